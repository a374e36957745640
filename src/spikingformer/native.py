"""Small C++ libraries compiled on first use, cached on disk and loaded with :mod:`ctypes`.

Two parts of the package are native code: the fused CPU LIF kernel
(:mod:`spikingformer.kernels.cpu`) and the caching CPU allocator (:mod:`spikingformer.runtime`).
Both are one C++ file each, built with one ``g++`` call (about a second) instead of going through
``torch.utils.cpp_extension`` (tens of seconds), because neither needs pybind11.

:class:`NativeLibrary` builds its library once per process, under a lock, never at import. The
shared object is cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under
a name hashed from the source, the compiler flags and a caller-given key (the CPU for
``-march=native`` code, the PyTorch build for code compiled against its headers), and written
atomically, so concurrent processes never load a half-written file. A failed build is remembered
(:attr:`NativeLibrary.error`) and the caller falls back to pure PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable


class NativeBuildError(RuntimeError):
    """A native library could not be compiled or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root)


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise NativeBuildError("no C++ compiler found (set CXX or install g++)")
    return cxx


class NativeLibrary:
    """One C++ source file -> one cached shared object, loaded on the first :meth:`get`.

    Args:
        name: the library's file stem and cache-folder prefix.
        source: a callable returning the C++ source (read lazily).
        flags: compiler flags placed before the source file.
        link_flags: flags placed after it (libraries to link).
        key: extra text hashed into the cache name (what else the binary depends on).
        declare: sets ``argtypes``/``restype`` on the loaded :class:`ctypes.CDLL`.
    """

    def __init__(self, name: str, source: Callable[[], str], flags: list[str], link_flags: list[str] | None = None,
                 key: Callable[[], str] = lambda: "", declare: Callable[[ctypes.CDLL], None] = lambda lib: None) -> None:
        self.name = name
        self._source = source
        self.flags = flags
        self.link_flags = link_flags or []
        self._key = key
        self._declare = declare
        self._lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self.build_seconds: float | None = None  # wall time of a compile in this process (None: cached / not built)

    def path(self) -> Path:
        """Where the compiled library for this source, these flags and this key lives (or will)."""
        text = "\0".join([self._source(), *self.flags, *self.link_flags, self._key()])
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return cache_dir() / f"{self.name}_{digest}" / f"{self.name}.so"

    def _compile(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        cxx = compiler()
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / f"{self.name}.cpp"
            src.write_text(self._source())
            obj = Path(tmp) / f"{self.name}.so"
            cmd = [cxx, *self.flags, str(src), "-o", str(obj), *self.link_flags]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NativeBuildError(f"running {cxx} failed: {exc}") from exc
            if proc.returncode != 0:
                raise NativeBuildError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()[-2000:]}")
            os.replace(obj, target)  # atomic: concurrent processes see either nothing or the whole file
        self.build_seconds = time.perf_counter() - start

    def _load(self) -> ctypes.CDLL:
        target = self.path()
        if not target.exists():
            self._compile(target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as exc:
            raise NativeBuildError(f"loading {target} failed: {exc}") from exc
        self._declare(lib)
        return lib

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, building it on first use; ``None`` (see :attr:`error`) if it cannot be built.

        Thread-safe and once per process: a forked child (DataLoader worker) reuses the parent's
        loaded library, and a fresh process finds the cached shared object on disk.
        """
        if self.lib is not None:
            return self.lib
        if self.error is not None:
            return None
        with self._lock:
            if self.lib is None and self.error is None:
                try:
                    self.lib = self._load()
                except NativeBuildError as exc:
                    self.error = str(exc)
        return self.lib

    def reset(self) -> None:
        """Forget the loaded library and any build failure (tests force rebuild/failure paths)."""
        with self._lock:
            self.lib, self.error, self.build_seconds = None, None, None
