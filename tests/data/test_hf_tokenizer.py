import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nnxlm.data import load_tokenizer
from nnxlm.errors import UserError


@pytest.fixture
def tokenizer_json(tmp_path):
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tokenizer.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50, trainer=trainer)
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


def test_a_file_that_is_not_a_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
