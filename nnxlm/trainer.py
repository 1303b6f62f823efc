"""The Trainer: owns the mesh, the train state, the optimizer, the checkpointer and the loaders.

    trainer = fdl.build(nnxlm.recipes.tiny())
    trainer.fit()            # resumes from the run directory's latest checkpoint if there is one
    trainer.evaluate()       # mean held-out loss

What a step optimises and which batch fields it takes belong to the recipe's `objective`
(nnxlm.objectives: NextToken by default, SFT, ...); which parameters train, to `trainable` and
`freeze`. Construction only records the recipe; `setup()` (called by fit/evaluate) builds everything.
"""

import contextlib
import json
import math
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from nnxlm import metrics as metrics_lib
from nnxlm.checkpointing import (
    Checkpointer,
    abstract_with_shardings,
    checkpoint_name,
    find_checkpoint,
    saved_adapter_base,
    saved_paths,
)
from nnxlm.data import ShardedBatches
from nnxlm.errors import UserError
from nnxlm.files import run_lock, write_atomically
from nnxlm.modules.lora import adapted, lora_delta, lora_disabled
from nnxlm.modules.pipeline import PipelineSchedule, pipelining
from nnxlm.objectives import NextToken
from nnxlm.optim import AdamW
from nnxlm.preemption import StopRequests
from nnxlm.profiling import StepProfiler
from nnxlm.progress import Progress
from nnxlm.recipes.serialization import as_config, to_json
from nnxlm.resumption import check_same_recipe, checkpoint_damage, damaged, recipe_fields, set_aside_newer
from nnxlm.sharding import (
    activation_sharding,
    constrain,
    logical_to_spec,
    make_mesh,
    mesh_axes_of,
    state_shardings,
    unsplit_dimensions,
)
from nnxlm.starting_points import load_parameters, prepare_tokenizer, restore_full_state
from nnxlm.train_state import TrainState, trainable_count, trainable_filter

# A run with on_nonfinite="skip" stops when this many steps in a row were not finite.
MAX_SKIPPED_IN_A_ROW = 10


@jax.jit
def _all_finite(state) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class Trainer:
    """Trains `model` (a factory called with rngs=) on `train_data` (a data source) for `objective`.

    Args:
      model: factory of the model, called as model(rngs=nnx.Rngs(seed)).
      train_data, eval_data: data sources (nnxlm.data); eval_data None skips evaluation.
      objective: what a step optimises and the batches it takes (nnxlm.objectives): NextToken()
        (pretraining) by default, SFT(...) for supervised fine-tuning.
      optimizer: an nnxlm.optim.AdamW (hyperparameters only).
      trainable: which parameters train: "all", "lora" (the LoRA adapters of model.lora only), or a
        regular expression searched in each parameter's path ("layers/attention/q_proj/kernel").
        The others get no gradients and no optimizer state.
      freeze: a regular expression of parameter paths kept frozen on top of that (e.g. "embedder").
      load_parameters_path: a run directory, checkpoint or Hugging Face model directory whose
        parameters start the run (fresh optimizer, step 0; MaxText's load_parameters_path).
      load_full_state_path: a run directory or checkpoint whose whole train state (parameters,
        optimizer state, step) starts the run; the data order starts over.
        The run directory's own checkpoints take priority over both.
      name: the recipe's name; the run directory defaults to runs/<name>.
      workdir: run directory (checkpoints, metrics.jsonl, TensorBoard events, recipe.json).
      tokenizer_path: a SentencePiece model or tokenizer.json; None uses the run directory's, else
        the tokenizer of load_parameters_path / load_full_state_path, else (pretraining from scratch
        only) one trained on tokenizer_train_chars characters of the training data.
      seq_len, batch_size: tokens per row and rows per step (global, over all devices and hosts).
      data_shards: the global batch is this many shards' batches side by side, each process loading
        its own shards; None: one a process. Fixed, it makes the batches (and resumption) the same
        on any process count that divides it.
      grad_accum_steps: the batch is processed as this many micro-batches of batch_size /
        grad_accum_steps rows whose gradients are summed before one update (the same update).
      eval_every, checkpoint_every: in steps; 0 evaluates never / checkpoints only at the end.
      eval_at_start: a run that starts at step 0 first evaluates (logged as step 0) and prints its
        sample completions, so that a fine-tuning run shows where it began.
      mesh: mesh axis sizes (nnxlm.sharding.MESH_AXES), one may be -1; sharding_rules overrides
        entries of the logical-axis table.
      pipeline_microbatches, pipeline_schedule, pipeline_repeats: with a `pipeline` mesh axis of S
        stages, each step's rows (per gradient-accumulation step) are cut into this many
        micro-batches (None: S) that flow through the stages by "gpipe" or "circular" (each
        micro-batch going round the stages pipeline_repeats times); see nnxlm.modules.pipeline.
      sample_prompts: completed with sample_max_new_tokens tokens at the end of fit(), greedily or,
        with sample_temperature > 0, sampled (nucleus sampling when sample_top_p is set); the
        objective turns each into the model's input (SFT: a user turn in the chat template).
      peak_flops_per_device: for MFU; None uses the data sheet (accelerators) or measures (CPU).
      on_nonfinite: what a step whose loss or gradient norm is NaN or infinite does: "stop" (the run
        ends with a line naming the step; the last checkpoint stays the latest) or "skip" (the
        update is dropped and the step logged with skipped=1; 10 such steps in a row stop the run).
      allow_recipe_change: resume a run directory although the recipe differs from the one it was
        trained with (beyond num_steps and how the run reports, evaluates and checkpoints).
      allow_data_restart: resume on another data layout (data_shards) by starting the data order over.
      profile_steps: trace this many steps with the JAX profiler into <workdir>/profile/ (TensorBoard's
        profile plugin, ui.perfetto.dev; nnxlm.profiling); 0 traces none. profile_skip_steps: the
        steps skipped first, counted from where fit() starts (its first step compiles).

    fit(resume_step=N) resumes from checkpoint N instead of the newest (which may be damaged); the
    newer ones are moved to <workdir>/set_aside/, never deleted.
    """

    def __init__(
        self,
        *,
        model: Callable[..., nnx.Module],
        train_data: Any,
        eval_data: Any = None,
        objective: Any = NextToken(),
        optimizer: AdamW = AdamW(),
        trainable: str = "all",
        freeze: str | None = None,
        load_parameters_path: str | None = None,
        load_full_state_path: str | None = None,
        name: str = "run",
        workdir: str | None = None,
        tokenizer_path: str | None = None,
        tokenizer_train_chars: int = 5_000_000,
        seq_len: int = 256,
        batch_size: int = 8,
        grad_accum_steps: int = 1,
        data_shards: int | None = None,
        num_steps: int = 1000,
        seed: int = 0,
        eval_every: int = 100,
        eval_batches: int = 8,
        eval_at_start: bool = False,
        checkpoint_every: int = 100,
        keep_checkpoints: int = 3,
        log_every: int = 10,
        profile_steps: int = 0,
        profile_skip_steps: int = 1,
        mesh: dict[str, int] | None = None,
        sharding_rules: dict[str, Any] | None = None,
        pipeline_microbatches: int | None = None,
        pipeline_schedule: str = "gpipe",
        pipeline_repeats: int = 1,
        num_workers: int = 0,
        sample_prompts: Sequence[str] = (),
        sample_max_new_tokens: int = 64,
        sample_temperature: float = 0.0,
        sample_top_p: float | None = None,
        peak_flops_per_device: float | None = None,
        on_nonfinite: str = "stop",
        allow_recipe_change: bool = False,
        allow_data_restart: bool = False,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.recipe = fdl.Config(Trainer, **as_config(arguments))
        vars(self).update({k: v for k, v in arguments.items() if k != "model"})
        self.model_factory = model  # `self.model` is the trained model (a property below)
        self.workdir = workdir or f"runs/{name}"
        self.mesh_axes = dict(mesh or {"data": -1})
        self.tokenizer = None
        # the run whose own LoRA adapters were merged into this run's weights when it started (its
        # adapters then go on that merged model, not on the original base; see _start_reference)
        self.adapter_base: str | None = None
        self._starting_adapters: str | None = None  # a starting point holding adapters (load_parameters)
        self._ready = False

    # ----------------------------------------------------------------------------------------------
    # Construction: everything that allocates happens here, once.

    def plan(self) -> "Trainer":
        """The mesh, shardings, abstract state and compiled-step functions: nothing allocated or read.

        Enough to lower the train step for a memory analysis (nnxlm inspect); setup() does the rest.
        """
        if hasattr(self, "_train_step"):
            return self
        self.trainable_filter = trainable_filter(self.trainable, self.freeze)
        self.mesh = make_mesh(self.mesh_axes)
        self.batch_sharding = NamedSharding(self.mesh, logical_to_spec(("batch", "length"), self.sharding_rules))
        self._check_batch_divides()
        self.tx, self.schedule = self.optimizer.build(self.num_steps * self.updates_per_step)
        self.graphdef, abstract_state = nnx.split(nnx.eval_shape(self._create_state))
        abstract_model = nnx.merge(self.graphdef, abstract_state).model
        trainable_count(abstract_model, self.trainable, self.freeze)
        self.state_shardings = state_shardings(abstract_state, self.mesh, self.sharding_rules)
        for note in unsplit_dimensions(abstract_state["model"], self.mesh, self.sharding_rules):
            print(f"nnxlm: replicated where the mesh does not divide it: {note}", file=sys.stderr)
        self.abstract_state = abstract_with_shardings(abstract_state, self.state_shardings)
        self.model_vocab_size = abstract_model.vocab_size
        context = getattr(abstract_model, "context_length", None)
        if context is not None and self.seq_len > context and jax.process_index() == 0:
            print(
                f"nnxlm: seq_len {self.seq_len} is past the model's context of {context} tokens (model.context_length, "
                "a converted model's max_position_embeddings): it has never seen those positions; extend it "
                "deliberately (rope scaling) or lower seq_len",
                file=sys.stderr,
            )
        self.flops_per_token = metrics_lib.training_flops_per_token(abstract_model, self.seq_len, self.trainable_filter)
        self._abstract_state = abstract_state
        self._train_step = jax.jit(
            self._train_step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, NamedSharding(self.mesh, PartitionSpec())),
            donate_argnums=0,
        )
        self._eval_step = jax.jit(self._eval_step_fn, in_shardings=(self.state_shardings, self.batch_sharding))
        return self

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes and dtypes of one global batch, sharded as the train step takes it."""
        shape, sharding = (self.batch_size, self.seq_len), self.batch_sharding
        fields = self.objective.batch_fields
        return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, dtype in fields.items()}

    def setup(self, resume_step: int | None = None) -> "Trainer":
        """Builds everything and restores the run directory's newest checkpoint (or resume_step)."""
        if self._ready:
            return self
        if self.train_data is None:
            raise UserError(
                "the recipe has no train_data: point it at data, e.g. --recipe \"fiddler:text_files('data/*.txt')\" "
                "(or jsonl_files, sft)"
            )
        self.plan()
        directory = str(epath.Path(self.workdir) / "checkpoints")
        if resume_step is not None:
            if jax.process_index() == 0:
                set_aside_newer(self.workdir, directory, resume_step)
            multihost_utils.sync_global_devices("nnxlm: newer checkpoints set aside")
        self.checkpointer = Checkpointer(directory, self.keep_checkpoints)
        self.step = self.checkpointer.latest_step()
        if self.step is not None and (damage := checkpoint_damage(self.checkpointer.directory, self.step)):
            raise damaged(self.checkpointer.directory, self.step, damage, resuming=True)
        resuming = self.step is not None and self.checkpointer.has_train_state(self.step)
        if resuming:
            saved_recipe = self.checkpointer.saved_recipe(self.step)
            check_same_recipe(saved_recipe, to_json(self.recipe), self.workdir, self.allow_recipe_change)
            self._report_schedule_change(recipe_fields(saved_recipe).get("num_steps"))
        # a model that has weights already (any checkpoint, a starting point) never gets a new vocabulary
        pretrained = self.step is not None or self.load_parameters_path or self.load_full_state_path
        self.tokenizer = prepare_tokenizer(self, pretrained=bool(pretrained))
        self.train_iterator = self._dataset(self.train_data, shuffle=True, repeat=True).__iter__()
        if resuming:
            restored, data_position = self.checkpointer.restore(self.step, self.abstract_state)
            self._restore_data_position(data_position)
            self.adapter_base = saved_adapter_base(self.checkpointer.directory, self.step)
            self.state = self._from_pure_dict(restored)
            print(f"nnxlm: resumed {self.workdir} at step {self.step}", file=sys.stderr)
        elif self.step is not None:  # a model without optimizer state, e.g. converted from Hugging Face
            self.state = self._fresh_state()
            load_parameters(self, self.workdir)
        elif self.load_full_state_path:
            self.state, self.step = restore_full_state(self, self.load_full_state_path)
            source = find_checkpoint(self.load_full_state_path)
            self.adapter_base = saved_adapter_base(*source)
            if any("adapter" in p for p in saved_paths(*source)):
                self._starting_adapters = checkpoint_name(*source)
        else:
            self.state, self.step = self._fresh_state(), 0
            if self.load_parameters_path:
                load_parameters(self, self.load_parameters_path)
        if not resuming:
            self._start_reference()
        if hasattr(self.objective, "prepare"):  # e.g. DPO's cached reference log-probabilities
            self.objective.prepare(self)
        self._ready = True
        return self

    def _fresh_state(self) -> nnx.State:
        return jax.jit(lambda: nnx.state(self._create_state()), out_shardings=self.state_shardings)()

    def _from_pure_dict(self, pure: dict) -> nnx.State:
        state = jax.tree.map(lambda x: x, self._abstract_state)  # a fresh copy of the abstract state
        nnx.replace_by_pure_dict(state, pure)
        return state

    def _check_batch_divides(self) -> None:
        steps = self.grad_accum_steps
        if steps < 1 or self.batch_size % steps:
            raise UserError(f"batch_size {self.batch_size} must divide by grad_accum_steps {steps} (at least 1)")
        group = getattr(self.objective, "rows_per_example", 1)
        if (self.batch_size // steps) % group:
            raise UserError(
                f"a micro-batch of {self.batch_size // steps} rows (batch_size {self.batch_size} / grad_accum_steps "
                f"{steps}) splits the {group}-row examples of {type(self.objective).__name__}: make batch_size a "
                f"multiple of {group * steps}"
            )
        for size, axes, what in zip(
            (self.batch_size // steps, self.seq_len),
            self.batch_sharding.spec,
            ("rows a micro-batch", "seq_len"),
            strict=True,
        ):
            axes = mesh_axes_of(axes)
            shards = math.prod(self.mesh.shape[a] for a in axes)
            if size % shards:
                raise UserError(
                    f"{what} ({size}) must divide by the {shards} devices of mesh axes {' x '.join(axes)}: "
                    "change batch_size, seq_len, grad_accum_steps or the mesh"
                )
        # each process loads whole rows, so its devices together must hold whole rows of the batch
        covered = np.zeros(self.seq_len, bool)
        for index in self.batch_sharding.addressable_devices_indices_map((self.batch_size, self.seq_len)).values():
            covered[index[1]] = True
        if not covered.all():
            raise UserError(
                f"the mesh {dict(self.mesh.shape)} splits the sequence across processes, but each process loads "
                "whole rows: make the sequence axis no larger than the devices of one process"
            )

    def _create_state(self) -> TrainState:
        model = self.model_factory(rngs=nnx.Rngs(self.seed))
        return TrainState(model, self.tx, self.seed, self.trainable_filter, reference=self.reference_mode == "copy")

    @property
    def reference_mode(self) -> str | None:
        """How the objective's reference model is kept: "adapters" (the model with its LoRA adapters
        off: only adapters train, so that is the starting model), "copy" (a frozen copy in the train
        state) or None (the objective has no reference)."""
        if not getattr(self.objective, "uses_reference", False):
            return None
        return "adapters" if self.trainable == "lora" else "copy"

    @property
    def pipeline(self) -> PipelineSchedule:
        """How micro-batches flow through the stages of a `pipeline` mesh axis."""
        return PipelineSchedule(self.pipeline_microbatches, self.pipeline_schedule, self.pipeline_repeats)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates a step makes on its batch (GRPO's iterations; 1 for the others)."""
        return getattr(self.objective, "iterations", 1)

    @property
    def eval_name(self) -> str:
        """The logged name of evaluate()'s result: eval_loss, or the objective's (GRPO: eval_reward)."""
        return getattr(self.objective, "eval_name", "eval_loss")

    def _with_reference(self, train_state: TrainState, batch: dict) -> dict:
        """The batch plus what the objective needs from its reference model (see reference_mode)."""
        if self.reference_mode == "copy":
            return {**batch, **self.objective.reference_fields(train_state.reference, batch)}
        if self.reference_mode == "adapters":
            with lora_disabled(train_state.model) as base:
                return {**batch, **self.objective.reference_fields(base, batch)}
        return batch

    def _start_reference(self) -> None:
        """A fresh run's reference is the model it starts from: a frozen copy ("copy"), or ("adapters")
        the base with the starting point's own adapters (e.g. an SFT run's) folded into its kernels
        and the adapters started afresh (B = 0), so that switching them off gives that model."""
        if self.reference_mode == "copy":
            copy = jax.jit(lambda m: jax.tree.map(jnp.copy, m), out_shardings=self.state_shardings["reference"])
            self.state["reference"] = copy(self.state["model"])
        elif self.reference_mode == "adapters":
            self.state = jax.jit(self._fold_adapters, out_shardings=self.state_shardings, donate_argnums=0)(self.state)
            if self._starting_adapters:  # merged now: this run's adapters go on that run's merged export
                self.adapter_base = self._starting_adapters

    def _fold_adapters(self, state):
        train_state = nnx.merge(self.graphdef, state)
        for module in adapted(train_state.model):
            delta = lora_delta(module)
            module.kernel[...] = (module.kernel[...].astype(jnp.float32) + delta).astype(module.kernel.dtype)
            module.adapter.b[...] = jnp.zeros_like(module.adapter.b[...])
        return nnx.state(train_state)

    def _dataset(self, source, *, shuffle: bool, repeat: bool) -> ShardedBatches:
        """This process's data shards (see data_shards), batched side by side."""
        if self.num_workers > 0 and not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
        shards, processes = self.data_shards or jax.process_count(), jax.process_count()
        if shards % processes or self.batch_size % shards:
            raise UserError(
                f"data_shards {shards} must divide by the process count {processes} and divide "
                f"batch_size {self.batch_size}: change data_shards or batch_size"
            )
        first, count = jax.process_index() * (shards // processes), shards // processes
        settings = dict(seq_len=self.seq_len, batch_size=self.batch_size // shards, seed=self.seed)
        settings.update(shuffle=shuffle, repeat=repeat, num_workers=self.num_workers, shard_count=shards)
        return ShardedBatches(
            [
                self.objective.dataset(source, self.tokenizer, shard_index=i, **settings)
                for i in range(first, first + count)
            ]
        )

    def _data_position(self) -> dict:
        """{"shards": [iterator state of every data shard], "num_workers": the loader's worker
        processes (their count shapes the states)}, gathered from all processes."""
        local = self.train_iterator.get_state()
        if jax.process_count() == 1:
            return {"shards": local, "num_workers": self.num_workers}
        encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
        longest = int(np.max(multihost_utils.process_allgather(np.array([encoded.size]))))
        padded = np.zeros(longest, np.uint8)
        padded[: encoded.size] = encoded
        gathered = multihost_utils.process_allgather(padded)  # [processes, longest]
        texts = (bytes(row).rstrip(b"\0").decode() for row in np.asarray(gathered).reshape(-1, longest))
        return {"shards": [state for text in texts for state in json.loads(text)], "num_workers": self.num_workers}

    def _restore_data_position(self, position: dict | None) -> None:
        shards = self.data_shards or jax.process_count()
        saved = (position or {}).get("shards", [])
        workers = (position or {}).get("num_workers")  # None: written before it was kept
        what = None
        if len(saved) != shards:
            what = f"the checkpoint holds the data position of {len(saved)} data shards, this run reads {shards}"
            fix = f"set data_shards={len(saved)}"
        elif isinstance(workers, int) and workers != self.num_workers:
            what = f"the checkpoint holds the data position of num_workers={workers}, this run has {self.num_workers}"
            fix = f"set num_workers={workers}"
        else:
            count = len(self.train_iterator.iterators)
            first = jax.process_index() * count
            try:
                self.train_iterator.set_state(saved[first : first + count])
                return
            except (TypeError, KeyError, ValueError) as e:  # grain's state of another loader
                what = f"the checkpoint's data position does not fit this run's data loader ({type(e).__name__}: {e})"
                fix = "resume with the num_workers and data settings it was written with"
        if not self.allow_data_restart:
            raise UserError(
                f"{what}: {fix} to resume the data order exactly, or allow_data_restart=True to start it over"
            )
        print(f"nnxlm: {what}: the data order starts over (allow_data_restart)", file=sys.stderr)
        self.train_iterator = self._dataset(self.train_data, shuffle=True, repeat=True).__iter__()

    def _to_device(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The fields the step takes, as global arrays."""
        return {
            key: jax.make_array_from_process_local_data(self.batch_sharding, batch[key])
            for key in self.objective.batch_fields
        }

    # ----------------------------------------------------------------------------------------------
    # The compiled steps: pure functions of (state, batch), compiled once.

    def _gradients(self, model, batch, dropout_key):
        """(gradients of the trainable parameters, metrics) of the batch, over grad_accum_steps
        micro-batches.

        The objective's terms are sums over units (tokens that carry loss, ...), each micro-batch's
        divided by the whole batch's units: the summed micro-batch gradients are the gradient of
        the whole batch's mean loss (a mean of micro-batch means would weigh sparsely counted
        micro-batches more). metrics["units"] is the batch's count of units.
        """
        graphdef, params, rest = nnx.split(model, self.trainable_filter, ...)
        units = self.objective.units(batch)
        denominator = jnp.maximum(units, 1.0)
        steps = self.grad_accum_steps

        def objective(params, rest, micro, key):
            # fresh variables for the frozen state: nnx.scan over the layers takes only variables
            # made at the current trace level (the differentiated parameters are remade by jax)
            rest = jax.tree.map(lambda x: x, rest)
            terms = self.objective.terms(nnx.merge(graphdef, params, rest), micro, key)
            metrics = {name: x / denominator for name, x in terms.sums.items()}
            metrics.update({name: x / steps for name, x in terms.means.items()})
            return terms.loss / denominator + terms.penalty / steps, metrics

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        if steps == 1:
            (_, metrics), grads = grad_fn(params, rest, batch, dropout_key)
            return grads, {**metrics, "units": units}
        # examples i, i + steps, i + 2 steps, ... form micro-batch i, an example's rows together (DPO:
        # a chosen and a rejected row); each device keeps its own rows when its share of the batch
        # divides by steps x rows_per_example (else the micro-batches move rows between devices)
        group = getattr(self.objective, "rows_per_example", 1)
        micro_batches = jax.tree.map(
            lambda x: x.reshape(-1, steps, group, *x.shape[1:]).swapaxes(0, 1).reshape(steps, -1, *x.shape[1:]), batch
        )

        def accumulate(carry, inputs):
            micro, key = inputs
            micro = {name: constrain(x, ("batch", "length")[: x.ndim]) for name, x in micro.items()}
            (_, metrics), grads = grad_fn(params, rest, micro, key)
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(grad_fn, params, rest, first, dropout_key)
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (shapes[1], shapes[0][1]))
        keys = jax.random.split(dropout_key, steps)
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro_batches, keys))
        return grads, {**metrics, "units": units}

    def _train_step_fn(self, state, batch):
        before = jax.tree.map(lambda x: x, state)  # new variables: merge shares those of `state`
        train_state = nnx.merge(self.graphdef, state)
        dropout_key = train_state.next_key()
        learning_rate = self.schedule(train_state.optimizer.step[...])
        updates = self.updates_per_step
        with activation_sharding(self.mesh, self.sharding_rules), pipelining(self.pipeline):
            batch = self._with_reference(train_state, batch)
            if hasattr(self.objective, "policy_fields"):  # the sampling policy's view (GRPO's pi_old)
                batch = {**batch, **self.objective.policy_fields(train_state.model, batch)}
            metrics, finite = {}, jnp.ones((), bool)
            for update in range(updates):  # metrics: their means over the updates
                key = dropout_key if updates == 1 else jax.random.fold_in(dropout_key, update)
                grads, update_metrics = self._gradients(train_state.model, batch, key)
                train_state.optimizer.update(train_state.model, grads)
                grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
                finite &= jnp.isfinite(update_metrics["loss"]) & jnp.isfinite(grad_norm)
                update_metrics = {**update_metrics, "grad_norm": grad_norm}
                metrics = {k: metrics.get(k, 0.0) + v / updates for k, v in update_metrics.items()}
        new_state = nnx.state(train_state)
        if self.on_nonfinite == "skip":  # the state before the step, key and optimizer counter included
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, before)
        return new_state, {**metrics, "lr": learning_rate, "finite": finite}

    def _eval_step_fn(self, state, batch):
        train_state = nnx.merge(self.graphdef, state)
        with activation_sharding(self.mesh, self.sharding_rules), pipelining(self.pipeline):
            batch = self._with_reference(train_state, batch)
            terms = self.objective.terms(train_state.model, batch, None)
        return terms.sums["loss"], self.objective.units(batch)

    # ----------------------------------------------------------------------------------------------
    # The loops.

    def evaluate(self) -> float:
        """Mean loss per unit over the first eval_batches batches of eval_data (the same each time);
        an objective that samples its batches gives its own measure (GRPO: the mean reward)."""
        self.setup()
        if self.eval_data is None:
            raise UserError("this recipe has no eval_data: set eval_data to a data source to evaluate")
        total, count = 0.0, 0.0
        iterator = iter(self._dataset(self.eval_data, shuffle=False, repeat=True))
        if hasattr(self.objective, "evaluate"):  # an objective that samples (GRPO: mean reward)
            return self.objective.evaluate(self, iterator, self.eval_batches)
        for _ in range(self.eval_batches):
            batch = next(iterator)
            if hasattr(self.objective, "prepare_batch"):
                batch, _ = self.objective.prepare_batch(self, batch, self.step)
            batch_total, batch_count = self._eval_step(self.state, self._to_device(batch))
            total, count = total + float(batch_total), count + float(batch_count)
        if count == 0:
            raise UserError("no eval token carries loss: check eval_data, seq_len and the objective's loss_on")
        return total / count

    def _report_short_decay(self) -> None:
        """Warmup that ends at the schedule's last update or later (it is cut to end there) leaves
        the learning rate peaking at the last step, never decayed: said, not done silently."""
        warmup = getattr(self.optimizer, "warmup_steps", 0)
        decay = getattr(self.optimizer, "decay_steps", None) or self.num_steps * self.updates_per_step
        if warmup > 0 and warmup >= decay - 1 and jax.process_index() == 0:
            print(
                f"nnxlm: optimizer.warmup_steps={warmup} reaches the last of the {decay} updates the learning rate "
                f"decays over: it rises for {max(decay - 1, 0)} updates, peaks at the last and never decays; set "
                "optimizer.warmup_steps lower (a few percent of num_steps is usual)",
                file=sys.stderr,
            )

    def _report_schedule_change(self, saved_num_steps) -> None:
        """A resumed run whose num_steps changed while its learning rate decays over num_steps
        follows another schedule from here on: said, with the way to keep the old one."""
        if not isinstance(saved_num_steps, int) or saved_num_steps == self.num_steps:
            return
        if getattr(self.optimizer, "decay_steps", None) or not hasattr(self.optimizer, "schedule"):
            return
        if jax.process_index() != 0:
            return
        step = self.step * self.updates_per_step
        was = float(self.optimizer.schedule(saved_num_steps * self.updates_per_step)(step))
        now = float(self.schedule(step))
        if not math.isclose(was, now, rel_tol=1e-6):
            print(
                f"nnxlm: num_steps changed from {saved_num_steps} to {self.num_steps} and the learning rate "
                f"decays over num_steps: at step {self.step} it is {now:.3g} instead of {was:.3g}; "
                f"set optimizer.decay_steps={saved_num_steps} to keep the saved run's schedule",
                file=sys.stderr,
            )

    def fit(self, resume_step: int | None = None) -> list[dict]:
        """Trains to num_steps, checkpointing and evaluating as the recipe says; returns the metrics.

        SIGTERM or Ctrl-C ends the run after the current step with a checkpoint (self.stopped_by
        names the signal); a second one exits at once (nnxlm.preemption). A second run in the same
        run directory is refused while this one trains (nnxlm.files.run_lock).
        """
        with run_lock(self.workdir) if jax.process_index() == 0 else contextlib.nullcontext():
            return self._fit(resume_step)

    def _fit(self, resume_step: int | None) -> list[dict]:
        self.setup(resume_step)
        main = jax.process_index() == 0  # the process that writes files and prints progress
        if main:
            write_atomically(epath.Path(self.workdir) / "recipe.json", json.dumps(to_json(self.recipe), indent=1))
        evaluates = self.eval_data is not None and (self.eval_every or self.eval_at_start)
        if main and evaluates and self.step == 0:  # (eval_every=0: its eval data is never read)
            baseline = self.objective.baseline(self.eval_data, self.tokenizer)
            if baseline:
                print(f"nnxlm: {baseline}")
        writer = metrics_lib.MetricsWriter(self.workdir) if main else None
        peak = metrics_lib.PeakFlops(self.peak_flops_per_device, self.mesh.size)
        tokens_per_step = self.batch_size * self.seq_len
        history, pending, self.stopped_by, skipped_in_a_row = [], None, None, 0
        progress = Progress(self.num_steps, self.step, enabled=main)
        profiler = StepProfiler(self.workdir, self.step, self.profile_skip_steps, self.profile_steps, enabled=main)
        if self.eval_at_start and self.step == 0 and self.eval_data is not None:
            self._report_start(writer, history, progress)
        clock = metrics_lib.StepClock()

        fresh = self.step == 0

        def finish(step, step_metrics, counts):
            nonlocal skipped_in_a_row
            record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}  # waits for that step
            step_time = clock.step_time(step)
            if fresh and not history:  # after the first step: a run that stops at bad input says only that
                self._report_short_decay()
            if record.pop("units") == 0:
                raise UserError(
                    f"step {step}: no token of the batch carries loss (every row is masked): check the data, "
                    "seq_len and the objective's loss_on"
                )
            skipped_in_a_row = 0 if record.pop("finite") else self._nonfinite(step, record, skipped_in_a_row)
            tokens_per_s = tokens_per_step / step_time
            record.update(
                step_time_s=step_time,
                tokens_per_s=tokens_per_s,
                tflops_per_s=self.flops_per_token * tokens_per_s / 1e12,
                mfu=peak.utilization(self.flops_per_token * tokens_per_s),
                **counts,
            )
            if self.on_nonfinite == "skip":
                record["skipped"] = float(skipped_in_a_row > 0)
            if hasattr(self.objective, "watch"):  # an objective's own guard (DPO: a loss stuck at ln 2)
                self.objective.watch(step, record)
            if self._evaluates_at(step):
                record[self.eval_name] = self.evaluate()
                clock.restart()  # evaluation time is not step time
            if writer:
                writer.write(step, record)
            history.append({"step": step, **record})
            progress.update(step, record, log=step % self.log_every == 0 or self.eval_name in record)

        try:
            with StopRequests() as stop:
                while self.step < self.num_steps:
                    if pending:
                        clock.look(pending[:2])
                    with profiler.step(self.step + 1):  # the batch and the dispatch, as MaxText marks a step
                        host_batch, sampled = next(self.train_iterator), {}
                        evaluates = self.eval_data is not None and self.eval_every and self.num_steps >= self.eval_every
                        if not history and pending is None and evaluates:
                            # with the first batch (whose bad examples are said first): an empty eval
                            # split is said now, not after training up to the first evaluation
                            self.eval_data.documents()
                        if hasattr(self.objective, "prepare_batch"):  # GRPO samples completions here
                            host_batch, sampled = self.objective.prepare_batch(self, host_batch, self.step)
                        fields = self.objective.batch_fields
                        counts = {k: int(np.sum(v)) for k, v in host_batch.items() if k not in fields}
                        counts.update(sampled)
                        self.state, step_metrics = self._train_step(self.state, self._to_device(host_batch))
                    self.step += 1
                    clock.look(*([pending[:2]] if pending else []), (self.step, step_metrics))
                    if pending:  # fetch the previous step's metrics while this one runs
                        finish(*pending)
                    pending = (self.step, step_metrics, counts)
                    stopping = stop.signal  # read once: a signal may arrive at any moment
                    saving = self.step == self.num_steps or stopping is not None
                    saving = saving or bool(self.checkpoint_every and self.step % self.checkpoint_every == 0)
                    trace_ends = profiler.ends_at(self.step)
                    if saving or self._evaluates_at(self.step) or trace_ends:
                        # before the next step changes the parameters that evaluation and saving see
                        finish(*pending)  # (and time the step: saving is not step time)
                        pending = None
                    if trace_ends:  # now that its last step is done; writing the trace is not step time
                        profiler.stop()
                        clock.restart()
                    if saving:
                        self.save()
                        clock.restart()
                    if stopping is not None:
                        self.stopped_by = signal.Signals(stopping).name
                        break
                if pending:
                    finish(*pending)
                self.checkpointer.wait()  # a signal now still lets the last checkpoint complete
        finally:
            progress.close()
            profiler.close(self.step)
            if writer:
                writer.close()
            self.checkpointer.wait()
        if self.stopped_by:
            print(
                f"nnxlm: stopped by {self.stopped_by} at step {self.step}; the checkpoint of step {self.step} is "
                "written: run the same command to resume",
                file=sys.stderr,
            )
        else:
            self._print_samples()
        return history

    def _evaluates_at(self, step: int) -> bool:
        return self.eval_data is not None and bool(self.eval_every) and step % self.eval_every == 0

    def _nonfinite(self, step: int, record: dict, skipped_in_a_row: int) -> int:
        """Handles a step whose loss or gradient norm is not finite (see on_nonfinite); returns how
        many steps in a row have now been skipped."""
        what = f"step {step}: the loss is {record['loss']:g} and the gradient norm {record['grad_norm']:g}"
        good = self.checkpointer.latest_step()
        if self.on_nonfinite != "skip" or skipped_in_a_row + 1 >= MAX_SKIPPED_IN_A_ROW:
            in_a_row = f" ({MAX_SKIPPED_IN_A_ROW} steps in a row)" if self.on_nonfinite == "skip" else ""
            raise UserError(
                f"{what}{in_a_row}: training stopped, nothing was saved after it and the latest checkpoint is "
                f"{'step ' + str(good) if good is not None else 'none'}; lower optimizer.learning_rate, check the "
                "data, or set on_nonfinite='skip' to drop such updates"
            )
        print(f"nnxlm: {what}: the update is skipped (on_nonfinite='skip')", file=sys.stderr)
        return skipped_in_a_row + 1

    def _report_start(self, writer, history: list, progress: Progress) -> None:
        """The eval loss and sample completions of the model before any step (step 0)."""
        record = {self.eval_name: self.evaluate()}
        if writer:
            writer.write(0, record)
        history.append({"step": 0, **record})
        if progress.enabled:
            progress.bar.console.print(f"step      0  eval {record[self.eval_name]:.3f} (before training)")
        self._print_samples("before training: ")

    def _print_samples(self, heading: str = "") -> None:
        for prompt, completion in zip(self.sample_prompts, self.sample(self.sample_prompts), strict=False):
            print(f"--- {heading}{prompt!r}\n{self.objective.sample_text(prompt, completion)}\n")

    def save(self) -> None:
        """Checkpoints the current state and data position (asynchronously); UserError, and nothing
        written, when the state holds NaN or infinity."""
        if not bool(_all_finite(self.state)):
            good = self.checkpointer.latest_step()
            raise UserError(
                f"step {self.step}: the parameters or optimizer state hold NaN or infinity, so they are not saved "
                f"(the latest checkpoint stays {'step ' + str(good) if good is not None else 'none'}): lower "
                "optimizer.learning_rate or check the data"
            )
        state = nnx.to_pure_dict(self.state)
        notes = {"adapter_base": self.adapter_base} if self.adapter_base else None
        self.checkpointer.save(self.step, state, to_json(self.recipe), self._data_position(), notes)

    @property
    def model(self) -> nnx.Module:
        """The model with the current parameters (a view of the train state)."""
        return nnx.merge(self.graphdef, self.state).model

    def sample(self, prompts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Completions of text prompts by the current model, sampled as the recipe says; the
        objective makes each prompt into the model's input (SFT: a user turn of the chat template)."""
        from nnxlm.generation import complete

        if not prompts or self.tokenizer is None:
            return []
        if jax.process_count() > 1:
            print("nnxlm: sample completions are printed by single-process runs only", file=sys.stderr)
            return []
        return complete(
            self.model,
            self.tokenizer,
            [self.objective.prompt_ids(self.tokenizer, prompt) for prompt in prompts],
            max_new_tokens=max_new_tokens or self.sample_max_new_tokens,
            temperature=self.sample_temperature,
            top_p=self.sample_top_p,
            seed=self.seed,
        )
