"""Whether a run directory can be resumed as it is: intact checkpoints, the same recipe, the same
data layout. Each check ends in one line that says what differs and how to go on; nothing here
deletes or rewrites a checkpoint.

A checkpoint step directory is written by orbax under a temporary name and renamed when complete,
so a save that was killed leaves `<step>.orbax-checkpoint-tmp-...`, never a `<step>` directory
(on gs://, where orbax cannot rename atomically, a `<step>` directory without commit_success.txt).
A `<step>` directory can still be damaged afterwards (files lost or truncated by a copy, a disk):
`checkpoint_damage` finds what it can without reading the arrays, and a failed restore names the
step the same way.
"""

import json
import sys

from etils import epath

from nnxlm.checksums import malformed
from nnxlm.errors import UserError

# Files every complete nnxlm checkpoint step holds, each a JSON document (orbax's and nnxlm's).
REQUIRED_JSON = ("_CHECKPOINT_METADATA", "info/metadata", "recipe/metadata", "state/_METADATA")

# Recipe fields a resumed run may change: how long it runs, how it reports and how it is laid out
# on the devices (checkpoints load on any mesh, scanned or not), not what it trains.
CHANGEABLE_ON_RESUME = (
    "mesh",
    "sharding_rules",
    "grad_accum_steps",  # the same update, in micro-batches
    "pipeline_microbatches",  # the same update, through pipeline stages
    "pipeline_schedule",
    "pipeline_repeats",
    "data_shards",  # checked on its own: the data position must fit (allow_data_restart)
    "num_steps",
    "workdir",
    "name",
    "log_every",
    "profile_steps",
    "profile_skip_steps",
    "eval_every",
    "eval_batches",
    "eval_at_start",
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",
    "sample_prompts",
    "sample_max_new_tokens",
    "sample_temperature",
    "sample_top_p",
    "peak_flops_per_device",
    "load_parameters_path",  # starting points matter at step 0 only
    "load_full_state_path",
    "on_nonfinite",
    "allow_recipe_change",
    "allow_data_restart",
)
# Fields of the model a resumed run may change wherever they are (the layout of the same parameters).
CHANGEABLE_MODEL_FIELDS = ("scan_layers", "remat_policy")


def checkpoint_steps(directory) -> list[int]:
    """The complete step directories of a checkpoints directory, oldest first."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and _finalized(d))


# Where renames are not atomic (orbax treats every gs:// path so), orbax writes a step directory
# under its final name and marks it complete with this file, written last.
COMMIT_FILE = "commit_success.txt"


def _finalized(step_dir) -> bool:
    return not str(step_dir).startswith("gs://") or (step_dir / COMMIT_FILE).exists()


def checkpoint_damage(directory, step: int) -> str | None:
    """What is missing or unreadable in checkpoint `step` (without reading its arrays), or None."""
    root = epath.Path(directory) / str(step)
    for name in REQUIRED_JSON:
        try:
            json.loads((root / name).read_text())
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as e:
            return f"{name} is unreadable ({type(e).__name__})"
    info = json.loads((root / "info/metadata").read_text())
    if not isinstance(info, dict) or not isinstance(info.get("train_state"), bool):
        return "info/metadata is not an nnxlm checkpoint's: it has no train_state"
    if reason := malformed(info.get("checksums")):
        return f"info/metadata {reason}"
    manifests = ["state/manifest.ocdbt"]
    for manifest in manifests:
        if not (root / manifest).is_file() or (root / manifest).stat().length == 0:
            return f"{manifest} is missing or empty"
    return None


def damaged(directory: str, step: int, reason: str, *, resuming: bool) -> UserError:
    """The one-line error for a damaged checkpoint `step`, naming the newest intact earlier one."""
    earlier = [s for s in checkpoint_steps(directory) if s < step and checkpoint_damage(directory, s) is None]
    head = f"checkpoint {directory}/{step} is damaged ({reason}); it is left as it is"
    if not earlier and resuming:
        return UserError(f"{head}, and no earlier checkpoint is intact: start a new run with another --workdir")
    if not earlier:
        return UserError(f"{head}, and no earlier checkpoint is intact: write it again (train, convert or quantize)")
    if resuming:
        return UserError(
            f"{head}: resume from step {earlier[-1]}, the newest intact one, with `nnxlm train ... --resume_step "
            f"{earlier[-1]}` (Python: trainer.fit(resume_step={earlier[-1]})), which sets the newer steps aside"
        )
    return UserError(f"{head}: load the newest intact one, {directory}/{earlier[-1]}")


def set_aside_newer(workdir: str, directory: str, step: int) -> None:
    """Moves the checkpoints newer than `step` to <workdir>/set_aside/ so that training resumes from
    `step` (and later saves of the same steps cannot collide with them); nothing is deleted."""
    steps = checkpoint_steps(directory)
    if not steps:
        raise UserError(f"resume_step {step}: {directory} holds no checkpoint yet; leave --resume_step out to start")
    if step not in steps:
        raise UserError(
            f"resume_step {step} is no checkpoint of {directory}: choose one of {', '.join(map(str, steps))}"
        )
    for newer in (s for s in steps if s > step):
        target = epath.Path(workdir) / "set_aside" / str(newer)
        if target.exists():
            target = target.with_name(f"{newer}.{len(list(target.parent.iterdir()))}")
        target.parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(directory) / str(newer)).rename(target)  # a rename, atomic on a local file system
        print(f"nnxlm: resuming from step {step}: moved checkpoint {newer} to {target}", file=sys.stderr)


def _objects(node):
    """Every JSON object within `node`, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def recipe_fields(recipe_json: dict) -> dict[str, object]:
    """{"model.block.attention.num_heads": 4, ...}: every value of a recipe saved as JSON (fiddle's
    serialization, which records each leaf with its paths), read without importing anything."""
    leaves = (node for node in _objects(recipe_json.get("objects", {})) if node.get("type") == "leaf")
    return {path.removeprefix("<root>."): leaf.get("value") for leaf in leaves for path in leaf.get("paths", ())}


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """ "field saved -> current" for each field that differs between two recipe JSONs, leaving out
    CHANGEABLE_ON_RESUME; the callables count too ("the recipe's classes or functions")."""
    before, after = recipe_fields(saved), recipe_fields(current)
    changes = []
    for path in sorted(set(before) | set(after)):
        top, last = path.split(".")[0].split("[")[0], path.split(".")[-1]
        if top in CHANGEABLE_ON_RESUME or last in CHANGEABLE_MODEL_FIELDS:
            continue
        old, new = (repr(fields[path]) if path in fields else "(default)" for fields in (before, after))
        if old != new:
            changes.append(f"{path} {old} -> {new}")
    if not changes and _callables(saved) != _callables(current):
        changes.append("the recipe's classes or functions")
    return changes


def _callables(recipe_json: dict) -> list[str]:
    refs = (node for node in _objects(recipe_json.get("objects", {})) if node.get("type") == "pyref")
    return sorted(f"{ref.get('module')}.{ref.get('name')}" for ref in refs)


def check_same_recipe(saved: dict, current: dict, where: str, allowed: bool) -> None:
    changes = recipe_changes(saved, current)
    if not changes:
        return
    listed = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    if allowed:
        print(f"nnxlm: resuming {where} with a changed recipe: {listed}", file=sys.stderr)
        return
    raise UserError(
        f"the recipe differs from the one {where} was trained with: {listed}; set allow_recipe_change=True to "
        "resume anyway, or use another --workdir"
    )
