"""The native build cache never takes the library down, and never loads a file it did not build.

Each broken-cache case is tested with a tiny library (the policy, precisely), and each of the three
ways it ends (rebuilt in place, a foreign or unsafe entry left alone, an unusable cache) once more
with the fused LIF kernel under a small model's CPU forward, which must still run, bit for bit as
before (each of those builds the whole kernel library again).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from spikingformer import native
from spikingformer.kernels import cpu_backend as cpu_kernel
from spikingformer.models.zoo import create_model
from spikingformer.native import NativeLibrary

needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None, reason="needs a C++ compiler")

SOURCE = 'extern "C" int sf_test_answer() { return 42; }\n'
PLANTED = r"""
#include <cstdio>
#include <cstdlib>
__attribute__((constructor)) static void planted() {  // what an attacker's library would run on load
  if (const char* p = std::getenv("SF_PLANTED_MARKER")) { if (FILE* f = std::fopen(p, "w")) std::fclose(f); }
}
extern "C" int sf_test_answer() { return 666; }
"""
NO_SYMBOL = 'extern "C" int something_else() { return 1; }\n'


def _declare(lib: ctypes.CDLL) -> None:
    lib.sf_test_answer.restype = ctypes.c_int


def tiny() -> NativeLibrary:
    return NativeLibrary("sf_native_test", lambda: SOURCE, ["-O0", "-march=native", "-fPIC", "-shared"], declare=_declare)


def compile_to(path: Path, source: str) -> None:
    src = path.parent / "planted.cpp"
    src.write_text(source)
    subprocess.run([os.environ.get("CXX") or "g++", "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
    src.unlink()


def get_with_warnings(lib: NativeLibrary) -> tuple[ctypes.CDLL | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = lib.get()
    return loaded, [str(w.message) for w in caught]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.setenv("SF_PLANTED_MARKER", str(tmp_path / "planted-ran"))
    monkeypatch.delenv(native.ARCH_ENV, raising=False)
    return root


def private_folder(path: Path) -> Path:
    path.parent.mkdir(parents=True, mode=0o700)
    return path


# -- breaking the cache: each returns the text the one warning must contain (None: no warning) ---

def _root_is_a_file(lib, cache, monkeypatch):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("not a directory")
    return "not usable"


def _read_only(lib, cache, monkeypatch):
    cache.mkdir(parents=True)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # a read-only file system under the cache root (root ignores chmod)
        if str(path).startswith(str(cache)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    return "Read-only file system"


def _garbage(lib, cache, monkeypatch):
    private_folder(lib.path()).write_bytes(os.urandom(4096))
    return None  # rebuilt in place, nothing to warn about


def _missing_symbols(lib, cache, monkeypatch):
    compile_to(private_folder(lib.path()), NO_SYMBOL)
    return None


def _world_writable_dir(lib, cache, monkeypatch):
    compile_to(private_folder(lib.path()), PLANTED)
    lib.path().parent.chmod(0o777)
    return "writable by group or others"


def _group_writable_file(lib, cache, monkeypatch):
    compile_to(private_folder(lib.path()), PLANTED)
    lib.path().chmod(0o775)
    return "writable by group or others"


def _foreign_owner(lib, cache, monkeypatch):
    compile_to(private_folder(lib.path()), PLANTED)
    uid = os.getuid()
    monkeypatch.setattr(native.os, "getuid", lambda: uid + 1)
    return f"owned by user id {uid}"


BREAKERS = [_root_is_a_file, _read_only, _garbage, _missing_symbols, _world_writable_dir, _group_writable_file,
            _foreign_owner]
# one per outcome: rebuilt in the cache; an entry not ours, built privately; an unusable cache, built privately
OUTCOMES = [_garbage, _foreign_owner, _read_only]


@needs_cxx
def test_builds_into_a_private_directory_and_reuses_it(cache):
    lib, caught = get_with_warnings(tiny())
    assert lib.sf_test_answer() == 42 and caught == []
    folder, path = tiny().path().parent, tiny().path()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid() and not path.stat().st_mode & 0o022
    again = tiny()  # a fresh process: loads the cached file, no compile
    assert again.get().sf_test_answer() == 42 and again.build_seconds is None
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "sf_native_test.so"]  # no temporary left behind
    assert stat.S_IMODE((folder / ".lock").stat().st_mode) == 0o600


@needs_cxx
def test_processes_starting_together_build_once(cache, tmp_path):
    """Three processes (as torchrun starts them) ask for the same library at once: one compiles it
    (a compiler that takes 3 s, so that they overlap), the others wait for the cache's lock and
    load what it built."""
    log, wrapper = tmp_path / "compiles.log", tmp_path / "slow-cxx"
    wrapper.write_text(f'#!/bin/sh\necho run >> "{log}"\nsleep 3\nexec "{shutil.which("g++")}" "$@"\n')
    wrapper.chmod(0o755)
    code = ("import ctypes\nfrom spikingformer.native import NativeLibrary\n"
            f"lib = NativeLibrary('sf_native_test', lambda: {SOURCE!r}, {tiny().flags!r}, "
            "declare=lambda l: setattr(l.sf_test_answer, 'restype', ctypes.c_int))\n"
            "print(lib.get().sf_test_answer(), lib.build_seconds is not None)\n")
    env = {**os.environ, "CXX": str(wrapper)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
    assert sorted(out.split()[1] for out, _ in outs) == ["False", "False", "True"]  # built once, loaded twice
    assert all(out.split()[0] == "42" for out, _ in outs)
    assert log.read_text().count("run") == 1


@needs_cxx
@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.strip("_"))
def test_broken_cache_still_gives_the_library_with_at_most_one_warning(breaker, cache, monkeypatch, tmp_path):
    lib = tiny()
    expected = breaker(lib, cache, monkeypatch)
    loaded, caught = get_with_warnings(lib)
    assert loaded is not None and loaded.sf_test_answer() == 42  # ours, built here, never the planted one
    assert not (tmp_path / "planted-ran").exists()  # the planted library was never loaded
    if expected is None:
        assert caught == []
        again = tiny()  # the cache holds a good library again
        assert again.get().sf_test_answer() == 42 and again.build_seconds is None
    else:
        assert len(caught) == 1 and expected in caught[0] and "private temporary directory" in caught[0], caught


@needs_cxx
def test_no_compiler_falls_back_with_one_warning_per_process(cache, monkeypatch):
    monkeypatch.setenv("CXX", str(cache / "no-such-compiler"))
    lib = tiny()
    loaded, caught = get_with_warnings(lib)
    assert loaded is None and len(caught) == 1 and "using plain PyTorch instead" in caught[0]
    assert "no-such-compiler" in lib.error
    assert get_with_warnings(lib) == (None, [])  # said once
    monkeypatch.delenv("CXX")
    lib.reset()  # nothing is remembered beyond the process (reset stands for a new one)
    assert lib.get().sf_test_answer() == 42


@needs_cxx
def test_target_arch_from_the_environment(cache, monkeypatch):
    native_path = tiny().path()
    monkeypatch.setenv(native.ARCH_ENV, "x86-64")
    lib = tiny()
    assert "-march=x86-64" in lib.compile_flags() and "-march=native" not in lib.compile_flags()
    assert lib.path() != native_path  # its own cache entry
    if os.uname().machine == "x86_64":
        assert lib.get().sf_test_answer() == 42


@needs_cxx
def test_unsafe_target_arch_is_refused_with_one_warning(cache, monkeypatch):
    monkeypatch.setenv(native.ARCH_ENV, "x86 64; rm")
    bad = tiny()
    loaded, caught = get_with_warnings(bad)
    assert loaded is None and len(caught) == 1 and native.ARCH_ENV in caught[0]


# -- compilers without a working OpenMP ------------------------------------------------------

OPENMP_SOURCE = r"""
extern "C" int sf_test_answer() {
  int s = 0;
#pragma omp parallel for reduction(+ : s)
  for (int i = 0; i < 8; ++i) s += i;
  return s + 14;
}
"""
# a compiler that refuses -fopenmp, as Apple's clang does
REFUSES_OPENMP = """#!/bin/sh
for a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; }; done
exec g++ "$@"
"""
# a compiler whose OpenMP builds need a runtime this machine lacks (clang without libomp): they
# compile, and the loader refuses them for an undefined symbol
LACKS_OPENMP_RUNTIME = """#!/bin/sh
for a in "$@"; do [ "$a" = "-fopenmp" ] && exec g++ -include "$(dirname "$0")/missing.h" "$@"; done
exec g++ "$@"
"""
MISSING_RUNTIME = """extern "C" void __kmpc_sf_missing_runtime();
static void* const sf_keep __attribute__((used)) = (void*)&__kmpc_sf_missing_runtime;
"""


def fake_compiler(folder: Path, script: str) -> str:
    folder.mkdir(mode=0o700)
    (folder / "missing.h").write_text(MISSING_RUNTIME)
    cxx = folder / "c++"
    cxx.write_text(script)
    cxx.chmod(0o700)
    return str(cxx)


def with_openmp() -> NativeLibrary:
    return NativeLibrary("sf_native_openmp", lambda: OPENMP_SOURCE, ["-O1", "-fPIC", "-shared"], declare=_declare,
                         openmp=True)


@needs_cxx
def test_openmp_where_the_compiler_has_it(cache, monkeypatch):
    """g++ builds OpenMP code on the runtime PyTorch loaded (its libgomp.so.1): no warning."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    monkeypatch.setenv("CXX", shutil.which("g++"))  # (whatever compiler the session uses)
    monkeypatch.setattr(native, "_openmp_flags", {})
    lib = with_openmp()
    loaded, caught = get_with_warnings(lib)
    assert caught == [] and loaded.sf_test_answer() == 42
    assert "-fopenmp" in lib.compile_flags() and "-fopenmp" not in tiny().compile_flags()  # only where asked for


@pytest.mark.skipif(shutil.which("clang++") is None or not native._openmp_runtimes(),
                    reason="needs clang++ and an OpenMP runtime loaded (PyTorch's, on Linux)")
def test_a_second_openmp_runtime_is_said_and_told_not_to_spin(cache, monkeypatch):
    """clang's OpenMP code runs on LLVM's libomp; PyTorch's Linux wheels load GNU libgomp. Where the
    probe brings a runtime of its own, one warning names both, and KMP_BLOCKTIME=0 is set (the
    environment unset) before that runtime starts."""
    monkeypatch.setattr(native, "_openmp_flags", {})
    monkeypatch.setenv("CXX", shutil.which("clang++"))
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    loaded = native._openmp_runtimes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flags = native.openmp_flags()
    said = [str(w.message) for w in caught]
    if not flags:
        pytest.skip(f"clang++ builds no working OpenMP code here: {said}")
    added = native._openmp_runtimes() - loaded
    if not added:
        pytest.skip("clang++'s OpenMP code runs on the runtime already loaded")
    assert len(said) == 1 and "compete for the cores" in said[0] and all(r in said[0] for r in added | loaded)
    assert os.environ["KMP_BLOCKTIME"] == "0" and "KMP_BLOCKTIME=0" in said[0]


def _fake_clang(folder: Path, driver_line: str) -> Path:
    """A compiler named clang++ whose driver (``-###``) prints ``driver_line``, as clang does, to stderr."""
    fake = folder / "bin" / "clang++"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho '{driver_line}' >&2\n")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("runtime, present, expected", [("omp", True, True), ("omp", False, False),
                                                        ("iomp5", True, True), ("gomp", True, False)])
def test_a_second_runtime_is_expected_from_the_compiler_driver(monkeypatch, tmp_path, runtime, present, expected):
    """A clang whose ``-fopenmp`` links a runtime other than GNU libgomp, found in one of its library
    folders: its kernels will run on a second runtime. g++ never."""
    lib = tmp_path / "lib"
    lib.mkdir()
    if present:
        (lib / f"lib{runtime}.so").write_bytes(b"")
    fake = _fake_clang(tmp_path, f'"/usr/bin/ld" "-shared" "-L/nowhere" "-L{lib}" "-l{runtime}" "-lc"')
    monkeypatch.setenv("CXX", str(fake))
    assert native.second_openmp_runtime_expected() is expected
    monkeypatch.setenv("CXX", "g++")
    assert native.second_openmp_runtime_expected() is False


@pytest.mark.parametrize("environment, before_torch, expected", [
    ({}, True, native.GOMP_SPINCOUNT), ({"GOMP_SPINCOUNT": "5"}, True, "5"),
    ({"OMP_WAIT_POLICY": "active"}, True, None), ({}, False, None)])
def test_pytorchs_gnu_threads_spin_less_beside_a_second_runtime(tmp_path, environment, before_torch, expected):
    """In a fresh process, before PyTorch loads (as the spikingformer command calls it): with a
    clang that brings libomp, GOMP_SPINCOUNT is set unless the environment chose the spinning, and
    not once PyTorch (and its libgomp, which read the environment) is loaded."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libomp.so").write_bytes(b"")
    fake = _fake_clang(tmp_path, f'"-L{lib}" "-lomp"')
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = ("import os, sys; " + ("" if before_torch else "import torch; ") +
            "from spikingformer import native; native.calm_gnu_openmp(); print(os.environ.get('GOMP_SPINCOUNT'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, **environment, "CXX": str(fake)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(expected)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="needs clang++")
def test_the_command_calms_pytorchs_threads_for_clangs_libomp(tmp_path):
    """``spikingformer info`` with CXX=clang++ (where it brings libomp): GOMP_SPINCOUNT was set
    before PyTorch loaded, and the kernel library's line says so."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(CXX=shutil.which("clang++"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    check = subprocess.run([sys.executable, "-c", "from spikingformer import native; print(native.second_openmp_runtime_expected())"],
                           capture_output=True, text=True, env=env, timeout=120)
    if check.stdout.strip() != "True":
        pytest.skip(f"clang++ brings no libomp here ({check.stdout.strip()} {check.stderr[-300:]})")
    proc = subprocess.run([sys.executable, "-m", "spikingformer", "info"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("kernel library:"))
    assert f"a second OpenMP runtime beside PyTorch's; GOMP_SPINCOUNT={native.GOMP_SPINCOUNT}" in line, line


@needs_cxx
def test_a_second_copy_of_gnu_openmp_is_said(cache, monkeypatch, tmp_path):
    """A PyTorch wheel whose libgomp is a renamed file (its own soname) is not shared by a g++ build,
    which maps the system's libgomp.so.1 beside it: one warning names both and says why. In a fresh
    process without PyTorch (whose libgomp.so.1 would be shared), a library of that name stands for
    the wheel's copy: the check reads the names of the runtimes mapped, before and after the probe."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++, whose OpenMP runtime is GNU libgomp")
    monkeypatch.setenv("CXX", gxx)  # (whatever compiler the session uses)
    renamed = tmp_path / "libgomp-0123abcd.so.1"
    subprocess.run([gxx, "-shared", "-fPIC", "-xc++", "-", "-o", str(renamed), f"-Wl,-soname,{renamed.name}"],
                   input='extern "C" int renamed_copy() { return 1; }\n', text=True, check=True)
    code = ("import ctypes, warnings, sys; warnings.simplefilter('always');"
            f"ctypes.CDLL({str(renamed)!r}, mode=ctypes.RTLD_GLOBAL);"
            "from spikingformer import native; assert 'torch' not in sys.modules;"
            "print(native.openmp_flags())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['-fopenmp']"
    said = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(said) == 1 and str(renamed) in said[0] and "renamed file" in said[0], proc.stderr


@needs_cxx
@pytest.mark.parametrize("script,reason", [(REFUSES_OPENMP, "unsupported option '-fopenmp'"),
                                           (LACKS_OPENMP_RUNTIME, "undefined symbol: __kmpc_sf_missing_runtime")],
                         ids=["refused", "no-runtime"])
def test_without_a_working_openmp_the_library_runs_on_one_thread(cache, monkeypatch, tmp_path, script, reason):
    monkeypatch.setattr(native, "_openmp_flags", {})
    cxx = fake_compiler(tmp_path / "bin", script)
    monkeypatch.setenv("CXX", cxx)
    lib = with_openmp()
    loaded, caught = get_with_warnings(lib)
    assert loaded.sf_test_answer() == 42  # built without OpenMP: the pragma's loop runs on one thread
    assert "-fopenmp" not in lib.compile_flags()
    assert len(caught) == 1 and "no working OpenMP" in caught[0] and "one thread" in caught[0] and reason in caught[0]
    assert get_with_warnings(with_openmp())[1] == []  # said once per compiler and process
    one_thread = lib.path()
    with monkeypatch.context() as m:  # the one-thread build has a cache entry of its own
        m.setitem(native._openmp_flags, cxx, ["-fopenmp"])
        assert with_openmp().path() != one_thread
    monkeypatch.setattr(native, "_openmp_flags", {})  # a new process: the probe's failure is not cached on disk
    assert get_with_warnings(with_openmp())[0].sf_test_answer() == 42


@needs_cxx
def test_a_fresh_build_that_does_not_load_is_the_compilers_fault_not_the_caches(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", fake_compiler(tmp_path / "bin", LACKS_OPENMP_RUNTIME))
    lib = NativeLibrary("sf_native_test", lambda: SOURCE, ["-O0", "-fopenmp", "-fPIC", "-shared"], declare=_declare)
    loaded, caught = get_with_warnings(lib)
    assert loaded is None and len(caught) == 1
    assert "does not load: undefined symbol: __kmpc_sf_missing_runtime" in lib.error
    assert "unusable" not in lib.error and "private temporary" not in lib.error  # not blamed on the cache,
    # and not built a second time elsewhere


# -- the LIF kernel under a small model's CPU forward -----------------------------------------


# -- a library compiled in parts --------------------------------------------------------------

PARTED = """
#ifdef SF_PART
#define SF_IN_PART(k) (SF_PART == (k))
#else
#define SF_IN_PART(k) 1
#endif
#if SF_IN_PART(0)
extern "C" int sf_test_answer() { return 42; }
#endif
#if SF_IN_PART(1)
extern "C" int sf_test_other() { return 7; }
#endif
#if SF_IN_PART(2) && defined(SF_BREAK_PART_2)
#error part two does not compile
#endif
"""


def _declare_both(lib: ctypes.CDLL) -> None:
    _declare(lib)
    lib.sf_test_other.restype = ctypes.c_int


def parted(parts: int, *extra: str) -> NativeLibrary:
    return NativeLibrary("sf_native_parts", lambda: PARTED, ["-O0", "-march=native", "-fPIC", "-shared", *extra],
                         declare=_declare_both, parts=parts)


@needs_cxx
@pytest.mark.parametrize("parts", [1, 3])
def test_a_library_in_parts_has_every_part_and_its_own_cache_entry(cache, parts):
    lib, caught = get_with_warnings(parted(parts))
    assert caught == [] and lib.sf_test_answer() == 42 and lib.sf_test_other() == 7
    assert parted(parts).path() != parted(4 - parts).path()  # one cache entry per way of building
    folder = parted(parts).path().parent
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "sf_native_parts.so"]  # no object file left behind


@needs_cxx
def test_a_part_that_fails_to_compile_falls_back_with_its_error(cache):
    lib = parted(3, "-DSF_BREAK_PART_2")
    loaded, caught = get_with_warnings(lib)
    assert loaded is None and len(caught) == 1 and "using plain PyTorch instead" in caught[0]
    assert "part two does not compile" in lib.error and "-DSF_PART=2" in lib.error  # the failing part's command


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = create_model("spikingformer_digits").eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = model(x)
    assert cpu_kernel.LIBRARY.lib is not None  # computed with the fused kernel
    return model, x, expected


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("breaker", OUTCOMES, ids=lambda f: f.__name__.strip("_"))
def test_model_forward_with_a_broken_cache(breaker, small_model, cache, monkeypatch, tmp_path):
    model, x, expected = small_model
    cpu_kernel._reset_for_tests()
    try:
        breaker(cpu_kernel.LIBRARY, cache, monkeypatch)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                out = model(x)
        assert torch.equal(out, expected)
        assert cpu_kernel.LIBRARY.lib is not None  # still the fused kernel: rebuilt, here or privately
        assert len(caught) <= 1 and not (tmp_path / "planted-ran").exists()
    finally:
        monkeypatch.undo()
        cpu_kernel._reset_for_tests()


@pytest.mark.slow
@needs_cxx
def test_every_command_runs_with_an_unusable_cache(tmp_path):
    """The CLI builds the allocator at start and the kernel at the first forward: one warning for both."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(blocker)}
    argv = [sys.executable, "-m", "spikingformer", "audit", "--model", "spikingformer_digits", "--dataset", "random",
            "--batches", "1", "--batch-size", "2", "--output", str(tmp_path / "out")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("not usable") == 1, done.stderr
    assert "Traceback" not in done.stderr
    warning = [line for line in done.stderr.splitlines() if "not usable" in line]
    assert warning[0].startswith("spikingformer: native build cache"), done.stderr  # the message alone, one line
    assert "RuntimeWarning" not in done.stderr and "warnings.warn(" not in done.stderr, done.stderr


# -- native bf16 ---------------------------------------------------------------------------------


def _cpu(monkeypatch, machine: str, avx512_bf16: bool, amx: bool = False) -> None:
    from spikingformer import cpu_features

    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16, amx, isa_cap, native", [
    (False, False, None, False),  # e.g. an AVX2-only EPYC: bf16 emulated
    (True, False, None, True),
    (False, True, None, True),
    (False, True, "avx2", False),  # oneDNN capped below bf16: emulated again
], ids=["avx2_only", "avx512_bf16", "amx", "amx_capped_at_avx2"])
def test_native_bf16_detection(monkeypatch, avx512_bf16, amx, isa_cap, native):
    from spikingformer.cpu_features import native_bf16

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if isa_cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)
    _cpu(monkeypatch, "x86_64", avx512_bf16=avx512_bf16, amx=amx)
    assert native_bf16() is native


@pytest.mark.parametrize("machine, vnni, amx, isa_cap, native", [
    ("x86_64", False, False, None, False),  # e.g. an AVX2-only EPYC: int8 without dot products
    ("x86_64", True, False, None, False),  # dot products without tiles (AVX512-VNNI, e.g. Zen 5): measured slower
    ("x86_64", False, True, None, True),
    ("x86_64", True, True, "avx2", False),  # oneDNN capped below them
    ("x86_64", True, True, "AVX512_CORE_BF16", False),  # capped at bf16 on vector units: no tiles either
    ("aarch64", True, True, None, False),
], ids=["avx2_only", "vnni", "amx", "capped_at_avx2", "capped_at_avx512_bf16", "arm"])
def test_native_int8_detection(monkeypatch, machine, vnni, amx, isa_cap, native):
    """The spike convolution's int8 way asks this: 8-bit matrix tiles (AMX) that oneDNN may use. The
    spike linear's bf16 rule asks the same tiles (``bf16_matrix_tiles``)."""
    from spikingformer.cpu_features import bf16_matrix_tiles, native_int8

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if isa_cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa_cap)
    _cpu(monkeypatch, machine, avx512_bf16=False, amx=amx)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: vnni)
    assert native_int8() is native
    assert bf16_matrix_tiles() is (machine == "x86_64" and amx and not isa_cap)


def test_amp_bf16_on_an_emulating_cpu_warns_once_and_auto_stays_fp32(monkeypatch):
    from spikingformer.engine.precision import autocast_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    _cpu(monkeypatch, "x86_64", avx512_bf16=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert autocast_dtype("bf16", cpu) is torch.bfloat16  # the user asked for it: honoured, with a warning
        assert autocast_dtype("auto", cpu) is None
        assert autocast_dtype("off", cpu) is None
    assert [str(w.message).count("\n") for w in caught] == [0]  # one warning, one line
    assert "no native bf16" in str(caught[0].message) and "--amp off" in str(caught[0].message)


def test_amp_auto_is_bf16_on_a_native_bf16_cpu_without_warning(monkeypatch):
    from spikingformer.engine.precision import autocast_dtype

    cpu = torch.device("cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    _cpu(monkeypatch, "x86_64", avx512_bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_dtype("bf16", cpu) is torch.bfloat16
        assert autocast_dtype("auto", cpu) is torch.bfloat16


def test_amp_fp16_is_for_gpus_and_refused_on_the_cpu():
    from spikingformer.engine.precision import autocast_dtype

    with pytest.raises(ValueError, match=r"--amp fp16 is for GPUs: on the CPU PyTorch emulates float16 .* --amp bf16 "):
        autocast_dtype("fp16", torch.device("cpu"))
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16  # the device's type only: no GPU needed
    assert autocast_dtype("auto", torch.device("cuda")) is torch.float16


def test_model_benchmark_skips_bf16_rows_on_an_emulating_cpu(monkeypatch, capsys):
    import argparse

    from bench_model import check_dtypes

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    _cpu(monkeypatch, "x86_64", avx512_bf16=False)
    args = argparse.Namespace(device="cpu", dtypes=["fp32", "bf16"])
    check_dtypes(args)
    assert args.dtypes == ["fp32"]
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(ValueError, match="--dtypes fp32"):
        check_dtypes(argparse.Namespace(device="cpu", dtypes=["bf16"]))


def test_model_benchmark_keeps_bf16_rows_on_a_native_bf16_cpu(monkeypatch, capsys):
    import argparse

    from bench_model import check_dtypes

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    _cpu(monkeypatch, "x86_64", avx512_bf16=True)
    args = argparse.Namespace(device="cpu", dtypes=["fp32", "bf16"])
    check_dtypes(args)
    assert args.dtypes == ["fp32", "bf16"] and capsys.readouterr().err == ""
