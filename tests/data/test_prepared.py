"""Prepared data (`nnxlm data prepare`, nnxlm.data.prepared): shards hold exactly the tokenizer's ids,
in order; parallel and resumed preparing write the same bytes; training from them matches
tokenizing on the fly; bad directories, shards and tokenizers are one-line errors."""

import itertools
import json
import os
import pickle
from pathlib import Path

import fiddle as fdl
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from nnxlm.cli import main
from nnxlm.data import JsonlFiles, Prepared, SentencePieceTokenizer, TextFiles, make_dataset
from nnxlm.data.prepared import prepare, read_manifest
from nnxlm.errors import UserError
from nnxlm.recipes.directives import resolve


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, stdlib_files):
    """40 text files of stdlib code, 200 to ~3000 characters each."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(stdlib_files[:400:10]):
        text = Path(path).read_text(encoding="utf-8")[: 200 + 70 * i]
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer_file(corpus, tmp_path_factory):
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    SentencePieceTokenizer.train(texts, 512).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_file):
    return SentencePieceTokenizer.load(tokenizer_file)


@pytest.fixture(scope="module")
def reference(corpus, tokenizer, tmp_path_factory):
    """The corpus prepared by one worker in shards of 7 documents: (source, directory)."""
    source = TextFiles(globs=[str(corpus / "*.txt")])
    output = tmp_path_factory.mktemp("prepared") / "ref"
    prepare(source, tokenizer, output, workers=1, documents_per_shard=7)
    return source, output


def _records(file) -> list[np.ndarray]:
    reader = ArrayRecordReader(str(file))
    try:
        return [np.frombuffer(b, "<i4") for b in reader.read(0, reader.num_records())]
    finally:
        reader.close()


def _files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def test_every_record_is_the_tokenizers_ids_of_its_document_in_order(reference, tokenizer):
    source, output = reference
    docs = source.documents()
    files = sorted((output / "train").glob("*.array_record"))
    assert [f.name for f in files] == [f"{i:05d}-of-00006.array_record" for i in range(6)]
    records = [r for f in files for r in _records(f)]
    expected = [np.asarray(tokenizer.encode(source.load(d)), np.int32) for d in docs]
    assert len(records) == len(expected) == 40
    for got, want in zip(records, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    manifest = read_manifest(str(output))
    train = manifest["splits"]["train"]
    assert train["documents"] == 40 and train["source"] == repr(source)
    assert [s["documents"] for s in train["shards"]] == [7, 7, 7, 7, 7, 5]
    assert [s["tokens"] for s in train["shards"]] == [sum(map(len, expected[i : i + 7])) for i in range(0, 40, 7)]
    assert manifest["tokenizer"]["file"] == "tokenizer.model" and manifest["tokenizer"]["vocab_size"] == 512
    assert SentencePieceTokenizer.load(str(output / "tokenizer.model")).serialized() == tokenizer.serialized()

    data = Prepared(str(output))
    assert len(data.documents()) == 40
    for i in (0, 6, 7, 39):
        np.testing.assert_array_equal(data.load(i), expected[i])
        assert data.load(i).dtype == np.int32
    assert data.where(8) == f"{output}/train/00001-of-00006.array_record record 1"
    data.check_tokenizer(tokenizer)
    copy = pickle.loads(pickle.dumps(data))  # what grain's worker processes get: no open readers
    assert "_cache" not in copy.__dict__ and copy == data
    np.testing.assert_array_equal(copy.load(39), expected[39])


def test_two_workers_write_the_same_bytes_as_one(reference, tokenizer, tmp_path):
    source, output = reference
    stats = prepare(source, tokenizer, tmp_path / "two", workers=2, documents_per_shard=7)
    assert stats["shards_written"] == 6 and stats["documents"] == 40 and stats["tokens"] > 0
    assert _files(tmp_path / "two") == _files(output)


def test_preparing_again_finishes_an_interrupted_run_and_equals_a_clean_one(reference, tokenizer, tmp_path, capsys):
    source, output = reference
    broken = tmp_path / "broken"
    prepare(source, tokenizer, broken, workers=1, documents_per_shard=7)
    manifest = json.loads((broken / "manifest.json").read_text())
    for i in (1, 4):  # not written yet when the run stopped
        manifest["splits"]["train"]["shards"][i] = None
        (broken / "train" / f"0000{i}-of-00006.array_record").unlink()
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "train" / "00005-of-00006.array_record").unlink()  # done, then lost
    (broken / "train" / "00002-of-00006.array_record.tmp123").write_bytes(b"half a shard")
    damaged = broken / "train" / "00003-of-00006.array_record"  # done, then cut short (a copy stopped)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    stats = prepare(source, tokenizer, broken, workers=1)  # documents_per_shard: the directory's
    err = capsys.readouterr().err
    assert "2 of 6 train shards already done" in err and "00005-of-00006.array_record is missing" in err
    assert "00003-of-00006.array_record is missing or damaged: writing it again" in err
    assert stats["shards_written"] == 4
    assert _files(broken) == {**_files(output), "manifest.json": (broken / "manifest.json").read_bytes()}
    assert read_manifest(str(broken)) == read_manifest(str(output))

    assert prepare(source, tokenizer, broken, workers=1)["shards_written"] == 0
    assert "train was complete already: nothing to write" in capsys.readouterr().out


def test_a_directory_of_other_data_is_refused_and_left_alone(reference, corpus, tmp_path):
    source, output = reference
    before = _files(output)
    other = SentencePieceTokenizer.train([p.read_text() for p in sorted(corpus.glob("*.txt"))[:20]], 480)
    with pytest.raises(UserError, match="another tokenizer: give a new --output"):
        prepare(source, other, output)
    with pytest.raises(UserError, match="split of another source"):
        prepare(
            TextFiles(globs=[str(corpus / "doc0*.txt")]),
            SentencePieceTokenizer.load(str(output / "tokenizer.model")),
            output,
        )
    with pytest.raises(UserError, match="prepared with 7 documents per shard"):
        prepare(source, SentencePieceTokenizer.load(str(output / "tokenizer.model")), output, documents_per_shard=8)
    assert _files(output) == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds other files"):
        prepare(source, other, tmp_path / "notes")
    (tmp_path / "examples.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(UserError, match="only pretraining text can be prepared"):
        prepare(JsonlFiles(globs=[str(tmp_path / "examples.jsonl")], field=None), other, tmp_path / "sft")


def test_damaged_shards_manifests_and_a_wrong_tokenizer_are_one_line_errors(reference, corpus, tokenizer, tmp_path):
    source, output = reference
    copy = tmp_path / "copy"
    for name, data in _files(output).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    shard = copy / "train" / "00002-of-00006.array_record"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    # found when the data is opened, before any training (it was found only when a run reached it)
    found = f"{size // 2:,} bytes, the manifest says {size:,} bytes"
    with pytest.raises(
        UserError, match=f"prepared shard {shard} is damaged or incomplete \\({found}\\): delete it"
    ) as e:
        Prepared(str(copy)).documents()
    assert "\n" not in str(e.value)
    shard.unlink()
    with pytest.raises(UserError, match=f"prepared shard {shard} is damaged or incomplete \\(missing"):
        Prepared(str(copy)).documents()

    other = SentencePieceTokenizer.train([p.read_text() for p in sorted(corpus.glob("*.txt"))[:20]], 480)
    with pytest.raises(UserError, match="prepared with another tokenizer than this run's: set tokenizer_path"):
        make_dataset(Prepared(str(output)), other, seq_len=16, batch_size=2)
    with pytest.raises(UserError, match="has no eval split"):
        Prepared(str(output), split="eval").documents()
    with pytest.raises(UserError, match="holds no prepared data"):
        Prepared(str(tmp_path / "nothing")).documents()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest.json is damaged .bad entry for shard 0"):
        Prepared(str(copy)).documents()
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="manifest.json is not readable JSON"):
        Prepared(str(copy)).documents()


def test_a_data_iterator_over_prepared_data_resumes_exactly(reference, tokenizer):
    data = Prepared(str(reference[1]))
    settings = dict(seq_len=32, batch_size=2, seed=3)
    iterator = iter(make_dataset(data, tokenizer, **settings))
    list(itertools.islice(iterator, 5))
    state = iterator.get_state()
    expected = list(itertools.islice(iterator, 4))
    resumed = iter(make_dataset(Prepared(str(reference[1])), tokenizer, **settings))
    resumed.set_state(state)
    for got, want in zip(itertools.islice(resumed, 4), expected, strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_prepared_data_trains_to_the_losses_of_the_same_text_tokenized_on_the_fly(
    corpus, tokenizer_file, tmp_path, capsys
):
    recipe = [
        "tiny",
        "set:model.vocab_size=512",
        f"fiddler:text_files('{corpus}/*.txt', eval_fraction=0.2)",
        f"set:tokenizer_path='{tokenizer_file}'",
        "set:num_steps=4",
        "set:eval_every=4",
        "set:checkpoint_every=0",
    ]
    out = tmp_path / "prepared"
    args = ["data", "prepare", *(f"--recipe={r}" for r in recipe), "--output", str(out), "--workers", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "documents/s" in printed and "tokens/s" in printed and "MB written" in printed
    assert f"fiddler:prepared('{out}')" in printed
    assert set(read_manifest(str(out))["splits"]) == {"train", "eval"}

    def losses(directives, workdir):
        cfg = resolve(directives)
        cfg.workdir = str(workdir)
        history = fdl.build(cfg).fit()
        return [[r["loss"], r.get("eval_loss", 0.0)] for r in history]

    on_the_fly = losses(recipe, tmp_path / "text")
    from_prepared = losses([*recipe, f"fiddler:prepared('{out}')"], tmp_path / "ids")
    assert len(on_the_fly) == 4 and on_the_fly[-1][1] > 0
    np.testing.assert_allclose(from_prepared, on_the_fly, rtol=1e-6)

    cfg = resolve(["tiny", f"fiddler:prepared('{out}')"])  # no tokenizer named: the directory's
    assert cfg.tokenizer_path == os.path.join(str(out), "tokenizer.model")
    assert cfg.eval_data.split == "eval"

    cfg = resolve(["tiny", "set:model.vocab_size=512", "set:num_steps=1"])  # ids with no tokenizer at all
    cfg.train_data, cfg.eval_data, cfg.workdir = fdl.Config(Prepared, path=str(out)), None, str(tmp_path / "none")
    with pytest.raises(UserError, match=r"^train_data holds token ids \(prepared data\) and the run has no tokenizer"):
        fdl.build(cfg).fit()


def test_command_line_mistakes_are_one_line_and_exit_2(capsys, tmp_path, corpus, tokenizer_file):
    (tmp_path / "file").write_text("x")
    text = [
        "--recipe",
        "set:model.vocab_size=512",
        "--recipe",
        f"fiddler:text_files('{corpus}/*.txt')",
        "--recipe",
        f"set:tokenizer_path='{tokenizer_file}'",
    ]
    for args, message in [
        (["--recipe", "tiny", *text, "--output", str(tmp_path / "file")], "is a file: give a directory"),
        (["--recipe", "nope", "--output", str(tmp_path / "out")], "unknown recipe 'nope'"),
        (["--recipe", "tiny", "--output", str(tmp_path / "out"), "--workers", "0"], "--workers 0 is not positive"),
        (["--recipe", "tiny", "--output", str(tmp_path / "out")], "synthetic token ids"),
        (["--recipe", "tiny", "--recipe", f"fiddler:prepared('{tmp_path}')"], "--output"),
        (["--recipe", "tiny", "--recipe", f"fiddler:prepared('{tmp_path}')", "--output", "o"], "holds no prepared"),
        (  # an empty eval split stops before the train split is written
            [
                "--recipe",
                "tiny",
                *text,
                "--recipe",
                "set:eval_data.eval_fraction=1e-6",
                "--output",
                str(tmp_path / "e"),
            ],
            "the 'eval' split of TextFiles",
        ),
    ]:
        assert main(["data", "prepare", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nnxlm: error:") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "e").exists()


def test_a_hugging_face_tokenizer_travels_with_its_special_tokens(corpus, tokenizer, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from nnxlm.data import load_tokenizer

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    hf.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<unk>"]))
    (tmp_path / "hf").mkdir()
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    source = TextFiles(globs=[str(corpus / "doc0*.txt")])
    prepare(source, load_tokenizer(str(tmp_path / "hf" / "tokenizer.json")), tmp_path / "out")

    cfg = resolve(["tiny", f"fiddler:prepared('{tmp_path / 'out'}')"])
    assert cfg.tokenizer_path == str(tmp_path / "out" / "tokenizer.json") and cfg.eval_data is None
    copied = load_tokenizer(cfg.tokenizer_path)  # its special tokens came along in tokenizer_config.json
    assert (copied.bos_id, copied.eos_id) == (0, 1)
    data = Prepared(str(tmp_path / "out"))
    data.check_tokenizer(copied)
    np.testing.assert_array_equal(data.load(3), copied.encode(source.load(source.documents()[3])))
    with pytest.raises(UserError, match="another tokenizer"):
        data.check_tokenizer(tokenizer)
