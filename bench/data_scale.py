"""Data at scale: start-up time and memory against the number of documents, and each source's
tokens/s against what the 57 M training step consumes.

    python -m bench.data_scale [--sizes 10000 1000000 10000000] [--prepare_up_to 1000000] [--seconds 3] [--runs 3]

Start-up: a JSON Lines corpus of N short documents (about 60 bytes each) and the same corpus
prepared (`nnxlm data prepare`, ArrayRecord shards of token ids). Each measurement runs in a fresh
process: seconds from building the pipeline to its first batch (4 × 512 tokens, shuffled), and the
rise of the process's peak resident memory over what it held after its imports.

Throughput: the same text (the Python standard library's files, 8,192-piece SentencePiece BPE)
from each source, in process (the trainer's default num_workers=0), packed into 4 × 512-token
batches: median tokens/s over --runs runs of --seconds. Beside it, the tokens/s one training step
of bench_llama_57m (4 × 512 tokens) consumes on this machine, measured in the same run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, median
from bench.data import tokens_per_second

SEQ_LEN, BATCH_SIZE, VOCAB_SIZE = 512, 4, 8192
WORDS = "the of and to in is that for it as with was on be by this are from or an at which but not".split()

STARTUP = """
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
from nnxlm.data import JsonlFiles, Prepared, load_tokenizer, make_dataset
kind, path, tokenizer_path = sys.argv[1:4]
SEQ_LEN, BATCH_SIZE = int(sys.argv[4]), int(sys.argv[5])
tokenizer = load_tokenizer(tokenizer_path)
base = rss("VmRSS:")
start = time.perf_counter()
source = JsonlFiles(globs=[path]) if kind == "jsonl" else Prepared(path)
batch = next(iter(make_dataset(source, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH_SIZE, seed=1)))
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, memory_mib=rss("VmHWM:") - base, documents=len(source.documents()))))
"""


def write_jsonl(path: str, n: int) -> None:
    """n documents of 6-12 words (about 60 bytes a line)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            count = min(100_000, n - start)
            picks = words[rng.integers(0, len(words), size=(count, 12))]
            lengths = rng.integers(6, 13, size=count)
            f.writelines(
                json.dumps({"text": f"document {start + i}: " + " ".join(picks[i, : lengths[i]])}) + "\n"
                for i in range(count)
            )


def startup(kind: str, path: str, tokenizer_path: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", STARTUP, kind, path, tokenizer_path, str(SEQ_LEN), str(BATCH_SIZE)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale(sizes: list[int], directory: str, prepare_up_to: int) -> list[dict]:
    from nnxlm.data import JsonlFiles, SentencePieceTokenizer
    from nnxlm.data.prepared import prepare

    tokenizer_path = os.path.join(directory, "small.model")
    sample = (" ".join(WORDS[i:] + WORDS[:i]) + f" document {i}: " for i in range(2000))
    SentencePieceTokenizer.train(sample, 512).save(tokenizer_path)
    from nnxlm.data import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    rows = []
    for n in sizes:
        corpus = os.path.join(directory, f"corpus-{n}.jsonl")
        write_jsonl(corpus, n)
        row = dict(documents=n, corpus_mb=os.path.getsize(corpus) / 1e6)
        kinds = [("jsonl", corpus)]
        if n <= prepare_up_to:  # preparing ten million documents takes minutes on 2 cores
            prepared = os.path.join(directory, f"prepared-{n}")
            start = time.perf_counter()
            prepare(JsonlFiles(globs=[corpus]), tokenizer, prepared, split="train", workers=2)
            row["prepare_s"] = time.perf_counter() - start
            kinds.append(("prepared", prepared))
        for kind, path in kinds:
            result = startup(kind, path, tokenizer_path)
            assert result["documents"] == n, result
            row[kind] = result
        rows.append(row)
        print(f"  {n:,} documents: {row}", file=sys.stderr)
        os.remove(corpus)
    return rows


def stdlib_sources(directory: str, tokenizer) -> dict:
    """The stdlib text as each kind of source (files written once, not timed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    from nnxlm.data import ArrayRecordFiles, HFDataset, JsonlFiles, ParquetFiles, Prepared, PythonStdlib
    from nnxlm.data.prepared import prepare

    stdlib = PythonStdlib(split="train")
    texts = [stdlib.load(doc) for doc in stdlib.documents()]
    jsonl = os.path.join(directory, "stdlib.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    parquet = os.path.join(directory, "stdlib.parquet")
    pq.write_table(pa.table({"text": texts}), parquet, row_group_size=256)
    array_record = os.path.join(directory, "stdlib.array_record")
    writer = ArrayRecordWriter(array_record, "group_size:1")
    for t in texts:
        writer.write(t.encode("utf-8"))
    writer.close()
    prepared = os.path.join(directory, "stdlib-prepared")
    prepare(JsonlFiles(globs=[jsonl]), tokenizer, prepared, split="train", workers=2)
    return {
        "text files (PythonStdlib)": stdlib,
        "JSON Lines": JsonlFiles(globs=[jsonl]),
        "Parquet": ParquetFiles(globs=[parquet]),
        "ArrayRecord (text records)": ArrayRecordFiles(globs=[array_record]),
        "Hugging Face datasets (parquet)": HFDataset(path="parquet", data_files=[parquet]),
        "prepared (token ids)": Prepared(prepared),
    }


def step_consumption(directory: str) -> float:
    """Median tokens/s of bench_llama_57m's train step (synthetic ids: no data cost), steps 3-8."""
    import fiddle as fdl

    import nnxlm

    cfg = nnxlm.recipes.bench_llama_57m()
    nnxlm.recipes.fiddlers.synthetic_data(cfg)
    cfg.workdir, cfg.num_steps, cfg.eval_every, cfg.checkpoint_every = os.path.join(directory, "run"), 8, 0, 0
    cfg.eval_data = None
    history = fdl.build(cfg).fit()
    return median([r["tokens_per_s"] for r in history[2:]])


def throughput(directory: str, seconds: float, runs: int) -> dict:
    from nnxlm.data import PythonStdlib, SentencePieceTokenizer

    stdlib = PythonStdlib(split="train")
    texts = (stdlib.load(doc) for doc in stdlib.documents())
    tokenizer = SentencePieceTokenizer.train(texts, VOCAB_SIZE, max_chars=5_000_000)
    sources = stdlib_sources(directory, tokenizer)
    rates = {}
    for name, source in sources.items():
        runs_s = [tokens_per_second(source, tokenizer, seed, seconds, SEQ_LEN, BATCH_SIZE) for seed in range(runs)]
        rates[name] = median(runs_s)
        print(f"  {name}: {rates[name]:,.0f} tokens/s", file=sys.stderr)
    return dict(tokens_per_s=rates, step_tokens_per_s=step_consumption(directory))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prepare_up_to", type=int, default=1_000_000, help="prepare corpora up to this size")
    parser.add_argument("--skip", nargs="*", default=[], choices=["scale", "throughput"])
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        if "throughput" not in args.skip:
            results["throughput"] = throughput(directory, args.seconds, args.runs)
        if "scale" not in args.skip:
            results["scale"] = scale(args.sizes, directory, args.prepare_up_to)
    emit(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
