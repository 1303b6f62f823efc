"""Tool calling through the chat API, driven by the `openai` client: the request's tools reach the
chat template, the calls the model writes come back as message.tool_calls (streamed too), and the
conversation that continues with the calls and their results renders as transformers renders it."""

import json

import openai
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nnxlm.data import load_tokenizer
from nnxlm.data.chat import ChatTemplate
from nnxlm.serving import Engine
from nnxlm.serving.api import create_app
from nnxlm.serving.tools import Calls, detect, parse
from tests.data.test_chat import CHATML_TOOLS, LLAMA3, SPECIAL, SPECIAL_TOKENS, TOOLS
from tests.serving.helpers import Scripted, server

MESSAGES = [{"role": "user", "content": "What is the weather in Paris and in Zürich?"}]
ANSWER = (
    "Let me look.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
)


def test_hermes_calls_are_parsed_after_any_text_and_bad_ones_stay_text():
    content, calls = parse(ANSWER, "hermes")
    assert content == "Let me look.\n"
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Zürich"}),
    ]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert parse('<tool_call>\n{"name": "f", "arguments": {}}\n', "hermes")[0] is None  # ended before the tag
    for text in (
        "no call here",
        '<tool_call>\n{"name": "f", "arguments": {\n</tool_call>',
        "<tool_call>[1]</tool_call>",
    ):
        assert parse(text, "hermes") == (text, [])


def test_calls_parse_as_vllms_parsers_read_them():
    sql = '{"name": "run_sql", "parameters": {"q": "SELECT 1; SELECT 2"}};'  # ';' inside and after
    assert [json.loads(c["function"]["arguments"]) for c in parse(sql, "llama3_json")[1]] == [
        {"q": "SELECT 1; SELECT 2"}
    ]
    tagged = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'  # Llama 3.1's special token
    assert parse(tagged, "llama3_json")[1][0]["function"]["name"] == "get_weather"
    content, calls = parse('\n\n<tool_call>\n{"name": "f", "arguments": "hello"}\n</tool_call>', "hermes")
    assert content == "\n\n" and calls[0]["function"]["arguments"] == '"hello"'  # always JSON text
    nested = '<tool_call>{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}</tool_call>"
    assert parse(nested, "hermes") == (nested, [])


def test_llama3_json_calls_are_the_whole_answer():
    content, calls = parse(' {"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', "llama3_json")
    assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("f", '{"x": 1}'),
        ("g", "{}"),
    ]
    for text in ("It is {warm}.", '{"no_name": 1}', "Sunny.", '{"name": "Alice", "age": 30}'):  # a JSON answer
        assert parse(text, "llama3_json") == (text, [])


@pytest.mark.parametrize(
    "fmt,text",
    [
        ("hermes", ANSWER),
        ("hermes", "a <tool_ca b"),
        ("llama3_json", '{"name": "f"}'),
        ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": "a;b"}}'),
        ("llama3_json", "<|python_tag|> is a token"),
        ("llama3_json", "Sunny, {18} degrees"),
    ],
)
def test_streamed_pieces_of_any_size_send_the_content_and_then_the_calls(fmt, text):
    want_content, want_calls = parse(text, fmt)
    for size in (1, 2, 5, len(text)):
        stream = Calls(fmt)
        sent = "".join(stream.add(text[i : i + size]) for i in range(0, len(text), size))
        rest, calls = stream.finish()
        assert sent + rest == (want_content or "") if want_calls else sent + rest == text
        assert [c["function"] for c in calls] == [c["function"] for c in want_calls]
        assert "<tool_call>" not in sent and (not want_calls or "<|python_tag|>" not in sent)


def test_the_format_is_read_from_the_chat_template():
    assert detect(CHATML_TOOLS) == "hermes"
    assert detect(LLAMA3) is None  # renders no tools
    llama31 = 'Respond in the format {"name": function name, "parameters": dictionary of argument name}'
    assert detect(llama31) == "llama3_json" and detect(None) is None


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, stdlib_files):
    """A Scripted model that answers ANSWER to MESSAGES (whatever it is asked), behind a real
    server with a byte-level tokenizer and Qwen 2.5's tool-calling chat template."""
    from pathlib import Path

    directory = tmp_path_factory.mktemp("tools")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    texts = [Path(p).read_text(encoding="utf-8")[:4000] for p in stdlib_files[:20]] + [ANSWER]
    bpe.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    )
    bpe.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML_TOOLS, **SPECIAL["chatml-tools"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(directory / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    prompt = tokenizer.encode_with_offsets(template.render(MESSAGES, add_generation_prompt=True, tools=TOOLS))[0]
    answer = tokenizer.encode(ANSWER) + [tokenizer.eos_id]
    script = [0] * len(answer)
    for k, token in enumerate(answer):  # the token after position p is script[p % len]: the first is answer[0]
        script[(len(prompt) - 1 + k) % len(answer)] = token
    engine = Engine(Scripted(script, tokenizer.vocab_size), tokenizer, slots=2, max_length=512)
    engine.warm_up()
    with engine, server(create_app(engine, "tools", template)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60), directory, tokenizer


def test_tool_calls_come_back_as_openai_clients_read_them_streamed_or_not(tool_server):
    client, _, _ = tool_server
    reply = client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS, temperature=0)
    choice = reply.choices[0]
    choice_message = choice.message
    assert choice.finish_reason == "tool_calls" and choice_message.content == "Let me look.\n"
    called = [(c.type, c.function.name, json.loads(c.function.arguments)) for c in choice_message.tool_calls]
    assert called == [("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Zürich"})]

    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(
        model="tools", messages=MESSAGES, tools=TOOLS, temperature=0, stream=True, tool_choice="auto"
    ):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, [call.function.name, ""])[1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me look.\n" and finish == "tool_calls"
    assert [(n, json.loads(a)) for n, a in calls.values()] == [(n, a) for _, n, a in called]

    # tool_choice none: the calls are the answer's text
    plain = client.chat.completions.create(
        model="tools", messages=MESSAGES, tools=TOOLS, tool_choice="none", temperature=0
    )
    assert plain.choices[0].message.content == ANSWER and plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason == "stop"


def test_the_conversation_goes_on_with_the_calls_and_their_results_as_transformers_renders_it(tool_server):
    from transformers import AutoTokenizer

    client, directory, tokenizer = tool_server
    reply = client.chat.completions.create(model="tools", messages=MESSAGES, tools=TOOLS, temperature=0)
    message = reply.choices[0].message
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18 + i})}
        for i, call in enumerate(message.tool_calls)
    ]
    conversation = [*MESSAGES, message.model_dump(exclude_none=True), *results]
    follow = client.chat.completions.create(model="tools", messages=conversation, tools=TOOLS, max_tokens=1)
    # transformers' templates take the arguments as objects (OpenAI sends them as JSON strings)
    reference = [*MESSAGES, {**message.model_dump(exclude_none=True)}, *results]
    reference[1]["tool_calls"] = [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in reference[1]["tool_calls"]
    ]
    text = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
        reference, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert '{"city": "Zürich"}' in text and '<tool_response>\n{"temperature": 19}' in text
    assert follow.usage.prompt_tokens == len(tokenizer.encode_with_offsets(text)[0])


def test_requests_with_tools_the_server_cannot_honour_get_a_400(tool_server):
    client, _, _ = tool_server
    cases = [
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "bogus"}, "tool_choice"),
        ({"tool_choice": "bogus"}, "tool_choice"),
        ({"tools": TOOLS, "parallel_tool_calls": False}, "parallel_tool_calls"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tools", messages=MESSAGES, max_tokens=1, **extra)
        assert refused.value.body["param"] == param, refused.value.body
    nested = "[" * 100_000 + "]" * 100_000
    for arguments, problem in (
        ("{", "is not valid JSON"),
        (nested, "is not valid JSON"),
        (5, "must be JSON text"),
    ):
        call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        with pytest.raises(
            openai.BadRequestError, match=rf"messages\[1\].tool_calls\[0\].function.arguments: {problem}"
        ):
            client.chat.completions.create(
                model="tools", messages=[*MESSAGES, {"role": "assistant", "tool_calls": [call]}], max_tokens=1
            )
