"""Small C++ libraries compiled on first use, cached on disk and loaded with :mod:`ctypes`.

Two parts of the package are native code: the fused CPU LIF kernel
(:mod:`spikingformer.kernels.cpu_backend`) and the caching CPU allocator (:mod:`spikingformer.allocator`).
Each is built by calling ``g++`` directly instead of going through ``torch.utils.cpp_extension``,
because neither needs pybind11: the allocator with one call (about a second); the kernel library,
one source of many template instantiations, as :attr:`NativeLibrary.parts` translation units of
that source compiled at once (``-DSF_PART=k``) and then linked, so that its build (about 30 s of
compiler time) takes a fraction of that on a machine with several cores.

:class:`NativeLibrary` builds its library once per process, under a lock, never at import. The
shared object is cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under
a name hashed from the source, the compiler flags and a caller-given key (the CPU for
``-march=native`` code, the PyTorch build for code compiled against its headers).

Target ISA: ``-march=native`` in a library's flags is replaced by ``-march=$SPIKINGFORMER_NATIVE_ARCH``
when that variable is set (``x86-64-v3`` for AVX2 machines, ``x86-64`` for any x86-64 CPU); the
flags are part of the cache name, so each target has its own cached library.

Cache policy (nothing here can take the library down):

* Each library lives in its own directory, created with mode 0700, with a lock file (``.lock``):
  processes that start together build the library once while the others wait. Before a cached library is
  loaded, its directory and file must be owned by the current user and not writable by group or
  others (and not be symbolic links); a library is compiled in a private temporary directory,
  loaded from there and only then moved atomically to its cache name, so no process ever loads
  a half-written or foreign file.
* A cached file that does not load, or lacks the expected symbols, is rebuilt.
* When the cache cannot be used (unwritable, a file in the way, not private, a file system that
  does not allow loading), the library is built in a fresh private temporary directory for this
  process instead, with one warning per cache directory.
* A library whose loops are OpenMP's (``openmp=True``) is built with ``-fopenmp`` only where the
  compiler's OpenMP code loads and runs here (:func:`openmp_flags`), else to run on one thread.
  Where that code will run on a second OpenMP runtime beside PyTorch's (clang's libomp),
  :func:`calm_gnu_openmp` makes PyTorch's threads spin less, when called before PyTorch loads.
* When it cannot be built or loaded at all (no compiler, a bad target), :meth:`NativeLibrary.get`
  returns ``None`` with one warning and the reason in :attr:`NativeLibrary.error`, and the caller
  uses plain PyTorch. Nothing of this is remembered across processes.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

ARCH_ENV = "SPIKINGFORMER_NATIVE_ARCH"
_CACHE_LAYOUT = "private-dirs-v2"  # hashed into every cache name: entries from before the checks are not reused
_warned_caches: set[str] = set()


class NativeBuildError(RuntimeError):
    """A native library could not be compiled or loaded."""


class _CompileError(NativeBuildError):
    """The compiler is missing or rejected the source or flags: building elsewhere would not help."""


class UnsafeCacheError(NativeBuildError):
    """A cache entry is not private to the current user, so it must not be loaded."""


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root)


def target_arch() -> str:
    """The ``-march`` value that replaces ``native`` (``$SPIKINGFORMER_NATIVE_ARCH``, default ``native``)."""
    return os.environ.get(ARCH_ENV, "").strip() or "native"


def compiler_name() -> str:
    """The compiler :func:`compiler` would run ("" where there is none)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or ""


def compiler() -> str:
    cxx = compiler_name()
    if not cxx:
        raise _CompileError("no C++ compiler found (set CXX or install g++)")
    return cxx


_OPENMP_PROBE = r"""
extern "C" int sf_openmp_probe(int n) {
  int s = 0;
#pragma omp parallel for reduction(+ : s) num_threads(2)
  for (int i = 0; i < n; ++i) s += i;
  return s;
}
"""
_openmp_flags: dict[str, list[str]] = {}  # compiler -> the flags that give working OpenMP code ([]: none do)


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtimes mapped into this process (GNU libgomp, LLVM's libomp, Intel's libiomp5;
    empty where ``/proc/self/maps`` cannot tell)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if re.search(r"/lib[gi]?omp[^/]*\.so", line)}


def second_openmp_runtime_expected() -> bool:
    """Whether the kernels' compiler links LLVM's (or Intel's) OpenMP runtime for ``-fopenmp``
    (clang, Intel's icpx), found in its library folders, so that their OpenMP code will run beside
    the GNU libgomp of PyTorch's Linux wheels. Asked of the compiler driver (``-fopenmp -###``:
    3-30 ms, nothing built, once per process and compiler), without importing PyTorch."""
    cxx = shutil.which(compiler_name()) if compiler_name() else None
    return cxx is not None and _links_a_second_runtime(cxx)


@functools.lru_cache(maxsize=None)
def _links_a_second_runtime(cxx: str) -> bool:
    try:
        driver = subprocess.run([cxx, "-fopenmp", "-shared", "-###", "-x", "c++", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError):
        return False
    words = [w.strip('"') for w in driver.split()]
    folders = [w[2:] for w in words if w.startswith("-L")]
    return any(os.path.exists(os.path.join(folder, f"lib{w[2:]}.so"))
               for w in words if w in ("-lomp", "-liomp5") for folder in folders)


GOMP_SPINCOUNT = "1000"  # what libgomp itself spins where it has more threads than cores


def calm_gnu_openmp() -> None:
    """Before PyTorch loads (the ``spikingformer`` command calls it first): where the kernels'
    OpenMP code will run on a second runtime (:func:`second_openmp_runtime_expected`), set
    ``GOMP_SPINCOUNT`` so that PyTorch's idle GNU threads stop spinning after 1000 turns instead of
    300,000, as libgomp does of itself when it has more threads than cores, which two runtimes'
    thread pools together are. Measured on 2 cores: clang's build 1.27-1.43x g++'s step time as is, 1.05-1.09x
    with it (docs/reliability.md, "Compilers"). Left alone where ``GOMP_SPINCOUNT`` or
    ``OMP_WAIT_POLICY`` is set, or PyTorch is already loaded (libgomp reads them when it loads)."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    if second_openmp_runtime_expected():
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT


def openmp_flags() -> list[str]:
    """``["-fopenmp"]`` where the compiler builds OpenMP code that loads and runs here, else ``[]``
    with one warning per compiler and process: Apple's clang refuses ``-fopenmp``, and a clang
    without its OpenMP runtime (libomp) builds libraries that do not load. Found once per process
    and compiler by a probe library, cached on disk like the others. Without a compiler that runs:
    ``[]``, silently (the library's own build says so). Where the probe brings an OpenMP runtime
    besides the one already loaded (PyTorch's), one warning too: the two runtimes' threads compete
    for the cores (clang's libomp beside the GNU libgomp of PyTorch's Linux wheels). Unless the
    environment says otherwise, ``KMP_BLOCKTIME=0`` is set for it before it starts, so that its idle
    threads sleep at once instead of spinning for 200 ms (LLVM's and Intel's runtimes read it)."""
    cxx = compiler_name()
    if cxx in _openmp_flags:
        return _openmp_flags[cxx]
    if not shutil.which(cxx):
        return []
    probe = NativeLibrary("spikingformer_openmp_probe", lambda: _OPENMP_PROBE, ["-O1", "-fopenmp", "-fPIC", "-shared"],
                          declare=lambda lib: setattr(lib.sf_openmp_probe, "restype", ctypes.c_int))
    loaded, added = _openmp_runtimes(), set()
    try:
        lib = probe._load()
        added = _openmp_runtimes() - loaded if loaded else set()
        if added:  # before that runtime starts (its first parallel region): its idle threads sleep at once
            os.environ.setdefault("KMP_BLOCKTIME", "0")
        works = lib.sf_openmp_probe(100) == 4950
        reason = "its probe summed wrongly"
    except Exception as exc:  # the probe must never take the library down
        works, reason = False, _first_line(str(exc) or type(exc).__name__)
    _openmp_flags[cxx] = ["-fopenmp"] if works else []
    if not works:
        warnings.warn(f"spikingformer: {cxx} builds no working OpenMP code here ({reason}); the native CPU "
                      "kernels are built without it and run on one thread each (install the compiler's OpenMP "
                      "runtime, e.g. libomp for clang, or set CXX=g++)", RuntimeWarning, stacklevel=2)
    elif added:
        gnu = all("libgomp" in os.path.basename(r) for r in added | loaded)
        advice = ("PyTorch's copy of GNU libgomp is a renamed file, which a build cannot share: a PyTorch "
                  "release that ships libgomp.so.1 shares it" if gnu else
                  "build with the compiler whose runtime PyTorch uses, g++ for the GNU libgomp of its Linux wheels")
        spin = (f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}" if "GOMP_SPINCOUNT" in os.environ else
                "GOMP_SPINCOUNT unset: start Python with GOMP_SPINCOUNT=1000, as the spikingformer command does")
        warnings.warn(f"spikingformer: {cxx}'s OpenMP code runs on {', '.join(sorted(added))}, beside the OpenMP "
                      f"runtime already loaded ({', '.join(sorted(loaded))}); their threads compete for the "
                      f"cores (KMP_BLOCKTIME={os.environ['KMP_BLOCKTIME']}; {spin}), so the native CPU kernels "
                      f"and PyTorch's run slower than with one runtime: {advice} (docs/reliability.md, \"Compilers\")",
                      RuntimeWarning, stacklevel=2)
    return _openmp_flags[cxx]


def check_private(path: Path) -> None:
    """Raise :class:`UnsafeCacheError` unless ``path`` is owned by this user and not group/world-writable."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheError(f"{path} is a symbolic link")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafeCacheError(f"{path} is owned by user id {st.st_uid}, not by the current user ({os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeCacheError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or ["unknown error"])[0][:300]


def _cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_side_by_side(cxx: str, commands: list[list[str]]) -> str:
    """Run the compiler commands, as many at a time as this process has CPUs (each holds a few
    hundred MB); their stderr, or :class:`_CompileError` for the first that failed."""

    def run(cmd: list[str]) -> subprocess.CompletedProcess | Exception:
        try:
            return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return exc

    with ThreadPoolExecutor(max(1, min(len(commands), _cpus()))) as pool:
        results = list(pool.map(run, commands))
    for cmd, result in zip(commands, results):
        if isinstance(result, Exception):
            raise _CompileError(f"running {cxx} failed: {result}") from result
        if result.returncode != 0:
            stderr = result.stderr
            errors = [ln for ln in stderr.splitlines() if "error" in ln] or stderr.splitlines() or [""]
            raise _CompileError(f"{cxx} failed: {errors[0].strip()[:300]}\n{' '.join(cmd)}\n{stderr.strip()[-2000:]}")
    return "".join(result.stderr for result in results)


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` while a library is looked up and built there, so that
    processes starting together (``torchrun``'s, spawned workers) build it once: the others wait,
    then load the cached file. Where no lock can be taken (no ``fcntl``, a file system without
    locks) each process goes on alone, as it would without one."""
    try:
        import fcntl

        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


class NativeLibrary:
    """One C++ source file -> one cached shared object, loaded on the first :meth:`get`.

    Args:
        name: the library's file stem and cache-folder prefix.
        source: a callable returning the C++ source (read lazily).
        flags: compiler flags placed before the source file (``-march=native`` is the target
            :func:`target_arch` names).
        link_flags: flags placed after it (libraries to link).
        key: extra text hashed into the cache name (what else the binary depends on).
        parts: how many translation units the source is compiled as, at once: part ``k`` with
            ``-DSF_PART=k`` (the source defines in each part its share of the functions), then
            linked. 1: one compiler call on the source as it is.
        declare: sets ``argtypes``/``restype`` on the loaded :class:`ctypes.CDLL` (a missing symbol
            raises ``AttributeError``: the file is not this library).
        openmp: the source's ``#pragma omp`` loops run on several threads where the compiler
            builds working OpenMP code (:func:`openmp_flags`); elsewhere on one.
    """

    def __init__(self, name: str, source: Callable[[], str], flags: list[str], link_flags: list[str] | None = None,
                 key: Callable[[], str] = lambda: "", declare: Callable[[ctypes.CDLL], None] = lambda lib: None,
                 parts: int = 1, openmp: bool = False) -> None:
        self.name = name
        self._source = source
        self.flags = flags
        self.openmp = openmp
        self.link_flags = link_flags or []
        self._key = key
        self._declare = declare
        self.parts = parts
        self._lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None
        self.build_seconds: float | None = None  # wall time of a compile in this process (None: cached / not built)

    def compile_flags(self) -> list[str]:
        """The flags with ``-march=native`` replaced by the :func:`target_arch`, and OpenMP's where
        the library uses it and the compiler has it."""
        arch = target_arch()
        flags = [f"-march={arch}" if flag == "-march=native" else flag for flag in self.flags]
        return [*flags, *openmp_flags()] if self.openmp else flags

    def path(self) -> Path:
        """Where the compiled library for this source, this compiler and its flags and this key lives (or will)."""
        text = "\0".join([_CACHE_LAYOUT, self._source(), compiler_name(), *self.compile_flags(), *self.link_flags,
                          self._key(), f"parts={self.parts}"])
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return cache_dir() / f"{self.name}_{digest}" / f"{self.name}.so"

    def compile(self, folder: Path, extra_flags: tuple[str, ...] = ()) -> tuple[Path, str]:
        """Compile into ``folder`` (private, fresh): the shared object's path there, and what the
        compiler wrote to stderr (its diagnostics, e.g. of ``extra_flags`` such as ``-fopt-info``)."""
        arch = target_arch()
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", arch):
            raise _CompileError(f"{ARCH_ENV}={arch!r} is not a -march value (use e.g. native, x86-64-v3, x86-64)")
        cxx = compiler()
        src = folder / f"{self.name}.cpp"
        src.write_text(self._source())
        obj = folder / f"{self.name}.so"
        flags = [*self.compile_flags(), *extra_flags]
        if self.parts == 1:
            steps = [[[cxx, *flags, str(src), "-o", str(obj), *self.link_flags]]]
        else:
            objects = [str(folder / f"{self.name}.part{k}.o") for k in range(self.parts)]
            steps = [[[cxx, *flags, f"-DSF_PART={k}", "-c", str(src), "-o", o] for k, o in enumerate(objects)],
                     [[cxx, *flags, *objects, "-o", str(obj), *self.link_flags]]]
        start = time.perf_counter()
        diagnostics = "".join(_run_side_by_side(cxx, commands) for commands in steps)
        self.build_seconds = time.perf_counter() - start
        os.chmod(obj, 0o700)  # private whatever the umask
        return obj, diagnostics

    def _open(self, path: Path) -> ctypes.CDLL:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:  # the loader's reason first (it names the path again)
            raise NativeBuildError(f"{str(exc).replace(f'{path}: ', '')} (loading {path})") from exc
        try:
            self._declare(lib)
        except AttributeError as exc:
            _ctypes.dlclose(lib._handle)  # unmapped, so a rebuilt file at this path is not shadowed by it
            raise NativeBuildError(f"{path} lacks an expected symbol: {exc}") from exc
        return lib

    def _load_cached(self, target: Path) -> ctypes.CDLL:
        """Load the cached library, (re)building it into the cache when it is absent or does not load."""
        folder = target.parent
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass
        check_private(folder)
        with _build_lock(folder):
            if os.path.lexists(target):
                check_private(target)
                try:
                    return self._open(target)
                except NativeBuildError:
                    pass  # a corrupt or foreign file: replaced below
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                obj, _ = self.compile(Path(tmp))
                try:
                    lib = self._open(obj)  # loaded under its unique temporary name, so never a stale handle
                except NativeBuildError as exc:  # a fresh build that does not load: the cache is not at fault
                    raise _CompileError(f"{compiler()} built {self.name}, but it does not load: {exc}") from exc
                os.replace(obj, target)  # atomic: other processes see the old file or the whole new one
        return lib

    def _load_private(self) -> ctypes.CDLL:
        """Build and load in a fresh private temporary directory, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix=f"{self.name}_") as tmp:
            return self._open(self.compile(Path(tmp))[0])

    def _load(self) -> ctypes.CDLL:
        target = self.path()
        try:
            return self._load_cached(target)
        except _CompileError:
            raise
        except (OSError, NativeBuildError) as exc:
            reason = _first_line(str(exc) or type(exc).__name__)
        try:
            lib = self._load_private()
        except Exception as exc:
            raise NativeBuildError(f"the build cache is unusable ({reason}) and so is a private temporary "
                                   f"directory ({_first_line(str(exc))})") from exc
        root = str(target.parent.parent)
        if root not in _warned_caches:
            _warned_caches.add(root)
            warnings.warn(f"spikingformer: native build cache {root} not usable ({reason}); building in a private "
                          "temporary directory for this process instead (point TORCH_EXTENSIONS_DIR at a private "
                          "writable directory to keep the build)", RuntimeWarning, stacklevel=4)
        return lib

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, building it on first use; ``None`` (one warning, see :attr:`error`) if it cannot be.

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
                except Exception as exc:  # native code must never take the library down
                    self.error = str(exc) or type(exc).__name__
                    warnings.warn(f"spikingformer: native library {self.name} unavailable ({_first_line(self.error)}); "
                                  "using plain PyTorch instead", RuntimeWarning, stacklevel=3)
        return self.lib

    def reset(self) -> None:
        """Forget the loaded library and any build failure (tests force rebuild/failure paths)."""
        with self._lock:
            self.lib, self.error, self.build_seconds = None, None, None
