"""gs:// paths for tests, with no network: a bucket kept in a local directory.

etils.epath sends gs:// paths to fsspec's "gcs" file system; here that is an fsspec DirFileSystem
over a local directory (the store), so epath calls on gs://bucket/... read and write
<store>/bucket/.... nnxlm and orbax see real gs:// paths and take their gs:// code paths (orbax:
no atomic rename, commit_success.txt marks a finished step). Two services that orbax calls directly
rather than through epath are replaced too: tensorstore's GCS driver (the arrays go to the same
store through tensorstore's file driver) and the bucket query for hierarchical namespaces (a plain
bucket).

Why not the alternatives: epath refuses memory:// (it knows gs://, s3://, az://, hf:// and local
paths), and tensorstore could not reach fsspec's memory anyway. epath.testing.mock_epath hooks
epath's calls on ordinary local paths: code that bypassed epath (os.path, open) would pass.

What this does not show: the GCS service's own behaviour (no directories, eventual listing,
request errors and retries), which gcsfs and tensorstore handle.
"""

import importlib
import os

import pytest
from etils.epath import backend, gpath
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils


class _LocalBucket(DirFileSystem):
    protocol = ("gs", "gcs")  # stripped from paths before they are joined to the store
    cachable = False
    store = None  # set by the fixture

    def __init__(self, *args, **kwargs):  # epath passes gcsfs options (finalize_on_close)
        # a file's directory is made as it is written: a bucket has no directories to make first
        super().__init__(path=self.store, fs=LocalFileSystem(auto_mkdir=True))


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """The store directory; gs://bucket/x is <store>/bucket/x. The test runs from an empty working
    directory of its own, which test_paths checks stays empty (a path that missed epath, e.g.
    os.makedirs("gs://bucket/run"), would land there as ./gs:/bucket/run)."""
    store = tmp_path / "store"
    (store / "bucket").mkdir(parents=True)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(_LocalBucket, "store", str(store))
    registry = importlib.import_module("fsspec.registry")._registry  # (`fsspec.registry` is its read-only view)
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry, protocol, _LocalBucket)
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath would use tf.io.gfile

    def kvstore(path: str) -> dict:
        bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(store, bucket, key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps one file system per scheme
    yield store
    backend.fsspec_backend._get_filesystem.cache_clear()
