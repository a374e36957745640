"""The native sources compile for the platforms that no machine of ours has run.

The kernel library (:mod:`spikingformer.kernels.cpu_backend`, the C++ of ``csrc/``) and the caching
allocator (:mod:`spikingformer.allocator`, Linux only) are built on the user's machine by its own
compiler. Their x86 vector code sits behind ``__AVX2__`` / ``__AVX512F__`` / ``__x86_64__`` tests,
so that elsewhere the plain loops remain: this checks that nothing x86- or Linux-only leaked out
of those guards, by compiling the sources for Arm Linux (armv8-a, the baseline of Graviton- and
Ampere-class servers), macOS on Apple silicon and Windows on x86-64 (with AVX2).

The compiler is zig's clang (the ``ziglang`` wheel: one compiler that carries every target's C and
C++ headers, so no cross toolchain or SDK is needed). Object files only, the library's parts
compiled side by side as its own build compiles them (``-DSF_PART=k``), with its flags but the
target's CPU for ``-march=native``: nothing is linked or run, so this says the sources are
portable C++, not that the kernels are fast or right there (the numerics tests say that on each
machine that runs them). Skipped where ``ziglang`` is not installed (``pip install ziglang``;
``.ci/run`` installs it for its slow run).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from spikingformer.kernels import cpu_backend

# zig target -> the CPU it compiles for, in zig's names (None: the target's baseline CPU)
TARGETS = {
    "aarch64-linux-gnu": None,
    "aarch64-macos": None,
    "x86_64-windows-gnu": "x86_64_v3",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ziglang") is None,
                       reason="needs the ziglang wheel (pip install ziglang): zig's clang with every target's headers"),
]


def _zig_cxx(target: str, builds: dict[str, list[str]], source: str, tmp_path) -> None:
    """Compile ``source`` for ``target`` into one object file per entry of ``builds`` (name -> flags),
    side by side; fail with each failing build's errors."""
    src = tmp_path / "source.cpp"
    src.write_text(source)
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(tmp_path / "zig-cache"),
               ZIG_LOCAL_CACHE_DIR=str(tmp_path / "zig-cache"))
    running = {name: subprocess.Popen([sys.executable, "-m", "ziglang", "c++", "-target", target, *flags, "-c",
                                       str(src), "-o", str(tmp_path / f"{name}.o")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
               for name, flags in builds.items()}
    failed = []
    for name, proc in running.items():
        stderr = proc.communicate(timeout=600)[1]
        errors = [line for line in stderr.splitlines() if "error" in line]
        if proc.returncode != 0 or not (tmp_path / f"{name}.o").stat().st_size:
            failed.append(f"{name} for {target}: " + "\n".join(errors[:10] or stderr.splitlines()[-10:]))
    assert not failed, "\n".join(failed)


def _library_flags(cpu: str | None) -> list[str]:
    """The kernel library's compile flags for another target: ``-march=native`` replaced by zig's
    ``-mcpu=cpu`` (or dropped), x86's vector-width tuning only for x86 CPUs, no ``-shared`` (object
    files only)."""
    flags = []
    for flag in cpu_backend.CXX_FLAGS:
        if flag == "-march=native":
            flags += [f"-mcpu={cpu}"] if cpu else []
        elif flag == "-mprefer-vector-width=512":
            flags += [flag] if cpu else []
        elif flag != "-shared":
            flags.append(flag)
    return [*flags, "-fopenmp"]


def test_the_flags_follow_the_librarys():
    """The cross builds use the library's own flags (so a flag added there is checked here too)."""
    assert "-march=native" in cpu_backend.CXX_FLAGS
    arm, x86 = _library_flags(None), _library_flags("x86_64_v3")
    assert not any(f.startswith(("-march", "-mcpu")) or f == "-shared" for f in arm)
    assert "-mcpu=x86_64_v3" in x86 and "-O3" in x86 and "-ffp-contract=off" in x86
    assert not any(f.startswith("-march") or f == "-shared" for f in x86)
    if platform.machine() in ("x86_64", "AMD64"):
        assert "-mprefer-vector-width=512" in x86 and "-mprefer-vector-width=512" not in arm


@pytest.mark.parametrize("target", list(TARGETS))
def test_kernel_library_compiles_for(target, tmp_path):
    flags = _library_flags(TARGETS[target])
    _zig_cxx(target, {f"part{k}": [*flags, f"-DSF_PART={k}"] for k in range(cpu_backend.PARTS)},
             cpu_backend.source(), tmp_path)


def test_allocator_compiles_for_arm_linux(tmp_path):
    """The allocator (Linux only: :func:`spikingformer.allocator.configure_allocator` stays off
    elsewhere) with its own flags, against this PyTorch's headers, for Arm Linux."""
    from spikingformer import allocator

    flags = [f for f in allocator._library().flags if f != "-shared"]
    assert "-I" in flags  # this PyTorch's headers
    _zig_cxx("aarch64-linux-gnu", {"allocator": flags}, allocator._source(), tmp_path)
