import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from nnxlm.errors import UserError
from nnxlm.sharding import logical_to_spec, make_mesh
from nnxlm.sharding.mesh import resolve_axis_sizes


def test_logical_names_map_through_the_one_table():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("layers", "embed", "kv_heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert logical_to_spec(("embed", "mlp"), {"mlp": None}) == P("fsdp", None)
    assert logical_to_spec(("heads", "vocab")) == P("tensor", None)  # a mesh axis is used once


def test_mesh_sizes_resolve_the_remaining_devices():
    assert resolve_axis_sizes({"data": -1, "tensor": 2}, 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert make_mesh({"data": -1}).shape["data"] == 1  # one CPU device in this process


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "needs 3 devices but 8"),
        ({"data": -1, "fsdp": -1}, "at most one"),
        ({"pipe": 2}, "unknown mesh axis"),
    ],
)
def test_bad_mesh_sizes_are_rejected(sizes, message):
    with pytest.raises(UserError, match=message):
        resolve_axis_sizes(sizes, 8)


SHARDED_RUN = """
import fiddle as fdl, jax, numpy as np, nnxlm
cfg = nnxlm.recipes.tiny()
cfg.num_steps, cfg.eval_every, cfg.checkpoint_every, cfg.workdir = 3, 0, 3, {workdir!r}
cfg.mesh = {mesh!r}
trainer = fdl.build(cfg)
losses = [r["loss"] for r in trainer.fit()]
spec = trainer.model.layers.mlp.gate[...].sharding.spec
print("LOSSES", losses, "DEVICES", len(jax.devices()), "SPEC", tuple(spec))
"""


def test_training_on_eight_fake_devices_shards_parameters_and_matches_one_device(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    outputs = {}
    for mesh in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
        workdir = str(tmp_path / "x".join(str(v) for v in mesh.values()))
        devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"} if max(mesh.values()) == 1 else {}
        code = SHARDED_RUN.format(workdir=workdir, mesh=mesh)
        result = subprocess.run([sys.executable, "-c", code], env={**env, **devices}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[len(outputs)] = result.stdout.split("LOSSES")[1]
    single, sharded = (eval(o.split("DEVICES")[0]) for o in outputs.values())
    assert "SPEC (None, 'fsdp', 'tensor')" in outputs[1] and "DEVICES 8" in outputs[1]
    assert max(abs(a - b) / abs(a) for a, b in zip(single, sharded, strict=True)) < 1e-5
