"""Paths and whole-file writes.

Every path a user gives nnxlm (run directories, checkpoints, tokenizers, Hugging Face model
directories, chat templates, metrics) may be anything `etils.epath` opens: a local path, or
gs://, s3://, az://, hf:// with that file system's fsspec package installed (gcsfs, s3fs, ...).
nnxlm reads and writes them through epath only, never through os.path or the builtin open, which
know local files alone (tests/test_paths.py checks this).

Files are written whole or not at all: a crash, a full disk or a kill while writing leaves the old
file (or none), never half of a new one. Each write goes to a temporary file beside the target,
is flushed (to disk, for a local file) and then renamed over it: a rename is atomic within a local
file system; an object store (gs://, s3://) makes an object visible only once it is complete,
so there too a reader sees the old file or the new one.
"""

import contextlib
import fcntl
import os
import shutil
import sys

from etils import epath

from nnxlm.errors import UserError

PathLike = str | os.PathLike


def is_local(p: PathLike) -> bool:
    """Whether `p` names a local file: epath treats every `scheme://...` as a remote one."""
    return "://" not in os.fspath(p)


def absolute(p: PathLike) -> epath.Path:
    """`p` made absolute where it is local (orbax needs absolute checkpoint paths, and a path kept
    for later stays right if the working directory changes); a URI is absolute already (epath's
    resolve() would prepend the working directory to it)."""
    p = epath.Path(p)
    return p.resolve() if is_local(p) else p


def _temporary(p: epath.Path) -> epath.Path:
    return p.with_name(f"{p.name}.tmp{os.getpid()}")


def _remove_quietly(p: epath.Path) -> None:
    try:
        if p.exists():
            p.unlink()
    except OSError:  # the original error matters more than a leftover we could not remove
        pass


def write_atomically(target: PathLike, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `target`, replacing any file there only once it is complete."""
    target = absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(target)
    try:
        with tmp.open("wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if is_local(tmp):
                os.fsync(f.fileno())
        tmp.replace(target)
    except BaseException:
        _remove_quietly(tmp)
        raise


def copy_atomically(source: PathLike, destination: PathLike) -> None:
    """Copies the file `source` to `destination` as write_atomically writes; the two may be on
    different file systems (a local tokenizer into a gs:// run directory)."""
    source, destination = absolute(source), absolute(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)  # e.g. additional_chat_templates/
    tmp = _temporary(destination)
    try:
        with source.open("rb") as src, tmp.open("wb") as out:
            shutil.copyfileobj(src, out, 16 * 2**20)
        tmp.replace(destination)
    except BaseException:
        _remove_quietly(tmp)
        raise


def require_empty_directory(p: PathLike, option: str) -> epath.Path:
    """`p`, absolute, where a command may write a new directory: absent or an empty directory.
    UserError naming `option` otherwise: writing among other files would mix them with what is
    written (a stale safetensors index beside new weights) or overwrite them (a run's own files,
    when `p` is the run being read or one of its checkpoints)."""
    out = absolute(p)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a directory that is not empty"
        raise UserError(f"{option} {p} is {what}: give a new or empty directory")
    return out


@contextlib.contextmanager
def run_lock(directory: PathLike):
    """Holds a lock on the run directory while a run trains there: a second run started in the
    same directory is refused in one line (the two would interleave their checkpoints and metrics).
    The lock is the operating system's (flock on the directory itself: no file is written), so it
    is released when its process dies, however it dies. A directory made only to be locked is
    removed again when nothing was written into it (a run refused for bad input leaves nothing).
    Remote run directories (gs://, s3://) have no such lock and are not locked."""
    if not is_local(directory):
        yield
        return
    path = absolute(directory)
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDONLY)  # a local directory: flock needs a descriptor
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another nnxlm run is training in {directory}: wait for it to end, or give this run another --workdir"
            ) from None
        except OSError as e:  # a file system without locks (some network mounts): the run is not locked
            print(f"nnxlm: {directory} cannot be locked ({e.strerror}): start one run at a time there", file=sys.stderr)
        yield
    finally:
        os.close(descriptor)  # releases the lock
        if made and not any(path.iterdir()):
            path.rmdir()
