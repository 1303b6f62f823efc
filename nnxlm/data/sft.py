"""Supervised fine-tuning data: examples -> token ids with a loss mask -> packed batches.

An example is a JSON object (a JSON Lines record) in one of two forms:

- `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}`:
  rendered by the chat template (nnxlm.data.chat), which places every special token itself (no
  bos is added); the assistant turns carry the loss: their content and end-of-turn token.
- `{"prompt": "...", "completion": "..."}`: plain text, bos + prompt + completion + eos, the
  completion and eos carrying the loss; the prompt keeps the tokens it has alone (what the model
  is given at inference). With lists of messages as prompt and completion it is a conversation
  whose completion turns carry the loss.

`loss_on="all"` trains on every token instead. A conversation's tokens are taken from the whole
rendered text at once (so tokenization is what the model sees at inference) and a token carries
loss when its characters overlap an assistant span, as transformers' `return_assistant_tokens_mask`
does (templates put special tokens at the turn boundaries, so no token crosses one).

`make_sft_dataset` builds, per data shard:

    MapDataset.source(source.documents()).shuffle().repeat()[shard::count]
      .map(Tokenize)                 # {"inputs", "targets", "loss_mask"} of one example
      .to_iter_dataset()
      FirstFitPackIterDataset        # whole examples into rows of seq_len (segment ids, positions)
      .batch(batch_size).map(Batch)  # the batch the step takes, plus per-row example counts

An example longer than seq_len + 1 tokens is cut to fit (overlong="truncate") or left out
(overlong="drop"); either way it is counted: each batch has `examples`, `truncated` and `dropped`
[rows] (a dropped example packs as zero tokens), which the trainer logs and does not feed the step.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain import experimental as gx

from nnxlm.data.chat import ChatTemplate, check_messages, check_tools, located
from nnxlm.data.pipeline import READ_OPTIONS, ordered_and_counted
from nnxlm.errors import UserError

LOSS_ON = ("assistant", "all")
OVERLONG = ("truncate", "drop")
STATS = ("examples", "truncated", "dropped")


def example_tokens(
    record: Any, tokenizer, template: ChatTemplate, *, loss_on: str = "assistant", where: str = "example"
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids int32 [n], loss mask bool [n]: whether token i carries loss as a target) of one
    example (see the module docstring); UserError naming `where` for a malformed one."""
    with located(where):
        return _example_tokens(record, tokenizer, template, loss_on, where)


def _example_tokens(record: Any, tokenizer, template: ChatTemplate, loss_on: str, where: str):
    if not isinstance(record, dict):
        raise UserError(f"{where}: an SFT example must be a JSON object with 'messages' or 'prompt'/'completion'")
    tools = check_tools(record.get("tools"), where)
    if "messages" in record:
        messages = check_messages(record["messages"], where)
        text, spans = template.assistant_spans(messages, tools)
        if loss_on == "assistant" and not spans:
            raise UserError(f"{where}: the conversation has no assistant message to train on")
        return _tokens(tokenizer, text, spans, loss_on)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = check_messages(prompt + completion, where)
            text, spans = template.assistant_spans(messages, tools)
            cut = len(template.render(messages[: len(prompt)], add_generation_prompt=True, tools=tools))
            spans = [(start, end) for start, end in spans if start >= cut]
            if loss_on == "assistant" and not spans:
                raise UserError(f"{where}: the completion has no assistant message to train on")
            return _tokens(tokenizer, text, spans, loss_on)
        if isinstance(prompt, str) and isinstance(completion, str):
            return _text_pair(tokenizer, prompt, completion, loss_on)
        raise UserError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages")
    raise UserError(f"{where}: an SFT example needs 'messages', or 'prompt' and 'completion'; it has {sorted(record)}")


def _tokens(tokenizer, text: str, spans, loss_on: str):
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [True] * len(ids) if loss_on == "all" else overlapping(offsets, spans)
    return np.asarray(ids, np.int32), np.asarray(trained, bool)


def _text_pair(tokenizer, prompt: str, completion: str, loss_on: str):
    """bos + prompt + completion + eos, the completion and eos trained. The prompt's tokens are
    those it has alone (what a model is given at inference): when tokenizing the two together
    merges a token across their boundary, the completion is tokenized on its own instead."""
    prompt_ids = tokenizer.encode_with_offsets(prompt)[0]
    ids = tokenizer.encode_with_offsets(prompt + completion)[0]
    if ids[: len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer.encode_with_offsets(completion)[0]
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = [*bos, *ids, tokenizer.eos_id]
    trained = [loss_on == "all"] * (len(bos) + len(prompt_ids)) + [True] * (len(ids) - len(bos) - len(prompt_ids))
    return np.asarray(ids, np.int32), np.asarray(trained, bool)


def overlapping(offsets, spans) -> list[bool]:
    """For each token's [start, end) characters (in order), whether it overlaps one of the sorted,
    disjoint spans (a token of no characters counts as one character wide)."""
    out, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        out.append(j < len(spans) and max(end, start + 1) > spans[j][0])
    return out


class Tokenize(grain.transforms.Map):
    """Example item -> {"inputs", "targets", "loss_mask"} [n - 1] of its tokens (targets shifted
    by one), cut to seq_len (or emptied, counted as dropped) when longer; emptied and counted as
    dropped too when no token of what is kept carries loss."""

    def __init__(
        self, source, tokenizer, template: ChatTemplate, seq_len: int, loss_on: str, overlong: str, patience: int
    ):
        self.source, self.tokenizer, self.template = source, tokenizer, template
        self.seq_len, self.loss_on, self.overlong = seq_len, loss_on, overlong
        # dropped examples pack as nothing: only dropped ones, `patience` in a row, never fill a row
        self.patience, self.dropped_in_a_row = patience, 0

    def map(self, item) -> dict[str, np.ndarray]:
        where = self.source.where(item) if hasattr(self.source, "where") else str(item)
        ids, trained = example_tokens(
            self.source.load(item), self.tokenizer, self.template, loss_on=self.loss_on, where=where
        )
        too_long = len(ids) > self.seq_len + 1
        if too_long and self.overlong == "truncate":
            ids, trained = ids[: self.seq_len + 1], trained[: self.seq_len + 1]
        dropped = too_long and self.overlong == "drop" or not trained[1:].any()
        if dropped:  # packs as zero tokens: only the count remains
            ids, trained = ids[:0], trained[:0]
        self.dropped_in_a_row = self.dropped_in_a_row + 1 if dropped else 0
        if self.dropped_in_a_row >= self.patience:
            cause = "longer, and overlong='drop'" if self.overlong == "drop" else "their answers lie past the cut"
            raise UserError(
                f"none of the last {self.dropped_in_a_row} SFT examples (up to {where}) keeps a token that carries "
                f"loss within seq_len {self.seq_len} ({cause}): raise seq_len, or shorten the examples"
            )
        return {
            "inputs": ids[:-1],
            "targets": ids[1:],
            "loss_mask": trained[1:].astype(np.float32),
            "truncated": np.int32(too_long and not dropped),
            "dropped": np.int32(dropped),
        }


class PackedRow(grain.transforms.Map):
    """A packed row -> [seq_len] fields of the step and its example counts."""

    def map(self, row: dict[str, Any]) -> dict[str, Any]:
        dropped = int(np.sum(row["dropped"]))
        return {
            "inputs": row["inputs"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "segment_ids": row["inputs_segment_ids"].astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.float32),
            "examples": np.int32(len(row["dropped"]) - dropped),
            "truncated": np.int32(np.sum(row["truncated"])),
            "dropped": np.int32(dropped),
        }


def make_sft_dataset(
    source: Any,
    tokenizer,
    template: ChatTemplate,
    *,
    seq_len: int,
    batch_size: int,
    loss_on: str = "assistant",
    overlong: str = "truncate",
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    num_workers: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """Packed SFT batches of `source`'s examples (see the module docstring): dicts of [batch_size,
    seq_len] inputs, targets, segment_ids, positions, loss_mask and [batch_size] example counts."""
    if tokenizer is None:
        raise UserError("SFT data is text: the run needs a tokenizer (set tokenizer_path)")
    ds, per_pass = ordered_and_counted(
        source, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
        num_workers=num_workers, shard_index=shard_index, shard_count=shard_count,
    )  # fmt: skip
    # two passes over this shard's examples in a row, none kept: the run stops instead of looping
    # (the loader's threads may tokenize a few examples out of order: the margin covers them)
    patience = 2 * per_pass + 2 * READ_OPTIONS.prefetch_buffer_size
    ds = ds.map(Tokenize(source, tokenizer, template, seq_len, loss_on, overlong, patience))
    length = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    it = gx.FirstFitPackIterDataset(
        ds.to_iter_dataset(READ_OPTIONS),
        length_struct=length,
        num_packing_bins=batch_size,
        shuffle_bins=False,
        meta_features=("truncated", "dropped"),
    )
    it = it.map(PackedRow()).batch(batch_size, drop_remainder=True)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it
