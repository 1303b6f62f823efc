"""Reference log-probabilities computed once and kept in the run directory (DPO's cache_reference).

The reference model never changes, so its log-probability of each training row can be computed
in one pass before the first step and looked up afterwards: the step then runs the policy alone.
The cache maps a digest of each row (its inputs, targets and loss mask) to that row's summed
log-probability, and lives in <workdir>/reference_logps/<fingerprint>.npz, where the fingerprint
digests the reference weights and every row of the data: later epochs and restarts reuse it, and
a changed reference, tokenizer, seq_len or dataset makes another (the stale file is removed).

The values are computed by the same compiled function the train step uses on the fly
(Trainer._with_reference) on batches of the step's shape, so a cached run's losses are those of
an uncached one, bit for bit (tested).
"""

import hashlib
import io
import sys
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

from nnxlm.errors import UserError
from nnxlm.files import write_atomically
from nnxlm.objectives.base import TOKEN_FIELDS

FIELD = "cached_reference_logps"  # the batch field: [rows, seq_len], each row's value repeated


def row_digests(batch: dict[str, np.ndarray]) -> list[bytes]:
    """A 16-byte digest of each row's tokens and loss mask: the cache's key."""
    parts = [np.ascontiguousarray(batch[name]) for name in ("inputs", "targets", "loss_mask")]
    return [
        hashlib.blake2b(b"".join(p[row].tobytes() for p in parts), digest_size=16).digest()
        for row in range(len(parts[0]))
    ]


class ReferenceCache:
    """Summed reference log-probabilities by row digest."""

    def __init__(self, path: str, table: dict[bytes, float]):
        self.path, self.table = path, table

    def field(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """[rows, seq_len] float32: each row's cached value, repeated along the row."""
        try:
            values = np.asarray([self.table[key] for key in row_digests(batch)], np.float32)
        except KeyError:
            raise UserError(
                f"a batch holds a row that the reference log-probabilities in {self.path} do not cover: the data "
                "changed during the run; restart it (the cache is rebuilt) or set cache_reference=False"
            ) from None
        return np.repeat(values[:, None], batch["inputs"].shape[1], axis=1)


def load_or_build(trainer, sources) -> ReferenceCache:
    """The run's cache for every row of `sources` (its training and eval data), built if missing."""
    if jax.process_count() > 1:
        raise UserError("cache_reference works in single-process runs: set cache_reference=False for this one")
    start = time.perf_counter()
    batches = [batch for source in sources if source is not None for batch in _all_rows(trainer, source)]
    keys = [key for batch in batches for key in row_digests(batch)]
    fingerprint = hashlib.sha256(_reference_digest(trainer) + b"".join(sorted(keys))).hexdigest()[:24]
    directory = epath.Path(trainer.workdir) / "reference_logps"
    path = directory / f"{fingerprint}.npz"
    if path.exists():
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as saved:
            table = dict(zip(map(bytes, saved["keys"]), saved["values"].tolist(), strict=True))
        if set(keys) <= set(table):
            print(f"nnxlm: reference log-probabilities of {len(table)} rows reused from {path}", file=sys.stderr)
            return ReferenceCache(path, table)
    compute = jax.jit(lambda state, batch: trainer._with_reference(nnx.merge(trainer.graphdef, state), batch))
    table = {}
    for batch in batches:
        device_batch = {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, batch[k]) for k in TOKEN_FIELDS
        }
        values = compute(trainer.state, device_batch)["reference_logps"]
        table.update(zip(row_digests(batch), np.asarray(values).tolist(), strict=True))
    if jax.process_index() == 0:
        for stale in directory.iterdir() if directory.is_dir() else []:
            stale.unlink()
        buffer = io.BytesIO()
        np.savez(
            buffer,
            keys=np.frombuffer(b"".join(table), np.uint8).reshape(-1, 16),
            values=np.asarray(list(table.values()), np.float32),
        )
        write_atomically(path, buffer.getvalue())
    print(
        f"nnxlm: reference log-probabilities of {len(table)} rows computed in {time.perf_counter() - start:.1f} s "
        f"-> {path}",
        file=sys.stderr,
    )
    return ReferenceCache(path, table)


def _all_rows(trainer, source):
    """Every batch of `source`'s rows, in order, once: the step's shape, the last one padded."""
    dataset = trainer.objective.dataset(
        source, trainer.tokenizer, seq_len=trainer.seq_len, batch_size=trainer.batch_size, seed=trainer.seed,
        shuffle=False, repeat=False, drop_remainder=False,
    )  # fmt: skip
    for batch in dataset:
        rows = len(batch["inputs"])
        if rows < trainer.batch_size:  # pad with copies of the first row (their values are dropped)
            batch = {
                k: np.concatenate([v, np.repeat(v[:1], trainer.batch_size - rows, axis=0)]) for k, v in batch.items()
            }
        yield batch


def _reference_digest(trainer) -> bytes:
    """A digest of the reference weights: the frozen copy, or the model's parameters but its adapters."""
    if trainer.reference_mode == "copy":
        state = nnx.to_pure_dict(trainer.state["reference"])
    else:
        state = nnx.to_pure_dict(trainer.state["model"])
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(state)[0], key=lambda x: jax.tree_util.keystr(x[0])):
        name = jax.tree_util.keystr(path)
        if trainer.reference_mode == "adapters" and "adapter" in name:
            continue
        digest.update(name.encode())
        digest.update(np.asarray(leaf).tobytes())
    return digest.digest()
