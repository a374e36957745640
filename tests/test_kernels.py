"""Every fused LIF backend against the plain-PyTorch reference (``lif_reference``).

Spikes must be bit-identical to the reference; gradients with respect to the input must match the
reference's autograd gradient to 1e-6 in float32 and, for float16/bfloat16 inputs, to the dtype's
rounding (both gradients compared in the input dtype).

Backends tested: ``torch`` and ``cpu`` in this process; ``triton`` in a subprocess that sets
``TRITON_INTERPRET=1`` before importing torch/triton (Triton's interpreter runs the kernels on CPU
tensors), so the rest of the session is unaffected; that subprocess also runs tests/test_neuron.py's
worked examples and SpikingJelly fixture on Triton. On a CUDA machine,
``SPIKINGFORMER_TEST_DEVICE=cuda pytest tests/test_kernels.py tests/test_neuron.py`` runs the same
checks on the GPU (``benchmarks/gpu_check.sh``). The reference itself is held to the paper's
equations and SpikingJelly's outputs in tests/test_neuron.py.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, KERNEL_BACKENDS as BACKENDS, TRITON_INTERPRET as INTERPRET, skip_unusable
from spikingformer import kernels
from spikingformer.kernels import cpu_backend as cpu_kernel
from spikingformer.neuron import LIFParams, MultiStepLIF, lif_reference, multistep_lif

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = [
    LIFParams(tau=tau, v_threshold=vth, detach_reset=detach)
    for tau in (2.0, 1.5)
    for vth in (1.0, 0.5)
    for detach in (True, False)
] + [LIFParams(v_reset=-0.1, detach_reset=False), LIFParams(tau=1.5, v_reset=-0.1)]


def _pid(p: LIFParams) -> str:
    return f"tau{p.tau}_vth{p.v_threshold}_vr{p.v_reset}_detach{int(p.detach_reset)}"


def _make_input(shape, dtype, p: LIFParams, seed: int = 0) -> torch.Tensor:
    """Currents that make a mix of spikes, with a few first steps charging exactly to threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + 0.8
    if p.v_reset == 0.0:
        flat = x.view(shape[0], -1)
        flat[0, : min(3, flat.shape[1])] = p.tau * p.v_threshold  # H[0] = V_th exactly: must fire
    return x.to(dtype).to(DEVICE)


def _grad_tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"rtol": 1e-6, "atol": 1e-6}
    # fp16/bf16: both gradients are float32 values rounded to the dtype; allow one rounding step.
    return {"rtol": torch.finfo(dtype).eps, "atol": 1e-6}


def _check_backend(backend: str, x: torch.Tensor, p: LIFParams, seed: int = 1) -> None:
    """Spikes bit-exact and input gradient close to the reference, for input ``x`` (any layout)."""
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(x.shape, generator=g).to(x.dtype).to(x.device)

    x_ref = x.detach().clone().requires_grad_(True)
    s_ref = lif_reference(x_ref, p)
    (gx_ref,) = torch.autograd.grad(s_ref, x_ref, grad_out)

    x_k = x.detach().requires_grad_(True)
    s_k = multistep_lif(x_k, p, backend=backend)
    assert s_k.dtype == x.dtype and s_k.shape == x.shape
    assert torch.equal(s_k, s_ref), f"{backend}: spikes differ from the reference"
    (gx_k,) = torch.autograd.grad(s_k, x_k, grad_out)
    assert gx_k.dtype == x.dtype and gx_k.shape == x.shape
    torch.testing.assert_close(gx_k, gx_ref, **_grad_tol(x.dtype))


@pytest.mark.parametrize("p", PARAMS, ids=_pid)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, dtype, p):
    skip_unusable(backend)
    _check_backend(backend, _make_input((16, 3, 5, 7), dtype, p), p)


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 5, 7), (16, 3, 5, 7), (4, 1), (2, 1000), (4, 2, 1030), (5, 3, 257), (4, 70000)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_shapes(backend, dtype, shape):
    skip_unusable(backend)
    p = LIFParams(tau=1.5, detach_reset=False)
    _check_backend(backend, _make_input(shape, dtype, p, seed=len(shape) + shape[-1]), p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_transposed_input(backend, dtype):
    skip_unusable(backend)
    p = LIFParams()
    x = _make_input((7, 5, 16), dtype, p, seed=3).permute(2, 0, 1)  # (N1, N2, T) -> time-first transposed view
    assert not x.is_contiguous()
    _check_backend(backend, x, p)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_strided_input(backend, dtype):
    skip_unusable(backend)
    p = LIFParams(tau=1.5, v_threshold=0.5)
    x = _make_input((16, 6, 10), dtype, LIFParams(), seed=4)[:, ::2, 1::3]
    assert not x.is_contiguous()
    _check_backend(backend, x, p)


def _special_currents(dtype: torch.dtype, repeats: int = 70) -> torch.Tensor:
    """``(T = 4, N)`` currents of infinities, NaNs, signed zeros and charges exactly at the threshold
    (tau 2, V_th 1: a current of 2 from rest), each column pattern ``repeats`` times, so that the
    kernels' vector loops and their remainders see them."""
    inf, nan = float("inf"), float("nan")
    cols = [[inf, 5.0, 5.0, 5.0], [-inf, 5.0, 5.0, 5.0], [nan, 5.0, 5.0, 5.0], [-0.0, -0.0, 2.0, -0.0],
            [2.0, -0.0, 2.0, 0.0], [0.0, -0.0, -2.0, 4.0], [5.0, -inf, 2.0, 2.0]]
    return torch.tensor(cols).t().repeat(1, repeats).to(dtype).contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_special_values_spike_as_the_reference(backend, dtype):
    """Where the reference's arithmetic meets infinities, NaNs and signed zeros, the kernels spike as
    it does: an infinite charge fires and leaves the reference's NaN membrane (H * (1 - S) + V_reset S
    with H infinite), which never fires again; a charge of exactly V_th fires; -0 charges as 0."""
    skip_unusable(backend)
    p = LIFParams(tau=2.0, v_threshold=1.0)
    x = _special_currents(dtype).to(DEVICE)
    with torch.no_grad():
        expected = lif_reference(x, p)
        got = multistep_lif(x, p, backend=backend)
    assert torch.equal(got, expected)
    # the reference itself, by hand: columns as in _special_currents
    hand = [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    assert expected[:, :7].t().tolist() == hand


# ---------------------------------------------------------------- CPU-kernel specifics ----------

cpu_only = pytest.mark.skipif(DEVICE.type != "cpu" or INTERPRET, reason="CPU-kernel checks run in the main CPU session")


@cpu_only
def test_select_backend_and_registry():
    assert {"torch", "cpu"} <= set(kernels.available_backends())
    assert kernels.select_backend(torch.zeros(2, 3)) == "cpu"


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_saves_only_the_input(dtype):
    """Backward keeps just x (its own dtype): 2 bytes per element for bf16, nothing in float32."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 100, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = multistep_lif(x, LIFParams(), backend="cpu")
    assert len(saved) == 1 and saved[0].dtype == dtype and saved[0].data_ptr() == x.data_ptr()
    s.sum().backward()


@cpu_only
def test_cpu_under_autocast_bf16():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    lif = MultiStepLIF(backend="cpu")
    x = torch.randn(4, 2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = lin(x)
        s = lif(a)
    assert a.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    assert torch.equal(s, lif_reference(a.detach(), LIFParams()))
    s.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def _spike_count(i: int) -> float:
    x = _make_input((4, 50000), torch.float32, LIFParams(), seed=i)
    return float(multistep_lif(x, LIFParams(), backend="cpu").sum())


class _SpikeCounts(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> float:
        return _spike_count(i)


@cpu_only
def test_cpu_in_dataloader_workers():
    """Forked DataLoader workers (after the parent used the kernel and its threads) run it too."""
    expected = [_spike_count(i) for i in range(4)]  # parent uses the kernel (multi-threaded) first
    loader = torch.utils.data.DataLoader(
        _SpikeCounts(), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    assert [float(v) for v in loader] == expected


@cpu_only
def test_cpu_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_kernel._reset_for_tests()
    try:
        p = LIFParams()
        x = _make_input((4, 3, 5), torch.float32, p)
        with pytest.warns(RuntimeWarning, match="using plain PyTorch instead") as caught:
            s = multistep_lif(x, p, backend="cpu")
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
        assert torch.equal(s, lif_reference(x, p))
        assert cpu_kernel.build_error() and "no-such-compiler" in cpu_kernel.build_error()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call must not warn again
            multistep_lif(x, p, backend="cpu")
        assert kernels.select_backend(x) == "torch"
    finally:
        monkeypatch.undo()
        cpu_kernel._reset_for_tests()
    assert kernels.select_backend(torch.zeros(2, 2)) == "cpu"


@cpu_only
def test_nothing_built_at_import():
    code = (
        "import spikingformer, spikingformer.neuron, spikingformer.kernels as k, sys;"
        "from spikingformer.kernels import cpu_backend as cpu;"
        "assert cpu.LIBRARY.lib is None and cpu.LIBRARY.build_seconds is None;"
        "assert 'spikingformer.kernels.triton_backend' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow
@cpu_only
def test_triton_kernels_under_interpreter():
    """Runs the triton-parametrised tests of this file and of tests/test_neuron.py in a subprocess
    with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    neuron_tests = str(Path(__file__).with_name("test_neuron.py"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, neuron_tests, "-q", "-x", "-p", "no:cacheprovider",
         "-m", "slow or not slow", "-k", "triton and not interpreter"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    if proc.returncode != 0 and "only 0-dimensional arrays can be converted to Python scalars" in tail:
        import numpy
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run a loop over a run-time bound under "
                    f"NumPy {numpy.__version__} (it converts a one-element array to int; Triton 3.8 squeezes it "
                    "first): a Triton bug, not the kernel's; on a GPU the kernels are compiled")
    assert proc.returncode == 0, tail
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m[1]) >= 50, tail


# ------------------------------------------------------ vectorisation on every x86-64 ISA ------

ISAS = ["x86-64", "x86-64-v3", "x86-64-v4"]  # SSE2, AVX2 (+FMA, F16C), AVX-512
VECTOR_LOOP_MARK = "SF_VECTOR_LOOP"


def _gxx() -> str:
    gxx = shutil.which("g++")
    if gxx is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs g++ on an x86-64 machine")
    return gxx


# per compiler: the flags of its vectoriser report, and how the report says a loop was / was not vectorised
VECTORISER_REPORTS = {
    "g++": (("-fopt-info-vec-optimized-missed",), "optimized: loop vectorized", ("couldn't vectorize loop",
                                                                                 "not vectorized")),
    "clang++": (("-Rpass=loop-vectorize", "-Rpass-missed=loop-vectorize"), "remark: vectorized loop",
                ("loop not vectorized",)),
}


@pytest.mark.slow
@cpu_only
@pytest.mark.filterwarnings("ignore:spikingformer.*OpenMP:RuntimeWarning")  # clang's runtime beside PyTorch's
@pytest.mark.parametrize("cxx", list(VECTORISER_REPORTS))
@pytest.mark.parametrize("march", ISAS)
def test_cpu_element_loops_vectorised(march, cxx, tmp_path, monkeypatch):
    """The compiler's vectoriser report for a build of the kernel for ``march``: every element loop of
    the forward and backward and of the fused SN -> max-pool (marked ``SF_VECTOR_LOOP`` in
    csrc/lif_cpu.cpp, csrc/pool_windows_cpu.cpp, csrc/bn_cpu.cpp and csrc/lif_pool_cpu.cpp, one
    library source) is vectorised, in every instantiation (no "not vectorized" at its line), by g++
    and by clang (which ignores g++'s loop pragmas: the library's ``SF_IVDEP`` gives it its own)."""
    path = shutil.which(cxx)
    if path is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"needs {cxx} on an x86-64 machine")
    monkeypatch.setenv("CXX", path)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)  # (restored: the OpenMP probe may set it for clang)
    flags, done, missed_says = VECTORISER_REPORTS[cxx]
    marked = [i for i, line in enumerate(cpu_kernel.source().splitlines(), 1)
              if VECTOR_LOOP_MARK in line and "for (" in line]
    assert len(marked) == 14, ("expected the LIF forward, backward-recompute and backward loops, the max-pool "
                               "windows' four, BN's batch sums (two) and backward apply, and the four of "
                               "lif_pool_cpu.cpp")
    # the library's own build (its parts at once), with the vectoriser's report
    _, stderr = cpu_kernel.native_library(march).compile(tmp_path, flags)
    report = stderr.splitlines()
    for line in marked:
        at = [(int(m[1]), r) for r in report if (m := re.match(rf".*lif_cpu\.cpp:{line}:(\d+): ", r))]
        # a loop's messages stand at one column of its line; messages at another column of the
        # line are about an enclosing loop (outer-loop vectorisation), not this one
        loop = {col for col, r in at if done in r}
        assert loop, f"{cxx} {march}: loop at line {line} not vectorised"
        missed = [r for col, r in at if col in loop and any(says in r for says in missed_says)]
        assert not missed, f"{cxx} {march}: loop at line {line}: " + "; ".join(missed[:3])


BF16_ROUND_CHECK = r"""
#include <cstdio>
int main() {  // bf16_round against the two conversions it replaces, on every float32 bit pattern
  long long bad = 0;
  for (unsigned long long u = 0; u < (1ull << 32); ++u) {
    const float f = from_bits((uint32_t)u);
    bad += to_bits(bf16_round(f)) != to_bits(bf16_to_float(float_to_bf16(f)));
  }
  std::printf("%lld\n", bad);
#if SF_LANES  // and the vector form of the BN -> SN step (Lanes), SF_LANES floats at once
  long long bad_lanes = 0;
  for (unsigned long long u = 0; u < (1ull << 32); u += SF_LANES) {
    uint32_t in[SF_LANES], out[SF_LANES];
    for (int i = 0; i < SF_LANES; ++i) in[i] = (uint32_t)(u + i);
    Lanes::F f;
    std::memcpy(&f, in, sizeof f);
    f = Lanes::bf16_round(f);
    std::memcpy(out, &f, sizeof f);
    for (int i = 0; i < SF_LANES; ++i) bad_lanes += out[i] != to_bits(bf16_round(from_bits(in[i])));
  }
  std::printf("lanes%d %lld\n", SF_LANES, bad_lanes);
  bad += bad_lanes;
#endif
  return bad != 0;
}
"""


@pytest.mark.slow
def test_bf16_round_equals_the_two_conversions_on_every_float(tmp_path):
    """The bf16 kernels round to bfloat16 and back with ``bf16_round`` (32-bit arithmetic), which
    must give the bits of ``bf16_to_float(float_to_bf16(x))`` (round to nearest even, NaN to
    0x7FC0, as c10::BFloat16) for all 2^32 inputs: NaNs, infinities, denormals and ties included;
    so must the vector form of the tokenizer kernel's forward (``Lanes::bf16_round``), 16 lanes in
    an AVX-512 build and 8 in an AVX2 build, each checked where this CPU runs it. The library's own
    source with a ``main`` appended, built with its flags, checks them all."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++")
    src = tmp_path / "bf16_round_check.cpp"
    src.write_text(cpu_kernel.source() + BF16_ROUND_CHECK)
    capabilities = torch.cpu.get_capabilities() if platform.machine() in ("x86_64", "AMD64") else {}
    builds = {}  # -march value: the vector form's line it must print (each build checks bf16_round too)
    if all(capabilities.get(isa) for isa in ("avx2", "fma3", "bmi2")):
        builds["x86-64-v3"] = "lanes8 0"
    if all(capabilities.get(f"avx512_{isa}") for isa in ("f", "bw", "vl")):
        builds["x86-64-v4"] = "lanes16 0"
    builds = builds or {"native": None}
    for march, lanes in builds.items():
        flags = [f"-march={march}" if f == "-march=native" else f for f in cpu_kernel.CXX_FLAGS
                 if f not in ("-shared", "-fPIC", "-O3")]
        build = subprocess.run([gxx, "-O2", *flags, "-o", str(tmp_path / "check"), str(src)],
                               capture_output=True, text=True, timeout=600)
        assert build.returncode == 0, build.stderr[-3000:]
        run = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=600)
        said = run.stdout.split("\n")
        assert run.returncode == 0 and said[0] == "0", f"{march}: mismatches: {run.stdout.strip()}"
        assert lanes is None or said[1] == lanes, f"{march}: {run.stdout.strip()}"


def _cpu_has(isa: str) -> bool:
    """Whether the CPU runs ``isa`` code, as its CPUID says (PyTorch's cpuinfo; ``ATEN_CPU_CAPABILITY``
    and the other caps do not change it). Not ``/proc/cpuinfo``: under an emulator (``qemu-x86_64
    -cpu EPYC-Rome``, docs/reliability.md) that lists the host's flags, not the emulated CPU's."""
    return platform.machine() in ("x86_64", "AMD64") and bool(getattr(torch.cpu, f"_is_{isa}_supported")())


@cpu_only
@pytest.mark.parametrize("march,cpu_flag", [("x86-64-v3", "avx2"), ("x86-64-v4", "avx512")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_per_isa_matches_reference(march, cpu_flag, dtype):
    """The kernel built for AVX2 and for AVX-512 (where this CPU runs them): spikes bit-exact and
    gradients to the reference's, as the ``-march=native`` build."""
    _gxx()
    if not _cpu_has(cpu_flag):
        pytest.skip(f"this CPU lacks {cpu_flag}")
    lib = cpu_kernel.native_library(march).get()
    assert lib is not None, cpu_kernel.native_library(march).error
    for p in (LIFParams(detach_reset=False), LIFParams(tau=1.5, v_threshold=0.5, v_reset=-0.1)):
        x = _make_input((6, 2, 1030), dtype, p, seed=7)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
        xr = x.clone().requires_grad_(True)
        s_ref = lif_reference(xr, p)
        (gx_ref,) = torch.autograd.grad(s_ref, xr, g)
        assert torch.equal(cpu_kernel.kernel_forward(lib, x, p), s_ref)
        torch.testing.assert_close(cpu_kernel.kernel_backward(lib, x, g, p), gx_ref, **_grad_tol(dtype))


@cpu_only
def test_lif_backward_refuses_a_gradient_of_another_shape():
    """The kernel reads as many gradient elements as the current has; a smaller gradient was read
    past its end. The operator and its fake implementation raise a ``ValueError`` naming both shapes."""
    from spikingformer.kernels import ops

    x, short = torch.randn(4, 1000), torch.randn(4, 10)
    with pytest.raises(ValueError, match="current's shape \\(4, 1000\\); got \\(4, 10\\)"):
        ops.lif_backward_op(x, short, 2.0, 1.0, 0.0, 4.0, True)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(ValueError, match="current's shape"):
        ops.lif_backward_op(mode.from_tensor(x), mode.from_tensor(short), 2.0, 1.0, 0.0, 4.0, True)
