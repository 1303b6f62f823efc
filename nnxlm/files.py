"""Files written whole or not at all: a crash, a full disk or a kill while writing leaves the old
file (or none), never half of a new one. Each write goes to a temporary file beside the target,
is flushed to disk and then renamed over it (a rename is atomic within a file system)."""

import os
import shutil


def _temporary(path: str) -> str:
    return f"{path}.tmp{os.getpid()}"


def write_atomically(path: str, data: str | bytes) -> None:
    """Writes `data` (text as UTF-8) to `path`, replacing any file there only once it is complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def copy_atomically(source: str, destination: str) -> None:
    """Copies the file `source` to `destination` as write_atomically writes."""
    tmp = _temporary(destination)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, destination)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
