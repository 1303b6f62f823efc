"""A reader of serialized ``tf.train.Example`` protos without TensorFlow or generated code.

MaxText and Grain users often store records as tf.Example. Its schema (tensorflow/core/example/
example.proto and feature.proto) is small enough to read from the protobuf wire format directly:

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }      # each entry: key = 1, value = 2
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

Anything else in the bytes (unknown fields, bad lengths) raises ValueError: a record that does not
parse strictly is not a tf.Example, which is how callers tell it from other record formats.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5  # protobuf wire types
_KINDS = {1: "bytes_list", 2: "float_list", 3: "int64_list"}


class Feature(NamedTuple):
    kind: str | None  # "bytes_list", "float_list", "int64_list", or None for an empty Feature
    values: list  # bytes, float or int values


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes):
    """(field number, wire type, value) of each field of a message: int for varints, bytes else."""
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        elif wire == _LENGTH:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire} is not used by tf.train.Example")
        if number == 0 or pos > len(data):
            raise ValueError("bad field number or length past the end")
        yield number, wire, value


def _only(data: bytes, number: int, wire: int, message: str):
    """The values of field ``number`` of a message that may hold nothing else."""
    for n, w, value in _fields(data):
        if (n, w) != (number, wire):
            raise ValueError(f"unexpected field {n} (wire type {w}) in {message}")
        yield value


def _feature(data: bytes) -> Feature:
    kind, values = None, []
    for number, wire, value in _fields(data):
        if number not in _KINDS or wire != _LENGTH:
            raise ValueError(f"unexpected field {number} in Feature")
        kind, values = _KINDS[number], []  # a oneof: the last kind wins
        for n, w, item in _fields(value):
            if n != 1:
                raise ValueError(f"unexpected field {n} in {kind}")
            if kind == "bytes_list" and w == _LENGTH:
                values.append(bytes(item))
            elif kind == "float_list" and w in (_LENGTH, _FIXED32):  # packed, or one float at a time
                if len(item) % 4:
                    raise ValueError("packed floats of a length not a multiple of 4")
                values.extend(struct.unpack(f"<{len(item) // 4}f", item))
            elif kind == "int64_list" and w in (_LENGTH, _VARINT):
                ints, pos = [item], 0
                if w == _LENGTH:  # packed varints
                    ints = []
                    while pos < len(item):
                        value, pos = _varint(item, pos)
                        ints.append(value)
                values.extend(v - (1 << 64) if v >= 1 << 63 else v for v in ints)  # two's complement
            else:
                raise ValueError(f"wire type {w} in {kind}")
    return Feature(kind, values)


def parse_example(data: bytes) -> dict[str, Feature]:
    """Feature name -> Feature of a serialized tf.train.Example; ValueError if it is not one."""
    features: dict[str, Feature] = {}
    for features_message in _only(data, 1, _LENGTH, "Example"):
        for entry in _only(features_message, 1, _LENGTH, "Features"):
            key, value = b"", b""
            for number, wire, item in _fields(entry):
                if wire != _LENGTH or number not in (1, 2):
                    raise ValueError(f"unexpected field {number} in a Features map entry")
                key, value = (item, value) if number == 1 else (key, item)
            try:
                name = bytes(key).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("a feature name is not UTF-8") from None
            features[name] = _feature(value)
    return features
