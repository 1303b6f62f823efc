"""Training runs on 8 fake CPU devices, compared with one device. Run by test_meshes.py as
`python -m tests.sharding.mesh_runs CASE...` in one subprocess for every case (the device count is
fixed at JAX start, and the process start and JAX's own warm-up are paid once); prints one JSON
line, {case: {"result": what the case returned} or {"error": its traceback}}."""

import json
import math
import re
import shutil
import sys
import tempfile
import traceback

import fiddle as fdl
import jax
from flax import nnx

import nnxlm.modules.attention
import nnxlm.trainer
from nnxlm.modules.moe import MoE
from nnxlm.recipes import tiny
from nnxlm.sharding import make_mesh
from nnxlm.sharding.memory import state_bytes_per_device
from tests.sharding.moe_checks import TRACED as EXPERT_PARALLEL_TRACES
from tests.sharding.moe_checks import moe_checks
from tests.sharding.ring_checks import ring_checks

MESHES = {
    "data=8": {"data": 8},
    "fsdp=8": {"fsdp": 8},
    "data=2 fsdp=2 tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
    "tensor=4": {"tensor": 4, "data": -1},  # tiny has 2 KV heads: replicated over tensor
    "expert=4 moe": {"expert": 4, "data": -1},
    "expert=2 fsdp=2 data=2 moe": {"expert": 2, "fsdp": 2, "data": 2},
    "sequence=2 fsdp=4": {"sequence": 2, "fsdp": 4},
    "sequence=4 ring": {"sequence": 4, "fsdp": 2},  # ring attention (context_parallel="ring")
}
# Pipeline parallelism (nnxlm.modules.pipeline): mesh and Trainer fields; tiny has 4 layers.
PIPELINES = {
    "pipeline=2 data=4 gpipe": ({"pipeline": 2, "data": 4}, {}),
    "pipeline=4 fsdp=2 gpipe accumulate": (  # 2 micro-batches of 2 rows for each of 2 accumulation steps
        {"pipeline": 4, "fsdp": 2},
        {"grad_accum_steps": 2, "pipeline_microbatches": 2},
    ),
    "pipeline=2 tensor=2 data=2 circular moe": (
        {"pipeline": 2, "tensor": 2, "data": 2},
        {"pipeline_schedule": "circular", "pipeline_repeats": 2, "pipeline_microbatches": 2},
    ),
}


def _mesh_on_leading_devices(sizes):
    """make_mesh over just as many devices as the sizes need: a one-device run inside this process."""
    count = math.prod(v for v in sizes.values() if v > 0)
    return make_mesh(sizes, jax.devices()[:count] if -1 not in sizes.values() else None)


nnxlm.trainer.make_mesh = _mesh_on_leading_devices
RING_TRACES = []  # the "ring" case must take Attention's ring path, not fall back to the all-gather
_ring_attention = nnxlm.modules.attention.ring_attention
nnxlm.modules.attention.ring_attention = lambda *a, **k: RING_TRACES.append(1) or _ring_attention(*a, **k)


def recipe(workdir, mesh, *, moe=False, ring=False, steps=5, checkpoint_every=0, **trainer_fields):
    cfg = tiny()
    cfg.workdir, cfg.mesh, cfg.num_steps = workdir, mesh, steps
    for field, value in trainer_fields.items():
        setattr(cfg, field, value)
    cfg.eval_every, cfg.checkpoint_every, cfg.log_every = 0, checkpoint_every, 1000
    if ring:
        cfg.model.block.attention.context_parallel = "ring"
    if moe:
        cfg.model.block.mlp = fdl.Partial(MoE, num_experts=4, num_experts_per_token=2, expert_hidden_dim=32)
    return cfg


def train(cfg, balance=None):
    """(trainer, losses); the MoE balance losses are appended to the list `balance` if given."""
    trainer = fdl.build(cfg)
    history = trainer.fit()
    trainer.checkpointer.close()
    if balance is not None:
        balance += [record["moe_balance_loss"] for record in history]
    return trainer, [record["loss"] for record in history]


def collectives(trainer) -> dict[str, int]:
    """How many of each collective the compiled train step holds."""
    text = trainer._train_step.lower(trainer._abstract_state, trainer.abstract_batch()).compile().as_text()
    names = ("collective-permute", "all-to-all", "all-gather", "all-reduce", "reduce-scatter")
    return {name: len(re.findall(rf" {name}(?:-start)?\(", text)) for name in names}


def shard_shapes(trainer):
    """{parameter path: (global shape, shape of the first device's shard)} of the first layer."""
    state = nnx.to_flat_state(nnx.state(trainer.model, nnx.Param))
    out = {}
    for path, variable in state:
        if "layers" in path and isinstance(after := path[path.index("layers") + 1], int) and after:
            continue  # looped layers: the first one stands for all
        array = variable[...]
        out[".".join(map(str, path))] = [list(array.shape), list(array.addressable_shards[0].data.shape)]
    return out


def device_bytes(trainer):
    """(model bytes on the first device, as held; as state_bytes_per_device reports them)."""
    held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(nnx.state(trainer.model)))
    return [held, state_bytes_per_device(trainer._abstract_state, trainer.state_shardings)["model"]]


def meshes(root):
    result = {}
    for moe in (False, True):
        name, balance = f"one device{' moe' if moe else ''}", [] if moe else None
        _, result[name] = train(recipe(f"{root}/one{moe}", {"data": 1}, moe=moe), balance)
        result[name + " balance"] = balance
    for name, mesh in MESHES.items():
        trainer, losses = train(recipe(f"{root}/{name}", mesh, moe="moe" in name, ring="ring" in name))
        result[name] = {"losses": losses, "shards": shard_shapes(trainer), "bytes": device_bytes(trainer)}
    for name, (mesh, fields) in PIPELINES.items():
        balance = [] if "moe" in name else None
        trainer, losses = train(recipe(f"{root}/{name}", mesh, moe="moe" in name, **fields), balance)
        result[name] = {"losses": losses, "shards": shard_shapes(trainer), "bytes": device_bytes(trainer)}
        result[name]["balance"] = balance
        if name == "pipeline=2 tensor=2 data=2 circular moe":  # compiled once more, for its HLO
            result[name]["collectives"] = collectives(trainer)
    result["ring attention traced"] = bool(RING_TRACES)
    result["expert parallel traced"] = sorted(set(EXPERT_PARALLEL_TRACES))  # before moe_checks adds its own
    result["moe layer"] = moe_checks()  # one layer's values and gradients under shard_map
    result["ring attention"] = ring_checks()  # function level: against dense, on the same 8 devices
    return result


def reshard(root):
    """Saves at step 5 on data=2 x fsdp=4; resumes that checkpoint on other meshes."""
    _, losses = train(recipe(f"{root}/first", {"data": 2, "fsdp": 4}, steps=10, checkpoint_every=5))
    result = {"uninterrupted": losses}
    for name, mesh in {
        "tensor=2 fsdp=2 data=2": {"tensor": 2, "fsdp": 2, "data": 2},
        "one device": {"data": 1},
    }.items():
        shutil.copytree(f"{root}/first/checkpoints/5", f"{root}/{name}/checkpoints/5")
        _, result[name] = train(recipe(f"{root}/{name}", mesh, steps=10, checkpoint_every=5))
    # pipelines keep the stacked [layers, ...] layout: a checkpoint moves in and out of them
    shutil.copytree(f"{root}/first/checkpoints/5", f"{root}/into pipeline/checkpoints/5")
    into = recipe(f"{root}/into pipeline", {"pipeline": 2, "fsdp": 2, "data": 2}, steps=10, checkpoint_every=5)
    _, result["into pipeline=2 fsdp=2 data=2 gpipe"] = train(into)
    circular = dict(pipeline_schedule="circular", pipeline_repeats=2, pipeline_microbatches=2)
    piped = recipe(f"{root}/piped", {"pipeline": 2, "data": 4}, steps=10, checkpoint_every=5, **circular)
    _, result["pipeline=2 data=4 circular"] = train(piped)
    shutil.copytree(f"{root}/piped/checkpoints/5", f"{root}/out of pipeline/checkpoints/5")
    _, result["out of pipeline, one device"] = train(recipe(f"{root}/out of pipeline", {"data": 1}, steps=10))
    return result


def accumulation(root):
    """One batch of 8 rows against 4 micro-batches of 2 rows, split over fsdp=2."""
    result = {}
    for steps in (1, 4):
        cfg = recipe(f"{root}/accumulate{steps}", {"data": 2, "fsdp": 2}, steps=5)
        cfg.mesh, cfg.grad_accum_steps = {"data": 1, "fsdp": 2}, steps
        _, result[f"grad_accum_steps={steps}"] = train(cfg)
    return result


def run(cases: list[str]) -> dict:
    """Each case in its own directory; a case that raises fails alone (its tests get its traceback)."""
    functions = {"meshes": meshes, "reshard": reshard, "accumulation": accumulation}
    results = {}
    for case in cases:
        with tempfile.TemporaryDirectory() as root:
            try:
                results[case] = {"result": functions[case](root)}
            except Exception:
                results[case] = {"error": traceback.format_exc()}
    return results


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(sys.argv[1:])))
