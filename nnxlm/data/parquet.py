"""Parquet files as a document source: one row, one document, read on demand by row group.

Start-up reads only each file's footer (row counts, schema), so a million rows index in a fraction
of a second. A document is loaded by reading the column chunk of its row group (Parquet's unit of
reading); each process keeps the most recently read row groups (``ROW_GROUP_CACHE_BYTES``) so
neighbouring rows cost nothing. Shuffled training jumps between row groups: files written with
small row groups (``pyarrow.parquet.write_table(..., row_group_size=1000)``) read far less per
document than files with one huge row group. Needs ``pyarrow`` (``pip install 'nnxlm[data]'``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from nnxlm.data.file_rows import FileRows, PerProcessCache, file_rows, one_line
from nnxlm.data.sources import _as_tuple, _check_split, _decode, _is_remote
from nnxlm.errors import UserError

ROW_GROUP_CACHE_BYTES = 256 << 20  # per process; the last row group read is always kept


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("Parquet files need pyarrow: pip install 'nnxlm[data]'") from None
    return pq


def _open(path: str) -> tuple[Any, np.ndarray]:
    """The open ParquetFile and the first row of each of its row groups (int64)."""
    pq = _pyarrow_parquet()
    try:  # local files are opened (and memory-mapped) by Arrow itself; gs:// and the like through etils
        file = pq.ParquetFile(epath.Path(path).open("rb") if _is_remote(path) else path, memory_map=True)
    except (OSError, ValueError) as e:  # ArrowInvalid: no footer, bad magic bytes (a truncated file)
        raise UserError(
            f"data file {path} is not a readable Parquet file ({one_line(e)}): rewrite it or leave it out of the globs"
        ) from None
    meta = file.metadata
    counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return file, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]]).astype(np.int64)


_files = PerProcessCache(max_size=64)  # (ParquetFile, row group starts) by path
_row_groups = PerProcessCache(max_size=ROW_GROUP_CACHE_BYTES, size_of=lambda t: t.nbytes)


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return any(
        check(arrow_type)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    ) or getattr(pa.types, "is_string_view", lambda _: False)(arrow_type)


@dataclasses.dataclass(frozen=True)
class ParquetFiles:
    """Each row of the Parquet files matching ``globs`` is one document: its ``field`` column (a
    string or UTF-8 binary column), or with ``field=None`` the whole row as a dict (fine-tuning
    examples). Items are ``(path, row)``; the eval split hashes each file's key and row number."""

    globs: Sequence[str]
    field: str | None = "text"
    split: str = "train"
    eval_fraction: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "globs", _as_tuple("ParquetFiles", self.globs))
        _check_split("ParquetFiles", self.split, self.eval_fraction)

    def documents(self) -> FileRows:
        """``(path, row)`` of every row of this split: row counts from the footers, checked
        schemas (the text column exists and holds text), no row read."""
        return file_rows("ParquetFiles", self.globs, self._count_rows, self.split, self.eval_fraction)

    def _count_rows(self, path: str) -> int:
        file, _ = _files.get(path, lambda: _open(path))
        if self.field is not None:
            schema = file.schema_arrow
            if self.field not in schema.names:
                raise UserError(
                    f"data file {path} has no column {self.field!r} (columns: {', '.join(schema.names)}): "
                    "set ParquetFiles.field to the text column"
                )
            column_type = schema.field(self.field).type
            if not _is_text(column_type):
                raise UserError(
                    f"data file {path}: column {self.field!r} holds {column_type}, not text: "
                    "set ParquetFiles.field to a string column"
                )
        return file.metadata.num_rows

    def where(self, item: tuple[str, int]) -> str:
        return f"{item[0]}:row {item[1]}"

    def load(self, item: tuple[str, int]) -> str | dict[str, Any]:
        path, row = item
        where = self.where(item)
        file, starts = _files.get(path, lambda: _open(path))
        group = int(np.searchsorted(starts, row, side="right")) - 1
        columns = None if self.field is None else (self.field,)
        table = _row_groups.get((path, group, columns), lambda: _read_row_group(file, group, columns, where))
        offset = row - int(starts[group])
        if self.field is None:
            return table.slice(offset, 1).to_pylist()[0]
        value = table.column(0)[offset].as_py()
        if value is None:
            raise UserError(f"{where}: column {self.field!r} is null: drop the row or set ParquetFiles.field")
        if isinstance(value, bytes):
            return _decode(value, where)
        if not isinstance(value, str):  # the schema was checked in documents(); files can change since
            raise UserError(f"{where}: column {self.field!r} is {type(value).__name__}, not a string")
        return value


def _read_row_group(file, group: int, columns, where: str):
    try:
        return file.read_row_group(group, columns=list(columns) if columns else None)
    except (OSError, ValueError) as e:  # ArrowInvalid / ArrowIOError: corrupt or truncated pages
        raise UserError(
            f"data file {where}: row group {group} cannot be read ({one_line(e)}): the file is corrupt or truncated, "
            "rewrite it or leave it out of the globs"
        ) from None
