"""Fused multi-step LIF for CPU tensors: a small C++ library (``csrc/lif_cpu.cpp``) compiled on first use.

The kernel walks the T-step recurrence for a block of elements at a time, so the membrane of a
block stays in L1 cache and every input and output element is touched exactly once. Its element
loops are branch-free, so the compiler vectorises them on every x86-64 ISA (SSE2, AVX2, AVX-512;
``tests/test_kernels.py`` checks the vectoriser's report for AVX2 and AVX-512 builds). The block
loop is parallelised with OpenMP; the library links the ``libgomp.so.1`` that PyTorch has already
loaded, so it shares PyTorch's thread pool and honours ``torch.set_num_threads`` (DataLoader
workers run it single-threaded, as PyTorch sets one thread there).

Memory kept for backward: only the input ``x`` itself, in its own dtype. Backward recomputes the
charged membrane ``H`` block by block into a per-thread scratch buffer that fits in cache, then
walks the recurrence in reverse (see :mod:`spikingformer.kernels.torch_backend` for the formulas).

Forward arithmetic follows :func:`spikingformer.neuron.lif_reference` operation by operation
(``H = V + (X - (V - V_reset)) / tau`` with a true float32 division, ``S = (H - V_th) >= 0``,
``V = H * (1 - S) + V_reset * S``; no fast-math, no FMA contraction), so the spikes are
bit-identical to it. The surrogate derivative uses a polynomial ``exp`` accurate to about one
float32 ulp.

The library needs no PyTorch headers (it works on raw pointers handed over through
:mod:`ctypes`), so ``g++`` builds it directly: its four parts at once, then a link (median 21 s on
a 2-core Xeon, against 32 s as one translation unit: ``benchmarks/bench_build.py``);
:class:`spikingformer.native.NativeLibrary` builds it on the first call (never at import), once per process, and caches it by source, flags
and CPU. If it cannot be built (no compiler, ...) the operator falls back to the ``"torch"``
backend's arithmetic with a single warning. Autograd, ``torch.compile`` and ``torch.export`` reach
the kernel through the ``spikingformer::lif`` operator (:mod:`spikingformer.kernels.ops`).
"""

from __future__ import annotations

import ctypes
import functools
import platform
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from spikingformer.kernels.params import LIFParams
from spikingformer.kernels.torch_backend import lif_backward, lif_forward, lif_torch_loop
from spikingformer.native import NativeLibrary

SOURCE_FILE = "csrc/lif_cpu.cpp"
# The library is one source: the LIF kernel, the max-pool's windows, BN's backward sums, the tokenizer's
# fused SN -> max-pool (using the LIF step and surrogate, the windows and the sums), the spike linears,
# the spike convolution's helpers, spike attention and Winograd's transforms, compiled as PARTS
# translation units at once (SF_IN_PART in csrc/lif_cpu.cpp): 0 the LIF kernel, BN's sums, the spike
# linears, convolutions and attention, 1 the fused SN -> max-pool's forward and Winograd's transforms,
# 2 and 3 its backward after a max-pool and without one (about 11 s and 7 s of 31 s on a 2-core Xeon).
SOURCE_FILES = (SOURCE_FILE, "csrc/pool_windows_cpu.cpp", "csrc/bn_cpu.cpp", "csrc/lif_lanes_cpu.cpp",
                "csrc/lif_pool_cpu.cpp", "csrc/lif_pool_api_cpu.cpp", "csrc/spike_linear_cpu.cpp",
                "csrc/spike_conv_cpu.cpp", "csrc/attention_cpu.cpp", "csrc/winograd_cpu.cpp")
PARTS = 4

# -O3 vectorises the element loops; no -ffast-math (it would change the forward's rounding and
# flush denormals); -ffp-contract=off so only the explicit std::fma calls fuse (the forward's
# rounding must be the reference's); -fno-math-errno lets std::fma/frexp inline.
# OpenMP's flag is added where the compiler has it (NativeLibrary's openmp).
CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c++17"]
if platform.machine() in ("x86_64", "AMD64"):
    # g++'s tuning for some AVX-512 CPUs (e.g. -march=native on Cooper Lake) prefers 256-bit vectors,
    # which made the backward about 1.5x slower than the generic x86-64-v4 build; no effect without AVX-512.
    CXX_FLAGS.append("-mprefer-vector-width=512")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAP_DTYPES = (torch.float32, torch.bfloat16)  # the tokenizer kernel's (csrc/lif_pool_cpu.cpp)

def source() -> str:
    """The library's C++ source (the files of :data:`SOURCE_FILES`, in order), shipped with the package."""
    package = resources.files("spikingformer")
    return "\n".join(package.joinpath(name).read_text() for name in SOURCE_FILES)


def _cpu_signature() -> str:
    """The CPU model and flags: the library is built with -march=native, so it is per-CPU."""
    info = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        picked = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        info += "|".join(picked)
    except OSError:
        pass
    return info


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ci, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
    lib.sf_lif_forward.argtypes = [vp, vp, i64, i64, f32, f32, f32, ci, ci]
    lib.sf_lif_forward.restype = ci
    lib.sf_lif_backward.argtypes = [vp, vp, vp, i64, i64, f32, f32, f32, f32, ci, ci, ci]
    lib.sf_lif_backward.restype = ci
    lib.sf_lif_pool_forward.argtypes = [vp, vp, i64, i64, i64, i64, i64, vp, vp, vp, vp, ci, ci, ci, f32, f32, f32, ci]
    lib.sf_lif_pool_forward.restype = ci
    lib.sf_lif_pool_backward.argtypes = [vp, vp, vp, i64, i64, i64, i64, i64, vp, vp, vp, vp, ci, ci, ci, f32, f32, f32,
                                         f32, ci, vp, ci]
    lib.sf_lif_pool_backward.restype = ci
    lib.sf_bn_backward_apply.argtypes = [vp, vp, vp, i64, i64, vp, vp, vp, vp, ci, ci]
    lib.sf_bn_backward_apply.restype = ci
    lib.sf_bn_batch_stats.argtypes = [vp, i64, i64, i64, ci, f32, vp, vp, vp, vp, ci, ci]
    lib.sf_bn_batch_stats.restype = ci
    lib.sf_lif_pool_has_fma.argtypes = []
    lib.sf_lif_pool_has_fma.restype = ci
    lib.sf_spike_gather.argtypes = [vp, i64, i64, ci, vp, vp, vp, ci]
    lib.sf_spike_gather.restype = i64
    lib.sf_spike_gather_packed.argtypes = [vp, i64, i64, vp, vp, ci]
    lib.sf_spike_gather_packed.restype = i64
    lib.sf_spike_window_lists.argtypes = [vp, vp, i64, i64, i64, i64, i64, i64, vp, vp, ci]
    lib.sf_spike_window_lists.restype = ci
    lib.sf_spike_pack.argtypes = [vp, i64, i64, ci, vp, ci]
    lib.sf_spike_pack.restype = ci
    lib.sf_spike_unpack.argtypes = [vp, i64, i64, vp, ci, ci]
    lib.sf_spike_unpack.restype = ci
    lib.sf_spike_to_u8.argtypes = [vp, i64, vp, ci]
    lib.sf_spike_to_u8.restype = ci
    lib.sf_spike_linear_forward.argtypes = [vp, vp, i64, i64, vp, vp, i64, vp, vp, ci, ci]
    lib.sf_spike_linear_forward.restype = ci
    lib.sf_spike_linear_weight_grad.argtypes = [vp, vp, i64, i64, vp, i64, vp, vp, vp, ci, ci]
    lib.sf_spike_linear_weight_grad.restype = ci
    lib.sf_spike_attention.argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, ci, f32, ci]
    lib.sf_spike_attention.restype = ci
    lib.sf_spike_attention_backward.argtypes = [vp, vp, vp, vp, vp, vp, vp, i64, i64, i64, i64, ci, f32, ci]
    lib.sf_spike_attention_backward.restype = ci
    lib.sf_winograd_input.argtypes = lib.sf_winograd_grad_tiles.argtypes = [vp, vp, i64, i64, i64, i64, ci, ci]
    lib.sf_winograd_input.restype = lib.sf_winograd_grad_tiles.restype = ci
    lib.sf_winograd_output.argtypes = [vp, vp, vp, i64, i64, i64, i64, ci, ci]
    lib.sf_winograd_output.restype = ci


def native_library(march: str = "native") -> NativeLibrary:
    """The kernel library built with ``-march=<march>`` (the package uses ``native``; benchmarks
    and the vectoriser test build other ISAs, e.g. ``x86-64-v3`` for AVX2)."""
    flags = [f if f != "-march=native" else f"-march={march}" for f in CXX_FLAGS]
    return NativeLibrary("spikingformer_lif_cpu", source, flags, key=_cpu_signature, declare=_declare, parts=PARTS,
                         openmp=True)


LIBRARY = native_library()


def library_path() -> Path:
    """Where the compiled library for this source, compiler flags and CPU lives (or will)."""
    return LIBRARY.path()


def get_library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; ``None`` if it cannot be built."""
    return LIBRARY.get()


def is_available() -> bool:
    """True when the fused CPU kernel is (or can be) built and loaded in this process."""
    return get_library() is not None


def build_error() -> str | None:
    """Why the library could not be built, or ``None``."""
    return LIBRARY.error


def _reset_for_tests() -> None:
    """Forget the loaded library and any build failure (tests force rebuild/failure paths)."""
    LIBRARY.reset()


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """Contiguous, in a dtype the kernel handles (other floats go through float32, as the reference)."""
    if x.dtype not in DTYPE_CODES:
        x = x.float()
    return x.contiguous()


def _time_and_rest(x: torch.Tensor) -> tuple[int, int]:
    T = x.shape[0]
    return T, (x.numel() // T if T else 0)


def kernel_forward(lib: ctypes.CDLL, x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Spikes of ``x`` (time-first, any layout) in x's dtype, computed by ``lib``; no autograd."""
    xk = _as_kernel_input(x)
    out = torch.empty_like(xk, memory_format=torch.contiguous_format)
    T, N = _time_and_rest(xk)
    if xk.numel():
        rc = lib.sf_lif_forward(xk.data_ptr(), out.data_ptr(), T, N, p.tau, p.v_threshold, p.v_reset,
                                DTYPE_CODES[xk.dtype], torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"sf_lif_forward failed with code {rc}")
    return out.to(x.dtype)


def kernel_backward(lib: ctypes.CDLL, x: torch.Tensor, grad_spikes: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Gradient of the spikes with respect to ``x`` (in x's dtype), computed by ``lib``."""
    xk = _as_kernel_input(x)
    gk = grad_spikes.to(xk.dtype).contiguous()
    gx = torch.empty_like(xk, memory_format=torch.contiguous_format)
    T, N = _time_and_rest(xk)
    if xk.numel():
        rc = lib.sf_lif_backward(xk.data_ptr(), gk.data_ptr(), gx.data_ptr(), T, N, p.tau, p.v_threshold,
                                 p.v_reset, p.alpha, int(p.detach_reset), DTYPE_CODES[xk.dtype],
                                 torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"sf_lif_backward failed with code {rc}")
    return gx.to(x.dtype)


def forward(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """The ``spikingformer::lif`` operator's CPU forward: the fused kernel, else the torch loop (the build warns once)."""
    lib = get_library()
    if lib is not None:
        return kernel_forward(lib, x, p)
    return lif_forward(x, p)[0]  # the library said why, once


def check_grad(x: torch.Tensor, grad_spikes: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless the spikes' gradient has x's shape (the kernel reads x's size)."""
    if grad_spikes.shape != x.shape:
        raise ValueError(f"the gradient of the spikes needs the current's shape {tuple(x.shape)}; "
                         f"got {tuple(grad_spikes.shape)}")


def backward(x: torch.Tensor, grad_spikes: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """The operator's CPU backward: the fused kernel, else the torch loop's recomputation and backward."""
    check_grad(x, grad_spikes)
    lib = get_library()
    if lib is not None:
        return kernel_backward(lib, x, grad_spikes, p)
    return lif_backward(grad_spikes, lif_forward(x, p)[1], p).to(x.dtype)



# ----------------------------------------------------------------------------- SN -> max-pool


def pooled_shape(x: torch.Tensor) -> tuple[int, ...]:
    """``(T, B, H, W, C)`` -> the shape after MaxPool2d(3, stride 2, padding 1): ``(T, B, Ho, Wo, C)``."""
    t, b, h, w, c = x.shape
    return t, b, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c


@functools.cache
def bn_rounding() -> str | None:
    """How PyTorch's CPU BatchNorm kernel in use rounds ``shift = bias - mean * scale`` and its output
    ``x * scale + shift`` (``scale = invstd * weight``): ``"fused"``, once each (its builds for x86
    with FMA, and for AArch64), ``"unfused"``, twice each, or ``None`` where a probe matches neither
    (then the fused kernels leave BatchNorm to PyTorch). Asked of PyTorch once per process, on small
    channels-last maps and token rows, in inference and in training."""
    g = torch.Generator().manual_seed(0)
    found = set()
    for shape in ((6, 8, 5, 7), (40, 8)):
        x = (torch.randn(shape, generator=g) * 3 + 0.5).contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)
        c, view = shape[1], (1, shape[1]) + (1,) * (len(shape) - 2)
        weight, bias = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) - 0.5
        mean, var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            inference = nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, 1e-5)
            training = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, 1e-5)
        for out, centre, invstd in ((inference, mean, bn_invstd(var, 1e-5, batch=False)), training):
            scale, centre, b = (invstd * weight).view(view), centre.view(view), bias.view(view)
            s = scale.double()  # float32 products are exact in float64: one rounding each below
            shift = (b.double() - centre.double() * s).float()
            fused = torch.equal(out, (x.double() * s + shift.double()).float())
            unfused = torch.equal(out, x * scale + (b - centre * scale))
            found.add("fused" if fused and not unfused else "unfused" if unfused and not fused else None)
    return found.pop() if len(found) == 1 else None


def bn_fuses_multiply_add() -> bool:
    """Whether PyTorch's CPU BatchNorm kernel in use rounds ``x * scale + shift`` once (:func:`bn_rounding`)."""
    return bn_rounding() == "fused"


@torch.compiler.assume_constant_result  # fixed for the process: the compiler evaluates it once
def kernel_reproduces_bn() -> bool:
    """Whether the library is built and computes BatchNorm's output with the rounding of PyTorch's
    CPU kernel in use: a build without FMA (e.g. ``SPIKINGFORMER_NATIVE_ARCH=x86-64``) cannot where
    PyTorch's kernel fuses its multiply-adds (:func:`bn_fuses_multiply_add`)."""
    lib, rounding = get_library(), bn_rounding()
    return lib is not None and rounding is not None and (rounding == "unfused" or bool(lib.sf_lif_pool_has_fma()))


def bn_invstd(var: torch.Tensor, eps: float, batch: bool) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` (float32) as PyTorch's CPU BatchNorm forms it: from a batch's biased
    variance in float64, then rounded (its training ``save_invstd``); from running statistics in
    float32 (its inference terms), asked of PyTorch's kernel itself: on some CPUs (an AMD EPYC, Zen 5)
    it is 1 ulp off the rounded quotient of the rounded square root in about a third of the channels.
    Its output for an input of ones with mean 0, weight 1 and bias 0 is that ``invstd``, unrounded."""
    if batch:
        return (1.0 / torch.sqrt(var.detach().double() + eps)).float()
    v = var.detach().float()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return torch.batch_norm(v.new_ones(1, v.numel()), None, None, torch.zeros_like(v), v, False, 0.0, eps, False)[0]


def kernel_lif_pool_forward(lib: ctypes.CDLL, x: torch.Tensor, p: LIFParams, pool: bool,
                            bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
                            batch: bool = False) -> torch.Tensor:
    """[BN ->] SN [-> max-pool] of channels-last maps ``x`` ``(T, B, H, W, C)`` by ``lib``, the spikes
    in x's dtype (float32 or bfloat16, :data:`MAP_DTYPES`: the kernel reads and writes the dtype as
    PyTorch stores it, and computes in float32, as the LIF kernel).

    ``bn``: ``(mean, var, weight, bias, eps)`` of a BatchNorm applied first, computed as PyTorch's
    CPU kernel computes it (:func:`bn_fuses_multiply_add`; for bfloat16 maps in float32 and rounded
    to bfloat16, as PyTorch's mixed-precision kernel does): its running statistics (inference), or
    with ``batch`` the batch statistics of ``x`` (training; ``torch.batch_norm_update_stats``).
    """
    xk = x.contiguous()
    out = xk.new_empty(pooled_shape(xk) if pool else xk.shape)
    terms = []
    if bn is not None:
        mean, var, weight, bias, eps = bn
        terms = [t.detach().float().contiguous() for t in (mean, bn_invstd(var, eps, batch), weight, bias)]
    ptrs = [t.data_ptr() for t in terms] or [None] * 4
    rc = lib.sf_lif_pool_forward(xk.data_ptr(), out.data_ptr(), *xk.shape, *ptrs, int(bn_fuses_multiply_add()),
                                 int(pool), DTYPE_CODES[xk.dtype], p.tau, p.v_threshold, p.v_reset,
                                 torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"sf_lif_pool_forward failed with code {rc} for maps of shape {tuple(x.shape)}")
    return out


def kernel_lif_pool_backward(lib: ctypes.CDLL, z: torch.Tensor, grad_pooled: torch.Tensor, p: LIFParams,
                             bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                             pool: bool = True, sums: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient with respect to the LIF input of max-pool(SN(.)) (``pool``) or SN(.) of channels-last
    maps ``(T, B, H, W, C)``, given the gradient of its output, by ``lib``, in z's dtype (as
    :func:`kernel_lif_pool_forward`). The LIF input is ``z``, or with ``bn`` = ``(save_mean,
    save_invstd, weight, bias)`` of a training BatchNorm, that BN's output of ``z``, computed again
    as PyTorch's CPU kernel computed it; then ``sums`` (``(2, C)`` float64, if given) receives BN's
    backward reductions, per channel: the sum of the returned gradient, and of it times ``z - mean``."""
    zk, gk = z.contiguous(), grad_pooled.to(z.dtype).contiguous()
    gz = torch.empty_like(zk)
    terms = [t.detach().float().contiguous() for t in bn] if bn is not None else []
    ptrs = [t.data_ptr() for t in terms] or [None] * 4
    rc = lib.sf_lif_pool_backward(zk.data_ptr(), gk.data_ptr(), gz.data_ptr(), *zk.shape, *ptrs,
                                  int(bn_fuses_multiply_add()), int(pool), DTYPE_CODES[zk.dtype], p.tau, p.v_threshold,
                                  p.v_reset, p.alpha, int(p.detach_reset),
                                  sums.data_ptr() if sums is not None else None, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"sf_lif_pool_backward failed with code {rc} for maps of shape {tuple(z.shape)}")
    return gz


def bn_lif_pool_backward(z: torch.Tensor, grad_pooled: torch.Tensor, p: LIFParams,
                         bn: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], pool: bool, eps: float,
                         needs: tuple[bool, bool, bool] = (True, True, True),
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(z, weight, bias)`` (each ``None`` unless ``needs`` says so) of max-pool(SN(BN(z)))
    (``pool``) or SN(BN(z)) for channels-last maps ``z`` ``(T, B, H, W, C)`` and a training BatchNorm
    with ``bn`` = ``(save_mean, save_invstd, weight, bias)``. The kernel: the LIF backward and BN's
    two reductions in one pass over the maps (:func:`kernel_lif_pool_backward`), then BN's input
    gradient in one more (``sf_bn_backward_apply``), written over the first pass's gradient (one
    map-size buffer, not two): PyTorch's BN backward formulas, its reductions
    summed in another order (float partial sums per row, float64 across rows), so equal to its
    gradients to rounding. Else :func:`lif_pool_backward`, then ``native_batch_norm_backward``."""
    check_maps(z, pool, bn, grad_pooled)
    mean, invstd, weight, _ = bn
    lib = get_library()
    if lib is None or z.dtype not in MAP_DTYPES or not kernel_reproduces_bn():
        def images(maps):  # (T x B, C, H, W), channels-last: the layout of PyTorch's mixed-dtype kernel
            return maps.permute(0, 1, 4, 2, 3).flatten(0, 1)

        gz = lif_pool_backward(z, grad_pooled, p, bn, pool).to(z.dtype)  # BN output's gradient, as it was stored
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(images(gz), images(z), weight, None, None, mean, invstd,
                                                               True, eps, list(needs))
        return (gx.unflatten(0, z.shape[:2]).permute(0, 1, 3, 4, 2) if gx is not None else None), gw, gb
    sums = torch.empty(2, z.shape[-1], dtype=torch.float64)
    zk = z.contiguous()
    gz = kernel_lif_pool_backward(lib, zk, grad_pooled, p, bn, pool, sums)
    gx = None
    if needs[0]:
        gx = gz  # written in place: the kernel's gradient is ours, and each element is read before it is written
        terms = [t.detach().float().contiguous() for t in (mean, invstd, weight)]
        rc = lib.sf_bn_backward_apply(zk.data_ptr(), gz.data_ptr(), gz.data_ptr(), zk.numel() // zk.shape[-1],
                                      zk.shape[-1], *(t.data_ptr() for t in terms), sums.data_ptr(),
                                      DTYPE_CODES[zk.dtype], torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"sf_bn_backward_apply failed with code {rc} for maps of shape {tuple(z.shape)}")
    gw = (sums[1] * invstd.double()).float() if needs[1] else None
    gb = sums[0].float() if needs[2] else None
    return gx, gw, gb


def lif_pool_plain(x: torch.Tensor, p: LIFParams, pool: bool, bn=None, batch: bool = False) -> torch.Tensor:
    """What :func:`kernel_lif_pool_forward` computes, with PyTorch's own BatchNorm and max-pool and
    the torch loop's LIF: the fallback where the library cannot be built. With ``batch``, BN computes
    the batch statistics of ``x`` again (the ones given)."""
    maps = x.permute(0, 1, 4, 2, 3)  # (T, B, C, H, W) with channels-last strides
    if bn is not None:
        mean, var, weight, bias, eps = bn
        stats = (None, None) if batch else (mean, var)
        flat = nn.functional.batch_norm(maps.flatten(0, 1), *stats, weight, bias, batch, 0.0, eps)
        maps = flat.view(maps.shape)
    spikes = lif_torch_loop(maps, p)
    if pool:
        flat = nn.functional.max_pool2d(spikes.flatten(0, 1), kernel_size=3, stride=2, padding=1)
        spikes = flat.view(*spikes.shape[:3], *flat.shape[-2:])
    return spikes.permute(0, 1, 3, 4, 2).contiguous()


def check_maps(x: torch.Tensor, pool: bool, bn=None, grad: torch.Tensor | None = None) -> None:
    """Raise a ``ValueError`` naming the problem unless ``x`` is maps ``(T, B, H, W, C)``, ``bn``'s
    statistics and parameters have ``C`` elements each, and ``grad`` has the output's shape (pooled
    with ``pool``): the kernels take their sizes from ``x`` and would read past the others."""
    if x.dim() != 5:
        raise ValueError(f"SN -> max-pool takes channels-last maps (T, B, H, W, C); got shape {tuple(x.shape)}")
    if bn is not None and any(t.numel() != x.shape[-1] for t in bn[:4]):
        raise ValueError(f"BatchNorm statistics and parameters need {x.shape[-1]} elements each (one per channel); "
                         f"got {[t.numel() for t in bn[:4]]}")
    want = pooled_shape(x) if pool else tuple(x.shape)
    if grad is not None and tuple(grad.shape) != want:
        raise ValueError(f"the gradient of the spikes of maps {tuple(x.shape)} has shape {want}; got {tuple(grad.shape)}")


def lif_pool_forward(x: torch.Tensor, p: LIFParams, pool: bool, bn=None, batch: bool = False) -> torch.Tensor:
    """[BN ->] SN [-> max-pool] of channels-last maps ``(T, B, H, W, C)``: the kernel, else :func:`lif_pool_plain`."""
    check_maps(x, pool, bn)
    lib = get_library()
    if lib is None or x.dtype not in MAP_DTYPES or (bn is not None and not kernel_reproduces_bn()):
        with torch.no_grad():
            return lif_pool_plain(x, p, pool, bn, batch)
    return kernel_lif_pool_forward(lib, x, p, pool, bn, batch)


def lif_pool_backward(z: torch.Tensor, grad_pooled: torch.Tensor, p: LIFParams, bn=None, pool: bool = True,
                      ) -> torch.Tensor:
    """Gradient of max-pool(SN(.)) (or SN(.) without ``pool``) with respect to its input, ``z`` or a
    training BN's output of ``z`` (:func:`kernel_lif_pool_backward`): the kernel, else the backward
    of :func:`lif_pool_plain` in explicit steps, the ones its autograd takes (the torch loop's LIF
    backward, PyTorch's max-pool backward), so that it also runs inside an operator, below
    autograd (there the BN's output is ``z * scale + shift``, to float32 rounding of PyTorch's)."""
    check_maps(z, pool, bn, grad_pooled)
    lib = get_library()
    if lib is not None and z.dtype in MAP_DTYPES and (bn is None or kernel_reproduces_bn()):
        return kernel_lif_pool_backward(lib, z, grad_pooled, p, bn, pool)
    if bn is not None:
        mean, invstd, weight, bias = bn
        scale = invstd * weight
        z = z * scale + (bias - mean * scale)
    maps = z.detach().permute(0, 1, 4, 2, 3)  # (T, B, C, H, W) with channels-last strides
    spikes, h_all = lif_forward(maps, p)
    grad = grad_pooled.permute(0, 1, 4, 2, 3).to(spikes.dtype)  # as autograd casts it to its output's
    if pool:
        flat = spikes.flatten(0, 1)
        _, idx = torch.ops.aten.max_pool2d_with_indices(flat, [3, 3], [2, 2], [1, 1])
        grad = torch.ops.aten.max_pool2d_with_indices_backward(grad.flatten(0, 1), flat, [3, 3], [2, 2], [1, 1],
                                                               [1, 1], False, idx).view(spikes.shape)
    gz = lif_backward(grad, h_all, p).to(z.dtype)
    return gz.permute(0, 1, 3, 4, 2).contiguous()
