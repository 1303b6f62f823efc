import dataclasses
import json
import os

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nnxlm
from nnxlm.metrics import read_metrics
from nnxlm.objectives import NextToken

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(workdir, **changes):
    cfg = nnxlm.recipes.tiny()
    cfg.workdir = str(workdir)
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def test_twenty_steps_of_the_tiny_recipe_lower_the_loss(tmp_path):
    history = fdl.build(tiny(tmp_path)).fit()
    losses = [record["loss"] for record in history]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    evals = [record["eval_loss"] for record in history if "eval_loss" in record]
    assert len(evals) == 2 and evals[1] < evals[0]


def test_an_empty_eval_split_is_found_at_the_first_step(tmp_path, small_tokenizer):
    from nnxlm.data import TextFiles

    for i in range(3):
        (tmp_path / f"{i}.txt").write_text("def f(x):\n    return x\n" * 20)
    globs = [str(tmp_path / "*.txt")]
    with pytest.raises(nnxlm.UserError, match="'eval' split .* has no documents"):
        TextFiles(globs, split="eval", eval_fraction=0.01).documents()  # 3 files: none falls in 1 %
    cfg = tiny(tmp_path / "run", eval_every=5, train_data=fdl.Config(TextFiles, globs, eval_fraction=0.01))
    cfg.eval_data = fdl.Config(TextFiles, globs, split="eval", eval_fraction=0.01)
    cfg.model = nnxlm.recipes.models.llama_tiny(vocab_size=1000)
    (tmp_path / "run").mkdir()
    small_tokenizer.save(str(tmp_path / "run" / "tokenizer.model"))
    with pytest.raises(nnxlm.UserError, match="'eval' split .* has no documents: raise eval_fraction or add data"):
        fdl.build(cfg).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not a step trained
    cfg.eval_every, cfg.num_steps = 0, 2  # evaluation off: its data is never read
    assert len(fdl.build(cfg).fit()) == 2


def test_a_seq_len_past_the_models_context_is_said(tmp_path, capfd):
    cfg = tiny(tmp_path, seq_len=64)
    cfg.model.context_length = 32  # as a converted model's max_position_embeddings
    fdl.build(cfg).plan()
    assert "seq_len 64 is past the model's context of 32 tokens" in capfd.readouterr().err
    cfg.model.context_length = 64
    fdl.build(cfg).plan()
    assert "past the model's context" not in capfd.readouterr().err


def test_metrics_jsonl_has_the_documented_fields(tmp_path):
    fdl.build(tiny(tmp_path, num_steps=10)).fit()
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 11))
    for field in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tflops_per_s", "mfu"):
        assert all(np.isfinite(r[field]) for r in records), field
    assert all(0 < r["mfu"] <= 1 for r in records)
    assert "eval_loss" in records[9]
    assert os.listdir(tmp_path / "tensorboard")
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert nnxlm.recipes.serialization.from_json(recipe).num_steps == 10


def test_fit_resumes_from_the_latest_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    reference = fdl.build(tiny(tmp_path / "a")).fit()
    first_half = tiny(tmp_path / "b", num_steps=10)
    first_half.optimizer.decay_steps = 20  # the learning-rate schedule of the 20-step run
    fdl.build(first_half).fit()
    second_half = tiny(tmp_path / "b")  # same run directory, longer run
    second_half.optimizer.decay_steps = 20
    resumed = fdl.build(second_half)
    assert resumed.setup().step == 10
    later = resumed.fit()
    assert [r["step"] for r in later] == list(range(11, 21))
    assert [r["loss"] for r in later] == [r["loss"] for r in reference[10:]]
    assert all(0 < r["mfu"] <= 1 for r in read_metrics(str(tmp_path / "b")))  # a fresh start and a resume


def test_load_model_rebuilds_the_trained_model_from_its_run_directory(tmp_path):
    trainer = fdl.build(tiny(tmp_path, num_steps=10))
    trainer.fit()
    model = nnxlm.load_model(str(tmp_path))
    ids = jnp.array([[1, 5, 9, 4]], jnp.int32)
    logits = model(ids)
    assert logits.shape == (1, 4, 256) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, trainer.model(ids))


def test_a_checkpoint_written_by_a_scanned_model_loads_into_a_looped_one_and_back(tmp_path):
    scanned = fdl.build(tiny(tmp_path, num_steps=10))
    scanned.fit()
    looped_cfg = tiny(tmp_path, num_steps=10)
    looped_cfg.model.scan_layers = False
    looped = fdl.build(looped_cfg).setup()
    assert looped.step == 10
    ids = jnp.array([[3, 1, 4, 1, 5, 9]], jnp.int32)
    np.testing.assert_allclose(looped.model(ids), scanned.model(ids), atol=1e-5, rtol=1e-5)
    looped.num_steps = 12
    looped.fit()  # saves step 12 from the looped model
    rescanned = fdl.build(tiny(tmp_path, num_steps=12)).setup()
    assert rescanned.step == 12
    np.testing.assert_allclose(rescanned.model(ids), looped.model(ids), atol=1e-5, rtol=1e-5)


def test_tokenizer_vocabulary_larger_than_the_model_is_an_error(tmp_path):
    from nnxlm.data import PythonStdlib, SentencePieceTokenizer

    texts = [PythonStdlib().load(p) for p in PythonStdlib().documents()[:20]]
    SentencePieceTokenizer.train(texts, 600).save(str(tmp_path / "tok.model"))
    cfg = tiny(tmp_path, tokenizer_path=str(tmp_path / "tok.model"))
    cfg.train_data = fdl.Config(PythonStdlib)
    with pytest.raises(nnxlm.UserError, match="raise model.vocab_size"):
        fdl.build(cfg).setup()


def test_a_mixture_of_experts_model_trains_with_its_balance_loss(tmp_path):
    from nnxlm.modules.moe import MoE

    cfg = tiny(tmp_path, num_steps=6, eval_every=0)
    cfg.model.block.mlp = fdl.Partial(MoE, num_experts=4, num_experts_per_token=2, expert_hidden_dim=32)
    history = fdl.build(cfg).fit()
    balance = [r["moe_balance_loss"] for r in history]
    assert all(np.isfinite(balance)) and min(balance) > 0  # summed over the 4 layers
    assert history[-1]["loss"] < history[0]["loss"]


def test_accumulated_micro_batch_gradients_equal_the_large_batch_gradient(tmp_path):
    trainer = fdl.build(tiny(tmp_path, grad_accum_steps=4)).setup()
    batch = {k: jnp.asarray(v) for k, v in next(trainer.train_iterator).items()}
    # micro-batch 0 (rows 0 and 4) counts few tokens: a mean of micro-batch means would overweight it
    mask = batch["loss_mask"].at[0, 5:].set(0.0).at[4, 9:].set(0.0)
    batch = {**batch, "loss_mask": mask}
    model, key = trainer.model, jax.random.key(0)

    def gradients(steps, batch):
        trainer.grad_accum_steps = steps
        return jax.jit(lambda b: trainer._gradients(model, b, key))(batch)

    assert "scan" in str(jax.make_jaxpr(lambda b: trainer._gradients(model, b, key))(batch))
    accumulated, large = gradients(4, batch), gradients(1, batch)
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(large), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    micro = [{k: v[i::4] for k, v in batch.items()} for i in range(4)]
    mean_of_means = jax.tree.map(lambda *g: sum(g) / 4, *(gradients(1, m)[0] for m in micro))
    differences = [
        np.abs(a - b).max() for a, b in zip(jax.tree.leaves(mean_of_means), jax.tree.leaves(large[0]), strict=True)
    ]
    assert max(differences) > 1e-4  # the test would see a mean of means


def test_a_multi_token_prediction_model_adds_and_logs_its_loss(tmp_path):
    cfg = tiny(tmp_path, num_steps=3, eval_every=0)
    cfg.model.mtp_depth = 1
    trainer = fdl.build(cfg).setup()

    def weights():
        model = trainer.model
        return np.array(model.mtp.depths.projection.kernel[...]), np.array(model.layers.mlp.gate.kernel[...])

    before = weights()
    history = trainer.fit()
    assert all(np.isfinite(r["mtp_loss"]) and r["mtp_loss"] > 0 for r in history)
    # AdamW moves a parameter with a gradient by about the learning rate a step; without one, only
    # weight decay would move it, some 100x less: the prediction module learns from its loss
    moved = [np.abs(a - b).mean() for a, b in zip(weights(), before, strict=True)]
    assert moved[0] > 0.2 * moved[1], moved


def test_a_scanned_and_a_looped_model_train_to_the_same_losses(tmp_path):
    # Strong decay makes any parameter decayed in one layout and not the other show in the loss.
    def recipe(workdir, scan):
        cfg = tiny(workdir, num_steps=40, eval_every=0, checkpoint_every=0)
        cfg.model.scan_layers = scan
        cfg.optimizer.weight_decay = 1.0
        cfg.optimizer.learning_rate = 1e-2
        return cfg

    scanned = fdl.build(recipe(tmp_path / "scanned", True)).setup()
    scanned.save()  # step 0: the looped run starts from these very parameters
    scanned.checkpointer.wait()
    looped_cfg = recipe(tmp_path / "looped", False)
    looped_cfg.load_full_state_path = str(tmp_path / "scanned")
    looped = fdl.build(looped_cfg).fit()
    reference = scanned.fit()
    np.testing.assert_allclose([r["loss"] for r in looped], [r["loss"] for r in reference], rtol=2e-5)


def test_eval_loss_at_step_k_is_the_loss_of_the_model_after_step_k(tmp_path):
    # A checkpoint at every step makes each step finish before the next starts: the reference.
    every_step = fdl.build(tiny(tmp_path / "a", num_steps=7, eval_every=3, checkpoint_every=1)).fit()
    at_the_end = fdl.build(tiny(tmp_path / "b", num_steps=7, eval_every=3, checkpoint_every=0)).fit()
    evals = lambda history: {r["step"]: r["eval_loss"] for r in history if "eval_loss" in r}  # noqa: E731
    assert set(evals(at_the_end)) == {3, 6}
    assert evals(at_the_end) == evals(every_step)


@dataclasses.dataclass(frozen=True)
class PoisonedNextToken(NextToken):
    """Next-token loss made NaN for the batches whose token sum is divisible by `every`."""

    every: int = 7

    def terms(self, model, batch, key):
        terms = super().terms(model, batch, key)
        factor = jnp.where(jnp.sum(batch["inputs"]) % self.every == 0, jnp.nan, 1.0)  # NaN gradients too
        return terms._replace(loss=terms.loss * factor, sums={**terms.sums, "loss": terms.sums["loss"] * factor})


def _poisoned_steps(cfg, num_steps):
    trainer = fdl.build(cfg).setup()
    batches = [next(trainer.train_iterator) for _ in range(num_steps)]
    return [i + 1 for i, b in enumerate(batches) if np.sum(b["inputs"]) % cfg.objective.every == 0]


def test_a_non_finite_loss_stops_the_run_and_leaves_the_last_good_checkpoint_the_latest(tmp_path):
    cfg = tiny(tmp_path, num_steps=30, checkpoint_every=2, eval_every=0, keep_checkpoints=30)
    for every in (7, 11, 13, 17, 19, 23):  # a poisoned step late enough to follow a few checkpoints
        cfg.objective = fdl.Config(PoisonedNextToken, every=every)
        first = (_poisoned_steps(cfg, 30) or [0])[0]
        if first > 4:
            break
    with pytest.raises(nnxlm.UserError, match=f"step {first}: the loss is nan.*latest checkpoint is step"):
        fdl.build(cfg).fit()
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved == list(range(2, first, 2))
    assert all(r["step"] < first for r in read_metrics(str(tmp_path)))


def test_skipping_non_finite_steps_keeps_the_state_of_the_step_before(tmp_path):
    cfg = tiny(tmp_path, num_steps=30, checkpoint_every=0, eval_every=0, on_nonfinite="skip")
    cfg.objective = fdl.Config(PoisonedNextToken, every=7)
    poisoned = _poisoned_steps(cfg, 30)
    assert 1 < len(poisoned) < 10
    trainer = fdl.build(cfg)
    history = trainer.fit()
    assert [r["step"] for r in history if r["skipped"]] == poisoned
    assert all(np.isfinite(r["loss"]) for r in history if not r["skipped"])
    assert int(trainer.state["optimizer"]["step"][...]) == 30 - len(poisoned)  # the skipped did not count
    always = tiny(tmp_path / "always", checkpoint_every=0, eval_every=0, on_nonfinite="skip")
    always.objective = fdl.Config(PoisonedNextToken, every=1)
    with pytest.raises(nnxlm.UserError, match=r"step 10: .* \(10 steps in a row\)"):
        fdl.build(always).fit()


def test_parameters_that_are_not_finite_are_never_saved(tmp_path):
    trainer = fdl.build(tiny(tmp_path, num_steps=2)).setup()
    trainer.state["model"]["final_norm"]["scale"][...] = jnp.full_like(
        trainer.state["model"]["final_norm"]["scale"][...], jnp.inf
    )
    with pytest.raises(nnxlm.UserError, match="step 0: the parameters or optimizer state hold NaN or infinity"):
        trainer.save()
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def test_a_second_run_in_the_same_run_directory_is_refused_while_the_first_trains(tmp_path):
    """Two runs in one directory interleaved their checkpoints and metrics.jsonl; the lock is
    flock's, which even another open file of this process conflicts with, as another run's would."""
    from nnxlm.files import run_lock

    trainer = fdl.build(tiny(tmp_path, num_steps=2, eval_every=0))
    with run_lock(tmp_path):  # the first run, still training
        with pytest.raises(nnxlm.UserError, match=f"another nnxlm run is training in {tmp_path}"):
            trainer.fit()
        assert not (tmp_path / "metrics.jsonl").exists()  # refused before it wrote anything
    assert len(trainer.fit()) == 2  # once the first has ended
