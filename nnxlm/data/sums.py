"""Small sums as prompt records: a task whose answer a reward function can check.

    {"prompt": "12 + 7 =", "completion": " 19", "answer": "19"}    or, with text=True, "12 + 7 = 19"

Pretraining (text) or SFT (prompt/completion) teach the form; GRPO samples completions of the
prompt and checks them against `answer` (nnxlm.rewards.exact_match). The spaces keep the
tokenizer from merging pieces across the "=" (SentencePiece pieces do not cross a space), so a
prompt tokenized alone ends as it does inside the text. Every pair of operands in [0, max_operand) is one record; a
pair belongs to the eval split by a hash of its text (eval_fraction of them), the same every run.
"""

import dataclasses

from nnxlm.data.sources import _check_split, _keep
from nnxlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sums:
    """a + b = records for a, b in [0, max_operand), in the split asked; text: the whole sum as text."""

    max_operand: int = 20
    split: str = "train"
    eval_fraction: float = 0.1
    text: bool = False

    def __post_init__(self):
        _check_split("Sums", self.split, self.eval_fraction)
        if not isinstance(self.max_operand, int) or self.max_operand < 2:
            raise UserError(f"Sums max_operand is {self.max_operand!r}: use an integer of at least 2")

    def documents(self) -> list[tuple[int, int]]:
        pairs = [(a, b) for a in range(self.max_operand) for b in range(self.max_operand)]
        kept = [p for p in pairs if _keep(f"{p[0]}+{p[1]}", self.split, self.eval_fraction)]
        if not kept:
            raise UserError(f"Sums(max_operand={self.max_operand}) has no {self.split!r} pair: raise max_operand")
        return kept

    def where(self, item: tuple[int, int]) -> str:
        return f"Sums {item[0]}+{item[1]}"

    def load(self, item: tuple[int, int]) -> dict | str:
        a, b = item
        if self.text:
            return f"{a} + {b} = {a + b}"
        return {"prompt": f"{a} + {b} =", "completion": f" {a + b}", "answer": str(a + b)}
