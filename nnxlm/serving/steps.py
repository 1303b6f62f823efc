"""The serving engine's two compiled programs, over a fixed number of slots that share one KV cache.

The cache (nnxlm.modules.kv_cache) holds `slots` rows of `max_length` slots each, with an index per
row: every request's tokens start at slot 0 of its row, so rows at different lengths decode side by
side and a row is reused by overwriting it.

- `prefill_chunk` runs `chunk` prompt tokens of one request into its row (the last chunk right
  padded) and samples the request's first token from the last real one. One program serves every
  prompt length: a longer prompt is more calls of the same shape.
- `decode_steps` runs up to `steps` decode steps of every slot in one call (a while loop on the
  device), each slot with its own position, sampling settings, seed and token budget; it returns
  each slot's new tokens with their log-probabilities.

Neither retraces for a new request: every per-request value is an array argument. Token n of a
request is sampled with the key fold_in(key(seed), n), so its tokens do not depend on which slot it
runs in, on the other slots, or on how its decode steps are cut into calls. Log-probabilities are
those of the model's own distribution (before temperature, top_k and top_p); the top ones are
computed only in calls where a slot asks for them.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nnxlm.generation import TRACES, _argmax, restrict_logits
from nnxlm.modules.kv_cache import KVCache

TOP_LOGPROBS = 20  # the most top_logprobs a request may ask for (OpenAI's limit)


class Sampling(NamedTuple):
    """Per-slot sampling settings, arrays [slots] (or [] for one request): temperature 0 is greedy,
    top_k 0 and top_p 1 keep every token."""

    seed: jax.Array  # uint32
    temperature: jax.Array  # float32
    top_k: jax.Array  # int32
    top_p: jax.Array  # float32


class Slots(NamedTuple):
    """What the host tells `decode_steps` about each slot, arrays [slots]."""

    active: jax.Array  # bool: a request is decoding in the slot
    generated: jax.Array  # int32: its tokens so far (the index of the next one)
    limit: jax.Array  # int32: the most tokens it may generate
    sampling: Sampling


class Tokens(NamedTuple):
    """New tokens of every slot, [slots, steps] (only the first count[s] of slot s are real)."""

    ids: jax.Array  # int32
    logprob: jax.Array  # float32: of each token under the model's distribution
    top_ids: jax.Array  # int32 [slots, steps, TOP_LOGPROBS]: the most likely tokens (zeros when not asked)
    top_logprob: jax.Array  # float32 [slots, steps, TOP_LOGPROBS]
    count: jax.Array  # int32 [slots]
    done: jax.Array  # bool [slots]: the slot emitted an end token or reached its limit


def sample_rows(logits_sv, sampling: Sampling, n_s):
    """Token [slots] of each row with its own settings; the key of a row's token is
    fold_in(key(seed), n). Rows at temperature 0 take the argmax; sampling work (and top_k / top_p
    cut-offs) is done only when some row needs it."""
    greedy_s = _argmax(logits_sv)

    def sampled():
        temperature_s = jnp.where(sampling.temperature > 0, sampling.temperature, 1.0)
        logits = logits_sv / temperature_s[:, None]
        vocab = logits.shape[-1]
        top_k_s = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
        logits = jax.lax.cond(
            jnp.any(top_k_s < vocab), lambda x: restrict_logits(x, top_k=top_k_s), lambda x: x, logits
        )
        logits = jax.lax.cond(
            jnp.any(sampling.top_p < 1.0), lambda x: restrict_logits(x, top_p=sampling.top_p), lambda x: x, logits
        )
        keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(sampling.seed, n_s)
        draw_s = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
        return jnp.where(sampling.temperature > 0, _inverse_transform(logits, draw_s), greedy_s)

    return jax.lax.cond(jnp.any(sampling.temperature > 0), sampled, lambda: greedy_s)


def _inverse_transform(logits_sv, draw_s):
    """The first token whose cumulative probability exceeds draw * total (never one of probability 0)."""
    probs_sv = jax.nn.softmax(logits_sv, axis=-1)
    cumulative_sv = jnp.cumsum(probs_sv, axis=-1)
    token_s = jnp.sum(cumulative_sv <= draw_s[:, None] * cumulative_sv[:, -1:], axis=-1, dtype=jnp.int32)
    vocab = logits_sv.shape[-1]
    last_s = jnp.max(jnp.where(probs_sv > 0, jnp.arange(vocab, dtype=jnp.int32), 0), axis=-1)
    return jnp.minimum(token_s, last_s)


def _logprobs(logits_sv, token_s, want_top):
    """(log-probability of each row's token, top ids, top log-probabilities) of the model's distribution."""
    logprobs_sv = jax.nn.log_softmax(logits_sv, axis=-1)
    chosen_s = jnp.take_along_axis(logprobs_sv, token_s[:, None], axis=-1)[:, 0]
    rows = logits_sv.shape[0]

    def top():
        values, ids = jax.lax.top_k(logprobs_sv, TOP_LOGPROBS)
        return ids.astype(jnp.int32), values

    def none():
        return jnp.zeros((rows, TOP_LOGPROBS), jnp.int32), jnp.zeros((rows, TOP_LOGPROBS), jnp.float32)

    return chosen_s, *jax.lax.cond(want_top, top, none)


def _is_end(token_s, end_ids_e):
    return jnp.any(token_s[:, None] == end_ids_e[None, :], axis=-1)


def prefill_chunk(graphdef, state, cache: KVCache, token_s, slot, ids_c, start, length, sampling: Sampling, want_top):
    """Writes `length` prompt tokens ids_c[:length] ([chunk], the rest padding) of the request in
    `slot` at positions start.. of its row; returns (cache, token_s with the slot's first new token,
    that token's Tokens-like fields (ids, logprob, top_ids, top_logprob) of shape [1])."""
    TRACES["serve_prefill"] += 1
    model = nnx.merge(graphdef, state)
    chunk = ids_c.shape[0]

    def row(x):
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)

    row_cache = dataclasses.replace(jax.tree.map(row, cache.without_index()), index=start)
    real_c = jnp.arange(chunk) < length
    positions_1c = (start + jnp.arange(chunk, dtype=jnp.int32))[None]
    x_1cd, row_cache = model.features(ids_c[None], positions_1c, real_c[None].astype(jnp.int32), cache=row_cache)

    def put(x, row_x):
        return jax.lax.dynamic_update_slice_in_dim(x, row_x.astype(x.dtype), slot, axis=0)

    cache = dataclasses.replace(
        jax.tree.map(put, cache.without_index(), row_cache.without_index()),
        index=cache.index.at[slot].set(start + length),
    )
    logits_1v = model.logits(jax.lax.dynamic_slice_in_dim(x_1cd[0], length - 1, 1, axis=0))
    one = jax.tree.map(lambda x: jnp.reshape(x, (1,)), sampling)
    token_1 = sample_rows(logits_1v, one, jnp.zeros((1,), jnp.int32))
    token_s = token_s.at[slot].set(token_1[0])
    return cache, token_s, (token_1, *_logprobs(logits_1v, token_1, want_top))


def decode_steps(graphdef, state, cache: KVCache, token_s, slots: Slots, end_ids_e, want_top, steps: int, rows: int):
    """Up to `steps` decode steps of the first `rows` slots (those holding every active one; the
    engine compiles a few row counts so that a lightly loaded server does not compute its empty
    slots), stopping early once none is left. Each step feeds a slot's last token at its own
    position and samples the next. Returns (cache, token_s, Tokens of the first `rows` slots)."""
    TRACES["serve_decode"] += 1
    if rows == token_s.shape[0]:
        return _decode_rows(graphdef, state, cache, token_s, slots, end_ids_e, want_top, steps)
    first = lambda x: x[:rows]  # noqa: E731
    part = dataclasses.replace(jax.tree.map(first, cache.without_index()), index=first(cache.index))
    part, part_token_s, out = _decode_rows(
        graphdef, state, part, first(token_s), jax.tree.map(first, slots), end_ids_e, want_top, steps
    )
    put = lambda x, rows_x: jax.lax.dynamic_update_slice_in_dim(x, rows_x, 0, axis=0)  # noqa: E731
    cache = dataclasses.replace(
        jax.tree.map(put, cache.without_index(), part.without_index()), index=put(cache.index, part.index)
    )
    return cache, put(token_s, part_token_s), out


def _decode_rows(graphdef, state, cache: KVCache, token_s, slots: Slots, end_ids_e, want_top, steps: int):
    num_slots = token_s.shape[0]
    empty = Tokens(
        ids=jnp.zeros((num_slots, steps), jnp.int32),
        logprob=jnp.zeros((num_slots, steps), jnp.float32),
        top_ids=jnp.zeros((num_slots, steps, TOP_LOGPROBS), jnp.int32),
        top_logprob=jnp.zeros((num_slots, steps, TOP_LOGPROBS), jnp.float32),
        count=jnp.zeros((num_slots,), jnp.int32),
        done=~slots.active | (slots.generated >= slots.limit),
    )

    def not_finished(carry):
        i, _, _, out, _ = carry
        return (i < steps) & ~jnp.all(out.done)

    def step(carry):
        # the parameters ride in the carry so that the model's variables belong to the loop's trace
        i, cache, token_s, out, state = carry
        model = nnx.merge(graphdef, state)
        ids_s1 = token_s[:, None]
        logits_s1v, cache = model(ids_s1, cache.index[:, None], jnp.ones_like(ids_s1), cache=cache)
        logits_sv = logits_s1v[:, 0]
        alive_s = ~out.done
        n_s = slots.generated + out.count
        new_s = sample_rows(logits_sv, slots.sampling, n_s)
        logprob_s, top_ids, top_logprob = _logprobs(logits_sv, new_s, want_top)
        count_s = out.count + alive_s
        out = Tokens(
            ids=out.ids.at[:, i].set(new_s),
            logprob=out.logprob.at[:, i].set(logprob_s),
            top_ids=out.top_ids.at[:, i].set(top_ids),
            top_logprob=out.top_logprob.at[:, i].set(top_logprob),
            count=count_s,
            done=out.done | (alive_s & (_is_end(new_s, end_ids_e) | (slots.generated + count_s >= slots.limit))),
        )
        return i + 1, cache, jnp.where(alive_s, new_s, token_s), out, state

    _, cache, token_s, out, _ = jax.lax.while_loop(not_finished, step, (0, cache, token_s, empty, state))
    return cache, token_s, out


__all__ = ["TOP_LOGPROBS", "Sampling", "Slots", "Tokens", "decode_steps", "prefill_chunk", "sample_rows"]
