"""Where a run's files live: local paths and gs:// URLs, through etils epath (gcsfs for buckets),
and the one-line errors of buckets.

Data is read through the same layer: documents with gcsfs (one ranged read per document), and
prepared ArrayRecord shards by ArrayRecord's own reader, which reaches gs:// with the Google
Cloud C++ client (`CLOUD_STORAGE_EMULATOR_ENDPOINT` points it at an emulator). That writer cannot
write to a bucket, so `jaxlm prepare` writes each shard locally and uploads it with gcsfs.

Checkpoints go to buckets through Orbax and TensorStore's own GCS support. The files a run
appends to (metrics.jsonl, TensorBoard events) cannot be written to a bucket as they are on a
disk, since an object cannot be appended to; and jax.profiler's own GCS client (TSL's, inside
jaxlib) has its endpoint fixed and its own credentials. So those files are written into a local
directory that a `BucketMirror` copies to the bucket with gcsfs, like everything else.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from etils import epath

from jaxlm.errors import UserError, cause

log = logging.getLogger("jaxlm")

BUCKET_SCHEME = "gs://"


def is_bucket(location: str | epath.Path) -> bool:
    return str(location).startswith(BUCKET_SCHEME)


def check_bucket(url: str, key: str) -> None:
    """Refuse, in one line, the gs:// URL of config key `key` if gcsfs is missing or its bucket
    is not there or cannot be read."""
    if importlib.util.find_spec("gcsfs") is None:  # what epath reaches buckets with
        raise UserError(
            f'{key}={url} needs gcsfs, which is not installed; pip install -e ".[gcs]" (or pip install "jaxlm[gcs]")'
        )
    import fsspec

    bucket = url.removeprefix(BUCKET_SCHEME).partition("/")[0]
    try:
        # Listing one object needs only storage.objects.list, which any role that can write
        # checkpoints has; reading the bucket's own metadata would need more.
        fsspec.filesystem("gs").ls(bucket, max_results=1, refresh=True)
    except FileNotFoundError:
        raise UserError(
            f"{key}={url}: bucket {BUCKET_SCHEME}{bucket} does not exist; create it or choose another {key}"
        ) from None
    except Exception as error:
        raise UserError(
            f"{key}={url}: cannot list {BUCKET_SCHEME}{bucket} ({cause(error)}); check the network, this "
            f"machine's credentials and their access to the bucket, or choose another {key}"
        ) from None


def path(location: str) -> epath.Path:
    """A local path (~ expanded) or a gs:// URL."""
    return epath.Path(location if is_bucket(location) else os.path.expanduser(location))


def _gcs():
    import fsspec

    return fsspec.filesystem("gs")


def files_under(directory: epath.Path) -> dict[str, int]:
    """Every file under `directory`, at any depth, with its size: one listing in a bucket."""
    if is_bucket(directory):
        found = _gcs().find(str(directory), detail=True)
        return {BUCKET_SCHEME + name: info["size"] for name, info in found.items() if info["type"] == "file"}
    return {str(p): p.stat().st_size for p in Path(directory).rglob("*") if p.is_file()}


def glob_files(pattern: str) -> dict[str, int]:
    """The files a glob (`**` for any depth) matches, with their sizes."""
    if is_bucket(pattern):
        found = _gcs().glob(pattern, detail=True)
        return {BUCKET_SCHEME + name: info["size"] for name, info in found.items() if info["type"] == "file"}
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    return {p: os.path.getsize(p) for p in matches if os.path.isfile(p)}


def read_bytes(location: str, start: int = 0, stop: int | None = None) -> bytes:
    """Bytes [start, stop) of a file (to its end when stop is None): one request in a bucket."""
    if is_bucket(location):
        return _gcs().cat_file(location, start, stop)
    with open(location, "rb") as file:
        file.seek(start)
        return file.read() if stop is None else file.read(stop - start)


def upload(local: Path, url: str, then: str) -> None:
    """Copy a local file to a gs:// URL, streamed; a failure is one line ending in `then`, what
    the user does once the bucket is reachable again."""
    try:
        _gcs().put_file(str(local), url)
    except Exception as error:
        raise UserError(
            f"cannot upload {local.name} to {url} ({cause(error)}); check this machine's access to the "
            f"bucket, then {then}"
        ) from None


class BucketMirror:
    """A local directory whose files are copied to a gs:// directory, each file whole whenever
    it changed: in the background after `changed()`, and a last time in `close()`."""

    def __init__(self, url: epath.Path):
        self.url = url
        self.local = Path(tempfile.mkdtemp(prefix="jaxlm-mirror-"))
        self._copied: dict[Path, tuple[int, int]] = {}  # (size, mtime) of each file when copied
        self._wake = threading.Event()
        self._closing = False
        self._failed = False  # warned about a failed copy; the next one is tried anyway
        self._thread = threading.Thread(target=self._copy_in_background, name="jaxlm-mirror", daemon=True)
        self._thread.start()

    def fetch(self, name: str) -> Path:
        """The local path of `name`, holding the bucket's copy of it if there is one."""
        local = self.local / name
        remote = self.url / name
        try:
            if remote.exists():
                local.write_bytes(remote.read_bytes())
                self._copied[local] = _version(local)
        except Exception as error:
            raise UserError(
                f"cannot read {remote} ({cause(error)}); check the network and this machine's access to the bucket"
            ) from None
        return local

    def changed(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Copy what changed since the last copy, and remove the local directory."""
        self._closing = True
        self._wake.set()
        self._thread.join()
        try:
            self._copy_changed()
        except Exception as error:
            raise UserError(
                f"cannot write to {self.url} ({cause(error)}); the run's metrics, TensorBoard events "
                f"and traces are left in {self.local}"
            ) from None
        shutil.rmtree(self.local, ignore_errors=True)

    def _copy_in_background(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            try:
                self._copy_changed()
                self._failed = False
            except Exception as error:
                if not self._failed:
                    log.warning(
                        "cannot write to %s (%s); trying again at the next change", self.url, cause(error)
                    )
                self._failed = True

    def _copy_changed(self) -> None:
        for local in sorted(self.local.rglob("*")):
            if not local.is_file():
                continue
            version = _version(local)  # before reading: a write during the copy is copied next time
            if self._copied.get(local) == version:
                continue
            (self.url / str(local.relative_to(self.local))).write_bytes(local.read_bytes())
            self._copied[local] = version


def _version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
