"""Pre-tokenized data: a corpus tokenized once into ArrayRecord shards (`nnxlm data prepare`).

A prepared directory holds::

    DIR/manifest.json                          what is there (below)
    DIR/tokenizer.model or tokenizer.json      the tokenizer the ids come from (and its companions)
    DIR/train/00000-of-00012.array_record      shards of the train split
    DIR/eval/00000-of-00001.array_record       shards of the eval split, when the recipe has eval_data

A record is one document's token ids as little-endian int32 bytes, without bos/eos (the pipeline
adds the run tokenizer's), so document boundaries are kept. Shard i holds documents
[i * K, (i + 1) * K) of the split in the source's ``documents()`` order (K = documents_per_shard):
the layout depends on the source and K only, never on the worker count. Shards are written with
``group_size:1`` (each record its own zstd chunk) so reading any document is one small read.

manifest.json (read as untrusted JSON)::

    {"format": "nnxlm-prepared", "version": 1,
     "tokenizer": {"sha256": hex of the serialized model or null, "vocab_size", "bos_id", "eos_id",
                   "file": "tokenizer.model" | "tokenizer.json" | null},
     "splits": {"train": {"source": repr of the source, "documents": n, "documents_per_shard": K,
                          "shards": [{"file": "train/00000-of-00012.array_record", "documents": k,
                                      "tokens": t, "bytes": b} or null while unwritten, ...]}}}

A shard is written under a temporary name and renamed once complete; then the manifest records it.
Preparing again into the same directory skips the shards already done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import sys
import threading
import time

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from nnxlm.data.pipeline import document_ids
from nnxlm.data.sources import SPLITS
from nnxlm.data.tokenizer import COMPANION_FILES
from nnxlm.errors import UserError
from nnxlm.files import copy_atomically, write_atomically

FORMAT, VERSION = "nnxlm-prepared", 1
MANIFEST = "manifest.json"
_WRITER_OPTIONS = "group_size:1"  # zstd per record: ~0.4 of the raw bytes, ~20 us a random read
_READER_OPTIONS = "readahead_buffer_size:0"  # random access: read ahead is wasted work


def tokenizer_sha256(tokenizer) -> str | None:
    """Hex sha256 of the tokenizer's serialized model (None for data that is already token ids)."""
    return None if tokenizer is None else hashlib.sha256(tokenizer.serialized()).hexdigest()


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}/{index:05d}-of-{count:05d}.array_record"


def _again(path: str) -> str:
    return f"delete {path} and run `nnxlm data prepare` again"


def _local(path: str, what: str) -> str:
    """``path``, a local directory: shards are ArrayRecord files, written and opened on local disk."""
    if "://" in path:
        raise UserError(
            f"{what} {path} is not on a local file system: prepared shards are written and read as local "
            "ArrayRecord files; prepare to local disk and mount or copy the directory where training runs"
        )
    return path


def read_manifest(path: str) -> dict:
    """The validated manifest of the prepared directory ``path``; UserError when missing or bad."""
    file = os.path.join(_local(os.fspath(path), "prepared data directory"), MANIFEST)
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{path} holds no prepared data (no {MANIFEST}): write it with `nnxlm data prepare --output {path}`"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is not readable JSON ({e}): {_again(path)}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"{file} is damaged ({problem}): {_again(path)}")
    return manifest


def _is_int(x, low: int = 0) -> bool:
    return type(x) is int and x >= low


def _manifest_problem(m) -> str | None:
    """What is wrong with a manifest's structure, or None."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"not an {FORMAT} manifest"
    if m.get("version") != VERSION:
        return f"format version {m.get('version')!r}, this nnxlm reads {VERSION}"
    tok, splits = m.get("tokenizer"), m.get("splits")
    if not isinstance(tok, dict) or not isinstance(splits, dict):
        return "no tokenizer or splits"
    if not (tok.get("sha256") is None or isinstance(tok.get("sha256"), str)):
        return "tokenizer.sha256 is not a string"
    if any(not (tok.get(k) is None or _is_int(tok.get(k))) for k in ("vocab_size", "bos_id", "eos_id")):
        return "a tokenizer id is not an integer"
    if tok.get("file") not in (None, "tokenizer.model", "tokenizer.json"):
        return "tokenizer.file is not tokenizer.model or tokenizer.json"
    for name, split in splits.items():
        if name not in SPLITS or not isinstance(split, dict) or not isinstance(split.get("source"), str):
            return f"bad split {name!r}"
        n, k, shards = split.get("documents"), split.get("documents_per_shard"), split.get("shards")
        if not (_is_int(n, 1) and _is_int(k, 1) and isinstance(shards, list) and len(shards) == math.ceil(n / k)):
            return f"bad counts in split {name!r}"
        for i, shard in enumerate(shards):
            expected = {"file": shard_name(name, i, len(shards)), "documents": min(k, n - i * k)}
            if shard is None:
                continue
            if not isinstance(shard, dict) or any(shard.get(key) != value for key, value in expected.items()):
                return f"bad entry for shard {i} of split {name!r}"
            if not (_is_int(shard.get("tokens")) and _is_int(shard.get("bytes"))):
                return f"bad counts for shard {i} of split {name!r}"
    return None


def _shard_records(file: str) -> int | None:
    """Records of a complete shard file, or None when it is missing or unreadable."""
    if not os.path.isfile(file):
        return None
    try:  # a damaged file fails when opened, counted or closed (a Riegeli hash mismatch)
        reader = ArrayRecordReader(file, _READER_OPTIONS)
        try:
            return reader.num_records() if reader.ok() else None
        finally:
            reader.close()
    except (RuntimeError, ValueError, OSError):
        return None


# -- writing -------------------------------------------------------------------------------------
def _write_shard(source, tokenizer, docs, output: str, index: int, name: str, start: int, stop: int):
    """Tokenizes documents [start, stop) into the shard file ``name``: (index, its manifest entry)."""
    final = os.path.join(output, name)
    tmp = f"{final}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    tokens = 0
    try:
        for i in range(start, stop):
            ids = document_ids(source, tokenizer, docs[i])
            writer.write(ids.astype("<i4", copy=False).tobytes())
            tokens += len(ids)
    finally:
        writer.close()
    with open(tmp, "rb") as f:  # on disk before the manifest says it is done
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return index, {"file": name, "documents": stop - start, "tokens": tokens, "bytes": os.path.getsize(final)}


_WORKER: dict = {}  # a worker process's source, tokenizer and documents, set once by _start_worker


def _start_worker(source, tokenizer, documents: int) -> None:
    # an initializer that raises makes the pool start workers forever: keep the error for the tasks
    try:
        docs = source.documents()  # once a worker process: listing may scan files
        if len(docs) != documents:
            raise UserError(f"the documents of {source!r} changed while preparing: prepare from data that stays put")
        _WORKER.update(source=source, tokenizer=tokenizer, docs=docs)
    except Exception as e:
        _WORKER["error"] = e


def _worker_shard(task: tuple):
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _write_shard(_WORKER["source"], _WORKER["tokenizer"], _WORKER["docs"], *task)


def prepare(source, tokenizer, output: str, *, split="train", workers=1, documents_per_shard=None) -> dict:
    """Tokenizes every document of ``source`` into the ``split`` shards of the directory ``output``
    (module docstring), ``workers`` processes each writing whole shards.

    Resumes: shards already written are kept. ``documents_per_shard`` None: the directory's, or for
    a new split ``ceil(n / 64)`` clamped to [100, 10000]. Returns the totals and time of this call:
    documents, tokens, bytes, seconds, shards_written.
    """
    output = _local(os.fspath(output), "--output")
    if split not in SPLITS:
        raise UserError(f"split {split!r}: use 'train' or 'eval'")
    if workers < 1 or (documents_per_shard is not None and documents_per_shard < 1):
        raise UserError("workers and documents_per_shard must be positive integers")
    exists = _check_output(output)
    docs = source.documents()
    if isinstance(source.load(docs[0]), dict):
        raise UserError(
            f"{type(source).__name__} yields examples (JSON objects), not text: only pretraining text can be "
            "prepared; fine-tuning data is tokenized as it trains"
        )
    manifest = read_manifest(output) if exists else _new_manifest(tokenizer)
    if manifest["tokenizer"]["sha256"] != tokenizer_sha256(tokenizer):
        raise UserError(f"{output} holds data prepared with another tokenizer: {_start_over(output)}")
    entry = _split_entry(manifest, split, source, len(docs), documents_per_shard, output)
    todo = _shards_to_write(output, split, entry)
    write_atomically(os.path.join(output, MANIFEST), json.dumps(manifest, indent=1))
    _save_tokenizer(tokenizer, output, manifest["tokenizer"]["file"])
    shards = entry["shards"]
    if 0 < len(todo) < len(shards):
        done = len(shards) - len(todo)
        print(f"nnxlm: {output}: {done} of {len(shards)} {split} shards already done", file=sys.stderr)

    start, written = time.perf_counter(), []

    def finished(index: int, shard: dict) -> None:
        shards[index] = shard
        written.append(shard)
        write_atomically(os.path.join(output, MANIFEST), json.dumps(manifest, indent=1))
        rate = sum(s["tokens"] for s in written) / max(time.perf_counter() - start, 1e-9)
        done = sum(s is not None for s in shards)
        print(f"nnxlm: {split} shard {done}/{len(shards)} written ({rate:,.0f} tokens/s)", file=sys.stderr, flush=True)

    if workers == 1 or len(todo) <= 1:
        for task in todo:
            finished(*_write_shard(source, tokenizer, docs, *task))
    else:
        try:
            pickle.dumps((source, tokenizer))  # only to hand them to the worker processes
        except Exception as e:
            raise UserError(f"{source!r} or its tokenizer cannot go to other processes ({e}): use 1 worker") from None
        # spawn, not fork: the parent may have started JAX's threads, which fork does not copy safely
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(workers, len(todo)), _start_worker, (source, tokenizer, len(docs))) as pool:
            for index, shard in pool.imap_unordered(_worker_shard, todo):
                finished(index, shard)
    return _report(written, time.perf_counter() - start, os.path.join(output, split))


def _check_output(output: str) -> bool:
    """Whether ``output`` holds prepared data already; UserError when it holds anything else."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"--output {output} is a file: give a directory for the prepared data")
    if os.path.exists(os.path.join(output, MANIFEST)):
        return True
    if os.path.isdir(output) and os.listdir(output):
        raise UserError(f"--output {output} is a directory that holds other files: give a new or empty directory")
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make --output {output} ({e.strerror}): give a directory you can write") from None
    return False


def _start_over(output: str) -> str:
    return f"give a new --output, or delete {output} to prepare it again"


def _split_entry(manifest: dict, split: str, source, n: int, documents_per_shard: int | None, output: str) -> dict:
    """The manifest entry of ``split``, new or the one to resume; UserError when it is another source's."""
    entry = manifest["splits"].get(split)
    if entry is None:
        k = documents_per_shard or min(10_000, max(100, math.ceil(n / 64)))
        entry = {"source": repr(source), "documents": n, "documents_per_shard": k, "shards": [None] * math.ceil(n / k)}
        manifest["splits"][split] = entry
    elif (entry["source"], entry["documents"]) != (repr(source), n):
        raise UserError(
            f"{output} holds the {split} split of another source ({entry['source']}, {entry['documents']} "
            f"documents): {_start_over(output)}"
        )
    elif documents_per_shard not in (None, entry["documents_per_shard"]):
        raise UserError(
            f"{output} was prepared with {entry['documents_per_shard']} documents per shard: "
            f"resume with that value, or {_start_over(output)}"
        )
    return entry


def _shards_to_write(output: str, split: str, entry: dict) -> list[tuple]:
    """Tasks for _write_shard: the shards not done, or whose file is gone or damaged since."""
    os.makedirs(os.path.join(output, split), exist_ok=True)
    for name in os.listdir(os.path.join(output, split)):  # left by an interrupted run
        if ".array_record.tmp" in name:
            os.remove(os.path.join(output, split, name))
    n, k, shards = entry["documents"], entry["documents_per_shard"], entry["shards"]
    todo = []
    for i, shard in enumerate(shards):
        name = shard_name(split, i, len(shards))
        if shard is not None and _shard_records(os.path.join(output, name)) != shard["documents"]:
            print(f"nnxlm: {os.path.join(output, name)} is missing or damaged: writing it again", file=sys.stderr)
            shards[i] = shard = None
        if shard is None:
            todo.append((output, i, name, i * k, min(n, (i + 1) * k)))
    return todo


def _report(written: list[dict], seconds: float, where: str) -> dict:
    """Prints and returns the totals and throughput of the shards written."""
    stats = {key: sum(s[key] for s in written) for key in ("documents", "tokens", "bytes")}
    stats.update(seconds=seconds, shards_written=len(written))
    if not written:
        print(f"nnxlm: {where} was complete already: nothing to write")
        return stats
    per_s = 1 / max(seconds, 1e-9)
    print(
        f"nnxlm: prepared {stats['documents']:,} documents, {stats['tokens']:,} tokens in {seconds:.1f} s "
        f"({stats['documents'] * per_s:,.0f} documents/s, {stats['tokens'] * per_s:,.0f} tokens/s, "
        f"{stats['bytes'] / 1e6:.1f} MB written) into {where}"
    )
    return stats


def _new_manifest(tokenizer) -> dict:
    ids = {k: None if tokenizer is None else getattr(tokenizer, k) for k in ("vocab_size", "bos_id", "eos_id")}
    # an HFTokenizer has the path of its tokenizer.json; a SentencePieceTokenizer saves a .model file
    file = None if tokenizer is None else "tokenizer.json" if hasattr(tokenizer, "path") else "tokenizer.model"
    tokenizer = {"sha256": tokenizer_sha256(tokenizer), **ids, "file": file}
    return {"format": FORMAT, "version": VERSION, "tokenizer": tokenizer, "splits": {}}


def _save_tokenizer(tokenizer, output: str, file: str | None) -> None:
    """A copy of the tokenizer beside the data, so a run trains from the directory alone."""
    if tokenizer is None or os.path.exists(os.path.join(output, file)):
        return
    if file == "tokenizer.json":  # a Hugging Face tokenizer.json: its special tokens are in its companions
        folder = os.path.dirname(os.path.abspath(tokenizer.path))
        copy_atomically(tokenizer.path, os.path.join(output, "tokenizer.json"))
        for name in COMPANION_FILES:
            if os.path.exists(os.path.join(folder, name)):
                copy_atomically(os.path.join(folder, name), os.path.join(output, name))
    else:
        tokenizer.save(os.path.join(output, "tokenizer.model"))
        if getattr(tokenizer, "chat_template", None):
            write_atomically(os.path.join(output, "chat_template.jinja"), tokenizer.chat_template)


# -- reading -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Prepared:
    """The ``split`` of a directory written by ``nnxlm data prepare``: one int32 id array a document.

    Constructing one touches no files. The manifest is read and shard readers opened on first use,
    once per process; pickling (grain worker processes) carries only ``path`` and ``split``.
    """

    path: str
    split: str = "train"

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.split not in SPLITS:
            raise UserError(f"Prepared.split is {self.split!r}: use 'train' or 'eval'")

    def __getstate__(self):
        return {"path": self.path, "split": self.split}

    def __setstate__(self, state):
        object.__setattr__(self, "path", state["path"])
        object.__setattr__(self, "split", state["split"])

    def _opened(self) -> dict:
        cache = self.__dict__.get("_cache")
        if cache is None or cache["pid"] != os.getpid():  # readers are not shared with a forked child
            manifest = read_manifest(self.path)
            entry = manifest["splits"].get(self.split)
            if entry is None:
                raise UserError(
                    f"{self.path} has no {self.split} split (it has {', '.join(manifest['splits']) or 'none'}): "
                    f"prepare it from a recipe with {self.split}_data, or set {self.split}_data to another source"
                )
            missing = sum(shard is None for shard in entry["shards"])
            if missing:
                raise UserError(
                    f"{self.path}: {missing} of {len(entry['shards'])} {self.split} shards are not written yet: "
                    "run the same `nnxlm data prepare` again to finish them"
                )
            counts = np.array([shard["documents"] for shard in entry["shards"]], dtype=np.int64)
            files = [os.path.join(self.path, shard["file"]) for shard in entry["shards"]]
            for file, shard in zip(files, entry["shards"], strict=True):  # at start-up, not hours into a run
                if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"]:
                    found = f"{os.path.getsize(file):,} bytes" if os.path.isfile(file) else "missing"
                    raise UserError(
                        f"prepared shard {file} is damaged or incomplete ({found}, the manifest says "
                        f"{shard['bytes']:,} bytes): delete it and run the same `nnxlm data prepare` again"
                    )
            cache = {"pid": os.getpid(), "ends": np.cumsum(counts), "counts": counts, "files": files, "readers": {}}
            cache.update(sha256=manifest["tokenizer"]["sha256"], lock=threading.Lock())
            object.__setattr__(self, "_cache", cache)
        return cache

    def _locate(self, item) -> tuple[int, int]:
        """(shard, record in it) of a document index."""
        cache = self._opened()
        ends, i = cache["ends"], int(item)
        if not 0 <= i < ends[-1]:
            raise IndexError(f"document {i} of {ends[-1]} in {self.path} ({self.split})")
        shard = int(np.searchsorted(ends, i, side="right"))
        return shard, i - int(ends[shard] - cache["counts"][shard])

    def documents(self) -> range:
        """Document indices 0..n-1 of the split, in the order they were prepared."""
        return range(int(self._opened()["ends"][-1]))

    def where(self, item) -> str:
        shard, record = self._locate(item)
        return f"{self._opened()['files'][shard]} record {record}"

    def load(self, item) -> np.ndarray:
        """int32 token ids [n] of document ``item`` (no bos/eos)."""
        shard, record = self._locate(item)
        cache = self._opened()
        file, reader = cache["files"][shard], cache["readers"].get(shard)
        damaged = (
            f"prepared shard {file} is damaged or incomplete: delete it and run the same `nnxlm data prepare` again"
        )
        if reader is None:
            with cache["lock"]:  # grain may load from several threads
                reader = cache["readers"].get(shard)
                if reader is None:
                    reader = ArrayRecordReader(file, _READER_OPTIONS) if os.path.isfile(file) else None
                    if reader is None or not reader.ok() or reader.num_records() != cache["counts"][shard]:
                        raise UserError(damaged)
                    cache["readers"][shard] = reader
        try:
            data = reader.read([record])[0]
        except RuntimeError:  # riegeli's checksum or decompression failed
            raise UserError(damaged) from None
        if len(data) % 4:
            raise UserError(damaged)
        return np.frombuffer(data, dtype="<i4").astype(np.int32, copy=False)

    def check_tokenizer(self, tokenizer) -> None:
        """UserError unless ``tokenizer`` is the one the ids were made with."""
        prepared, given = self._opened()["sha256"], tokenizer_sha256(tokenizer)
        if prepared != given:
            raise UserError(
                f"the data in {self.path} was prepared with another tokenizer than this run's: set "
                f"tokenizer_path to the one in {self.path}, or prepare the data again with this run's tokenizer"
            )
