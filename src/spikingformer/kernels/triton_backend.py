"""Fused multi-step LIF in Triton (backend ``"triton"``), for CUDA tensors.

One program handles a block of ``BLOCK`` elements and loops over the T time steps inside the
kernel, with the membrane in registers; loads and stores are in the input's dtype, the maths in
float32. As the CPU kernel, forward saves only the input ``x`` (its own dtype) for backward;
the backward kernel recomputes the charged membrane ``H`` into a transient float32 scratch buffer
(freed when backward returns, never held between forward and backward), then walks the
recurrence in reverse (formulas in :mod:`spikingformer.kernels.torch_backend`).

Bit-exact spikes: the charge ``H = V + (X - (V - V_reset)) / tau`` must round exactly as the
reference's separate tensor ops do on the same device. PyTorch's CUDA kernels divide a tensor by a
Python scalar as ``a * (1 / b)`` (the reciprocal rounded to float32), its CPU kernels with a true
division, so the kernel multiplies by the float32 reciprocal on GPUs and divides on the CPU
(Triton's interpreter), and it is compiled with ``enable_fp_fusion=False`` so ``V + B * inv_tau``
is not contracted into an FMA.

Runs on CPU tensors under Triton's interpreter: set ``TRITON_INTERPRET=1`` in the environment
before this module is imported (``@triton.jit`` decides at decoration time whether it builds an
interpreted function; in Triton 3.x the flag is ``triton.knobs.runtime.interpret``).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from spikingformer.kernels.params import LIFParams

BLOCK = 1024
NUM_WARPS = 4
#: Whether the kernels below were decorated as interpreted functions (decided once, at import).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


@triton.jit
def _lif_step(x, v, tau, inv_tau, v_th, v_reset, RECIP: tl.constexpr):
    """One time step on float32 blocks: charge, fire, hard reset. Returns (H, S, V)."""
    b = x - (v - v_reset)
    if RECIP:
        c = b * inv_tau
    else:
        c = b / tau
    h = v + c
    s = ((h - v_th) >= 0.0).to(tl.float32)
    return h, s, h * (1.0 - s) + v_reset * s


@triton.jit
def _lif_fwd_kernel(
    x_ptr, s_ptr, T, N, tau, inv_tau, v_th, v_reset,
    RECIP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.full((BLOCK,), 0.0, tl.float32) + v_reset
    x_ptrs = x_ptr + offs
    s_ptrs = s_ptr + offs
    for _t in range(T):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        h, s, v = _lif_step(x, v, tau, inv_tau, v_th, v_reset, RECIP)
        tl.store(s_ptrs, s.to(s_ptr.dtype.element_ty), mask=mask)
        x_ptrs += N
        s_ptrs += N


@triton.jit
def _lif_bwd_kernel(
    x_ptr, gs_ptr, gx_ptr, h_ptr, T, N, tau, inv_tau, v_th, v_reset, alpha,
    DETACH: tl.constexpr, RECIP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    # 1) recompute the charged membrane H[t] into the scratch buffer
    v = tl.full((BLOCK,), 0.0, tl.float32) + v_reset
    x_ptrs = x_ptr + offs
    h_ptrs = h_ptr + offs
    for _t in range(T):
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        h, s, v = _lif_step(x, v, tau, inv_tau, v_th, v_reset, RECIP)
        tl.store(h_ptrs, h, mask=mask)
        x_ptrs += N
        h_ptrs += N
    # 2) reverse walk: dL/dH[t] = gS[t] sg'(H[t]-V_th) + gV[t] dV[t]/dH[t]
    gv = tl.zeros((BLOCK,), tl.float32)
    for i in range(T):
        t = T - 1 - i
        base = t.to(tl.int64) * N + offs
        h = tl.load(h_ptr + base, mask=mask, other=0.0)
        z = h - v_th
        sig = tl.sigmoid(alpha * z)
        sg = alpha * sig * (1.0 - sig)
        not_spiked = tl.where(z >= 0.0, 0.0, 1.0)
        if DETACH:
            dvdh = not_spiked
        else:
            dvdh = not_spiked + (v_reset - h) * sg
        g = tl.load(gs_ptr + base, mask=mask, other=0.0).to(tl.float32)
        gh = g * sg + gv * dvdh
        if RECIP:
            gx = gh * inv_tau
        else:
            gx = gh / tau
        gv = gh - gx
        tl.store(gx_ptr + base, gx.to(gx_ptr.dtype.element_ty), mask=mask)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    xk = x if x.dtype in _KERNEL_DTYPES else x.float()
    xk = xk.contiguous()
    T = xk.shape[0]
    N = xk.numel() // T if T else 0
    return xk, T, N


@functools.lru_cache(maxsize=64)
def _tau_scalars(tau: float) -> tuple[float, float]:
    """tau and float32(1 / float32(tau)) -- the reciprocal exactly as PyTorch's CUDA division forms it."""
    tau32 = torch.tensor(tau, dtype=torch.float32)
    inv_tau = float(torch.tensor(1.0, dtype=torch.float32) / tau32)
    return float(tau32), inv_tau


def _scalars(p: LIFParams) -> tuple[float, float]:
    return _tau_scalars(p.tau)


def _launch_options(x: torch.Tensor) -> dict:
    # Compiler options are not accepted by the interpreter; on GPUs forbid FMA contraction.
    return {} if x.device.type == "cpu" else {"enable_fp_fusion": False, "num_warps": NUM_WARPS}


def triton_forward(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Spikes of ``x`` (time-first) in x's dtype."""
    xk, T, N = _prepare(x)
    out = torch.empty_like(xk)
    if xk.numel():
        tau, inv_tau = _scalars(p)
        grid = (triton.cdiv(N, BLOCK),)
        with torch.cuda.device(xk.device) if xk.is_cuda else nullcontext():
            _lif_fwd_kernel[grid](
                xk, out, T, N, tau, inv_tau, p.v_threshold, p.v_reset,
                RECIP=xk.is_cuda, BLOCK=BLOCK, **_launch_options(xk),
            )
    return out.to(x.dtype)


def triton_backward(x: torch.Tensor, grad_spikes: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Gradient of the spikes with respect to ``x``, in x's dtype."""
    xk, T, N = _prepare(x)
    gs = grad_spikes.to(xk.dtype).contiguous()
    gx = torch.empty_like(xk)
    if xk.numel():
        h_scratch = torch.empty(xk.shape, dtype=torch.float32, device=xk.device)
        tau, inv_tau = _scalars(p)
        grid = (triton.cdiv(N, BLOCK),)
        with torch.cuda.device(xk.device) if xk.is_cuda else nullcontext():
            _lif_bwd_kernel[grid](
                xk, gs, gx, h_scratch, T, N, tau, inv_tau, p.v_threshold, p.v_reset, p.alpha,
                DETACH=p.detach_reset, RECIP=xk.is_cuda, BLOCK=BLOCK, **_launch_options(xk),
            )
    return gx.to(x.dtype)


class TritonLIF(torch.autograd.Function):
    """Fused LIF in Triton on CPU tensors under the interpreter (CUDA tensors use the operator);
    saves only ``x`` (own dtype) and recomputes ``H`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: LIFParams) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.p = p
        return triton_forward(x, p)

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):
        (x,) = ctx.saved_tensors
        return triton_backward(x, grad_spikes, ctx.p), None


def lif_interpreted(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Multi-step LIF with the Triton kernels on CPU tensors, under Triton's interpreter only.

    (CUDA tensors go through the ``spikingformer::lif`` operator, whose CUDA kernel is this
    module's: :func:`spikingformer.kernels.ops.lif_triton`.) Raises unless this module was imported
    with ``TRITON_INTERPRET=1``.
    """
    if not INTERPRETED:
        raise RuntimeError(
            "the 'triton' LIF backend needs a CUDA tensor (or TRITON_INTERPRET=1 set before importing "
            "spikingformer.kernels.triton_backend, to run it in Triton's interpreter)"
        )
    return TritonLIF.apply(x, p)
