"""Peak memory of Hugging Face conversion, against the size of the checkpoint it converts.

    python -m bench.convert [--d_model 1536 --num_layers 8 --mlp_dim 4096 --vocab_size 32000]

Writes a random Llama of that shape as an HF directory (nnxlm.convert.to_hf), then runs
`nnxlm convert from-hf` and `nnxlm convert to-hf` on it, each in its own process, and reports each
process's peak resident memory above that of a process that only imports nnxlm and starts JAX.
Streaming conversion should need about the model (the output is assembled in memory) plus its
largest tensor, not two or three copies of the model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from safetensors import safe_open

BASELINE = "import jax, nnxlm.convert; jax.numpy.zeros(1).block_until_ready()"
MAKE = """
import fiddle as fdl, sys
from flax import nnx
from nnxlm.convert import to_hf
from nnxlm.recipes import models
shape = {shape}
model = fdl.build(models.llama(**shape))(rngs=nnx.Rngs(0))
to_hf(model, sys.argv[1])
"""


def peak_rss_mib(command: list[str]) -> float:
    """Runs command; its peak resident set size in MiB (ru_maxrss of that child alone)."""
    process = subprocess.Popen(command, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(command)}")
    return usage.ru_maxrss / 1024


def checkpoint_sizes(directory: str) -> tuple[int, int]:
    """(total bytes, largest tensor's bytes) of the safetensors in directory."""
    total = largest = 0
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "np") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    size = f.get_slice(key).get_shape()
                    nbytes = 4
                    for dim in size:
                        nbytes *= dim
                    total, largest = total + nbytes, max(largest, nbytes)
    return total, largest


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_model", type=int, default=1536)
    parser.add_argument("--num_layers", type=int, default=8)
    parser.add_argument("--mlp_dim", type=int, default=4096)
    parser.add_argument("--vocab_size", type=int, default=32_000)
    parser.add_argument("--json", action="store_true", help="end with the figures as one JSON line")
    args = parser.parse_args(argv)
    shape = dict(d_model=args.d_model, num_layers=args.num_layers, mlp_dim=args.mlp_dim, vocab_size=args.vocab_size)
    shape.update(num_heads=args.d_model // 128, num_kv_heads=max(1, args.d_model // 512))
    with tempfile.TemporaryDirectory() as root:
        hf, run, back = (os.path.join(root, name) for name in ("hf", "run", "back"))
        baseline = peak_rss_mib([sys.executable, "-c", BASELINE])
        peak_rss_mib([sys.executable, "-c", MAKE.format(shape=shape), hf])
        total, largest = checkpoint_sizes(hf)
        from_hf = peak_rss_mib([sys.executable, "-m", "nnxlm", "convert", "from-hf", hf, run]) - baseline
        to_hf = peak_rss_mib([sys.executable, "-m", "nnxlm", "convert", "to-hf", run, back]) - baseline
    mib = 2**20
    figures = {
        "checkpoint_mib": total / mib,
        "largest_tensor_mib": largest / mib,
        "from_hf_peak_above_baseline_mib": from_hf,
        "to_hf_peak_above_baseline_mib": to_hf,
        "baseline_mib": baseline,
    }
    print(f"checkpoint {total / mib:,.0f} MiB (largest tensor {largest / mib:,.0f} MiB); baseline {baseline:,.0f} MiB")
    for name, value in (("from-hf", from_hf), ("to-hf", to_hf)):
        print(f"{name}: peak {value:,.0f} MiB above baseline = {value * mib / total:.2f} x the checkpoint")
    if args.json:
        print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
