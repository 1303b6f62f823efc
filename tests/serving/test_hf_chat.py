"""A converted Hugging Face model behind the server answers a chat as transformers does: its own
tokenizer.json, chat template and end-of-turn token, byte-level tokens in the logprobs."""

import json

import openai
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nnxlm.convert import from_hf
from nnxlm.errors import UserError
from nnxlm.serving import Engine
from nnxlm.serving.api import create_app
from nnxlm.serving.load import load, serving_length
from tests.serving.helpers import server

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["def add(a, b):\n    return a + b\n", "héllo 😀 世界"] * 50, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    hf_config = transformers.Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(hf_config).save_pretrained(directory)
    return directory


def test_a_converted_model_chats_as_transformers_generates(hf_dir, tmp_path):
    from_hf(str(hf_dir), str(tmp_path / "run"))
    served = load(str(tmp_path / "run"), max_length=128)
    end = served.tokenizer._to_id("<|im_end|>")
    assert end in served.end_ids  # the template's end of turn ends a reply, beside the eos token
    engine = Engine(served.model, served.tokenizer, slots=2, max_length=128, end_ids=served.end_ids)
    messages = [{"role": "user", "content": "héllo 😀"}]
    with engine, server(create_app(engine, "qwen", served.template)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model="qwen", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
        )
        streamed = client.chat.completions.create(
            model="qwen", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in streamed)

    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    hf_tokenizer.chat_template = TEMPLATE
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    new = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=end)[0, ids.shape[1] :].tolist()
    new = new[: new.index(end)] if end in new else new
    assert reply.usage.prompt_tokens == ids.shape[1]
    assert reply.choices[0].message.content == streamed == hf_tokenizer.decode(new)
    tokens = reply.choices[0].logprobs.content
    assert len(tokens) == len(new)  # one logprobs entry a token, its bytes the token's own
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace") == hf_tokenizer.decode(new)


def test_a_converted_model_serves_its_own_context_and_no_more(hf_dir, tmp_path):
    from_hf(str(hf_dir), str(tmp_path / "run"))
    assert load(str(tmp_path / "run")).max_length == 512  # config.json's max_position_embeddings, not seq_len 256
    with pytest.raises(UserError, match="--max_length 513 is past the model's context of 512 tokens"):
        load(str(tmp_path / "run"), max_length=513)
    # a long context is capped by default (each slot's cache holds all of it); a run's seq_len serves whole
    assert serving_length(None, seq_len=256, context_length=131072) == 4096
    assert serving_length(None, seq_len=8192, context_length=131072) == 8192
    assert serving_length(None, seq_len=256, context_length=None) == 256
    assert serving_length(100_000, seq_len=256, context_length=131072) == 100_000
