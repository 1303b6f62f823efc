"""Test doubles and a real server for the serving tests."""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.modules.kv_cache import KVCache, write_slots


class Scripted(nnx.Module):
    """A model with no layers whose next token after position p is script[p % len(script)]: the
    serving tests know what it will say (an emoji split over byte tokens, a stop string)."""

    def __init__(self, script, vocab_size: int):
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))
        self.vocab_size = vocab_size

    def init_cache(self, batch: int, max_length: int, stacked=None) -> KVCache:
        return KVCache((), (), jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((), jnp.int32))

    def features(self, ids_bt, positions_bt, segment_ids_bt, *, cache):
        segment_ids = write_slots(cache.segment_ids, segment_ids_bt, cache.index, axis=1)
        cache = dataclasses.replace(cache, segment_ids=segment_ids, index=cache.index + ids_bt.shape[1])
        return positions_bt[..., None].astype(jnp.float32), cache

    def logits(self, x_btd):
        script = self.script[...]
        return 10.0 * jax.nn.one_hot(script[x_btd[..., 0].astype(jnp.int32) % script.shape[0]], self.vocab_size)

    def __call__(self, ids_bt, positions_bt, segment_ids_bt, cache):
        x, cache = self.features(ids_bt, positions_bt, segment_ids_bt, cache=cache)
        return self.logits(x), cache


def server(app):
    """A real uvicorn server of `app` on 127.0.0.1 at a free port, in a thread: yields its base URL."""
    from nnxlm.serving.api import serve_in_thread

    return serve_in_thread(app)
