"""Whether a run directory can be resumed as it is: intact checkpoints, the same recipe, the same
data layout. Each check ends in one line that says what differs and how to go on; nothing here
deletes or rewrites a checkpoint.

A checkpoint step directory is written by orbax under a temporary name and renamed when complete,
so a save that was killed leaves `<step>.orbax-checkpoint-tmp-...`, never a `<step>` directory.
A `<step>` directory can still be damaged afterwards (files lost or truncated by a copy, a disk):
`checkpoint_damage` finds what it can without reading the arrays, and a failed restore names the
step the same way.
"""

import json
import os
import shutil
import sys

from nnxlm.errors import UserError

# Files every complete nnxlm checkpoint step holds, each a JSON document (orbax's and nnxlm's).
REQUIRED_JSON = ("_CHECKPOINT_METADATA", "info/metadata", "recipe/metadata", "state/_METADATA")

# Recipe fields a resumed run may change: how long it runs, how it reports and how it is laid out
# on the devices (checkpoints load on any mesh, scanned or not), not what it trains.
CHANGEABLE_ON_RESUME = (
    "mesh",
    "sharding_rules",
    "grad_accum_steps",  # the same update, in micro-batches
    "data_shards",  # checked on its own: the data position must fit (allow_data_restart)
    "num_steps",
    "workdir",
    "name",
    "log_every",
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


def checkpoint_steps(directory: str) -> list[int]:
    """The complete (renamed) step directories of a checkpoints directory, oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def checkpoint_damage(directory: str, step: int) -> str | None:
    """What is missing or unreadable in checkpoint `step` (without reading its arrays), or None."""
    root = os.path.join(directory, str(step))
    for name in REQUIRED_JSON:
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                json.load(f)
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, ValueError) as e:
            return f"{name} is unreadable ({type(e).__name__})"
    manifests = [os.path.join(root, "state", "manifest.ocdbt")]
    for manifest in manifests:
        if not os.path.isfile(manifest) or os.path.getsize(manifest) == 0:
            return f"{os.path.relpath(manifest, root)} is missing or empty"
    return None


def damaged(directory: str, step: int, reason: str, *, resuming: bool) -> UserError:
    """The one-line error for a damaged checkpoint `step`, naming the newest intact earlier one."""
    earlier = [s for s in checkpoint_steps(directory) if s < step and checkpoint_damage(directory, s) is None]
    head = f"checkpoint {directory}/{step} is damaged ({reason}); it is left as it is"
    if not earlier:
        return UserError(f"{head}, and no earlier checkpoint is intact: start a new run with another --workdir")
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
    if step not in steps:
        raise UserError(
            f"resume_step {step} is no checkpoint of {directory}: choose one of {', '.join(map(str, steps)) or 'none'}"
        )
    for newer in (s for s in steps if s > step):
        target = os.path.join(workdir, "set_aside", str(newer))
        if os.path.exists(target):
            target += f".{len(os.listdir(os.path.dirname(target)))}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(os.path.join(directory, str(newer)), target)
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
