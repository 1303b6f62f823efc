"""Preference data: {"prompt", "chosen", "rejected"} pairs -> two rows a pair, for DPO.

A pair without "prompt" holds it implicitly, as the start both responses share (implicit_prompt).

A record's prompt is text or a list of messages; chosen and rejected are text, or lists of
(assistant) messages that continue the prompt's conversation. The prompt is tokenized once and
shared by both rows, and each response is tokenized on its own: the boundary between prompt and
response lies in token space (no token merges across it, no bos inside a response).

- Text prompt: bos + prompt ids, then response ids + eos.
- Messages: the chat template's rendering of the prompt with the assistant header (no bos: the
  template places its special tokens), then the rest of the conversation's rendering, tokenized
  alone.

Only the response tokens (and eos) carry loss. A pair takes rows 2i (chosen) and 2i + 1 (rejected)
of a batch, each [seq_len], padded, not packed. A response that does not fit is cut (overlong
"truncate") or the pair left out ("drop"); a prompt that leaves no room for a response always
drops the pair. Each batch counts its `examples`, `truncated` and `dropped` pairs [rows] (the
trainer logs them and does not feed them to the step).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from nnxlm.data.chat import ChatTemplate, check_messages, check_tools, located
from nnxlm.data.pipeline import READ_OPTIONS, ordered_documents
from nnxlm.data.prompts import ROW_FIELDS as FIELDS
from nnxlm.data.prompts import prompt_tokens, response_row
from nnxlm.errors import UserError


def pair_tokens(record: Any, tokenizer, template: ChatTemplate, where: str = "example"):
    """(prompt ids, chosen ids, rejected ids), lists of ints, of one preference record; UserError
    naming `where` for a malformed one."""
    with located(where):
        return _pair_tokens(record, tokenizer, template, where)


def _pair_tokens(record: Any, tokenizer, template: ChatTemplate, where: str):
    if not isinstance(record, dict) or not {"chosen", "rejected"} <= set(record):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{where}: a preference example needs 'chosen' and 'rejected', and 'prompt' unless both start with "
            f"it; it has {keys}"
        )
    if "prompt" in record:
        prompt, responses = record["prompt"], (record["chosen"], record["rejected"])
    else:
        prompt, responses = implicit_prompt(record["chosen"], record["rejected"], where)
    tools = check_tools(record.get("tools"), where)
    if isinstance(prompt, str) and all(isinstance(r, str) for r in responses):
        prompt_ids, _ = prompt_tokens(prompt, tokenizer, template, where)
        return (prompt_ids, *(tokenizer.encode_with_offsets(r)[0] + [tokenizer.eos_id] for r in responses))
    if isinstance(prompt, list) and all(isinstance(r, list) and r for r in responses):
        prompt = check_messages(prompt, where)
        prompt_ids, head = prompt_tokens(prompt, tokenizer, template, where, tools)
        ids = [prompt_ids]
        for response in responses:
            text = template.render(check_messages(prompt + response, where), tools=tools)
            if not text.startswith(head):
                raise UserError(f"{where}: the chat template renders the response's turns before its header")
            ids.append(tokenizer.encode_with_offsets(text[len(head) :])[0])
        return tuple(ids)
    raise UserError(
        f"{where}: 'prompt', 'chosen' and 'rejected' must be strings, or a list of messages and two "
        "non-empty lists of the messages that follow"
    )


def implicit_prompt(chosen: Any, rejected: Any, where: str):
    """(prompt, (chosen, rejected) after it) of a pair given whole, as TRL's implicit-prompt format
    holds it: two conversations (the prompt is the messages both start with) or two texts (the
    prompt is their common start up to its last whitespace, which stays with the responses, so no
    word is split between prompt and response)."""
    if not (
        isinstance(chosen, list) and isinstance(rejected, list) or isinstance(chosen, str) and isinstance(rejected, str)
    ):
        raise UserError(f"{where}: 'chosen' and 'rejected' must both be strings or both be lists of messages")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str):
        shared = max((i for i in range(shared) if chosen[i].isspace()), default=0)
    if not shared or shared in (len(chosen), len(rejected)):
        raise UserError(
            f"{where}: without 'prompt', 'chosen' and 'rejected' must start with the same prompt (whole messages, or "
            "words) and differ after it: add the 'prompt' field"
        )
    return chosen[:shared], (chosen[shared:], rejected[shared:])


class PairRows(grain.transforms.Map):
    """Preference item -> {field: [2, seq_len]} (chosen, rejected) and its counts."""

    def __init__(self, source, tokenizer, template: ChatTemplate, seq_len: int, overlong: str):
        self.source, self.tokenizer, self.template = source, tokenizer, template
        self.seq_len, self.overlong = seq_len, overlong

    def map(self, item) -> dict[str, np.ndarray]:
        where = self.source.where(item) if hasattr(self.source, "where") else str(item)
        prompt, *responses = pair_tokens(self.source.load(item), self.tokenizer, self.template, where)
        too_long = max(len(prompt) + len(r) for r in responses) > self.seq_len + 1
        dropped = len(prompt) >= self.seq_len or (too_long and self.overlong == "drop")
        rows = [response_row(prompt, r, self.seq_len) for r in responses]
        pair = {name: np.stack([row[name] for row in rows]) for name in FIELDS}
        if dropped:  # no token carries loss: the pair counts as dropped and adds nothing
            pair["loss_mask"][:] = 0.0
        pair.update(
            examples=np.int32(not dropped), truncated=np.int32(too_long and not dropped), dropped=np.int32(dropped)
        )
        return pair


class PairBatch(grain.transforms.Map):
    """[pairs, 2, seq_len] -> [2 pairs, seq_len] rows: chosen at 2i, rejected at 2i + 1."""

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: batch[name].reshape(-1, batch[name].shape[-1]) for name in FIELDS}
        for name in ("examples", "truncated", "dropped"):  # a pair counts once, on its chosen row
            out[name] = np.stack([batch[name], np.zeros_like(batch[name])], axis=1).reshape(-1)
        return out


def make_preference_dataset(
    source: Any,
    tokenizer,
    template: ChatTemplate,
    *,
    seq_len: int,
    batch_size: int,
    overlong: str = "truncate",
    drop_remainder: bool = True,
    **settings,
) -> grain.IterDataset:
    """Batches of batch_size rows (batch_size / 2 pairs) of `source`'s preference records (without
    drop_remainder, the last may be smaller); settings (seed, shuffle, repeat, num_workers,
    shard_index, shard_count) are ordered_documents'."""
    if tokenizer is None:
        raise UserError("preference data is text: the run needs a tokenizer (set tokenizer_path)")
    if batch_size % 2:
        raise UserError(
            f"a data shard's batch of {batch_size} rows (batch_size / data_shards) holds pairs of rows (chosen, "
            "rejected): make it even"
        )
    ds = ordered_documents(source, seq_len=seq_len, batch_size=batch_size // 2, **settings)
    ds = ds.map(PairRows(source, tokenizer, template, seq_len, overlong))
    it = ds.to_iter_dataset(READ_OPTIONS).batch(batch_size // 2, drop_remainder=drop_remainder).map(PairBatch())
    if settings.get("num_workers", 0) > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings["num_workers"]))
    return it
