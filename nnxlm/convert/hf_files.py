"""Reading and writing Hugging Face model directories: config.json plus safetensors files,
sharded (model.safetensors.index.json) or not, one tensor at a time.

Both sides use plain file reads and writes rather than memory maps: a memory-mapped file keeps
every page it touched resident until it is closed, so reading a checkpoint through one costs its
whole size in memory. Files are read and written through etils.epath: a directory may be local or
gs://, s3://, ... (nnxlm.files). The safetensors format is small enough to handle here: an 8-byte
little-endian header length, a JSON header ({name: {"dtype", "shape", "data_offsets": [begin,
end]}, "__metadata__": {...}}, which may end in spaces), then the tensors' bytes, offsets counted
from the end of the header.

Only safetensors are read: PyTorch's own formats (pytorch_model.bin, *.pt, *.pth, *.ckpt) are
pickles, and unpickling a file runs whatever code it names, so a directory from someone else that
has only those is refused with the file's name and the conversion that makes it safe.
"""

import io
import json
import math
import shutil
import tempfile

import ml_dtypes
import numpy as np
from etils import epath

from nnxlm.errors import UserError
from nnxlm.files import is_local

SHARD_BYTES = 4 * 2**30  # transformers' default shard size for save_pretrained is about this
# Space kept for a shard's header before its data, so the data streams straight to its place; a
# header that outgrows it (thousands of tensors in one shard) costs one copy of that shard.
HEADER_RESERVE = 2**20
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
DTYPE_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


def read_config(directory) -> dict:
    path = epath.Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json: give a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): re-download the model") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object of fields: re-download the model")
    return config


def _damaged(path: str, why: str) -> UserError:
    return UserError(f"{path} is not a readable safetensors file ({why}): re-download the model")


def missing_safetensors(directory, wanted: str) -> UserError:
    """The error for a directory without the safetensors file(s) `wanted`, naming the pickle file
    it has instead, if any (never opened: see the module docstring)."""
    try:
        pickles = sorted(f.name for f in epath.Path(directory).iterdir() if f.name.endswith(PICKLE_SUFFIXES))
    except OSError:
        pickles = []
    if pickles:
        more = f" (and {len(pickles) - 1} more)" if len(pickles) > 1 else ""
        return UserError(
            f"{epath.Path(directory) / pickles[0]}{more} is a pickle, which nnxlm never loads (loading it "
            f"could run any code); {directory} has no {wanted}: convert it to safetensors where you trust "
            "it (transformers: save_pretrained(..., safe_serialization=True))"
        )
    return UserError(
        f"{directory} has no {wanted}: only safetensors checkpoints convert (save the model with safe_serialization)"
    )


def read_header(path) -> tuple[dict, int]:
    """({tensor name: (dtype, shape, begin, end)}, offset of the data) of a safetensors file, with
    begin and end in bytes from that offset."""
    try:
        with epath.Path(path).open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _damaged(path, "shorter than its header")
            length = int.from_bytes(prefix, "little")
            if length > MAX_HEADER_BYTES:
                raise _damaged(path, f"header length {length} is not plausible")
            raw = f.read(length)
            size = f.seek(0, io.SEEK_END)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    if len(raw) < length:
        raise _damaged(path, "truncated inside its header")
    try:
        header = json.loads(raw.decode("utf-8"))
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] not in DTYPES:
                raise UserError(f"tensor {name!r} of {path} has dtype {entry['dtype']}, which nnxlm cannot convert")
            dtype, shape, (begin, end) = np.dtype(DTYPES[entry["dtype"]]), tuple(entry["shape"]), entry["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise _damaged(path, f"tensor {name!r} has data_offsets that disagree with its shape")
            entries[name] = (dtype, shape, begin, end)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, unknown dtype, malformed entries
        raise _damaged(path, f"bad header: {type(e).__name__} {e}") from None
    data_start = 8 + length
    data_end = max((end for *_, end in entries.values()), default=0)
    if data_start + data_end > size:
        raise _damaged(path, f"truncated: {size} bytes where the header needs {data_start + data_end}")
    return entries, data_start


class TensorReader:
    """Tensors of an HF checkpoint by name, each read from its safetensors file when asked for
    (plain reads: memory holds only the tensors the caller keeps)."""

    def __init__(self, directory, file: str | None = None):
        """file: read this one safetensors file of the directory (e.g. adapter_model.safetensors)."""
        self.directory = directory
        self._headers = {}  # file -> (entries, data offset)
        index_path = epath.Path(directory) / "model.safetensors.index.json"
        if file is not None:
            if not (epath.Path(directory) / file).exists():
                raise missing_safetensors(directory, file)
            weight_map = dict.fromkeys(self._header(file)[0], file)
        elif index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
        else:
            if not (epath.Path(directory) / "model.safetensors").exists():
                raise missing_safetensors(directory, "model.safetensors or model.safetensors.index.json")
            weight_map = dict.fromkeys(self._header("model.safetensors")[0], "model.safetensors")
        self.weight_map = weight_map

    def _header(self, file: str) -> tuple[dict, int]:
        if file not in self._headers:
            self._headers[file] = read_header(epath.Path(self.directory) / file)
        return self._headers[file]

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> np.ndarray:
        if name not in self.weight_map:
            raise UserError(
                f"the checkpoint in {self.directory} lacks tensor {name!r}: its config.json and weights disagree"
            )
        file = self.weight_map[name]
        path = epath.Path(self.directory) / file
        entries, data_start = self._header(file)
        if name not in entries:
            raise _damaged(path, f"the index puts tensor {name!r} in it but its header lacks it")
        dtype, shape, begin, end = entries[name]
        array = np.empty(shape, dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        with path.open("rb") as f:
            f.seek(data_start + begin)
            done = 0
            while done < end - begin:  # one read returns at most about 2 GiB
                count = f.readinto(buffer[done:])
                if not count:
                    raise _damaged(path, f"truncated inside tensor {name!r}")
                done += count
        return array


class _ShardWriter:
    """One safetensors file written tensor by tensor: the data goes to its place after a reserved
    header space as it comes, the header is written last. An object store (gs://, s3://) cannot
    seek back to write the header: there the data is gathered in a local temporary file, and the
    header and data are uploaded in one go at the end."""

    def __init__(self, path: epath.Path, header_reserve: int):
        self.path, self.reserve = path, -(-header_reserve // 8) * 8  # the data stays 8-byte aligned
        self.staged = None if is_local(path) else tempfile.TemporaryFile()  # noqa: SIM115 (closed in finish)
        self.file = path.open("wb") if self.staged is None else self.staged
        if self.staged is None:
            self.file.seek(8 + self.reserve)
        self.entries, self.size = {}, 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array, order="C")  # (ascontiguousarray would make a scalar 1-d)
        if array.dtype not in DTYPE_NAMES:
            raise UserError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        entry = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape)}
        entry["data_offsets"] = [self.size, self.size + array.nbytes]
        self.entries[name] = entry
        self.file.write(array.reshape(-1).view(np.uint8))
        self.size += array.nbytes

    def finish(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        if self.staged is not None:
            with self.path.open("wb") as out:
                out.write(_header_bytes(header, -(-len(header) // 8) * 8))
                self.staged.seek(0)
                shutil.copyfileobj(self.staged, out, 16 * 2**20)
            self.staged.close()
            return
        if len(header) <= self.reserve:
            self.file.seek(0)
            self.file.write(_header_bytes(header, self.reserve))
            self.file.close()
            return
        self.file.close()  # the header outgrew its space: copy the data behind a larger one
        length = -(-len(header) // 8) * 8
        moved = self.path.with_name(self.path.name + ".data")
        self.path.replace(moved)
        with moved.open("rb") as source, self.path.open("wb") as out:
            out.write(_header_bytes(header, length))
            source.seek(8 + self.reserve)
            shutil.copyfileobj(source, out, 16 * 2**20)
        moved.unlink()


def _header_bytes(header: bytes, length: int) -> bytes:
    """The 8-byte length and the header, padded with spaces (which the format allows) to length."""
    return length.to_bytes(8, "little") + header + b" " * (length - len(header))


def write_tensors(
    directory,
    tensors,
    shard_bytes: int = SHARD_BYTES,
    header_reserve: int = HEADER_RESERVE,
    prefix: str = "model",
) -> None:
    """Writes (name, array) pairs as safetensors shards of at most shard_bytes (with an index when
    there is more than one), each array to disk as it comes: memory holds one array at a time.
    Files are named <prefix>.safetensors, or <prefix>-00001-of-0000N.safetensors with an index."""
    directory = epath.Path(directory)
    parts = []  # (temporary path, tensor names)
    writer, total = None, 0

    def start():
        return _ShardWriter(directory / f"part-{len(parts):05d}.safetensors.tmp", header_reserve)

    try:
        for name, array in tensors:
            if writer is not None and writer.entries and writer.size + array.nbytes > shard_bytes:
                writer.finish()
                parts.append((writer.path, list(writer.entries)))
                writer = None
            writer = writer or start()
            writer.add(name, array)
            total += array.nbytes
        writer = writer or start()
        writer.finish()
        parts.append((writer.path, list(writer.entries)))
    except BaseException:  # no half-written parts left behind
        if writer is not None:
            writer.file.close()
            parts.append((writer.path, []))
        for path, _ in parts:
            for leftover in (path, path.with_name(path.name + ".data")):
                if leftover.exists():
                    leftover.unlink()
        raise
    if len(parts) == 1:
        parts[0][0].replace(directory / f"{prefix}.safetensors")
        return
    weight_map = {}
    for number, (path, names) in enumerate(parts, start=1):
        final = f"{prefix}-{number:05d}-of-{len(parts):05d}.safetensors"
        path.replace(directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=1))
