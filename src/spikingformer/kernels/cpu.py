"""Fused multi-step LIF for CPU tensors: a small C++ library compiled on first use.

The kernel walks the T-step recurrence for a block of elements at a time, so the membrane of a
block stays in L1 cache (vectorised over elements, AVX-512 where the CPU has it) and every input
and output element is touched exactly once. The block loop is parallelised with OpenMP; the
library links the ``libgomp.so.1`` that PyTorch has already loaded, so it shares PyTorch's thread
pool and honours ``torch.set_num_threads`` (DataLoader workers run it single-threaded, as PyTorch
sets one thread there).

Memory kept for backward: only the input ``x`` itself, in its own dtype (2 bytes per element for
bf16/fp16, 4 for fp32; nothing extra when the caller keeps ``x`` alive anyway). Backward recomputes
the charged membrane ``H`` block by block into a per-thread scratch buffer that fits in cache, then
walks the recurrence in reverse (see :mod:`spikingformer.kernels.torch_loop` for the formulas).

Forward arithmetic follows :func:`spikingformer.neuron.lif_reference` operation by operation
(``H = V + (X - (V - V_reset)) / tau`` with a true float32 division, ``S = (H - V_th) >= 0``,
``V = H * (1 - S) + V_reset * S``; no fast-math), so the spikes are bit-identical to it. The
surrogate derivative uses a polynomial ``exp`` accurate to about one float32 ulp.

Why not ``torch.utils.cpp_extension.load_inline``: the library needs no PyTorch headers (it works
on raw pointers handed over through :mod:`ctypes`), so one ``g++`` call builds it in about a
second instead of the tens of seconds that compiling against ``torch/extension.h`` takes, and
calling it costs no pybind11 dispatch.

The build happens on the first call (never at import), once per process
(:class:`spikingformer.native.NativeLibrary`); the shared object is cached in
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) under a name hashed from the
source, the compiler flags and the CPU. If it cannot be built (no compiler, ...)
:func:`lif_cpu` falls back to the ``"torch"`` backend with a single warning.
"""

from __future__ import annotations

import ctypes
import platform
import warnings
from pathlib import Path

import torch

from spikingformer.native import NativeLibrary
from spikingformer.neuron import LIFParams

_CPP_SOURCE = r"""
// Fused multi-step LIF (forward and backward) on time-first, contiguous (T, N) arrays.
#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>
#include <algorithm>

namespace {

constexpr int64_t kBlock = 256;   // elements per block: membrane + T-step scratch stay in L1/L2

// ---- dtype conversions (code 0: float32, 1: float16, 2: bfloat16) --------------------------
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const _Float16* p, int64_t i) { return (float)p[i]; }
inline float load_f(const uint16_t* p, int64_t i) {  // bfloat16 bits
  uint32_t u = ((uint32_t)p[i]) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline void store_f(float* p, int64_t i, float v) { p[i] = v; }
inline void store_f(_Float16* p, int64_t i, float v) { p[i] = (_Float16)v; }
inline void store_f(uint16_t* p, int64_t i, float v) {  // round to nearest even, as c10::BFloat16
  uint32_t u; std::memcpy(&u, &v, 4);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p[i] = (v != v) ? (uint16_t)0x7FC0u : (uint16_t)r;
}

// exp(x) for float32, Cephes-style range reduction + degree-6 polynomial (~1 ulp), vectorisable.
inline float exp_f(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  // round to nearest with the 1.5*2^23 trick (|x*log2e| < 2^22): vectorises without libm
  float n = std::fma(x, 1.44269504088896341f, 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r + 1.0f);
  int32_t e = ((int32_t)n + 127) << 23;
  float scale; std::memcpy(&scale, &e, 4);
  return p * scale;
}

// d/dz sigmoid(alpha z), computed like the reference: alpha * sig * (1 - sig).
inline float surrogate(float z, float alpha) {
  float sig = 1.0f / (1.0f + exp_f(-(alpha * z)));
  return alpha * sig * (1.0f - sig);
}

// The charge, operation for operation as lif_reference: H = V + (X - (V - V_reset)) / tau.
// When tau is a power of two, 1/tau is exact and "* inv_tau" rounds exactly as "/ tau" does;
// the library is compiled with -ffp-contract=off so "V + B * inv_tau" is never fused.
template <bool POW2>
inline float charge(float v, float x, float tau, float inv_tau, float vr) {
  return POW2 ? v + (x - (v - vr)) * inv_tau : v + (x - (v - vr)) / tau;
}

template <typename S, bool POW2>
void forward_block(const S* __restrict x, S* __restrict out, int64_t T, int64_t N, int64_t i0,
                   int64_t n, float tau, float inv_tau, float vth, float vr) {
  float v[kBlock];
  for (int64_t i = 0; i < n; ++i) v[i] = vr;
  for (int64_t t = 0; t < T; ++t) {
    const S* xt = x + t * N + i0;
    S* ot = out + t * N + i0;
    for (int64_t i = 0; i < n; ++i) {
      float h = charge<POW2>(v[i], load_f(xt, i), tau, inv_tau, vr);
      float s = ((h - vth) >= 0.0f) ? 1.0f : 0.0f;
      v[i] = h * (1.0f - s) + vr * s;
      store_f(ot, i, s);
    }
  }
}

template <typename S, bool POW2>
void backward_block(const S* __restrict x, const S* __restrict gs, S* __restrict gx, int64_t T,
                    int64_t N, int64_t i0, int64_t n, float tau, float inv_tau, float vth, float vr,
                    float alpha, bool detach, float* __restrict hbuf) {
  float v[kBlock];
  float gv[kBlock];
  for (int64_t i = 0; i < n; ++i) v[i] = vr;
  for (int64_t t = 0; t < T; ++t) {   // recompute H for this block
    const S* xt = x + t * N + i0;
    float* ht = hbuf + t * kBlock;
    for (int64_t i = 0; i < n; ++i) {
      float h = charge<POW2>(v[i], load_f(xt, i), tau, inv_tau, vr);
      float s = ((h - vth) >= 0.0f) ? 1.0f : 0.0f;
      v[i] = h * (1.0f - s) + vr * s;
      ht[i] = h;
    }
  }
  const float keep = detach ? 0.0f : 1.0f;  // gradient through the reset (detach_reset=False)
  for (int64_t i = 0; i < n; ++i) gv[i] = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* ht = hbuf + t * kBlock;
    const S* gst = gs + t * N + i0;
    S* gxt = gx + t * N + i0;
    for (int64_t i = 0; i < n; ++i) {
      float h = ht[i];
      float z = h - vth;
      float sg = surrogate(z, alpha);
      float not_spiked = (z >= 0.0f) ? 0.0f : 1.0f;
      float dvdh = std::fma(keep, (vr - h) * sg, not_spiked);
      float gh = std::fma(load_f(gst, i), sg, gv[i] * dvdh);
      float g = gh * inv_tau;  // gradients need not be bit-exact: multiply (1 ulp of 1/tau)
      gv[i] = gh - g;
      store_f(gxt, i, g);
    }
  }
}

// Below ~256k elements one thread is about as fast, and never waits on a descheduled worker.
inline int threads_for(int64_t work, int nthreads) {
  return (work >= (int64_t)1 << 18) ? std::max(1, nthreads) : 1;
}

template <typename S, bool POW2>
void forward_impl(const void* x, void* out, int64_t T, int64_t N, float tau, float inv_tau,
                  float vth, float vr, int nthreads) {
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const int nt = threads_for(T * N, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t i0 = b * kBlock;
    forward_block<S, POW2>((const S*)x, (S*)out, T, N, i0, std::min(kBlock, N - i0), tau, inv_tau,
                           vth, vr);
  }
}

template <typename S, bool POW2>
void backward_impl(const void* x, const void* gs, void* gx, int64_t T, int64_t N, float tau,
                   float inv_tau, float vth, float vr, float alpha, int detach, int nthreads) {
  const int64_t nblocks = (N + kBlock - 1) / kBlock;
  const int nt = threads_for(T * N, nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> hbuf((size_t)(T * kBlock));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t i0 = b * kBlock;
      backward_block<S, POW2>((const S*)x, (const S*)gs, (S*)gx, T, N, i0, std::min(kBlock, N - i0),
                              tau, inv_tau, vth, vr, alpha, detach != 0, hbuf.data());
    }
  }
}

}  // namespace

extern "C" {

int sf_lif_abi_version() { return 2; }

// 1/tau exactly representable (tau a power of two)?
static bool pow2_tau(float tau) { int e; return std::frexp(tau, &e) == 0.5f; }

// dtype: 0 float32, 1 float16, 2 bfloat16. Returns 0 on success, -1 for an unknown dtype.
int sf_lif_forward(const void* x, void* out, int64_t T, int64_t N, float tau, float vth,
                   float vr, int dtype, int nthreads) {
  const float inv = 1.0f / tau;
  const bool p2 = pow2_tau(tau);
#define SF_FWD(S) (p2 ? forward_impl<S, true>(x, out, T, N, tau, inv, vth, vr, nthreads) \
                      : forward_impl<S, false>(x, out, T, N, tau, inv, vth, vr, nthreads))
  switch (dtype) {
    case 0: SF_FWD(float); return 0;
    case 1: SF_FWD(_Float16); return 0;
    case 2: SF_FWD(uint16_t); return 0;
  }
  return -1;
}

int sf_lif_backward(const void* x, const void* gs, void* gx, int64_t T, int64_t N, float tau,
                    float vth, float vr, float alpha, int detach, int dtype, int nthreads) {
  const float inv = 1.0f / tau;
  const bool p2 = pow2_tau(tau);
#define SF_BWD(S) (p2 ? backward_impl<S, true>(x, gs, gx, T, N, tau, inv, vth, vr, alpha, detach, nthreads) \
                      : backward_impl<S, false>(x, gs, gx, T, N, tau, inv, vth, vr, alpha, detach, nthreads))
  switch (dtype) {
    case 0: SF_BWD(float); return 0;
    case 1: SF_BWD(_Float16); return 0;
    case 2: SF_BWD(uint16_t); return 0;
  }
  return -1;
}

}  // extern "C"
"""

# -O3 vectorises the element loops; no -ffast-math (it would change the forward's rounding and
# flush denormals); -ffp-contract=off so only the explicit std::fma calls fuse (the forward's
# rounding must be the reference's); -fno-math-errno lets std::fma/frexp vectorise/inline.
_CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_warned = False


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


LIBRARY = NativeLibrary("spikingformer_lif_cpu", lambda: _CPP_SOURCE, _CXX_FLAGS, key=_cpu_signature, declare=_declare)


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
    global _warned
    LIBRARY.reset()
    _warned = False


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """Contiguous, in a dtype the kernel handles (other floats go through float32, as the reference)."""
    if x.dtype not in _DTYPE_CODES:
        x = x.float()
    return x.contiguous()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _forward(lib: ctypes.CDLL, x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    xk = _as_kernel_input(x)
    out = torch.empty_like(xk, memory_format=torch.contiguous_format)
    T = xk.shape[0]
    N = xk.numel() // T if T else 0
    if xk.numel():
        rc = lib.sf_lif_forward(
            _ptr(xk), _ptr(out), T, N, p.tau, p.v_threshold, p.v_reset,
            _DTYPE_CODES[xk.dtype], torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"sf_lif_forward failed with code {rc}")
    return out.to(x.dtype)


def _backward(lib: ctypes.CDLL, x: torch.Tensor, grad_spikes: torch.Tensor, p: LIFParams) -> torch.Tensor:
    xk = _as_kernel_input(x)
    gk = grad_spikes.to(xk.dtype).contiguous()
    gx = torch.empty_like(xk, memory_format=torch.contiguous_format)
    T = xk.shape[0]
    N = xk.numel() // T if T else 0
    if xk.numel():
        rc = lib.sf_lif_backward(
            _ptr(xk), _ptr(gk), _ptr(gx), T, N, p.tau, p.v_threshold, p.v_reset, p.alpha,
            int(p.detach_reset), _DTYPE_CODES[xk.dtype], torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"sf_lif_backward failed with code {rc}")
    return gx.to(x.dtype)


class CPUFusedLIF(torch.autograd.Function):
    """Fused LIF on CPU; saves only ``x`` (own dtype) and recomputes ``H`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: LIFParams, lib: ctypes.CDLL) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.p = p
        ctx.lib = lib
        return _forward(lib, x, p)

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _backward(ctx.lib, x, grad_spikes, ctx.p), None, None


def _warn_fallback() -> None:
    global _warned
    if not _warned:
        _warned = True
        reason = ((LIBRARY.error or "unknown error").splitlines() or ["unknown error"])[0][:300]
        warnings.warn(
            f"spikingformer: fused CPU LIF kernel unavailable ({reason}); falling back to the 'torch' backend",
            RuntimeWarning,
            stacklevel=3,
        )


def lif_cpu(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Multi-step LIF with the fused CPU kernel (backend ``"cpu"``).

    Falls back to the ``"torch"`` backend, warning once, when the kernel cannot be built or the
    tensor is not on the CPU.
    """
    if x.device.type == "cpu":
        lib = get_library()
        if lib is not None:
            return CPUFusedLIF.apply(x, p, lib)
        _warn_fallback()
    from spikingformer.kernels.torch_loop import lif_torch_loop

    return lif_torch_loop(x, p)
