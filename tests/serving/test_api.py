"""The OpenAI-compatible server, run for real (uvicorn on 127.0.0.1) and driven by the `openai` client."""

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import fiddle as fdl
import numpy as np
import openai
import pytest
from flax import nnx

from nnxlm.data.chat import BUILTIN_TEMPLATE, ChatTemplate
from nnxlm.generation import TRACES, generate
from nnxlm.recipes import models
from nnxlm.serving import Engine
from nnxlm.serving.api import create_app
from tests.serving.helpers import Scripted, server

NAME = "tiny"


@pytest.fixture(scope="module")
def tiny(small_tokenizer):
    cfg = models.llama_tiny(vocab_size=small_tokenizer.vocab_size)
    cfg.scan_layers = False
    model = fdl.build(cfg)(rngs=nnx.Rngs(3))
    engine = Engine(model, small_tokenizer, slots=8, max_length=256, steps=4)
    engine.warm_up()
    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    with engine, server(create_app(engine, NAME, template)) as url:
        yield model, engine, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), url


def stream_text(client, **kwargs):
    pieces, finish, usage = {}, {}, None
    for chunk in client.completions.create(model=NAME, stream=True, stream_options={"include_usage": True}, **kwargs):
        for choice in chunk.choices:
            pieces.setdefault(choice.index, []).append(choice.text)
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
        usage = chunk.usage or usage
    return {i: "".join(p) for i, p in pieces.items()}, finish, usage


def test_greedy_requests_side_by_side_equal_one_by_one_and_generate_with_no_new_traces(tiny, small_tokenizer):
    model, engine, client, _ = tiny
    traces = (TRACES["serve_prefill"], TRACES["serve_decode"])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, small_tokenizer.vocab_size, size=int(n)).tolist() for n in rng.integers(1, 150, 8)]

    def complete(prompt):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, logprobs=0)
        return r.choices[0]

    one_by_one = [complete(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, prompts))
    assert [c.text for c in together] == [c.text for c in one_by_one]
    for prompt, choice in zip(prompts, together, strict=True):
        want = generate(model, [prompt], 16, eos_id=small_tokenizer.eos_id, pad_id=small_tokenizer.eos_id)[0].tolist()
        want = want[: want.index(small_tokenizer.eos_id)] if small_tokenizer.eos_id in want else want
        assert len(choice.logprobs.tokens) == len(want)
        assert choice.text == small_tokenizer.decode(prompt[-8:] + want)[len(small_tokenizer.decode(prompt[-8:])) :]
    # every other setting: sampling, top_k / top_p, logprobs, n with a seed, stop strings, chat, streaming
    client.completions.create(model=NAME, prompt="x", max_tokens=5, temperature=1.3, top_p=0.5, extra_body={"top_k": 4})
    client.completions.create(model=NAME, prompt="def f(", max_tokens=5, n=3, seed=1, logprobs=5, stop=["a", "b"])
    client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, top_logprobs=20
    )
    stream_text(client, prompt=list(range(5, 200)), max_tokens=40)
    assert (TRACES["serve_prefill"], TRACES["serve_decode"]) == traces, "a request compiled after warm-up"


def test_completions_and_chat_with_logprobs_usage_and_n(tiny, small_tokenizer):
    _, _, client, _ = tiny
    r = client.completions.create(model=NAME, prompt="import os\n", max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert all(
        len(top) == 3 and max(top.values()) >= lp.token_logprobs[i] - 1e-4 for i, top in enumerate(lp.top_logprobs)
    )
    assert all(x <= 0 for x in lp.token_logprobs) and r.choices[0].finish_reason == "length"
    prompt_tokens = 1 + len(small_tokenizer.encode("import os\n"))  # bos + the text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    sampled = dict(model=NAME, messages=messages, max_completion_tokens=6, temperature=0.9, seed=4, n=3)
    chat = client.chat.completions.create(**sampled, logprobs=True, top_logprobs=2)
    assert [c.index for c in chat.choices] == [0, 1, 2] and chat.object == "chat.completion"
    assert len({c.message.content for c in chat.choices}) > 1  # the choices sample with seeds 4, 5, 6
    for c in chat.choices:
        assert c.message.role == "assistant"
        entry = c.logprobs.content[0]
        assert len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode("utf-8", "backslashreplace") == entry.token
    rendered = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens()).render(
        messages, add_generation_prompt=True
    )
    ids = small_tokenizer.encode_with_offsets(rendered)[0]
    assert chat.usage.prompt_tokens == len(ids) and ids.count(small_tokenizer.bos_id) <= 1  # no doubled bos
    lengths = [c.finish_reason == "length" for c in chat.choices]
    assert chat.usage.completion_tokens >= 6 * sum(lengths) + (3 - sum(lengths))  # every choice makes a token
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    again = client.chat.completions.create(**sampled)
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    models_list = client.models.list()
    assert [m.id for m in models_list.data] == [NAME]


def test_streams_equal_responses_and_stop_strings_cut_across_tokens(tiny):
    _, _, client, _ = tiny
    base = client.completions.create(model=NAME, prompt="class A:\n", max_tokens=30, temperature=0, logprobs=0)
    text, offsets = base.choices[0].text, base.choices[0].logprobs.text_offset
    boundary = next(o for o in offsets if 2 <= o <= len(text) - 2 and text[o - 2 : o + 2].strip())
    stop = text[boundary - 2 : boundary + 2]  # spans two tokens
    want = text[: text.index(stop)]
    r = client.completions.create(model=NAME, prompt="class A:\n", max_tokens=30, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed, finish, usage = stream_text(client, prompt="class A:\n", max_tokens=30, temperature=0, stop=[stop])
    assert (streamed[0], finish[0]) == (want, "stop") and usage.completion_tokens == r.usage.completion_tokens
    streamed, finish, _ = stream_text(client, prompt="class A:\n", max_tokens=30, temperature=0, n=2)
    assert streamed == {0: text, 1: text} and finish == {0: "length", 1: "length"}

    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True
        )
    )
    whole = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


BAD_REQUESTS = {
    "malformed JSON": (b'{"prompt": "x", ', "completions"),
    "not an object": (b"[1, 2]", "completions"),
    "JSON nested too deeply": (b"[" * 100_000 + b"]" * 100_000, "completions"),
    "a JSON response format": ({"prompt": "x", "response_format": {"type": "json_object"}}, "completions"),
    "best_of 2": ({"prompt": "x", "best_of": 2}, "completions"),
    "negative max_tokens": ({"prompt": "x", "max_tokens": -1}, "completions"),
    "absurd max_tokens": ({"prompt": "x", "max_tokens": 10**12}, "completions"),
    "temperature 5": ({"prompt": "x", "temperature": 5}, "completions"),
    "top_p 0": ({"prompt": "x", "top_p": 0}, "completions"),
    "top_k -5": ({"prompt": "x", "top_k": -5}, "completions"),
    "n 0": ({"prompt": "x", "n": 0}, "completions"),
    "n 1000": ({"prompt": "x", "n": 1000}, "completions"),
    "logprobs 9": ({"prompt": "x", "logprobs": 9}, "completions"),
    "seed text": ({"prompt": "x", "seed": "abc"}, "completions"),
    "stop numbers": ({"prompt": "x", "stop": [1, 2]}, "completions"),
    "token id outside the vocabulary": ({"prompt": [5, 10**9]}, "completions"),
    "empty prompt": ({"prompt": []}, "completions"),
    "no prompt": ({"max_tokens": 3}, "completions"),
    "prompt longer than the context": ({"prompt": list(range(3, 300))}, "completions"),
    "prompt and max_tokens past the context": ({"prompt": list(range(3, 200)), "max_tokens": 100}, "completions"),
    "messages and max_completion_tokens past the context": (
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 250, "max_tokens": 5},
        "chat/completions",
        "max_completion_tokens",
    ),
    "a penalty": ({"prompt": "x", "presence_penalty": 1.5}, "completions"),
    "stream not a bool": ({"prompt": "x", "stream": "yes"}, "completions"),
    "no messages": ({"max_tokens": 3}, "chat/completions"),
    "bad role": ({"messages": [{"role": "wizard", "content": "x"}]}, "chat/completions"),
    "role not a string": ({"messages": [{"role": ["user"], "content": "x"}]}, "chat/completions", "messages[0]"),
    "lone surrogate in a prompt": (b'{"prompt": "a\\ud800"}', "completions", "prompt"),
    "lone surrogate in a message": (
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        "chat/completions",
        "messages",
    ),
    "image content": ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "chat/completions"),
    "tools with a template that has none": (
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
        "chat/completions",
    ),
    "top_logprobs 30": (
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30},
        "chat/completions",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_gets_a_400_in_openais_shape_and_the_server_goes_on(tiny, case):
    _, _, client, url = tiny
    payload, path, *param = BAD_REQUESTS[case]
    status, body, _ = post(
        f"{url}/v1/{path}",
        None if isinstance(payload, bytes) else payload,
        payload if isinstance(payload, bytes) else None,
    )
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert body["error"]["param"] == (param or [body["error"]["param"]])[0], body
    r = client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0, extra_body={"unknown_field": 1})
    assert r.usage.completion_tokens >= 1  # unknown fields are accepted and ignored


def test_an_unknown_model_or_route_is_a_404_and_a_wrong_method_a_405_in_openais_shape(tiny):
    _, _, client, url = tiny
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    status, body, _ = post(f"{url}/v1/embeddings", {"input": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"
    try:
        urllib.request.urlopen(f"{url}/v1/completions", timeout=10)
    except urllib.error.HTTPError as e:
        status, body = e.code, json.loads(e.read())
    assert status == 405 and set(body["error"]) == {"message", "type", "param", "code"}


def test_seeds_past_32_bits_are_hashed_not_cut():
    from nnxlm.serving.requests import seed32

    assert [seed32(s) for s in (0, 5, 2**32 - 1)] == [0, 5, 2**32 - 1]  # the engine's seeds as they were
    wide = [seed32(s) for s in (2**32 + 5, -1, -5, 2**63 - 1, 2**64 - 2)]
    assert len(set(wide)) == len(wide) and all(0 <= s < 2**32 for s in wide)
    assert seed32(2**32 + 5) != 5 and seed32(-1) != 2**32 - 1 and seed32(-1) == seed32(2**64 - 1)


def test_health_and_prometheus_metrics(tiny):
    _, _, client, url = tiny
    client.completions.create(model=NAME, prompt="x", max_tokens=3, temperature=0)
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in (
        "nnxlm_requests_total",
        "nnxlm_generation_tokens_total",
        "nnxlm_queue_depth",
        "nnxlm_slots_busy",
        "nnxlm_time_to_first_token_seconds_bucket",
        "nnxlm_inter_token_latency_seconds_bucket",
    ):
        assert name in text
    assert 'nnxlm_requests_total{outcome="ok"}' in text


# -- a model whose words are known: characters over byte tokens, a full queue, a client that leaves

EMOJI_TEXT = " héllo 😀 世界 👍🏽 ok"


@pytest.fixture(scope="module")
def scripted(small_tokenizer):
    script = small_tokenizer.encode(EMOJI_TEXT)
    engine = Engine(
        Scripted(script, small_tokenizer.vocab_size), small_tokenizer, slots=1, max_length=1 << 16, max_queue=1
    )
    engine.warm_up()
    with server(create_app(engine, "scripted")) as url:
        yield engine, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), url, script


def test_emoji_and_cjk_stream_whole_and_equal_the_response(scripted, small_tokenizer):
    engine, client, _, script = scripted
    prompt = [5] * (len(script) + 1)  # the first new token is script[0]
    with engine:
        whole = client.completions.create(model="scripted", prompt=prompt, max_tokens=len(script), temperature=0)
        chunks = [
            c.choices[0].text
            for c in client.completions.create(
                model="scripted", prompt=prompt, max_tokens=len(script), temperature=0, stream=True
            )
        ]
    assert (
        whole.choices[0].text
        == "".join(chunks)
        == small_tokenizer.decode([5] + script)[len(small_tokenizer.decode([5])) :]
    )
    assert "😀 世界 👍🏽" in whole.choices[0].text
    assert not any("\ufffd" in c for c in chunks)


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(scripted):
    engine, client, url, script = scripted
    prompt = [5] * (len(script) + 1)
    status, body, headers = 0, None, {}
    from nnxlm.serving import Settings

    # the engine is not running: one request takes the slot, one waits, the next is refused
    held = [engine.submit(prompt, Settings(max_tokens=10)), engine.submit(prompt, Settings(max_tokens=10))]
    status, body, headers = post(f"{url}/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert status == 429 and headers.get("retry-after") == "1" and body["error"]["type"] == "rate_limit_error"
    with engine:
        for request in held:
            request.result(timeout=60)
        stream = client.completions.create(
            model="scripted", prompt=prompt, max_tokens=60_000, temperature=0, stream=True
        )
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 30
        while engine.free_slots() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.free_slots() == 1
        assert 'outcome="cancelled"' in engine.metrics.text().decode()
        after = client.completions.create(model="scripted", prompt=prompt, max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason == "length"


def counted(engine, outcome: str) -> float:
    return engine.metrics.requests.labels(outcome)._value.get()


def test_a_request_that_could_never_start_is_a_400_not_a_429(scripted):
    engine, client, url, _ = scripted  # 1 slot and a queue of 1: 2 choices at most
    before = counted(engine, "cancelled")
    status, body, _ = post(f"{url}/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 2})
    assert status == 400 and body["error"]["param"] == "prompt" and "at most 2" in body["error"]["message"]
    assert counted(engine, "cancelled") == before  # nothing was queued, so nothing was withdrawn
    with engine:
        two = client.completions.create(model="scripted", prompt=["a", "b"], max_tokens=2, temperature=0)
    assert len(two.choices) == 2


def test_a_client_that_leaves_a_request_that_is_not_streamed_frees_its_slot(scripted):
    engine, _, url, script = scripted
    prompt = [5] * (len(script) + 1)
    impatient = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=0.5)
    cancelled, ok = counted(engine, "cancelled"), counted(engine, "ok")
    with engine:
        with pytest.raises(openai.APITimeoutError):  # tokens keep flowing while the client is gone
            impatient.completions.create(model="scripted", prompt=prompt, max_tokens=60_000, temperature=0)
        deadline = time.monotonic() + 30
        while counted(engine, "cancelled") == cancelled and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counted(engine, "cancelled") == cancelled + 1 and counted(engine, "ok") == ok
        while engine.free_slots() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.free_slots() == 1


def test_an_empty_text_prompt_without_a_bos_token_is_the_prompts_fault():
    import types

    from nnxlm.serving.requests import APIError, completion_prompts

    no_bos = types.SimpleNamespace(bos_id=None, encode=lambda text: list(text.encode()))  # as Qwen's tokenizer
    assert completion_prompts({"prompt": "ab"}, no_bos) == [[97, 98]]
    with pytest.raises(APIError) as refused:
        completion_prompts({"prompt": ["x", ""]}, no_bos)
    assert refused.value.param == "prompt" and "is empty" in refused.value.message
