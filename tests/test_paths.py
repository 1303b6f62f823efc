"""Run directories, checkpoints, tokenizers, metrics and HF directories at any epath path: here
gs://bucket/... kept in a local directory (tests/fake_gcs.py says how and why), and a check that
no os.path or builtin open comes back on user paths."""

import io
import json
import os
import re
import tokenize
from pathlib import Path

import fiddle as fdl
import numpy as np
import pytest

import nnxlm
from nnxlm.cli import main
from nnxlm.data import PythonStdlib, load_tokenizer
from nnxlm.metrics import read_metrics
from nnxlm.recipes import models
from nnxlm.recipes.serialization import from_json
from nnxlm.resumption import checkpoint_steps

PACKAGE = Path(nnxlm.__file__).parent


def tiny(workdir, **changes):
    """8 steps of the tiny recipe, checkpointed every 4, with the learning-rate schedule of the
    8-step run whatever num_steps says."""
    cfg = nnxlm.recipes.tiny()
    cfg.workdir, cfg.num_steps, cfg.checkpoint_every, cfg.log_every = str(workdir), 8, 4, 4
    cfg.eval_data, cfg.eval_every = None, 0
    cfg.optimizer.decay_steps = 8
    for name, value in changes.items():
        setattr(cfg, name, value)
    return cfg


def test_a_run_in_a_bucket_checkpoints_logs_and_resumes_like_an_uninterrupted_local_run(fake_gcs, tmp_path):
    reference = fdl.build(tiny(tmp_path / "local")).fit()
    fdl.build(tiny("gs://bucket/run", num_steps=4)).fit()
    resumed = fdl.build(tiny("gs://bucket/run"))
    assert resumed.setup().step == 4
    later = resumed.fit()
    assert [r["loss"] for r in later] == [r["loss"] for r in reference[4:]]

    stored = fake_gcs / "bucket" / "run"
    assert checkpoint_steps("gs://bucket/run/checkpoints") == [4, 8]
    assert (stored / "checkpoints" / "8" / "commit_success.txt").exists()  # orbax took its gs:// path
    assert [r["step"] for r in read_metrics("gs://bucket/run")] == list(range(1, 9))
    events = list((stored / "tensorboard").iterdir())
    assert events and all(b"loss" in event.read_bytes() for event in events)
    assert from_json(json.loads((stored / "recipe.json").read_text())).workdir == "gs://bucket/run"
    assert os.listdir(".") == []  # nothing missed epath into the working directory (./gs:/...)


def test_a_text_run_keeps_its_tokenizer_in_the_bucket_and_the_command_line_works_there(fake_gcs, capsys):
    cfg = nnxlm.recipes.tiny()
    cfg.model = models.llama_tiny(vocab_size=512)
    cfg.train_data, cfg.eval_data = fdl.Config(PythonStdlib), None
    cfg.tokenizer_train_chars = 300_000
    cfg.num_steps, cfg.checkpoint_every, cfg.workdir = 2, 0, "gs://bucket/text"
    fdl.build(cfg).fit()  # trains the run's tokenizer and saves it into the bucket
    stored = fake_gcs / "bucket"
    assert load_tokenizer("gs://bucket/text/tokenizer.model").vocab_size == 512
    assert (stored / "text" / "tokenizer.model").exists()

    assert main(["decode", "--checkpoint", "gs://bucket/text", "--prompt", "def", "--max_new_tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def")
    assert main(["convert", "to-hf", "gs://bucket/text", "gs://bucket/hf"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(stored / "hf"))
    assert main(["convert", "from-hf", "gs://bucket/hf", "gs://bucket/back"]) == 0
    ids = np.arange(12, dtype=np.int32)[None]
    trained, back = nnxlm.load_model("gs://bucket/text"), nnxlm.load_model("gs://bucket/back")
    np.testing.assert_allclose(back(ids), trained(ids), rtol=1e-5, atol=1e-5)

    capsys.readouterr()
    assert main(["decode", "--checkpoint", "gs://bucket/none", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint found at gs://bucket/none" in err, err
    assert os.listdir(".") == []


def test_data_globs_in_a_bucket_are_documents_like_local_ones(fake_gcs):
    """Text files, JSON Lines and Parquet matched by gs:// globs: the same documents, keys (so the
    same eval split) and texts as the same files on local disk; prepared data says it is local-only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nnxlm.data import JsonlFiles, ParquetFiles, TextFiles
    from nnxlm.data.prepared import Prepared
    from nnxlm.errors import UserError

    local = fake_gcs / "bucket" / "corpus"  # what gs://bucket/corpus holds
    for i in range(12):
        (local / "text" / f"part{i // 6}").mkdir(parents=True, exist_ok=True)
        (local / "text" / f"part{i // 6}" / f"{i:02d}.txt").write_text(f"document {i}")
    lines = "".join(json.dumps({"text": f"line {i}"}) + "\n" + ("\n" if i % 5 == 0 else "") for i in range(40))
    (local / "lines.jsonl").write_text(lines)
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(30)]}), local / "rows.parquet", row_group_size=8)
    cases = [
        (TextFiles, "text/**/*.txt", {}),
        (JsonlFiles, "*.jsonl", {}),
        (ParquetFiles, "*.parquet", {}),
    ]
    for kind, pattern, fields in cases:
        for split in ("train", "eval"):
            remote = kind(globs=[f"gs://bucket/corpus/{pattern}"], split=split, eval_fraction=0.3, **fields)
            here = kind(globs=[f"{local}/{pattern}"], split=split, eval_fraction=0.3, **fields)
            texts = [remote.load(d) for d in remote.documents()]
            assert texts == [here.load(d) for d in here.documents()] and texts, (kind, split)
    assert len(TextFiles(globs=["gs://bucket/corpus/text/**/*.txt"]).documents()) == 12
    for bad in (lambda: Prepared("gs://bucket/prepared").documents(),):
        with pytest.raises(UserError, match=r"^prepared data directory gs://bucket/prepared is not on a local file"):
            bad()
    assert os.listdir(".") == []


# Calls that read or write files without epath: they work on local paths alone.
LOCAL_ONLY = re.compile(
    r"\bos\.path\b|(?<![\w.])(?<!def )open\(|\bos\.(makedirs|mkdir|replace|rename|remove|unlink|listdir|scandir|"
    r"walk|stat|rmdir|fstat)\(|\bshutil\.(copy|copyfile|copy2|copytree|move|rmtree)\(|\bglob\.i?glob\(|"
    r"np\.load\((?!io\.BytesIO)|\.from_file\("
)
# (file, text of the line) -> why it may stay local
ALLOWED = {
    ("launch.py", 'with open("/sys/kernel/mm/transparent_hugepage/enabled"'): "a kernel setting of this machine",
    ("launch.py", 'if os.path.basename(program) == "nnxlm":'): "the running program's own file",
    ("launch.py", "if os.path.abspath(program) == os.path.join("): "the running program's own file",
    ("recipes/directives.py", "if not os.path.isfile(path):"): "a recipe .py file is imported by this Python",
    # data globs: the standard glob for local patterns (hidden files stay out), epath for the others
    ("data/sources.py", "return [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]"): "local glob",
    ("data/sources.py", "expanded = pattern if _is_remote(pattern) else os.path.expanduser(pattern)"): "local glob",
    ("data/sources.py", "found.setdefault(os.path.normpath(path), os.path.relpath("): "local glob",
    ("data/sources.py", 'with open(path, "rb") as f:  # a local file'): "a memory map needs a local file",
    ("data/sources.py", "mapped = _mapped.get((os.path.abspath(path)"): "a memory map needs a local file",
    ("data/sources.py", "stat = os.stat(path)  # a file rewritten"): "a memory map needs a local file",
    ("data/sources.py", "path = os.path.join(dirpath, name)"): "the interpreter's own standard library",
    ("data/sources.py", 'if not name.endswith(".py") or os.path.getsize(path) == 0:'): "the standard library",
    ("data/sources.py", "key = os.path.relpath(path, root).replace(os.sep, "): "the interpreter's own standard library",
    ("data/sources.py", "for dirpath, dirnames, filenames in os.walk(root):"): "the interpreter's own standard library",
    ("data/parquet.py", "file = pq.ParquetFile(epath.Path(path).open("): "pyarrow memory-maps local files",
}
# Files read by libraries that open local paths themselves.
NOT_COVERED = {
    "data/prepared.py",  # ArrayRecord shards: local files only (remote paths are refused in one line)
}


def _code(source: str) -> list[str]:
    """The lines of `source` with comments and plain strings (docstrings) blanked out; f-strings
    stay, as code runs inside them."""
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        is_fstring = token.type == tokenize.STRING and "f" in token.string.split(token.string[-1])[0].lower()
        if token.type in (tokenize.STRING, tokenize.COMMENT) and not is_fstring:
            (first, start), (last, end) = token.start, token.end
            for row in range(first, last + 1):
                line = lines[row - 1]
                a, b = (start if row == first else 0), (end if row == last else len(line))
                lines[row - 1] = line[:a] + " " * (b - a) + line[b:]
    return lines


def test_nnxlm_reads_and_writes_user_paths_through_epath_only():
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        name = file.relative_to(PACKAGE).as_posix()
        if name in NOT_COVERED:
            continue
        source = file.read_text(encoding="utf-8")
        for number, (line, code) in enumerate(zip(source.splitlines(), _code(source), strict=True), start=1):
            if LOCAL_ONLY.search(code) and not any(name == f and text in line for f, text in ALLOWED):
                found.append(f"nnxlm/{name}:{number}: {line.strip()}")
    assert not found, "use etils.epath (see nnxlm/files.py) instead of:\n" + "\n".join(found)
