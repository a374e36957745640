"""The frame cache of the file-based event data sets: each sample's frames stored once as a compressed ``.npz``.

Frames go under ``<cache_dir>/frames_<split_by>_T<time_steps>/`` (default ``cache_dir``:
``<root>/.spikingformer_cache``; when the root is read-only -- not writable, or with no write permission bit
set, which is honoured even for root -- and no ``cache_dir`` is given,
``~/.cache/spikingformer/<root name>-<hash of the absolute root path>``). Each cache file records the size and
modification time (ns) of its source files and is rebuilt when they change. Writes are atomic (temporary
file + ``os.replace``), so concurrent DataLoader workers are safe.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spikingformer.checkpoints import CheckpointError, write_atomic
from spikingformer.data.events import PathLike

_CACHE_VERSION = 1


def _is_writable_dir(path: Path) -> bool:
    """True when ``path`` is a directory we may write to: os.access says so and some write bit is set."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(stat.S_IMODE(mode) & 0o222)


def default_cache_dir(root: PathLike) -> Path:
    """The cache folder used for ``root`` when no ``cache_dir`` is given.

    ``<root>/.spikingformer_cache`` when ``root`` (or an existing ``<root>/.spikingformer_cache``) is writable,
    else ``~/.cache/spikingformer/<root name>-<first 12 hex digits of sha1(absolute root)>``.
    """
    root = Path(root).resolve()
    local = root / ".spikingformer_cache"
    if (local.is_dir() and _is_writable_dir(local)) or (not local.exists() and _is_writable_dir(root)):
        return local
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return Path(os.path.expanduser("~")) / ".cache" / "spikingformer" / f"{root.name}-{digest}"


def _stamp(sources: Sequence[Path]) -> np.ndarray:
    """int64 array [size0, mtime_ns0, size1, mtime_ns1, ...] of the source files."""
    out = []
    for s in sources:
        st = os.stat(s)
        out += [st.st_size, st.st_mtime_ns]
    return np.asarray(out, dtype=np.int64)


def compact_counts(frames: np.ndarray) -> np.ndarray:
    """Store integer counts in the smallest exact dtype (uint8 / uint16), else float32."""
    mx = float(frames.max()) if frames.size else 0.0
    if mx <= np.iinfo(np.uint8).max:
        return frames.astype(np.uint8)
    if mx <= np.iinfo(np.uint16).max:
        return frames.astype(np.uint16)
    return frames.astype(np.float32)


class FrameCache:
    """Per-sample ``.npz`` frame cache keyed by integration method and time steps, validated by source size + mtime.

    Args:
        directory: the folder holding this cache (``.../frames_<split_by>_T<time_steps>``); created on first write.
        split_by: 'number' or 'time'.
        time_steps: number of frames.
    """

    def __init__(self, directory: Path, split_by: str, time_steps: int) -> None:
        self.directory = Path(directory)
        self.split_by = split_by
        self.time_steps = time_steps
        self.unwritable: str | None = None  # why a write failed; then this process writes no more

    def path(self, key: str) -> Path:
        """Cache file of sample ``key`` (a relative, '/'-separated name)."""
        return self.directory / f"{key}.npz"

    def load(self, key: str, sources: Sequence[Path]) -> np.ndarray | None:
        """The cached frames (T, 2, H, W) of ``key`` if present and built from the current ``sources``."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if (int(z["version"]) != _CACHE_VERSION or str(z["split_by"]) != self.split_by
                        or int(z["T"]) != self.time_steps or not np.array_equal(z["stamp"], _stamp(sources))):
                    return None
                return z["frames"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
            return None  # unreadable or partial file: rebuild it

    def save(self, key: str, sources: Sequence[Path], frames: np.ndarray) -> None:
        """Atomically write the frames (T, 2, H, W) of ``key`` with the stamp of ``sources``.

        The cache only saves time: where it cannot be written (a full disk, a folder without write
        permission) one warning says so and this process goes on without writing it (the frames are
        integrated from the recordings each time they are read)."""
        if self.unwritable is not None:
            return
        path = self.path(key)
        # the archive is made in memory first, so a write that fails (a full disk) fails in our write,
        # not inside NumPy's zip file (NumPy 1.x leaves that open, to be closed at garbage collection)
        archive = io.BytesIO()
        np.savez_compressed(archive, frames=compact_counts(frames), stamp=_stamp(sources),
                            split_by=np.array(self.split_by), T=np.array(self.time_steps),
                            version=np.array(_CACHE_VERSION))
        try:
            write_atomic(path, lambda fh: fh.write(archive.getbuffer()), durable=False)
        except CheckpointError as err:
            cause = err.__cause__
            self.unwritable = getattr(cause, "strerror", None) or str(cause or err)
            warnings.warn(f"spikingformer: cannot write the frame cache {path}: {self.unwritable}; going on without it "
                          "(each epoch integrates the frames from the recordings again, which is slower): free space "
                          "there or give another folder (--cache-dir, or cache_dir= of the data set)", UserWarning,
                          stacklevel=2)


__all__ = ["FrameCache", "compact_counts", "default_cache_dir"]
