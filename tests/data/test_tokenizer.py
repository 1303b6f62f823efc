"""SentencePieceTokenizer: exact round trip on code, special ids, save/load and errors."""

import pickle
from pathlib import Path

import pytest

from nnxlm.data import SentencePieceTokenizer, Tokenizer, load_tokenizer
from nnxlm.errors import UserError

TRICKY = (
    "  leading spaces\tand\ttabs\n\n\n"
    "    indented = 'héllo wörld 日本語 🎉 \u200b\ufeff'   \n"
    "trailing spaces   \r\n"
    "literal \u2581 mark \u2581\u2581 and a\u2581b\n"
    "\x00\x1b control\t\t\n"
    "no newline at end  "
)


def test_round_trip_on_unseen_stdlib_files(small_tokenizer, stdlib_files):
    unseen = [p for i, p in enumerate(stdlib_files) if i % 10 == 5][:12]  # not trained on
    for path in unseen:
        text = Path(path).read_text(encoding="utf-8")
        assert small_tokenizer.decode(small_tokenizer.encode(text)) == text, path


@pytest.mark.parametrize("text", [TRICKY, " ", "\n", "\t", "\u2581", "", "x\n\n  \n"])
def test_round_trip_on_whitespace_and_unicode(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    assert 3 not in ids  # unk never appears: unseen characters fall back to bytes
    assert small_tokenizer.decode(ids) == text


def test_special_ids_and_layout(small_tokenizer):
    tok = small_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 1000
    assert tok.id_to_piece(4) == "\n" and tok.id_to_piece(5) == "<0x00>"
    ids = tok.encode("def f(x):\n    return x\n")
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
    assert ids.count(4) == 2  # each newline is its own token
    assert len(tok.encode("        ")) <= 2  # indentation runs are pieces
    assert isinstance(tok, Tokenizer)


def test_decode_skips_specials_and_out_of_range(small_tokenizer):
    tok = small_tokenizer
    ids = tok.encode("print('hi')\n")
    noisy = [tok.bos_id, *ids[:2], tok.pad_id, *ids[2:], tok.eos_id, tok.vocab_size, 10**6, -1]
    assert tok.decode(noisy) == "print('hi')\n"


def test_compresses_code(small_tokenizer, stdlib_files):
    text = Path(stdlib_files[5]).read_text(encoding="utf-8")
    assert len(small_tokenizer.encode(text)) < 0.6 * len(text)


def test_save_load_and_pickle(small_tokenizer, tmp_path):
    path = tmp_path / "sub" / "tok.model"
    small_tokenizer.save(str(path))
    for tok in [load_tokenizer(str(path)), pickle.loads(pickle.dumps(small_tokenizer))]:
        assert tok.vocab_size == small_tokenizer.vocab_size
        assert tok.encode(TRICKY) == small_tokenizer.encode(TRICKY)
        assert tok.decode(tok.encode(TRICKY)) == TRICKY


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match=r"tokenizer file .*missing\.model does not exist"):
        SentencePieceTokenizer.load(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf \xff\x00")
    with pytest.raises(UserError, match=r"tokenizer file .*bad\.model is not a SentencePiece"):
        SentencePieceTokenizer.load(str(bad))


def test_train_errors():
    with pytest.raises(UserError, match="vocab_size 100 is too small"):
        SentencePieceTokenizer.train(["abc"], 100)
    with pytest.raises(UserError, match="no text"):
        SentencePieceTokenizer.train(["", "\n\n"], 512)


def test_train_stops_reading_after_max_chars():
    def texts():
        yield "alpha beta gamma\n" * 50
        raise AssertionError("read past max_chars")

    tok = SentencePieceTokenizer.train(texts(), 512, max_chars=100)
    assert tok.decode(tok.encode("beta alpha\n")) == "beta alpha\n"


def test_an_error_of_the_texts_reaches_the_caller_as_it_is():
    """A bad data file met while training names itself; SentencePiece would print only its own frame."""

    def texts():
        yield "some text\n" * 50
        raise UserError("data/bad.jsonl:7 has no field 'text': set JsonlFiles.field to the text field")

    with pytest.raises(UserError, match=r"^data/bad\.jsonl:7 has no field 'text'"):
        SentencePieceTokenizer.train(texts(), 512)
