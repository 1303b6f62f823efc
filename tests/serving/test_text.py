"""Text as people read it: whole characters, stop strings across tokens, streamed == not streamed."""

import pytest

from nnxlm.serving.text import Completion, Detokenizer

TEXTS = ["print('héllo 😀 世界')  # ok 👍🏽", "    return 你好, 🎉"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_text_never_splits_a_character_and_adds_up_to_decode(small_tokenizer, text):
    context = small_tokenizer.encode("x = 1\n")
    ids = small_tokenizer.encode(text)
    assert any(small_tokenizer.token_bytes(i) and len(small_tokenizer.token_bytes(i)) == 1 for i in ids)
    detokenizer = Detokenizer(small_tokenizer, context)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a byte token of an emoji adds nothing until its character is whole
    full = small_tokenizer.decode(context + ids)
    assert "".join(pieces) == full[len(small_tokenizer.decode(context)) :]


def stream(tokenizer, ids, stop, max_tokens=None):
    """(streamed pieces, the completion) of feeding ids one at a time, releasing after each."""
    completion = Completion(tokenizer, (), tuple(stop), frozenset({tokenizer.eos_id}))
    pieces = []
    for n, token in enumerate(ids, 1):
        done = completion.add(token)
        if not done and max_tokens == n:
            completion.finish_length()
        pieces.append(completion.release()[0])
        if completion.finish_reason:
            break
    return pieces, completion


@pytest.mark.parametrize(
    "stop, expected",
    [(["lo wo"], "hel"), (["o w", "ld"], "hell"), (["😀"], "hello world "), (["nowhere"], "hello world 😀!")],
)
def test_stop_strings_match_across_tokens_and_never_reach_the_stream(small_tokenizer, stop, expected):
    ids = small_tokenizer.encode("hello world 😀!")
    pieces, completion = stream(small_tokenizer, ids, stop, max_tokens=len(ids))
    assert completion.text == expected == "".join(pieces)
    assert completion.finish_reason == ("length" if stop == ["nowhere"] else "stop")
    for s in stop:  # no prefix of a stop string was shown before the match ended the text
        assert s not in "".join(pieces)
    kept = completion.tokens
    assert all(t.start < max(len(expected), 1) for t in kept)  # tokens wholly inside a stop string are dropped


def test_a_possible_stop_string_is_held_back_until_it_is_not_one(small_tokenizer):
    completion = Completion(small_tokenizer, (), ("abcX",), frozenset())
    for token in small_tokenizer.encode("ab"):
        completion.add(token)
    text, _ = completion.release()
    assert not text.endswith("ab")  # "ab" may begin "abcX"
    for token in small_tokenizer.encode("abcd"):  # ...and it did not
        completion.add(token)
    completion.finish_length()
    shown = text + completion.release()[0]
    assert shown == completion.text and "abcd" in shown


def test_an_end_token_finishes_with_stop_and_is_not_text(small_tokenizer):
    ids = small_tokenizer.encode("done") + [small_tokenizer.eos_id] + small_tokenizer.encode("after")
    pieces, completion = stream(small_tokenizer, ids, [])
    assert completion.finish_reason == "stop" and "".join(pieces) == completion.text == "done"
    assert completion.generated == len(small_tokenizer.encode("done")) + 1  # the end token counts as generated
