"""Chat templates render as transformers' apply_chat_template does, and SFT masks follow the turns."""

import json

import numpy as np
import pytest

from nnxlm import UserError
from nnxlm.data import load_tokenizer
from nnxlm.data.chat import BUILTIN_TEMPLATE, ChatTemplate, check_messages
from nnxlm.data.sft import example_tokens
from nnxlm.objectives.sft import chat_template as sft_chat_template

CHATML = (  # Qwen 2.5's shape: a default system turn when the conversation has none
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (  # the system turn is folded into the first user turn; roles must alternate
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
CHATML_MARKED = (  # with transformers' {% generation %} markers around what the assistant writes
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_TOOLS = (  # Qwen 2.5's tool calling: the tools in the system turn, calls in <tool_call> tags
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set f = call.function if call.function is defined else call %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + f.name + \'", "arguments": \' }}'
    "{{- (f.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEMPLATES = {
    "chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "chatml-marked": CHATML_MARKED, "chatml-tools": CHATML_TOOLS,
}  # fmt: skip
SPECIAL = {
    "chatml": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "chatml-tools": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "chatml-marked": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "llama3": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    "gemma": dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
}
END_OF_TURN = {
    "chatml": "<|im_end|>", "chatml-marked": "<|im_end|>", "chatml-tools": "<|im_end|>", "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
}  # fmt: skip
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
]  # fmt: skip
CONVERSATIONS = [
    [{"role": "user", "content": "What does len() return?"}, {"role": "assistant", "content": "The number of items."}],
    [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "Sort [3, 1, 2]."},
        {"role": "assistant", "content": " [1, 2, 3] "},
        {"role": "user", "content": "And reversed?"},
        {"role": "assistant", "content": "[3, 2, 1] — done. Ünïcode ok"},
    ],
    [{"role": "user", "content": "Only a question, 3 * 4 =\n?"}],
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, stdlib_files):
    """One HF tokenizer (byte-level BPE with the specials of the three families) per template."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [Path(p).read_text(encoding="utf-8")[:4000] for p in stdlib_files[:40]]
    texts += [m["content"] for c in CONVERSATIONS for m in c]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet)
    tokenizer.train_from_iterator(texts, trainer)
    dirs = {}
    for name, template in TEMPLATES.items():
        directory = tmp_path_factory.mktemp(name)
        bos = SPECIAL[name].get("bos_token")  # prepended by the tokenizer, as Llama 3's and Gemma's are
        tokenizer.post_processor = (
            processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])
            if bos
            else None
        )
        tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **SPECIAL[name]}
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        dirs[name] = directory
    return dirs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_rendered_text_and_tokens_equal_transformers_apply_chat_template(tokenizer_dirs, name):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tokenizer_dirs[name]))
    tokenizer = load_tokenizer(str(tokenizer_dirs[name] / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    for conversation in CONVERSATIONS:
        for generation_prompt in (False, True):
            expected = reference.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=generation_prompt
            )
            text = template.render(conversation, add_generation_prompt=generation_prompt)
            assert text == expected
            expected_ids = reference.apply_chat_template(
                conversation, tokenize=True, add_generation_prompt=generation_prompt, return_dict=True
            )["input_ids"]
            assert tokenizer.encode_with_offsets(text)[0] == list(expected_ids)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_loss_covers_assistant_turns_and_their_end_of_turn_token_only(tokenizer_dirs, name):
    tokenizer = load_tokenizer(str(tokenizer_dirs[name] / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    conversation = CONVERSATIONS[1]
    ids, trained = example_tokens({"messages": conversation}, tokenizer, template)
    trained_text = tokenizer._tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False)
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    if name in ("llama3", "gemma"):  # these templates trim the content
        answers = [a.strip() for a in answers]
    assert trained_text == "".join(a + END_OF_TURN[name] for a in answers)
    if "bos_token" in SPECIAL[name]:  # the template's own bos, once, and never trained
        bos = tokenizer.bos_id
        assert ids[0] == bos and list(ids).count(bos) == 1 and not trained[0]
    # the role headers carry no loss: the token before each trained run is untrained prompt
    starts = np.flatnonzero(trained[1:] & ~trained[:-1]) + 1
    assert len(starts) == 2


def test_generation_markers_give_the_masks_transformers_gives(tokenizer_dirs):
    from transformers import AutoTokenizer

    directory = tokenizer_dirs["chatml-marked"]
    reference = AutoTokenizer.from_pretrained(str(directory))
    tokenizer = load_tokenizer(str(directory / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    for conversation in CONVERSATIONS[:2]:
        expected = reference.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, trained = example_tokens({"messages": conversation}, tokenizer, template)
        assert list(ids) == list(expected["input_ids"])
        assert trained.astype(int).tolist() == list(expected["assistant_masks"])


def test_prompt_completion_pairs_train_the_completion_and_eos(tokenizer_dirs):
    tokenizer = load_tokenizer(str(tokenizer_dirs["llama3"] / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    record = {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"}
    ids, trained = example_tokens(record, tokenizer, template)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and trained[-1] and not trained[0]
    assert tokenizer._tokenizer.decode(ids[trained][:-1].tolist()) == "    return a + b\n"
    everything = example_tokens(record, tokenizer, template, loss_on="all")[1]
    assert everything.all()
    conversational = {"prompt": CONVERSATIONS[1][:4], "completion": CONVERSATIONS[1][4:]}
    ids, trained = example_tokens(conversational, tokenizer, template)
    trained_text = tokenizer._tokenizer.decode(ids[trained].tolist(), skip_special_tokens=False)
    assert trained_text == "[3, 2, 1] — done. Ünïcode ok<|eot_id|>"  # the prompt's assistant turn is not trained


def test_the_builtin_template_suits_nnxlm_sentencepiece_tokenizers(small_tokenizer):
    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    text = template.render(CONVERSATIONS[1][:3], add_generation_prompt=False)
    assert text.startswith("<|system|>\nYou answer in one line.\n<|user|>\nSort")
    assert text.endswith("<|assistant|>\n [1, 2, 3] </s>\n")
    ids, trained = example_tokens({"messages": CONVERSATIONS[1]}, small_tokenizer, template)
    assert list(ids).count(small_tokenizer.eos_id) == 2  # "</s>" became the eos token, once a turn
    assert small_tokenizer.decode(ids[trained].tolist()) == " [1, 2, 3] [3, 2, 1] — done. Ünïcode ok"
    assert np.sum(ids[trained] == small_tokenizer.eos_id) == 2  # each turn's eos carries loss
    prompt = template.render(CONVERSATIONS[2], add_generation_prompt=True)
    assert prompt == "<|user|>\nOnly a question, 3 * 4 =\n?\n<|assistant|>\n"


@pytest.mark.parametrize(
    "record, message",
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user"}]}, "message 0 has no content: give a string"),
        ({"messages": [{"content": "hi"}]}, "must be an object with 'role' and 'content'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user", "content": 3}]}, "content of type int"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}, "part of type 'image'"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "tool_calls: .* on an assistant"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": {"name": "f"}}, "'tools' must be a list"),
        ({"messages": [{"role": "user", "content": "no answer"}]}, "no assistant message"),
        ({"prompt": "only a prompt"}, "needs 'messages', or 'prompt' and 'completion'"),
        ({"prompt": "text", "completion": [{"role": "assistant", "content": "x"}]}, "both be strings"),
        (["a", "list"], "must be a JSON object"),
    ],
)
def test_malformed_examples_name_where_they_are(small_tokenizer, record, message):
    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    with pytest.raises(UserError, match=message) as error:
        example_tokens(record, small_tokenizer, template, where="data/chat.jsonl:7")
    assert str(error.value).startswith("data/chat.jsonl:7: ")


def test_a_template_that_does_not_render_is_one_clear_error(tokenizer_dirs):
    tokenizer = load_tokenizer(str(tokenizer_dirs["gemma"] / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="does not render this conversation.*roles must alternate"):
        template.render(twice)
    answered = [*twice, {"role": "assistant", "content": "c"}]
    with pytest.raises(UserError, match="^data/chat.jsonl:3: the chat template does not render.*must alternate"):
        example_tokens({"messages": answered}, tokenizer, template, where="data/chat.jsonl:3")
    with pytest.raises(UserError, match="does not parse"):
        ChatTemplate("{% for m in messages %}", {})


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 18}'},
    {"role": "assistant", "content": "Sunny, 18 degrees."},
]


def test_tool_calls_render_as_transformers_renders_them_and_the_calls_are_trained(tokenizer_dirs):
    """TRL's tool-calling SFT data: an example's `tools` reach the template, an assistant turn
    may be tool calls alone (content null), and the loss covers the calls and the answer, not the
    tool's result."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tokenizer_dirs["chatml-tools"]))
    tokenizer = load_tokenizer(str(tokenizer_dirs["chatml-tools"] / "tokenizer.json"))
    template = ChatTemplate(tokenizer.chat_template, tokenizer.special_tokens())
    for upto in (2, 4):
        expected = reference.apply_chat_template(TOOL_CONVERSATION[:upto], tools=TOOLS, tokenize=False)
        assert template.render(check_messages(TOOL_CONVERSATION[:upto], "x"), tools=TOOLS) == expected
    assert '"name": "get_weather"' in expected and "<tool_response>" in expected
    # a template that prints every turn's content prints nothing for a null one, as transformers does
    llama3 = ChatTemplate(LLAMA3, SPECIAL["llama3"])
    expected = AutoTokenizer.from_pretrained(str(tokenizer_dirs["llama3"])).apply_chat_template(
        TOOL_CONVERSATION, tokenize=False
    )
    assert llama3.render(check_messages(TOOL_CONVERSATION, "x")) == expected and "None" not in expected
    ids, trained = example_tokens({"messages": TOOL_CONVERSATION, "tools": TOOLS}, tokenizer, template)
    trained_text = tokenizer.decode(ids[trained].tolist())  # without its special tokens
    assert trained_text == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' + (
        "Sunny, 18 degrees."
    )
    assert np.sum(ids[trained] == tokenizer.eos_id) == 2  # each assistant turn's <|im_end|>

    builtin = ChatTemplate(BUILTIN_TEMPLATE, tokenizer.special_tokens())
    with pytest.raises(UserError, match="built-in chat template has no tool calls"):
        example_tokens({"messages": TOOL_CONVERSATION}, tokenizer, builtin)


def test_a_tokenizers_named_tool_use_template_renders_conversations_with_tools(tokenizer_dirs, tmp_path):
    """Some tokenizer configs hold a list of named templates: transformers renders a conversation
    with tools in the "tool_use" one, every other in "default"; so do training and serving."""
    import shutil

    from transformers import AutoTokenizer

    from nnxlm.serving.tools import template_format

    shutil.copy(tokenizer_dirs["chatml-tools"] / "tokenizer.json", tmp_path / "tokenizer.json")
    named = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": CHATML_TOOLS}]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": named, **SPECIAL["chatml-tools"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    template = sft_chat_template(load_tokenizer(str(tmp_path / "tokenizer.json")))
    for conversation, tools in ((TOOL_CONVERSATION[:2], TOOLS), (CONVERSATIONS[1], None)):
        expected = reference.apply_chat_template(conversation, tools=tools, tokenize=False)
        assert template.render(check_messages(conversation, "x"), tools=tools) == expected
    assert "<tools>" in template.render(TOOL_CONVERSATION[:1], tools=TOOLS)
    assert "<tools>" not in template.render(TOOL_CONVERSATION[:1])
    reference.save_pretrained(tmp_path / "saved")  # chat_template.jinja + additional_chat_templates/tool_use.jinja
    resaved = sft_chat_template(load_tokenizer(str(tmp_path / "saved" / "tokenizer.json")))
    assert resaved.render(TOOL_CONVERSATION[:1], tools=TOOLS) == template.render(TOOL_CONVERSATION[:1], tools=TOOLS)
    assert resaved.render(CONVERSATIONS[1]) == template.render(CONVERSATIONS[1])
    assert template_format(template) == "hermes"  # the server reads the calls that template teaches


def test_content_given_as_text_parts_is_their_text(small_tokenizer):
    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    parts = [{"type": "text", "text": "Sort "}, {"type": "text", "text": "[3, 1, 2]."}]
    as_parts = [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "[1]"}]}]
    as_text = [{"role": "user", "content": "Sort [3, 1, 2]."}, {"role": "assistant", "content": "[1]"}]
    for got, expected in zip(
        example_tokens({"messages": as_parts}, small_tokenizer, template),
        example_tokens({"messages": as_text}, small_tokenizer, template),
        strict=True,
    ):
        np.testing.assert_array_equal(got, expected)
