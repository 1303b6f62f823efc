"""The SFT pipeline: whole examples packed apart, the loss on assistant tokens, overlong ones counted."""

import json

import numpy as np
import pytest

from nnxlm import UserError
from nnxlm.data import JsonlFiles
from nnxlm.data.chat import BUILTIN_TEMPLATE, ChatTemplate
from nnxlm.data.sft import example_tokens, make_sft_dataset


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


EXAMPLES = [chat(f"What is {i} + {i}?", f"It is {2 * i}." + " Indeed." * (i % 3)) for i in range(12)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES), encoding="utf-8")
    return path


def dataset(path, tokenizer, **settings):
    template = ChatTemplate(BUILTIN_TEMPLATE, tokenizer.special_tokens())
    defaults = dict(seq_len=64, batch_size=4, shuffle=False, repeat=False)
    return make_sft_dataset(JsonlFiles(globs=[str(path)], field=None), tokenizer, template, **(defaults | settings))


def test_packed_rows_hold_whole_examples_apart_with_the_loss_on_answers(jsonl, small_tokenizer):
    template = ChatTemplate(BUILTIN_TEMPLATE, small_tokenizer.special_tokens())
    batches = list(dataset(jsonl, small_tokenizer))
    seen = []
    for batch in batches:
        assert batch["inputs"].shape == (4, 64) and batch["loss_mask"].dtype == np.float32
        for row in range(4):
            segments = batch["segment_ids"][row]
            for segment in sorted(set(segments.tolist()) - {0}):
                where = segments == segment
                positions = batch["positions"][row][where]
                np.testing.assert_array_equal(positions, np.arange(where.sum()))  # restart at 0
                ids = np.concatenate([batch["inputs"][row][where][:1], batch["targets"][row][where]])
                seen.append((ids, batch["loss_mask"][row][where]))
            assert not batch["loss_mask"][row][segments == 0].any()  # padding carries no loss
        assert batch["examples"].sum() == sum(len(set(s.tolist()) - {0}) for s in batch["segment_ids"])
    assert len(seen) == sum(int(b["examples"].sum()) for b in batches) >= 8
    # each packed example is exactly that example's tokens and mask (targets shifted by one)
    expected = {
        tuple(ids): trained for ids, trained in (example_tokens(e, small_tokenizer, template) for e in EXAMPLES)
    }
    for ids, loss_mask in seen:
        np.testing.assert_array_equal(loss_mask, expected[tuple(ids)][1:])


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_examples_longer_than_a_row_are_cut_or_dropped_and_counted(jsonl, small_tokenizer, overlong):
    long = chat("Tell me everything.", "word " * 200)
    with open(jsonl, "a", encoding="utf-8") as f:
        f.write(json.dumps(long) + "\n")
    batches = list(dataset(jsonl, small_tokenizer, overlong=overlong, batch_size=1))
    truncated = sum(int(b["truncated"].sum()) for b in batches)
    dropped = sum(int(b["dropped"].sum()) for b in batches)
    examples = sum(int(b["examples"].sum()) for b in batches)
    assert (truncated, dropped) == ((1, 0) if overlong == "truncate" else (0, 1))
    assert examples == len(EXAMPLES) + (overlong == "truncate")
    if overlong == "truncate":
        full = [b for b in batches if b["truncated"].sum()][0]
        assert full["segment_ids"][0].min() == 1 and full["loss_mask"][0].sum() > 0  # the whole row, one example


def test_a_malformed_line_names_its_file_and_line(tmp_path, small_tokenizer):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(EXAMPLES[0]), json.dumps({"messages": [{"role": "robot", "content": "beep"}]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:2: message 0 has unknown role 'robot'"):
        list(dataset(path, small_tokenizer))
    path.write_text(json.dumps({"text": "no fields"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"{path}:1: an SFT example needs 'messages'"):
        list(dataset(path, small_tokenizer))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_examples_none_of_which_keeps_a_trained_token_stop_the_run_instead_of_looping(
    tmp_path, small_tokenizer, overlong
):
    path = tmp_path / "long.jsonl"
    long = chat("Tell me everything. " + "word " * 100, "Nothing.")  # the answer lies past seq_len 64
    path.write_text(json.dumps(long) + "\n" + json.dumps(long) + "\n", encoding="utf-8")
    batches = iter(dataset(path, small_tokenizer, overlong=overlong, repeat=True))
    with pytest.raises(
        UserError, match=r"none of the last \d+ SFT examples .*long.jsonl:[12]\) keeps .* seq_len 64.*raise seq_len"
    ):
        next(batches)


def test_a_few_kept_examples_among_many_dropped_ones_train_on(tmp_path, small_tokenizer):
    path = tmp_path / "mostly_long.jsonl"
    long = chat("Tell me everything. " + "word " * 100, "Nothing.")
    path.write_text("".join(json.dumps(e) + "\n" for e in [long, long, EXAMPLES[0], long]), encoding="utf-8")
    batches = iter(dataset(path, small_tokenizer, batch_size=1, repeat=True))
    for _ in range(6):  # many passes: each row holds the one example that fits
        assert next(batches)["examples"].sum() >= 1
