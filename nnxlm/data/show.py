"""`nnxlm data show`: the first examples of a recipe's data as its train step sees them.

Each packed segment of the first batches (a fine-tuning example, or a document piece for
pretraining) is printed as text with the tokens that carry loss marked apart: between ⟦ and ⟧,
or, on a terminal, also in bold green (the others dimmed). Special tokens print as their text.
"""

import sys

import numpy as np

from nnxlm.data.prompts import PROMPT_FIELDS

LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧


def segments(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids [n], carries loss [n]) of each packed segment of a batch, row by row: the segment's
    first input and its targets (a target's loss flag is its token's)."""
    out = []
    for row in range(batch["inputs"].shape[0]):
        ids_row, segment_row = batch["inputs"][row], batch["segment_ids"][row]
        for segment in sorted(set(segment_row.tolist()) - {0}):
            where = np.flatnonzero(segment_row == segment)
            ids = np.concatenate([ids_row[where[:1]], batch["targets"][row][where]])
            loss = np.concatenate([[False], batch["loss_mask"][row][where] > 0])
            out.append((ids, loss))
    return out


def render(tokenizer, ids: np.ndarray, loss: np.ndarray, color: bool) -> str:
    """The text of ids with the runs that carry loss marked."""
    specials = {}
    if tokenizer is not None:
        for text in tokenizer.special_tokens().values():
            encoded = tokenizer.encode_with_offsets(text)[0]
            if len(encoded) == 1:  # a token of its own (an unknown-token text is not)
                specials[encoded[0]] = text
    pieces, start = [], 0
    while start < len(ids):
        end = start
        while end < len(ids) and loss[end] == loss[start]:
            end += 1
        text = _text(tokenizer, ids[start:end], specials)
        if loss[start]:
            text = f"{LOSS_OPEN}{text}{LOSS_CLOSE}"
        if color:
            text = f"\033[1;32m{text}\033[0m" if loss[start] else f"\033[2m{text}\033[0m"
        pieces.append(text)
        start = end
    return "".join(pieces)


def _text(tokenizer, ids, specials: dict) -> str:
    if tokenizer is None:  # token ids of synthetic data
        return " ".join(str(int(i)) for i in ids) + " "
    out, run = [], []
    for i in ids.tolist():
        if i in specials:
            out += [tokenizer.decode(run), specials[i]]
            run = []
        else:
            run.append(i)
    return "".join([*out, tokenizer.decode(run)])


def training_batches(trainer):
    """The iterator of batches the trainer's train step would take (its tokenizer found or trained
    first, as `nnxlm train` does), without building the model."""
    trainer.plan()
    from nnxlm.starting_points import find_run_tokenizer

    trainer.tokenizer = find_run_tokenizer(trainer)
    return iter(trainer._dataset(trainer.train_data, shuffle=True, repeat=True))


def show(trainer, count: int = 3) -> str:
    """The report: the first `count` examples of the recipe's training data."""
    batches = training_batches(trainer)
    color = sys.stdout.isatty()
    shown, lines, seen_batches = 0, [], 0
    legend = f"tokens that carry loss are between {LOSS_OPEN} and {LOSS_CLOSE}"
    lines.append(f"{type(trainer.objective).__name__} data, seq_len {trainer.seq_len} ({legend})")
    while shown < count and seen_batches < 100:
        batch = next(batches)
        seen_batches += 1
        counts = {
            k: int(np.sum(v))
            for k, v in batch.items()
            if k not in trainer.objective.batch_fields and k not in PROMPT_FIELDS
        }
        if counts:
            lines.append("batch: " + ", ".join(f"{value} {name}" for name, value in counts.items()))
        if "prompt_ids" in batch:  # prompts the objective samples completions of (GRPO)
            for ids, length, record in zip(batch["prompt_ids"], batch["prompt_length"], batch["record"], strict=True):
                if shown == count:
                    break
                shown += 1
                lines.append(f"--- prompt {shown}: {length} tokens; its record: {record}")
                lines.append(render(trainer.tokenizer, ids[:length], np.zeros(length, bool), color))
            continue
        for ids, loss in segments(batch):
            if shown == count:
                break
            shown += 1
            lines.append(f"--- example {shown}: {len(ids)} tokens, {int(loss.sum())} carry loss")
            lines.append(render(trainer.tokenizer, ids, loss, color))
    return "\n".join(lines)
