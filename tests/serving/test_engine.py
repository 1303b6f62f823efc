"""The continuous-batching engine: each request's tokens do not depend on its neighbours, and no
request compiles anything after warm-up."""

import fiddle as fdl
import numpy as np
import pytest
from flax import nnx

from nnxlm.generation import TRACES, generate
from nnxlm.recipes import models
from nnxlm.serving import Engine, QueueFull, Settings


class IdsTokenizer:
    """Text is the ids: the engine tests compare tokens, not words."""

    bos_id, eos_id, vocab_size = None, None, 97

    def __init__(self, fail_on=None):
        self.fail_on = fail_on

    def decode(self, ids):
        if self.fail_on in ids:
            raise RuntimeError(f"cannot decode {self.fail_on}")
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module")
def model():
    cfg = models.llama_tiny(vocab_size=97)
    cfg.scan_layers = True  # the engine unstacks the layers it decodes with
    return fdl.build(cfg)(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 97, size=int(n)).tolist() for n in rng.integers(1, 140, size=16)]


def ids_of(result, choice=0):
    return [t.id for t in result.choices[choice].tokens]


def test_greedy_tokens_are_the_same_alone_beside_15_others_and_through_generate(model, prompts):
    engine = Engine(model, IdsTokenizer(), slots=16, max_length=192, steps=4, chunk=32)
    engine.warm_up()
    traces = dict(TRACES)
    greedy = Settings(max_tokens=20)
    with engine:
        alone = [ids_of(engine.submit(p, greedy).result(timeout=120)) for p in prompts[:8]]
        # the 8 greedy prompts beside 8 sampled ones with every setting (and top log-probabilities)
        sampled = [
            Settings(20, temperature=0.8, seed=i, top_k=[0, 5][i % 2], top_p=[1.0, 0.9][i // 2 % 2], top_logprobs=i % 3)
            for i in range(8)
        ]
        requests = [engine.submit(p, s) for p, s in zip(prompts, [greedy] * 8 + sampled, strict=True)]
        together = [r.result(timeout=120) for r in requests]
    assert [ids_of(r) for r in together[:8]] == alone
    reference = [generate(model, [p], 20)[0].tolist() for p in prompts[:8]]
    assert alone == reference
    assert all(len(r.choices[0].tokens) == 20 and r.choices[0].finish_reason == "length" for r in together)
    assert {k: TRACES[k] for k in ("serve_prefill", "serve_decode")} == {
        k: traces[k] for k in ("serve_prefill", "serve_decode")
    }, "a request compiled after warm-up"
    top = together[10].choices[0].tokens[0].top
    assert len(top) == 2 and top[0][1] >= top[1][1]  # top_logprobs=2, most likely first


def test_a_seed_gives_the_same_tokens_in_any_company_and_n_choices_differ(model, prompts):
    engine = Engine(model, IdsTokenizer(), slots=4, max_length=192, steps=3, chunk=64)
    settings = Settings(max_tokens=12, temperature=1.0, seed=7)
    with engine:
        alone = ids_of(engine.submit(prompts[0], settings).result(timeout=60))
        crowd = [engine.submit(p, Settings(12, temperature=1.0)) for p in prompts[1:4]]
        three = engine.submit(prompts[0], Settings(max_tokens=12, temperature=1.0, seed=7, n=3)).result(timeout=60)
        for r in crowd:
            r.result(timeout=60)
    assert ids_of(three, 0) == alone  # choice i uses seed + i
    assert ids_of(three, 1) != alone and ids_of(three, 2) != ids_of(three, 1)


def test_a_full_queue_refuses_and_a_cancelled_request_frees_its_slot(model, prompts):
    engine = Engine(model, IdsTokenizer(), slots=1, max_length=192, max_queue=1)
    long = engine.submit(prompts[0][:10], Settings(max_tokens=150))
    queued = engine.submit(prompts[1][:10], Settings(max_tokens=5))
    with pytest.raises(QueueFull):
        engine.submit(prompts[2][:10], Settings(max_tokens=5))
    # more choices than the slot and the queue could ever hold: refused for good, nothing queued
    waiting = len(engine._waiting)
    with pytest.raises(ValueError, match="3 choices .* at most 2"):
        engine.submit_all([prompts[2][:10]] * 3, [Settings(max_tokens=5)] * 3)
    assert len(engine._waiting) == waiting == 2
    with engine:
        next(long.updates(timeout=60))  # decoding has started
        long.cancel()
        assert len(queued.result(timeout=60).choices[0].tokens) == 5
        updates = long.poll()
    assert updates and updates[-1].finish_reason == "cancelled"
    assert len(long.choices[0].tokens) < 150
    assert engine.free_slots() == 1


def test_a_failing_request_fails_alone(model, prompts):
    engine = Engine(model, IdsTokenizer(fail_on=96), slots=2, max_length=192)
    with engine:
        bad = engine.submit([5, 96, 7], Settings(max_tokens=4))
        good = engine.submit(prompts[0][:20], Settings(max_tokens=4))
        with pytest.raises(RuntimeError, match="cannot decode 96"):
            bad.result(timeout=60)
        assert len(good.result(timeout=60).choices[0].tokens) == 4
        again = engine.submit(prompts[1][:20], Settings(max_tokens=4)).result(timeout=60)
    assert len(again.choices[0].tokens) == 4


def test_prompts_that_do_not_fit_are_refused(model):
    engine = Engine(model, IdsTokenizer(), slots=1, max_length=100, chunk=64)  # cache rows of 2 chunks, 128
    with pytest.raises(ValueError, match="context is 100 tokens, but 95 prompt tokens and max_tokens 6"):
        engine.submit(list(range(95)), Settings(max_tokens=6))  # within the row, past the context asked for
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], Settings(max_tokens=1))
    with engine:  # the whole context is served
        assert len(engine.submit(list(range(95)), Settings(max_tokens=5)).result(timeout=60).choices[0].tokens) == 5


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -3}, "top_k must be an integer >= 0"),
        ({"n": 0}, "n must be an integer >= 1"),
    ],
)
def test_settings_out_of_range_are_refused_not_run(bad, message):
    # the engine used from Python: max_tokens=0 generated a token, top_p=0 masked every logit
    with pytest.raises(ValueError, match=message):
        Settings(**{"max_tokens": 4, **bad})
    Settings(max_tokens=4, temperature=0.7, top_k=0, top_p=1.0)  # 0 and 1 keep every token
