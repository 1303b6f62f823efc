"""ArrayRecordFiles: raw-text, JSON and tf.train.Example records, splits, the pipeline, bad files;
the tf.Example reader against protobuf's own serializer."""

import functools
import json
import struct

import fiddle as fdl
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from nnxlm.data import ArrayRecordFiles, make_dataset
from nnxlm.data.tf_example import Feature, parse_example
from nnxlm.errors import UserError
from nnxlm.recipes.directives import resolve
from tests.data import source_checks

FIRST = [f"def first_{i}(x):\n    return x + {i}\n" for i in range(7)]
SECOND = [f"class Second{i}:\n    size = {i * 11}\n" for i in range(5)]


def _write(path, records: list[bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()


@functools.cache
def _example_class():
    """tf.train.Example built by protobuf from a descriptor with TensorFlow's field numbers."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="nnxlm_test_example.proto", package="tf_test", syntax="proto3")

    def message(name, *fields):
        m = file.message_type.add(name=name)
        for number, field_name, kind, type_name, label in fields:
            field = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
        return m

    repeated, optional = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", (1, "value", F.TYPE_BYTES, "", repeated))
    message("FloatList", (1, "value", F.TYPE_FLOAT, "", repeated))
    message("Int64List", (1, "value", F.TYPE_INT64, "", repeated))
    feature = message(
        "Feature",
        (1, "bytes_list", F.TYPE_MESSAGE, ".tf_test.BytesList", optional),
        (2, "float_list", F.TYPE_MESSAGE, ".tf_test.FloatList", optional),
        (3, "int64_list", F.TYPE_MESSAGE, ".tf_test.Int64List", optional),
    )
    feature.oneof_decl.add(name="kind")
    for field in feature.field:
        field.oneof_index = 0
    features = message("Features", (1, "feature", F.TYPE_MESSAGE, ".tf_test.Features.FeatureEntry", repeated))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=optional)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, type_name=".tf_test.Feature", label=optional)
    entry.options.map_entry = True
    message("Example", (1, "features", F.TYPE_MESSAGE, ".tf_test.Features", optional))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tf_test.Example"))


def _example(**features) -> bytes:
    example = _example_class()()
    for name, values in features.items():
        kind = "bytes" if isinstance(values[0], bytes) else "float" if isinstance(values[0], float) else "int64"
        getattr(example.features.feature[name], f"{kind}_list").value.extend(values)
    return example.SerializeToString()


def test_tf_example_reader_agrees_with_protobuf():
    data = _example(text=["héllo".encode(), b""], ids=[1, -5, 2**40], weights=[0.5, -2.25])
    assert parse_example(data) == {
        "text": Feature("bytes_list", [b"h\xc3\xa9llo", b""]),
        "ids": Feature("int64_list", [1, -5, 2**40]),
        "weights": Feature("float_list", [0.5, -2.25]),
    }
    assert parse_example(b"") == {}


def test_tf_example_reader_takes_unpacked_numbers_and_rejects_other_bytes():
    def length(number, payload):  # a length-delimited field, lengths < 128
        return bytes([number << 3 | 2, len(payload)]) + payload

    unpacked = length(3, bytes([1 << 3 | 0, 7, 1 << 3 | 0, 9]))  # Int64List, one varint at a time
    floats = length(2, bytes([1 << 3 | 5]) + struct.pack("<f", 1.5))  # FloatList, one fixed32
    entry = length(1, b"n") + length(2, unpacked)
    entry2 = length(1, b"f") + length(2, floats)
    data = length(1, length(1, entry) + length(1, entry2))
    assert parse_example(data) == {"n": Feature("int64_list", [7, 9]), "f": Feature("float_list", [1.5])}
    for not_an_example in [b"plain text", b'{"text": 1}', data[:-1], b"\x0a\x05abc"]:
        with pytest.raises(ValueError):
            parse_example(not_an_example)


@pytest.fixture
def corpus(tmp_path):
    """Two files of raw-text records; documents are FIRST then SECOND."""
    _write(tmp_path / "a.array_record", [t.encode() for t in FIRST])
    _write(tmp_path / "sub" / "b.array_record", [t.encode() for t in SECOND])
    return str(tmp_path / "**" / "*.array_record")


def test_raw_text_records_in_file_then_record_order(corpus, tmp_path):
    source = ArrayRecordFiles(corpus)
    docs = source.documents()
    assert len(docs) == 12 and docs[7] == (str(tmp_path / "sub" / "b.array_record"), 0)
    assert source_checks.texts(source) == FIRST + SECOND
    assert source.where(docs[8]) == f"{tmp_path / 'sub' / 'b.array_record'}:row 1"


def test_json_and_tf_example_records_give_their_text_field(tmp_path):
    _write(tmp_path / "json.array_record", [json.dumps({"text": t, "id": i}).encode() for i, t in enumerate(FIRST)])
    examples = [_example(text=[t.encode()], id=[i]) for i, t in enumerate(SECOND)]
    # an Example whose Features are 123 bytes long reads b"\n{" (whitespace, "{"), like JSON, at first
    braces = next("{" * n for n in range(1, 123) if _example(text=[b"{" * n], id=[99])[1:2] == b"{")
    examples.append(_example(text=[braces.encode()], id=[99]))
    _write(tmp_path / "tf.array_record", examples)
    source = ArrayRecordFiles(str(tmp_path / "*.array_record"), field="text")
    assert source_checks.texts(source) == FIRST + SECOND + [braces]


def test_splits_are_disjoint_and_cover(corpus):
    source_checks.assert_splits_disjoint_and_cover(lambda **split: ArrayRecordFiles(corpus, **split))


def test_pipeline_resumes_exactly_and_shards_split_one_order(corpus, small_tokenizer):
    source = ArrayRecordFiles(corpus)
    source_checks.assert_pipeline_decodes_the_documents(source, small_tokenizer)
    source_checks.assert_resumes_exactly(source, small_tokenizer)
    source_checks.assert_two_shards_split_one_order(source)
    source_checks.assert_pickles_as_plain_values(source)


def test_worker_processes_open_their_own_readers(corpus, small_tokenizer, parsed_flags):
    source = ArrayRecordFiles(corpus)
    want = source_checks.take(make_dataset(source, small_tokenizer, seq_len=16, batch_size=2), 3)
    dataset = make_dataset(source, small_tokenizer, seq_len=16, batch_size=2, num_workers=1)
    got = source_checks.take(dataset, 3)
    for w, g in zip(want, got, strict=True):
        assert (w["inputs"] == g["inputs"]).all()


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # inside the first chunk of records: its hash no longer matches
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "records, field, damage, pattern",
    [
        ([b'{"body": "x"}'], "text", None, r"bad\.array_record:row 0 \(a JSON object\) has no field 'text'"),
        ([b'{"text": 3}'], "text", None, r"bad\.array_record:row 0: JSON field 'text' is int, not a string"),
        ([_example(body=[b"x"])], "text", None, r"row 0 \(a tf.train.Example\) has no feature 'text' \(features: body"),
        ([_example(text=[3])], "text", None, r"bad\.array_record:row 0: feature 'text' is a int64_list, not one bytes"),
        ([b"ok", b"\xff not utf-8"], None, None, r"bad\.array_record:row 1 is not UTF-8"),
        ([b"raw text"], "text", None, r"row 0 is neither a JSON object nor a tf.train.Example: .*field=None"),
        ([b'{"text": "unterminated'], "text", None, r"bad\.array_record:row 0 is not valid JSON"),
        ([t.encode() for t in FIRST], None, "truncate", r"bad\.array_record is not a readable ArrayRecord file"),
        ([t.encode() * 5 for t in FIRST], None, _corrupt, r"bad\.array_record:row \d+ cannot be read .*corrupt"),
    ],
    ids=["json missing", "json type", "example missing", "example type", "not utf-8", "raw", "bad json", "truncated",
         "corrupt"],
)  # fmt: skip
def test_bad_records_give_one_line_naming_file_and_row(tmp_path, records, field, damage, pattern):
    path = tmp_path / "bad.array_record"
    _write(path, records)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage is not None:
        damage(path)
    source = ArrayRecordFiles(str(path), field=field)
    with pytest.raises(UserError, match=pattern) as error:
        for item in source.documents():
            source.load(item)
    assert "\n" not in str(error.value)


def test_array_record_files_fiddler_from_the_command_line(corpus, tmp_path):
    cfg = resolve(["tiny", f"fiddler:array_record_files({corpus!r}, eval={corpus!r})"])
    assert (cfg.train_data.field, cfg.eval_data.eval_fraction) == (None, 0.0)
    assert source_checks.texts(fdl.build(cfg.eval_data)) == FIRST + SECOND
