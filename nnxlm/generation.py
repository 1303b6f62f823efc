"""Text generation: sampling rules and a compiled generation loop.

`generate` runs the whole loop under one jit: each new token re-reads the full (fixed-size)
buffer, so shapes never change and it compiles once per (batch, prompt length, new tokens).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits_bv, key, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Next token ids [batch] from logits [batch, vocab]: greedy at temperature 0, else sampled
    from the temperature-scaled distribution restricted to the top_k tokens and to the smallest
    set whose probability reaches top_p (nucleus)."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_largest = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth_largest, -jnp.inf, logits_bv)
    if top_p is not None:
        sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
        cumulative_bv = jnp.cumsum(jax.nn.softmax(sorted_bv, axis=-1), axis=-1)
        # keep a token while the probability mass before it is below top_p (so at least one)
        last_kept = jnp.sum(cumulative_bv - jax.nn.softmax(sorted_bv, axis=-1) < top_p, axis=-1)
        threshold = jnp.take_along_axis(sorted_bv, last_kept[:, None] - 1, axis=-1)
        logits_bv = jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as a right-aligned [batch, longest] array and its lengths."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
    return ids, np.array([len(p) for p in prompts], np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, ids_bt, lengths_b, key, *, max_new_tokens, temperature, top_k, top_p):
    batch, prompt_len = ids_bt.shape
    total = prompt_len + max_new_tokens
    buffer_bt = jnp.concatenate([ids_bt, jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    start_b = prompt_len - lengths_b  # index of each row's first real token
    column_t = jnp.arange(total)
    segment_ids_bt = (column_t[None, :] >= start_b[:, None]).astype(jnp.int32)  # 0 marks left padding
    positions_bt = jnp.maximum(column_t[None, :] - start_b[:, None], 0)

    def step(i, carry):
        # the parameters ride in the carry so the model's variables belong to the loop's trace,
        # which nnx.scan inside the model requires
        buffer_bt, key, state = carry
        key, step_key = jax.random.split(key)
        logits_btv = nnx.merge(graphdef, state)(buffer_bt, positions_bt, segment_ids_bt)
        next_b = sample_logits(logits_btv[:, prompt_len + i - 1], step_key, temperature, top_k, top_p)
        return buffer_bt.at[:, prompt_len + i].set(next_b), key, state

    buffer_bt, _, _ = jax.lax.fori_loop(0, max_new_tokens, step, (buffer_bt, key, state))
    return buffer_bt[:, prompt_len:]


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k=None, top_p=None, seed: int = 0):
    """New token ids [batch, max_new_tokens] continuing prompt_ids ([batch, length] or a list of lists)."""
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    ids_bt, lengths_b = left_pad(prompts)
    graphdef, state = nnx.split(model)
    out = _generate(
        graphdef,
        state,
        ids_bt,
        lengths_b,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
    )
    return np.asarray(out)


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, **sampling) -> list[str]:
    """Completions of text prompts (the prompt itself is not repeated); stops at end of text."""
    ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    new_ids = generate(model, ids, max_new_tokens, **sampling)
    completions = []
    for row in new_ids.tolist():
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        completions.append(tokenizer.decode(row))
    return completions
