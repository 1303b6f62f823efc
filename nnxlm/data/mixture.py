"""A weighted mixture of document sources (e.g. 70 % code, 30 % text).

``Mixture`` is itself a source: its items are ``(k, item)`` pairs of the ``k``-th source, so
everything that loads documents (pretraining, SFT, preference and prompt data) takes it as is.
The pipeline (``ordered_documents``) orders each source on its own (shuffled with its own seed,
repeated, this data shard's share) and interleaves them with ``grain.MapDataset.mix``: documents
are drawn in proportion to ``weights`` (by documents, as grain's and Hugging Face's mixtures
are), deterministically, and a checkpoint's data position resumes the mixture exactly. For
pretraining, each batch also counts the documents it starts from each source
(``mixture/<name>``): the trainer logs them, and the progress line shows the realised shares.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnxlm.data.sources import PartsIndex
from nnxlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Documents of ``sources`` drawn in proportion to ``weights`` (any positive numbers: they are
    normalised). ``names`` label the logged proportions; by default ``source0``, ``source1``..."""

    sources: Sequence[Any]
    weights: Sequence[float]
    names: Sequence[str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        try:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        except (TypeError, ValueError):
            raise UserError(f"Mixture.weights {list(self.weights)} must all be positive numbers") from None
        names = tuple(self.names) if self.names is not None else tuple(f"source{k}" for k in range(len(self.sources)))
        object.__setattr__(self, "names", names)
        if not self.sources:
            raise UserError("Mixture.sources is empty: give at least one source")
        if len(self.weights) != len(self.sources) or len(names) != len(self.sources):
            raise UserError(
                f"Mixture has {len(self.sources)} sources, {len(self.weights)} weights and {len(names)} names: "
                "give one weight (and name) per source"
            )
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise UserError(f"Mixture.weights {list(self.weights)} must all be positive numbers")
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise UserError(f"Mixture.names {list(names)} must be distinct non-empty strings")
        if any(isinstance(s, Mixture) for s in self.sources):
            raise UserError("a Mixture inside a Mixture: list its sources in the outer one, weights multiplied")

    @property
    def yields_token_ids(self) -> bool:
        """True when every source gives token ids (the run then needs no tokenizer)."""
        return all(getattr(source, "yields_token_ids", False) for source in self.sources)

    @property
    def proportions(self) -> tuple[float, ...]:
        total = sum(self.weights)
        return tuple(w / total for w in self.weights)

    def documents(self) -> Components:
        """Every source's documents one after another, as ``(k, item)`` (the mix happens in the
        pipeline); raises the first source's error when one has no documents."""
        return Components([source.documents() for source in self.sources])

    def load(self, item: tuple[int, Any]) -> Any:
        k, inner = item
        return self.sources[k].load(inner)

    def where(self, item: tuple[int, Any]) -> str:
        k, inner = item
        source = self.sources[k]
        return source.where(inner) if hasattr(source, "where") else f"{self.names[k]} document {inner}"

    def check_tokenizer(self, tokenizer: Any) -> None:
        for source in self.sources:
            if hasattr(source, "check_tokenizer"):
                source.check_tokenizer(tokenizer)


class Components(PartsIndex):
    """Several sources' document sequences as one lazy sequence of ``(k, item)``."""

    def __init__(self, parts: list[Sequence]):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts], dtype=np.int64)

    def _item(self, part: int, i: int, local: int) -> tuple[int, Any]:
        return (part, self.parts[part][local])


class Tagged:
    """A sequence of one source's items as ``(k, item)``: what the mixed pipeline draws from."""

    def __init__(self, k: int, items: Sequence):
        self.k, self.items = k, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return (self.k, self.items[i])
