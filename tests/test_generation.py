"""Generation: KV-cached greedy decoding equals re-running the model; sampling obeys its rules.

Every distinct (batch, bucket, sampling rule) compiles prefill + decode (~2 s here), so the tests
share a few configurations on purpose.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nnxlm.generation import BUCKET, TRACES, generate, restrict_logits, sample_logits, stream
from tests.modules.helpers import tiny_model

PROMPTS = [[4, 8, 15, 16, 23, 42], [7], [9, 9, 2]]  # mixed lengths, batch 3


def greedy_reference(model, prompt, steps):
    """Greedy decoding by re-running the full model (no cache) on a buffer: causality makes the
    zeros after the last token irrelevant, and one shape compiles once."""
    ids = np.zeros((1, len(prompt) + steps), np.int32)
    ids[0, : len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    for t in range(len(prompt), len(prompt) + steps):
        ids[0, t] = int(jnp.argmax(forward(state, ids)[0, t - 1]))
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_generation_matches_step_by_step_argmax(scan_layers):
    model = tiny_model(scan_layers)
    prompt = [5, 17, 3, 42]
    out = generate(model, [prompt], max_new_tokens=6)
    assert out.shape == (1, 6) and out.dtype == np.int32
    assert out[0].tolist() == greedy_reference(model, prompt, 6)


def test_prompts_of_mixed_lengths_give_the_tokens_of_each_alone():
    model = tiny_model()
    batch = generate(model, PROMPTS, max_new_tokens=5)
    for row, prompt in zip(batch, PROMPTS, strict=True):
        np.testing.assert_array_equal(row, generate(model, [prompt], max_new_tokens=5)[0])


def test_a_row_that_emits_eos_is_padded_and_the_others_go_on():
    model = tiny_model()
    free = generate(model, PROMPTS, max_new_tokens=8)
    eos = int(free[0, 2])
    cut = free[0].tolist().index(eos)
    stopped = generate(model, PROMPTS, max_new_tokens=8, eos_id=eos, pad_id=0)
    assert stopped[0].tolist() == free[0, : cut + 1].tolist() + [0] * (7 - cut)
    for row in (1, 2):
        if eos not in free[row].tolist():
            np.testing.assert_array_equal(stopped[row], free[row])
    alone = generate(model, [PROMPTS[0]], max_new_tokens=8, eos_id=eos)  # every row done: early exit
    np.testing.assert_array_equal(alone[0], stopped[0])


def test_two_prompt_lengths_and_new_token_counts_in_one_bucket_compile_once():
    # a vocabulary no other test uses: their compilations (same structure, same shapes) would count
    model = tiny_model(vocab_size=89)
    generate(model, [[1, 2, 3]], max_new_tokens=5)
    generate(model, [[1, 2, 3]], max_new_tokens=5, temperature=1.0, seed=3)
    before = dict(TRACES)
    generate(model, [[4, 5, 6, 7, 8, 9, 10]], max_new_tokens=9)
    generate(model, [[4, 5, 6, 7, 8, 9, 10]], max_new_tokens=9, temperature=0.6, seed=1)  # a new temperature
    assert dict(TRACES) == before
    generate(model, [[1] * (BUCKET + 1)], max_new_tokens=5)  # the next bucket compiles anew
    assert TRACES["prefill"] == before["prefill"] + 1


def test_sampling_is_reproducible_by_seed_and_by_chunk():
    model = tiny_model()
    a = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=3)
    c = generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=1.0, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    parts = list(stream(model, [[1, 2, 3]], 8, temperature=1.0, seed=3, chunk=3))  # the CLI's path
    assert [p.shape[1] for p in parts] == [1, 4, 7, 8]
    np.testing.assert_array_equal(parts[-1], a)


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1)), jnp.argmax(logits, -1))
    model = tiny_model()
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=4, temperature=0.0, top_k=5, top_p=0.5, seed=9)
    np.testing.assert_array_equal(greedy, generate(model, [[1, 2, 3]], max_new_tokens=4))


def test_top_k_and_top_p_never_leave_their_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.05, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 2)
    top_k = sample_logits(logits, keys[0], temperature=1.0, top_k=2)
    assert set(np.unique(top_k)) == {0, 1}
    top_p = sample_logits(logits, keys[1], temperature=1.0, top_p=0.85)  # 0.5 + 0.3 < 0.85: three tokens
    assert set(np.unique(top_p)) == {0, 1, 2}
    both = sample_logits(logits, keys[1], temperature=2.0, top_k=3, top_p=0.5)
    assert set(np.unique(both)) <= {0, 1}


def test_sampling_follows_the_distribution_and_the_cut_offs_match_a_sort():
    probs = jnp.array([0.5, 0.3, 0.1, 0.05, 0.05])
    tokens = sample_logits(jnp.log(jnp.tile(probs, (4000, 1))), jax.random.key(2), temperature=1.0)
    np.testing.assert_allclose(np.bincount(tokens, minlength=5) / 4000, probs, atol=0.03)
    logits = jax.random.normal(jax.random.key(3), (6, 1000)) * 3
    descending = -jnp.sort(-logits, axis=-1)  # the reference cut-offs, by sorting
    for k in (1, 7, 300, 1000):
        np.testing.assert_array_equal(
            jnp.isfinite(restrict_logits(logits, top_k=k)), logits >= descending[:, k - 1 : k]
        )
    probs_sorted = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    for p in (0.01, 0.5, 0.9, 0.999):
        last_kept = jnp.sum(mass_before < p, axis=-1, keepdims=True) - 1
        threshold = jnp.take_along_axis(descending, last_kept, axis=-1)
        np.testing.assert_array_equal(jnp.isfinite(restrict_logits(logits, top_p=p)), logits >= threshold)


def test_bad_arguments_and_an_overfull_cache_raise_value_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceed max_length 16"):
        generate(model, [[1] * 10], max_new_tokens=7, max_length=16)
    for bad, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, top_k=0), "top_k"),
        (dict(temperature=1.0, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, [[1, 2]], **{"max_new_tokens": 3, **bad})
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=3)


def test_text_stream_prints_each_character_once_and_whole():
    from nnxlm.data import SentencePieceTokenizer
    from nnxlm.generation import TextStream

    tokenizer = SentencePieceTokenizer.train(["def add(a, b):\n    return a + b\n"] * 50, 300)
    text = "def añadir(a, b):  # 日本語 ▁\n    return a + b"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the CJK characters fall back to byte pieces
    stream_ = TextStream(tokenizer)
    pieces = [stream_.update(ids[:n], final=n == len(ids)) for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert TextStream(tokenizer).update([*ids, tokenizer.eos_id, 5, 6]) == text  # stops at end of text
