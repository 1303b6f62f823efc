"""Prompt data: {"prompt", ...} records -> batches of prompt token ids, for objectives that sample
their responses (GRPO); and the [seq_len] row of a prompt with a response, which DPO's pairs and
GRPO's completions share.

A record's prompt is text (bos + its ids) or a list of messages (the chat template's rendering with
the assistant header, no bos: the template places its special tokens). Its other fields (e.g.
`answer`) travel with it, as the record's JSON text, to the reward functions.

A batch of P prompts has:
  prompt_ids     int32 [P, max_prompt_len], left-aligned, 0 after the prompt
  prompt_length  int32 [P]
  record         str [P], each the record as JSON
  examples, truncated [P]: a prompt longer than max_prompt_len keeps its last max_prompt_len tokens
"""

from __future__ import annotations

import json
from typing import Any

import grain
import numpy as np

from nnxlm.data.chat import ChatTemplate, check_messages, check_tools, located
from nnxlm.data.pipeline import READ_OPTIONS, ordered_documents
from nnxlm.errors import UserError

ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PROMPT_FIELDS = ("prompt_ids", "prompt_length", "record")  # a prompt batch's; the rest are counts


def prompt_tokens(
    prompt: Any, tokenizer, template: ChatTemplate, where: str = "example", tools: list | None = None
) -> tuple[list[int], str]:
    """(ids the model is given, the prompt as text) of a text or messages prompt (with the
    record's `tools` for the chat template)."""
    if isinstance(prompt, str):
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        return bos + tokenizer.encode_with_offsets(prompt)[0], prompt
    if isinstance(prompt, list):
        with located(where):
            text = template.render(check_messages(prompt, where), add_generation_prompt=True, tools=tools)
        return tokenizer.encode_with_offsets(text)[0], text
    raise UserError(f"{where}: 'prompt' must be a string or a list of messages, not {type(prompt).__name__}")


def response_row(prompt: list[int], response: list[int], seq_len: int) -> dict[str, np.ndarray]:
    """The [seq_len] row of a prompt followed by its response (cut to fit), padded: only the
    response's tokens carry loss."""
    ids = np.asarray(prompt + response, np.int32)[: seq_len + 1]
    n = len(ids) - 1
    row = {name: np.zeros(seq_len, np.float32 if name == "loss_mask" else np.int32) for name in ROW_FIELDS}
    row["inputs"][:n], row["targets"][:n] = ids[:-1], ids[1:]
    row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
    row["loss_mask"][len(prompt) - 1 : n] = 1.0  # targets from the response's first token on
    return row


class PromptItem(grain.transforms.Map):
    """Prompt item -> {"prompt_ids" [max_prompt_len], "prompt_length", "record", counts}."""

    def __init__(self, source, tokenizer, template: ChatTemplate, max_prompt_len: int):
        self.source, self.tokenizer, self.template = source, tokenizer, template
        self.max_prompt_len = max_prompt_len

    def map(self, item) -> dict[str, np.ndarray]:
        where = self.source.where(item) if hasattr(self.source, "where") else str(item)
        record = self.source.load(item)
        if not isinstance(record, dict) or "prompt" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{where}: a prompt example is a JSON object with 'prompt'; it has {keys}")
        tools = check_tools(record.get("tools"), where)
        ids, _ = prompt_tokens(record["prompt"], self.tokenizer, self.template, where, tools)
        truncated = len(ids) > self.max_prompt_len
        ids = ids[-self.max_prompt_len :]  # the end of a long prompt: what the response follows
        padded = np.zeros(self.max_prompt_len, np.int32)
        padded[: len(ids)] = ids
        return {
            "prompt_ids": padded,
            "prompt_length": np.int32(len(ids)),
            "record": np.str_(json.dumps(record)),
            "examples": np.int32(1),
            "truncated": np.int32(truncated),
        }


def make_prompt_dataset(
    source: Any,
    tokenizer,
    template: ChatTemplate,
    *,
    max_prompt_len: int,
    batch_size: int,
    **settings,
) -> grain.IterDataset:
    """Batches of batch_size prompts of `source`; settings (seq_len, seed, shuffle, repeat,
    num_workers, shard_index, shard_count) are ordered_documents'."""
    if tokenizer is None:
        raise UserError("prompt data is text: the run needs a tokenizer (set tokenizer_path)")
    ds = ordered_documents(source, batch_size=batch_size, **settings)
    ds = ds.map(PromptItem(source, tokenizer, template, max_prompt_len))
    it = ds.to_iter_dataset(READ_OPTIONS).batch(batch_size, drop_remainder=True)
    if settings.get("num_workers", 0) > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings["num_workers"]))
    return it


def records(batch: dict[str, np.ndarray]) -> list[dict]:
    """The records of a batch of prompts."""
    return [json.loads(str(text)) for text in batch["record"]]
