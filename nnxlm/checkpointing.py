"""One state, one checkpoint: train state + recipe JSON + data-iterator position, saved by orbax.

On disk each step holds: `state` (model, optimizer, step and RNG key, as a pure dict; or the
model alone for a converted checkpoint), `info` (which of the two, and a checksum of each array:
nnxlm.checksums), `recipe` (the recipe JSON) and `data` (the data position of every data shard,
as JSON: {"shards": [state, ...]}).

The stored layout (`stored_layout`) differs from the model's pure dict in two ways:
- Layer parameters are always stored stacked, with a leading layers axis, so a checkpoint written
  by a scanned model loads into a looped one and back; so is each of a Transformer's layer stacks
  (LAYER_STACKS).
- A projection module's kernel is stored at the projection's own path (`attention/q_proj`, not
  `attention/q_proj/kernel`), as before projections were modules: checkpoints of both kinds load,
  and the Hugging Face conversion tables name the same paths. A projection with a LoRA adapter
  is stored as its module: `q_proj/kernel` beside `q_proj/adapter/{a, b}`.
"""

import ast
import contextlib
import ctypes
import json
import sys

import fiddle as fdl
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nnxlm.checksums import checksums, mismatch, path_name, saved_dtype
from nnxlm.errors import UserError
from nnxlm.files import absolute
from nnxlm.recipes.serialization import from_json
from nnxlm.resumption import checkpoint_damage, checkpoint_steps, damaged

# The Transformer's layer stacks: `layers` and, where the first layers differ, `first_layers`.
LAYER_STACKS = ("layers", "first_layers")


def _is_layer_list(key, value) -> bool:
    return key in LAYER_STACKS and isinstance(value, dict) and bool(value) and all(isinstance(k, int) for k in value)


def _stack(leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
    return jnp.stack(leaves)


def _is_bare_kernel(node) -> bool:
    """A projection without adapter in a pure dict: {"kernel": array}."""
    return isinstance(node, dict) and len(node) == 1 and "kernel" in node


def collapse_kernels(tree):
    """Replaces every bare projection {"kernel": k} by k (see the module docstring)."""
    if _is_bare_kernel(tree):
        return tree["kernel"]
    if not isinstance(tree, dict):
        return tree
    return {key: collapse_kernels(value) for key, value in tree.items()}


def stored_layout(tree):
    """A model or train state pure dict in the stored layout: every {"layers": {0: t0, 1: t1, ...}}
    replaced by {"layers": stacked(t0, t1, ...)} (and so for each name of LAYER_STACKS), and bare
    projections by their kernels."""
    return collapse_kernels(_stack_layers(tree))


def _stack_layers(tree):
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if _is_layer_list(key, value):
            out[key] = jax.tree.map(lambda *leaves: _stack(leaves), *(value[i] for i in range(len(value))))
        else:
            out[key] = _stack_layers(value)
    return out


def from_stored_layout(tree, like):
    """Inverse of stored_layout, onto the layout of `like` (a pure dict of the target model or
    state): its layer lists and its projection modules."""
    if not isinstance(like, dict):
        return tree
    if _is_bare_kernel(like) and not isinstance(tree, dict):
        return {"kernel": tree}
    out = {}
    for key, value in like.items():
        if _is_layer_list(key, value):
            stacked = from_stored_layout(tree[key], value[0])
            out[key] = {
                i: jax.tree.map(
                    lambda stacked, target, i=i: jax.device_put(stacked[i], target.sharding), stacked, value[i]
                )
                for i in range(len(value))
            }
        else:
            out[key] = from_stored_layout(tree[key], value)
    return out


def abstract_with_shardings(abstract_state: nnx.State, shardings) -> dict:
    """Pure dict of ShapeDtypeStructs that carry the target shardings (orbax restores onto them)."""

    def leaf(variable, sharding):
        return jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=sharding)

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return nnx.to_pure_dict(
        jax.tree.map(lambda v, s: v.replace(leaf(v, s)), abstract_state, shardings, is_leaf=is_variable)
    )


# Checkpoints past `keep` are renamed into this subdirectory (atomically) before they are deleted:
# a process killed while deleting one leaves no half-deleted step directory beside the good ones.
DELETED = "deleted"


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run in `directory`; saves asynchronously."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = str(absolute(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left
            todelete_subdir=DELETED,
            # the step's directory made before save() returns: made in the background, a failure
            # (a full disk, no permission) left orbax's writer threads waiting 300 s for it, and a
            # run that had reported the failure in one line could not exit for five minutes
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        # orbax removes a killed save's temporary directories in a thread: wait for it, so that a run
        # that fails right after (a bad setting) does not exit under it with a traceback after its
        # one-line error (seen: "cannot schedule new futures after interpreter shutdown")
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._writing = None  # the step being written in the background, if any
        self._purge_deleted()

    def _purge_deleted(self) -> None:
        deleted = epath.Path(self.directory) / DELETED
        if jax.process_index() == 0 and deleted.exists():
            try:
                deleted.rmtree()
            except OSError:  # what is left is removed at the next save
                pass

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, recipe: dict, data_state: dict | None = None, notes: dict | None = None):
        """Starts writing `state` (pure dict), the recipe and the data position (a JSON snapshot, taken
        before the call: the iterators move on while orbax writes) and `notes` (JSON fields kept in
        the step's info, see saved_info); all processes call it. A failed write (disk full, no
        permission) is a UserError here or at the next save or wait()."""
        items = _items(ocp.args.StandardSave, state, recipe, data_state, notes)
        self.wait()  # for the step written before (orbax's save waits too): a failure there is its own
        with self._reporting_failure(step):
            # force: whatever orbax's save policies say, a step nnxlm saves is saved
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not saved:
            raise UserError(f"checkpoint step {step} was not written to {self.directory}: it exists already")
        self._writing = step

    @contextlib.contextmanager
    def _reporting_failure(self, step: int):
        try:
            yield
        except Exception as e:  # orbax re-raises a background write's error, of any type, here
            failed = self._writing if self._writing is not None else step
            self._writing = None
            intact = [s for s in checkpoint_steps(self.directory) if s != failed]
            raise UserError(
                f"checkpoint step {failed} could not be written to {self.directory} ({type(e).__name__}: "
                f"{_first_line(e)}); the earlier checkpoints are intact (newest: "
                f"{intact[-1] if intact else 'none'}): free disk space or fix permissions, then run again to resume"
            ) from e

    def saved_recipe(self, step: int) -> dict:
        """The recipe JSON saved with checkpoint `step` (read as data: nothing is imported)."""
        return json.loads((epath.Path(self.directory) / str(step) / "recipe" / "metadata").read_text())

    def restore(self, step: int, target: dict) -> tuple[dict, dict | None]:
        """(state restored onto `target`, a pure dict of ShapeDtypeStructs; the saved data position)."""
        saved = saved_checksums(self.directory, step)
        stored = stored_layout(target)
        items = dict(state=ocp.args.StandardRestore(as_saved(stored, saved)))
        if (epath.Path(self.directory) / str(step) / "data").is_dir():
            items["data"] = ocp.args.JsonRestore()
        try:
            _quiet_failed_reads()
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and tensorstore raise many types for damaged files
            raise damaged(self.directory, step, _read_failed(e, "restored"), resuming=True) from e
        if reason := changed_on_disk(restored["state"], saved):
            raise damaged(self.directory, step, reason, resuming=True)
        return from_stored_layout(cast_to(restored["state"], stored), target), restored.get("data")

    def has_train_state(self, step: int) -> bool:
        """False for a checkpoint that holds only a model (no optimizer state), e.g. a converted one."""
        info = epath.Path(self.directory) / str(step) / "info" / "metadata"  # JsonSave's file
        return json.loads(info.read_text())["train_state"]

    def restore_model(self, step: int, target: dict) -> dict:
        """Only the model's parameters, onto `target` (pure dict of ShapeDtypeStructs)."""
        return restore_model(self.directory, step, target)

    def wait(self) -> None:
        with self._reporting_failure(self._writing if self._writing is not None else -1):
            self.manager.wait_until_finished()
        self._writing = None
        self._purge_deleted()

    def close(self) -> None:
        self.manager.close()


def _items(save_args, state: dict, recipe: dict, data_state: dict | None, notes: dict | None = None) -> dict:
    """The items of one checkpoint step: the state in its stored layout saved by `save_args` (an
    orbax args class), its arrays' checksums in info (orbax keeps none), with `notes`."""
    stored = stored_layout(state)
    info = {
        **(notes or {}),
        "train_state": "optimizer" in state,  # False: a model alone
        "checksums": checksums(stored),
    }
    items = dict(state=save_args(stored), recipe=ocp.args.JsonSave(recipe), info=ocp.args.JsonSave(info))
    if data_state is not None:
        items["data"] = ocp.args.JsonSave(data_state)
    return items


class _InPlaceNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Writes numpy arrays as they are (no defensive copy) and one after another (tensorstore's
    write buffers hold one array's worth, not the whole tree's)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def _background_serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info, arg in zip(values, infos, args, strict=True):
            await super()._background_serialize([value], [info], [arg])
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Hands memory that is free but still held by the C allocator back to the system. Tensorstore's
    threads each keep the buffers of the array they wrote in their own glibc arena: without this,
    writing arrays one after another still leaves several arrays' worth resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def save_model_checkpoint(directory: str, step: int, model: dict, recipe: dict) -> None:
    """Writes a checkpoint of a model alone (no optimizer state) whose parameters are numpy arrays,
    e.g. a converted one, and waits for it: memory stays near the model plus one array, where
    Checkpointer.save (built to return quickly during training) copies the whole state first and
    has tensorstore buffer every array at once. The checkpoint loads as Checkpointer's do."""
    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        *((kind, handlers.get_type_handler(kind)) for kind in handlers.supported_types()),
        (np.ndarray, _InPlaceNumpyHandler()),
    )
    manager = ocp.CheckpointManager(
        str(absolute(directory)),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_handlers=dict(
            state=ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
            recipe=ocp.JsonCheckpointHandler(),
            info=ocp.JsonCheckpointHandler(),
        ),
    )
    state = {"model": model}
    try:
        manager.save(step, args=ocp.args.Composite(**_items(ocp.args.PyTreeSave, state, recipe, None)))
        manager.wait_until_finished()
    finally:
        manager.close()


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0].split(" See full TensorStore details")[0][:200] if text else ""


def _read_failed(error: Exception, verb: str = "read") -> str:
    """The reason a checkpoint read failed, for its one-line error."""
    return f"it cannot be {verb}: {type(error).__name__}: {_first_line(error)}"


def _quiet_failed_reads() -> None:
    """Orbax reads a checkpoint's arrays concurrently and gives up at the first that fails; the
    others still pending then fail on its closed event loop, and Python would print each of them
    ("Event loop is closed", "Exception ignored in: <coroutine _read_array_index_and_device_put>")
    around the one-line error that reports the failure. Those reports are dropped (installed once,
    before reads); any other goes to the hook there was."""
    previous = sys.unraisablehook
    if getattr(previous, "__name__", "") == "quiet_failed_reads":
        return

    def quiet_failed_reads(unraisable) -> None:
        where = getattr(unraisable.object, "__qualname__", None) or repr(unraisable.object)
        if "_read_array_index_and_device_put" in where or (
            isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        ):
            return
        previous(unraisable)

    sys.unraisablehook = quiet_failed_reads


def find_checkpoint(path) -> tuple[str, int]:
    """(checkpoints directory, step) for a run directory, a checkpoints directory or a step directory."""
    path = absolute(path)
    candidates = [(path / "checkpoints", None), (path, None)]
    if path.name.isdigit():
        candidates.append((path.parent, int(path.name)))
    for directory, step in candidates:
        directory = str(directory)
        if not epath.Path(directory).is_dir():
            continue
        steps = checkpoint_steps(directory)
        if step is None and steps:
            step = steps[-1]
        if step is not None and step in steps:
            if reason := checkpoint_damage(directory, step):
                raise damaged(directory, step, reason, resuming=False)
            return directory, step
    raise UserError(
        f"no checkpoint found at {path}: give a run directory (with checkpoints/) or a checkpoint step directory"
    )


def load_recipe(path) -> fdl.Config:
    """The recipe saved beside a checkpoint, as a fiddle config, its values checked."""
    from nnxlm.recipes.validation import check_recipe  # validation imports the Trainer

    directory, step = find_checkpoint(path)
    recipe_file = epath.Path(directory) / str(step) / "recipe" / "metadata"
    try:
        recipe = from_json(recipe_file.read_text())
    except UserError:
        raise
    except Exception as e:  # fiddle raises KeyError, TypeError, ... for JSON that is not a recipe
        raise UserError(
            f"checkpoint {directory}/{step} has no readable recipe ({e}); it was not written by nnxlm"
        ) from e
    check_recipe(recipe)
    return recipe


def restore_model(directory: str, step: int, target: dict) -> dict:
    """Reads only the `model` subtree of a checkpoint's state onto `target` (a pure dict of
    ShapeDtypeStructs; no optimizer state is read), with a manager of its own (a manager keeps one
    handler per item)."""
    saved = saved_checksums(directory, step)
    wanted = {"model": stored_layout(target)}
    item = as_saved(wanted, saved)
    manager = ocp.CheckpointManager(directory)
    try:
        _quiet_failed_reads()
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
                )
            ),
        )
    except Exception as e:
        raise damaged(directory, step, _read_failed(e), resuming=False) from e
    finally:
        manager.close()
    if reason := changed_on_disk(restored["state"], saved):
        raise damaged(directory, step, reason, resuming=False)
    return from_stored_layout(cast_to(restored["state"], wanted), {"model": target})["model"]


def saved_checksums(directory: str, step: int) -> dict[str, str] | None:
    """The checksums saved with checkpoint `step` (None: written before they were kept); checked
    as data by resumption.checkpoint_damage before any read."""
    return saved_info(directory, step).get("checksums")


def saved_adapter_base(directory: str, step: int) -> str | None:
    """The adapter_base noted in a checkpoint (see Trainer.adapter_base; untrusted JSON: a string
    or nothing)."""
    base = saved_info(directory, step).get("adapter_base")
    return base if isinstance(base, str) else None


def checkpoint_name(directory: str, step: int) -> str:
    """A checkpoint step's absolute path: what names the exact weights, wherever the command runs."""
    return str(absolute(directory) / str(step))


def saved_info(directory: str, step: int) -> dict:
    """The info saved with checkpoint `step` (untrusted JSON, a table; {} when it is not one):
    train_state, checksums, and the notes of Checkpointer.save, e.g. adapter_base (see
    Trainer.adapter_base)."""
    info = json.loads((epath.Path(directory) / str(step) / "info" / "metadata").read_text())
    return info if isinstance(info, dict) else {}


def as_saved(target, saved: dict[str, str] | None):
    """`target` (a stored-layout tree of ShapeDtypeStructs) with each array's dtype as it was
    saved: read as saved, its values can be compared with their checksums before they are cast
    to the dtype asked for (cast_to), e.g. a float32 checkpoint fine-tuned in bfloat16."""

    def leaf(path, x):
        entry = (saved or {}).get(path_name(path))
        if entry is None or not isinstance(x, jax.ShapeDtypeStruct) or str(x.dtype) == saved_dtype(entry):
            return x
        return jax.ShapeDtypeStruct(x.shape, jnp.dtype(saved_dtype(entry)), sharding=x.sharding)

    return jax.tree_util.tree_map_with_path(leaf, target)


def cast_to(restored, target):
    """Each restored array in the dtype of `target`'s (as_saved's inverse)."""

    def cast(x, t):
        if x.dtype == t.dtype:
            return x
        sharding = getattr(t, "sharding", None)
        return x.astype(t.dtype) if sharding is None else jax.device_put(x.astype(t.dtype), sharding)

    return jax.tree.map(cast, restored, target)


def changed_on_disk(restored: dict, saved: dict[str, str] | None) -> str | None:
    """Why arrays read from a checkpoint (its state's stored layout, or part of it, read as saved)
    are not the ones saved, or None: bytes changed on disk often decode without error into other
    numbers. Compared against the checksums saved with them; a checkpoint written before checksums
    were kept is checked for NaN and infinity instead, which a run never saves."""
    if saved:
        bad = mismatch(restored, saved)
        return None if bad is None else f"{bad} does not match the checksum saved with it"
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(leaf))):
            return f"{path_name(path)} holds NaN or infinite values"
    return None


def _abstract_model(directory: str, step: int) -> nnx.Module:
    """The model of a checkpoint's recipe, shapes only (nothing allocated)."""
    factory = fdl.build(load_recipe(epath.Path(directory) / str(step)).model)
    return nnx.eval_shape(lambda: factory(rngs=nnx.Rngs(0)))


def load_model(path, mesh=None, quantize=None) -> nnx.Module:
    """The NNX model of a run directory or checkpoint, rebuilt from the recipe saved with it: on
    one device, or sharded over `mesh` by the sharding rules (e.g. tensor parallel for serving).

    quantize: int8 weights and / or KV cache made as the model loads: "int8" (int8 weights with
    the default settings), a dict of nnxlm.modules.quantization.Quantization fields
    ({"weights": None, "kv": "int8"}) or a Quantization. A run written by `nnxlm quantize` is
    quantized already and loads as it is."""
    from nnxlm.sharding import make_mesh, state_shardings

    directory, step = find_checkpoint(path)
    graphdef, abstract_state = nnx.split(_abstract_model(directory, step))
    mesh = make_mesh({"data": -1}, devices=jax.devices()[:1]) if mesh is None else mesh
    target = abstract_with_shardings(abstract_state, state_shardings(abstract_state, mesh))
    nnx.replace_by_pure_dict(abstract_state, restore_model(directory, step, target))
    model = nnx.merge(graphdef, abstract_state)
    if quantize is not None:
        from nnxlm.quantize import as_quantization

        as_quantization(quantize).apply(model)
        graphdef, state = nnx.split(model)  # int8 kernels and scales placed by the sharding rules
        is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        place = lambda v, s: v.replace(jax.device_put(v[...], s))  # noqa: E731
        model = nnx.merge(graphdef, jax.tree.map(place, state, state_shardings(state, mesh), is_leaf=is_variable))
    return model


class ModelReader:
    """The model of a run directory or checkpoint, one parameter at a time and without building it:
    `model` is the abstract model (shapes only) of the saved recipe and read(path) one parameter
    as a numpy array, path being its place in the model's pure dict with layer stacks stacked
    (stored_layout). Memory holds only the arrays the caller keeps. Close it when done."""

    def __init__(self, path):
        self.directory, self.step = find_checkpoint(path)
        self.model = _abstract_model(self.directory, self.step)
        self._abstract = stored_layout(nnx.to_pure_dict(nnx.state(self.model)))
        self._manager = ocp.CheckpointManager(self.directory)
        self.info = saved_info(self.directory, self.step)  # read once, not at every parameter
        self._saved = self.info.get("checksums")

    def read(self, path: tuple) -> np.ndarray:
        leaf = self._abstract
        for key in path:
            leaf = leaf[key]
        item = leaf
        for key in reversed(("model", *path)):  # the state's tree with that one leaf
            item = {key: item}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        args = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
        try:
            _quiet_failed_reads()
            restored = self._manager.restore(self.step, args=ocp.args.Composite(state=args))["state"]
        except Exception as e:
            raise damaged(self.directory, self.step, _read_failed(e), resuming=False) from e
        if reason := changed_on_disk(restored, self._saved):
            raise damaged(self.directory, self.step, reason, resuming=False)
        for key in ("model", *path):
            restored = restored[key]
        return restored

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def saved_paths(directory: str, step: int) -> list[str]:
    """The paths ("model/layers/attention/q_proj") of the arrays a checkpoint step's state holds,
    read from orbax's tree metadata (nothing restored)."""
    try:
        tree = json.loads((epath.Path(directory) / str(step) / "state" / "_METADATA").read_text())["tree_metadata"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {directory}/{step} has no readable tree metadata ({e})") from None
    return ["/".join(ast.literal_eval(key)) for key in tree]
