"""Checkpoint checksums of arrays split over a mesh of 8 fake CPU devices, in a subprocess."""

import subprocess
import sys

from tests import cpu_env

# A model-sized tree: 64 arrays split over fsdp (their sums are collectives), compared with the
# same values unsharded. XLA aborts a collective stuck for 10 s (40 s by default) rather than hang.
SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from nnxlm.checksums import checksums
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
spec = lambda i: P(None, "fsdp") if i % 2 else P("fsdp", "data")
tree = {f"a{i}": jax.device_put(jnp.arange(4 * 64 * 24.0).reshape(4, 64, 24) * i, NamedSharding(mesh, spec(i)))
        for i in range(64)}
unsharded = checksums(jax.device_get(tree))
for _ in range(5):
    assert checksums(tree) == unsharded
print("same")
"""


def test_checksums_of_sharded_arrays_are_their_unsharded_ones_and_never_stall_collectives():
    env = cpu_env(8)
    env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=10"
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["same"], result.stderr[-2000:]
