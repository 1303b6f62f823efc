"""A Hugging Face ``datasets`` dataset as a document source (``pip install 'nnxlm[data]'``).

``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read
with ``load_from_disk``), or anything ``datasets.load_dataset`` takes: a builder such as
"parquet", "json", "csv" or "arrow" with ``data_files``, a directory of data files, or a Hub name
(when the network allows). Only data is read: no dataset script or other downloaded code runs.

Datasets are memory-mapped Arrow tables, so a row is read by index without loading the rest.
``filters`` (column -> value, or -> list of allowed values) and ``min_chars`` are plain values a
recipe or ``set:`` override can change; they are evaluated once, vectorized over the Arrow
columns, into a numpy array of kept row numbers. The eval split hashes the original row numbers,
so changing a filter never moves a row from train to eval.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from nnxlm.data.file_rows import PerProcessCache, one_line
from nnxlm.data.sources import _check_split, _decode, _empty_split, split_mask
from nnxlm.errors import UserError

_TEXT_TYPES = ("string", "large_string", "string_view")
_BYTES_TYPES = ("binary", "large_binary")  # decoded as UTF-8 when read
_SCALARS = (str, int, float, bool)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("HFDataset needs the datasets package: pip install 'nnxlm[data]'") from None
    return datasets


class _Loaded:
    """A loaded dataset and the Arrow columns read from it so far (one per process)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.columns: dict[str, Any] = {}

    def column(self, name: str):
        if name not in self.columns:  # memory-mapped: no copy unless the dataset has an index mapping
            self.columns[name] = self.dataset.with_format("arrow")[name]
        return self.columns[name]


_loaded = PerProcessCache(max_size=8)  # _Loaded by the arguments that load it


@dataclasses.dataclass(frozen=True)
class HFDataset:
    """Each row of a Hugging Face dataset's ``hf_split`` is one document: its text ``field``, or
    with ``field=None`` the whole row as a dict (fine-tuning examples). Items are row numbers.

    ``name``, ``data_files``, ``data_dir``, ``revision`` and ``cache_dir`` go to ``load_dataset``.
    ``filters`` keeps the rows whose columns equal the given values (a list: any of them);
    ``min_chars`` keeps texts of at least that many characters.
    """

    path: str
    name: str | None = None
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None
    data_dir: str | None = None
    hf_split: str = "train"
    field: str | None = "text"
    filters: Mapping[str, Any] | None = None
    min_chars: int = 0
    revision: str | None = None
    cache_dir: str | None = None
    split: str = "train"
    eval_fraction: float = 0.0

    def __post_init__(self):
        _check_split("HFDataset", self.split, self.eval_fraction)
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise UserError(f"HFDataset.path is {self.path!r}: give a dataset directory, a builder or a Hub name")
        object.__setattr__(self, "path", os.fspath(self.path))
        if isinstance(self.data_files, (list, tuple)):
            object.__setattr__(self, "data_files", tuple(os.fspath(f) for f in self.data_files))
        if not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise UserError(f"HFDataset.min_chars is {self.min_chars!r}: use a non-negative integer")
        if self.min_chars and self.field is None:
            raise UserError("HFDataset.min_chars needs a text field: set HFDataset.field")
        for column, value in (self.filters or {}).items():
            allowed = value if isinstance(value, (list, tuple)) else [value]
            if not isinstance(column, str) or not allowed or not all(isinstance(v, _SCALARS) for v in allowed):
                raise UserError(
                    f"HFDataset.filters[{column!r}] is {value!r}: use a string, number or bool, or a list of them"
                )

    def _load(self) -> _Loaded:
        key = (self.path, self.name, repr(self.data_files), self.data_dir, self.hf_split, self.revision, self.cache_dir)
        return _loaded.get(key, self._open)

    def _open(self) -> _Loaded:
        datasets = _datasets()
        folder = epath.Path(self.path)  # a save_to_disk directory, local or remote (datasets reads it by fsspec)
        saved = folder.is_dir() and any((folder / marker).is_file() for marker in ("state.json", "dataset_dict.json"))
        try:
            if saved:
                dataset = datasets.load_from_disk(self.path)
            else:
                data_files = list(self.data_files) if isinstance(self.data_files, tuple) else self.data_files
                dataset = datasets.load_dataset(
                    self.path, self.name, data_dir=self.data_dir, data_files=data_files, split=self.hf_split,
                    revision=self.revision, cache_dir=self.cache_dir,
                )  # fmt: skip
        except Exception as e:  # datasets raises many types: missing files, unknown splits, no network
            raise UserError(
                f"{self._name()} cannot be loaded ({type(e).__name__}: {one_line(e)}): check path, name, data_files "
                "and hf_split"
            ) from None
        if isinstance(dataset, datasets.DatasetDict):
            if self.hf_split not in dataset:
                splits = ", ".join(dataset)
                raise UserError(f"{self._name()} has no split {self.hf_split!r} ({splits}): set HFDataset.hf_split")
            dataset = dataset[self.hf_split]
        if not isinstance(dataset, datasets.Dataset):
            raise UserError(f"{self._name()} loaded as {type(dataset).__name__}: nnxlm needs a map-style Dataset")
        return _Loaded(dataset)

    def _name(self) -> str:
        return f"HFDataset({self.path!r}" + (f", {self.name!r}" if self.name else "") + ")"

    def documents(self) -> Sequence[int]:
        """Row numbers of ``hf_split`` that pass the filters and belong to this split: a range
        when every row does, else an int64 array."""
        loaded = self._load()
        dataset = loaded.dataset
        if self.field is not None:
            self._check_column(dataset, self.field, "field", _TEXT_TYPES + _BYTES_TYPES)
        rows: Sequence[int] = range(len(dataset))
        if self.filters or self.min_chars:
            rows = np.flatnonzero(self._filter_mask(loaded))
            if not len(rows):
                raise UserError(f"no rows of {self._name()} pass filters={self.filters} min_chars={self.min_chars}")
        if self.eval_fraction > 0.0:
            key = "/".join(p for p in (epath.Path(self.path).name, self.name, self.hf_split) if p)
            rows = np.asarray(rows, dtype=np.int64)
            rows = rows[split_mask(key, rows, self.split, self.eval_fraction)]
        if not len(rows):
            raise _empty_split(self._name(), self.split)
        return rows

    def _check_column(self, dataset, column: str, what: str, types: tuple[str, ...]) -> None:
        if column not in dataset.column_names:
            raise UserError(
                f"{self._name()} has no column {column!r} (columns: {', '.join(dataset.column_names)}): "
                f"set HFDataset.{what}"
            )
        if types and getattr(dataset.features[column], "dtype", None) not in types:
            raise UserError(
                f"{self._name()}: column {column!r} holds {dataset.features[column]}, not text: set HFDataset.{what}"
            )

    def _filter_mask(self, loaded: _Loaded) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        keep = np.ones(len(loaded.dataset), dtype=bool)
        for column, value in (self.filters or {}).items():
            self._check_column(loaded.dataset, column, "filters", ())
            values = loaded.column(column)
            try:
                if isinstance(value, (list, tuple)):
                    match = pc.is_in(values, value_set=pa.array(list(value)))
                else:
                    match = pc.equal(values, pa.scalar(value))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise UserError(
                    f"HFDataset.filters[{column!r}] = {value!r} cannot be compared with column {column!r} of type "
                    f"{values.type}: give a value of the column's type"
                ) from None
            keep &= np.asarray(pc.fill_null(match, False), dtype=bool)
        if self.min_chars:
            texts = loaded.column(self.field)
            if pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type):
                try:
                    texts = pc.cast(texts, pa.large_string())  # checks the bytes are UTF-8
                except pa.ArrowInvalid:
                    raise UserError(
                        f"{self._name()}: column {self.field!r} holds bytes that are not UTF-8 text: convert the "
                        "data to UTF-8"
                    ) from None
            keep &= np.asarray(pc.fill_null(pc.utf8_length(texts), 0)) >= self.min_chars
        return keep

    def where(self, item: int) -> str:
        return f"{self._name()}[{self.hf_split!r}] row {int(item)}"

    def load(self, item: int) -> str | dict[str, Any]:
        loaded = self._load()
        if self.field is None:
            return loaded.dataset[int(item)]
        value = loaded.column(self.field)[int(item)].as_py()
        if isinstance(value, bytes):
            return _decode(value, self.where(item))
        if not isinstance(value, str):
            raise UserError(
                f"{self.where(item)}: field {self.field!r} is {type(value).__name__}, not a string: "
                "filter the row out (min_chars=1 drops empty and missing texts) or set HFDataset.field"
            )
        return value
