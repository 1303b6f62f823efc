"""Every parallelism gives the one-device losses, with parameters split as the rules say.

Every case runs in one subprocess of tests/sharding/mesh_runs.py with 8 fake CPU devices."""

import json
import os
import subprocess
import sys

import pytest

from tests import cpu_env
from tests.sharding import ring_checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = ("meshes", "reshard", "accumulation")


def run_cases(*cases: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "tests.sharding.mesh_runs", *cases],
        cwd=ROOT,
        env=cpu_env(8),
        capture_output=True,
        text=True,
    )
    # an XLA abort ends in a stack of native frames: its message is the line above them
    message = "\n".join(line for line in result.stderr.splitlines() if not line.lstrip().startswith("@ 0x"))
    assert result.returncode == 0, message[-3000:]
    return json.loads(result.stdout.split("RESULT ")[-1])


@pytest.fixture(scope="module")
def runs():
    """Every case's result, from one subprocess (one start-up and warm-up of JAX for all of them)."""
    return run_cases(*CASES)


def result_of(runs: dict, case: str) -> dict:
    assert "error" not in runs[case], runs[case]["error"][-3000:]  # that case raised: its traceback
    return runs[case]["result"]


def assert_same_losses(reference, losses):
    assert len(losses) == len(reference)
    assert max(abs(a - b) / abs(a) for a, b in zip(reference, losses, strict=True)) < 1e-5, (reference, losses)


@pytest.fixture(scope="module")
def meshes(runs):
    return result_of(runs, "meshes")


# (global shape, first device's shard shape) of a few parameters; tiny: width 64, 4 layers
# (stacked), 4 query and 2 KV heads of 16, MLP 192, vocabulary 256; the MoE has 4 experts of 32.
EXPECTED_SHARDS = {
    "data=8": {"layers.attention.q_proj.kernel": [4, 64, 4, 16], "head.kernel": [64, 256]},
    "fsdp=8": {
        "layers.attention.q_proj.kernel": [4, 8, 4, 16],
        "layers.mlp.gate.kernel": [4, 8, 192],
        "embedder.embedding": [256, 8],
    },
    "data=2 fsdp=2 tensor=2": {
        "layers.attention.q_proj.kernel": [4, 32, 2, 16],
        "layers.attention.k_proj.kernel": [4, 32, 1, 16],
        "layers.mlp.down.kernel": [4, 96, 32],
        "head.kernel": [32, 128],
    },
    "tensor=4": {"layers.attention.q_proj.kernel": [4, 64, 1, 16], "layers.attention.k_proj.kernel": [4, 64, 2, 16]},
    "expert=4 moe": {"layers.mlp.gate.kernel": [4, 1, 64, 32], "layers.mlp.router.kernel": [4, 64, 1]},
    "expert=2 fsdp=2 data=2 moe": {"layers.mlp.gate.kernel": [4, 2, 32, 32], "layers.mlp.router.kernel": [4, 32, 2]},
    "sequence=2 fsdp=4": {"layers.attention.q_proj.kernel": [4, 8, 4, 16], "embedder.embedding": [256, 8]},
    "sequence=4 ring": {"layers.attention.q_proj.kernel": [4, 8, 4, 16]},
    # pipelines: each stage holds its block of the stacked layers; the rest is replicated over pipeline
    "pipeline=2 data=4 gpipe": {"layers.attention.q_proj.kernel": [2, 64, 4, 16], "head.kernel": [64, 256]},
    "pipeline=4 fsdp=2 gpipe accumulate": {"layers.mlp.gate.kernel": [1, 32, 192], "embedder.embedding": [256, 32]},
    "pipeline=2 tensor=2 data=2 circular moe": {
        "layers.attention.q_proj.kernel": [2, 64, 2, 16],
        "layers.mlp.gate.kernel": [2, 4, 64, 16],
        "head.kernel": [64, 128],
    },
}


@pytest.mark.parametrize("mesh", list(EXPECTED_SHARDS))
def test_five_steps_match_one_device_and_parameters_are_split(meshes, mesh):
    reference = meshes["one device moe" if "moe" in mesh else "one device"]
    assert_same_losses(reference, meshes[mesh]["losses"])
    shards = meshes[mesh]["shards"]
    for name, shard_shape in EXPECTED_SHARDS[mesh].items():
        assert shards[name][1] == shard_shape, (name, shards[name])
    held, reported = meshes[mesh]["bytes"]  # what nnxlm inspect reports per device is what a device holds
    assert held == reported


def test_pipelines_match_one_device_moe_balance_loss_included_and_shift_stages_by_collective_permute(meshes):
    """GPipe and circular schedules (nnxlm.modules.pipeline), the losses checked above; here the MoE
    balance loss, formed from every micro-batch's statistics, equals the whole batch's on one
    device, and the compiled step moves activations between stages by collective-permute (the
    circular schedule's parameter view adds all-to-alls over the pipeline axis)."""
    circular = meshes["pipeline=2 tensor=2 data=2 circular moe"]
    assert_same_losses(meshes["one device moe balance"], circular["balance"])
    assert circular["collectives"]["collective-permute"] >= 1 and circular["collectives"]["all-to-all"] >= 1


def test_ring_attention_equals_dense_in_values_and_gradients_and_passes_chunks_around(meshes):
    """Function level (tests/sharding/ring_checks.py): every case within 1e-5 of dense attention,
    keys and values moved by collective-permutes (no all-gather where KV heads split as queries);
    and the "sequence=4 ring" training above took the ring path."""
    assert meshes["ring attention traced"]
    checks = meshes["ring attention"]
    for case in ring_checks.CASES:
        assert max(checks[case]) < 1e-5, (case, checks[case])
        assert "collective-permute" in checks[case + " collectives"]
    assert "all-gather" not in checks["sequence=4: packed, traced window, soft-cap, GQA collectives"]


def test_moe_on_an_expert_axis_sends_tokens_by_all_to_all_and_matches_one_device(meshes):
    """The MoE training runs above took the shard_map path (nnxlm.modules.expert_parallel); function
    level (tests/sharding/moe_checks.py): one layer's loss and gradients within 1e-5 of one device
    with the hidden axis split over tensor inside the shard_map, with a capacity factor over a
    sequence axis, and on a mesh without an expert axis (each device its own tokens)."""
    assert {"data=2 expert=4 ep=4", "data=2 expert=2 fsdp=2 ep=2"} <= set(meshes["expert parallel traced"])
    checks = meshes["moe layer"]
    assert len(checks) == 3
    for case, check in checks.items():
        assert check["expert_parallel"], case
        assert check["value"] < 1e-5 and check["grads"] < 1e-5, (case, check)


def test_a_checkpoint_from_one_mesh_resumes_on_another_and_on_one_device(runs):
    result = result_of(runs, "reshard")
    continued = result["uninterrupted"][5:]
    assert_same_losses(continued, result["tensor=2 fsdp=2 data=2"])
    assert_same_losses(continued, result["one device"])
    # into and out of a pipeline: the checkpoint layout does not depend on the mesh
    assert_same_losses(continued, result["into pipeline=2 fsdp=2 data=2 gpipe"])
    assert_same_losses(result["uninterrupted"], result["pipeline=2 data=4 circular"])
    assert_same_losses(continued, result["out of pipeline, one device"])


def test_gradient_accumulation_gives_the_large_batch_update(runs):
    result = result_of(runs, "accumulation")
    assert_same_losses(result["grad_accum_steps=1"], result["grad_accum_steps=4"])
