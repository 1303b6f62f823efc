"""ArrayRecord files as a document source: one record, one document, read by random access.

ArrayRecord (the format Grain and MaxText read) indexes its records, so start-up only opens each
file to count them and a document is one seek. Records come in three shapes, all read here
without TensorFlow:

- raw UTF-8 text: ``field=None``;
- a JSON object: ``field`` names its text field;
- a serialized ``tf.train.Example``: ``field`` names a bytes feature holding one UTF-8 value
  (nnxlm.data.tf_example reads the protobuf wire format).

Files written with ``group_size:1`` (Grain's advice) read one record per access; larger groups
decompress the whole group for each record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from nnxlm.data.file_rows import FileRows, PerProcessCache, file_rows, one_line
from nnxlm.data.sources import _as_tuple, _check_split, _decode
from nnxlm.data.tf_example import parse_example
from nnxlm.errors import UserError

# no read-ahead and no thread pool: shuffled training reads one record here, one there
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def _open(path: str):
    from array_record.python.array_record_module import ArrayRecordReader  # installed with grain

    reader = ArrayRecordReader(path, _READER_OPTIONS)
    if not reader.ok():  # a truncated or non-ArrayRecord file opens "not ok" with 0 records
        try:
            reader.read()
            detail = "unreadable"
        except RuntimeError as e:
            detail = one_line(e) if str(e).strip() else "truncated or corrupt"
        raise UserError(
            f"data file {path} is not a readable ArrayRecord file ({detail}): rewrite it or leave it out of the globs"
        )
    return reader


_readers = PerProcessCache(max_size=256)  # open readers by path (thread-safe: grain shares one per file)


@dataclasses.dataclass(frozen=True)
class ArrayRecordFiles:
    """Each record of the ArrayRecord files matching ``globs`` is one document: the record as
    UTF-8 text (``field=None``), or the text ``field`` of a JSON object or tf.train.Example
    record. Items are ``(path, record number)``; the eval split hashes each file's key and
    record number."""

    globs: Sequence[str]
    field: str | None = None
    split: str = "train"
    eval_fraction: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "globs", _as_tuple("ArrayRecordFiles", self.globs))
        _check_split("ArrayRecordFiles", self.split, self.eval_fraction)

    def documents(self) -> FileRows:
        """``(path, record number)`` of every record of this split, counted from the files'
        indexes (no record read)."""
        return file_rows(
            "ArrayRecordFiles", self.globs, lambda path: _readers.get(path, lambda: _open(path)).num_records(),
            self.split, self.eval_fraction,
        )  # fmt: skip

    def where(self, item: tuple[str, int]) -> str:
        return f"{item[0]}:row {item[1]}"

    def load(self, item: tuple[str, int]) -> str:
        path, row = item
        where = self.where(item)
        reader = _readers.get(path, lambda: _open(path))
        try:
            (data,) = reader.read(row, row + 1)  # the range form: read([row]) costs ~3 ms a call more
        except (RuntimeError, IndexError, ValueError) as e:
            raise UserError(
                f"data file {where} cannot be read ({one_line(e)}): the file is corrupt "
                "or truncated, rewrite it or leave it out of the globs"
            ) from None
        if self.field is None:
            return _decode(data, where)
        return _text_field(data, self.field, where)


def _text_field(data: bytes, field: str, where: str) -> str:
    """The text ``field`` of a record that is a JSON object or a tf.train.Example."""
    fix = "set ArrayRecordFiles.field to the text field (None for raw-text records)"
    json_error = None
    if data.lstrip().startswith(b"{"):
        try:
            record = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            record, json_error = None, getattr(e, "msg", None) or str(e)
        if isinstance(record, dict):
            if field not in record:
                raise UserError(f"{where} (a JSON object) has no field {field!r}: {fix}")
            text = record[field]
            if not isinstance(text, str):
                raise UserError(f"{where}: JSON field {field!r} is {type(text).__name__}, not a string: {fix}")
            return text
        # not JSON after all: a tf.Example whose Features length byte happens to be "{" (123)
    try:
        features = parse_example(data)
    except ValueError:
        if json_error is not None:
            raise UserError(f"{where} is not valid JSON ({json_error}): fix or rewrite the record") from None
        raise UserError(
            f"{where} is neither a JSON object nor a tf.train.Example: set ArrayRecordFiles.field=None "
            "for raw-text records"
        ) from None
    if field not in features:
        names = ", ".join(sorted(features)) or "none"
        raise UserError(f"{where} (a tf.train.Example) has no feature {field!r} (features: {names}): {fix}")
    feature = features[field]
    if feature.kind != "bytes_list" or len(feature.values) != 1:
        got = f"{len(feature.values)} values" if feature.kind == "bytes_list" else f"a {feature.kind}"
        raise UserError(f"{where}: feature {field!r} is {got}, not one bytes value of text: {fix}")
    return _decode(feature.values[0], where)
