import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from nnxlm.data import load_tokenizer
from nnxlm.errors import UserError


@pytest.fixture
def tokenizer_json(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    return path


def test_tokenizer_json_loads_behind_the_same_interface(tokenizer_json):
    tokenizer = load_tokenizer(str(tokenizer_json))
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.pad_id == tokenizer.eos_id  # no pad token named: eos pads
    ids = tokenizer.encode("def add(a, b):")
    assert ids and tokenizer.bos_id not in ids
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id]) == "def add(a, b):"


def test_a_bos_token_is_prepended_only_where_the_tokenizer_itself_prepends_it(tokenizer_json):
    """As transformers encodes a text: a tokenizer may name a bos token that its post-processor
    never adds (SmolLM2's <|im_start|>), and then no bos is prepended to prompts or documents."""
    from transformers import AutoTokenizer

    from nnxlm.generation import prompt_ids

    (tokenizer_json.parent / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    for adds_bos in (True, False):
        if not adds_bos:
            data = json.loads(tokenizer_json.read_text())
            tokenizer_json.write_text(json.dumps({**data, "post_processor": None}))
        tokenizer = load_tokenizer(str(tokenizer_json))
        expected = AutoTokenizer.from_pretrained(str(tokenizer_json.parent))("def add(a").input_ids
        assert prompt_ids(tokenizer, "def add(a") == list(expected)
        assert (tokenizer.bos_id is not None) == adds_bos and (expected[0] == 1) == adds_bos
        assert tokenizer.special_tokens()["bos_token"] == "<s>"  # chat templates still see it


def test_a_file_that_is_not_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_token_bytes_of_a_sentencepiece_style_tokenizer_json_keep_spaces_and_raw_bytes(tmp_path):
    """Llama 2's and Mistral's tokenizer.json: "▁" for a space and <0xE6>-style byte pieces, which
    the logprobs' bytes must give as they are (decoding a token alone strips its space and makes a
    lone byte U+FFFD)."""
    from tokenizers import normalizers

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials)
    tokenizer.train_from_iterator(["the server answers the request with the text"] * 20, trainer)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = load_tokenizer(str(tmp_path / "tokenizer.json"))
    text = "the server answers 日本"
    ids = loaded.encode(text)
    assert "<0xE6>" in [tokenizer.id_to_token(i) for i in ids]  # 日 is three byte pieces
    assert b"".join(loaded.token_bytes(i) for i in ids) == (" " + text).encode("utf-8")
