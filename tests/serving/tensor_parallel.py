"""Run in a process with 2 fake CPU devices (test_cli_serve): the engine on a model sharded over
"tensor" gives the greedy tokens of the unsharded model's generate, in float and with int8
weights and KV cache. Prints RESULT <json>."""

import json

import fiddle as fdl
import jax
import numpy as np
from flax import nnx

from nnxlm.generation import generate
from nnxlm.recipes import models
from nnxlm.serving import Engine, Settings
from nnxlm.sharding import make_mesh, state_shardings
from tests.serving.test_engine import IdsTokenizer


def check(quantization=None) -> dict:
    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = False
    model = fdl.build(cfg)(rngs=nnx.Rngs(0))
    if quantization is not None:
        quantization.apply(model)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, size=int(n)).tolist() for n in (5, 40, 90, 130)]
    reference = [generate(model, [p], 12)[0].tolist() for p in prompts]

    mesh = make_mesh({"tensor": 2}, devices=jax.devices()[:2])
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    engine = Engine(sharded, IdsTokenizer(), slots=4, max_length=192, steps=4, mesh=mesh)
    with engine:
        requests = [engine.submit(p, Settings(max_tokens=12)) for p in prompts]
        tokens = [[t.id for t in r.result(timeout=120).choices[0].tokens] for r in requests]
    kernel = sharded.layers[0].attention.q_proj.kernel[...]
    return {
        "equal": tokens == reference,
        "cache_spec": str(engine._cache.k[0].sharding.spec),
        "kernel_devices": len(kernel.sharding.device_set),
        "kernel_dtype": str(kernel.dtype),
        "cache_dtype": str(engine._cache.k[0].dtype),
    }


def main():
    from nnxlm.modules.quantization import Quantization

    result = {"float": check(), "int8": check(Quantization(kv="int8"))}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
