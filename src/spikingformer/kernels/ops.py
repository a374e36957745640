"""The fused LIF neuron as PyTorch operators, so that autograd, ``torch.compile`` and ``torch.export`` see it.

``spikingformer::lif(x, tau, v_threshold, v_reset, alpha, detach_reset) -> spikes`` and its
backward ``spikingformer::lif_backward(x, grad_spikes, ...) -> grad_x`` are registered with
:mod:`torch.library`:

* CPU kernel: the fused C++ kernel (:mod:`spikingformer.kernels.cpu_backend`; the torch loop if it cannot be built);
* CUDA kernel: the Triton kernels (:mod:`spikingformer.kernels.triton_backend`; the torch loop without Triton);
* fake (meta) implementations, so the compiler traces shapes without running the kernels;
* autograd: forward saves only ``x``; backward calls ``spikingformer::lif_backward``.

To the compiler the operators are opaque calls: ``torch.compile(model, fullgraph=True)`` traces
through them without a graph break and keeps the fused kernels. In eager, CPU calls skip the
dispatcher and run the same functions (:class:`_EagerLIF`, :func:`eager_or_op`).

Below, the tokenizer's SN -> max-pool (``lif_pool``), BN -> SN [-> max-pool] (``bn_lif_pool``; in
training with ``bn_batch_stats`` and ``bn_lif_pool_train_backward``, differentiable through
:func:`bn_spike_train`) and the spike linear (``spike_linear`` and its weight gradients) are
operators likewise; the spike convolution's are in :mod:`spikingformer.kernels.spike_conv_ops`.
"""

from __future__ import annotations

from typing import Optional

import torch

from spikingformer.kernels import batch_stats
from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import products
from spikingformer.kernels import spike_linear as spike_kernels
from spikingformer.kernels.params import LIFParams
from spikingformer.kernels.torch_backend import lif_backward, lif_forward, lif_torch_loop


def _params(tau: float, v_threshold: float, v_reset: float, alpha: float, detach_reset: bool) -> LIFParams:
    return LIFParams(tau, v_threshold, v_reset, alpha, detach_reset)


def _new_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped and typed like ``x``: what every kernel returns."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("spikingformer::lif", mutates_args=(), device_types="cpu")
def lif(x: torch.Tensor, tau: float, v_threshold: float, v_reset: float, alpha: float,
        detach_reset: bool) -> torch.Tensor:
    """Spikes of the time-first current ``x`` (same shape and dtype, contiguous)."""
    return cpu.forward(x, _params(tau, v_threshold, v_reset, alpha, detach_reset))


@torch.library.custom_op("spikingformer::lif_backward", mutates_args=(), device_types="cpu")
def lif_backward_op(x: torch.Tensor, grad_spikes: torch.Tensor, tau: float, v_threshold: float, v_reset: float,
                    alpha: float, detach_reset: bool) -> torch.Tensor:
    """Gradient of ``lif``'s spikes with respect to ``x`` (x's shape and dtype, contiguous)."""
    return cpu.backward(x, grad_spikes, _params(tau, v_threshold, v_reset, alpha, detach_reset))


def _triton():
    """The Triton kernels' module, or ``None`` where Triton does not import."""
    try:
        from spikingformer.kernels import triton_backend
    except Exception:  # no (or a broken) Triton install: the torch loop computes the same
        return None
    return triton_backend


@lif.register_kernel("cuda")
def _lif_cuda(x, tau, v_threshold, v_reset, alpha, detach_reset):
    p = _params(tau, v_threshold, v_reset, alpha, detach_reset)
    tl = _triton()
    return tl.triton_forward(x, p) if tl is not None else lif_forward(x, p)[0]


@lif_backward_op.register_kernel("cuda")
def _lif_backward_cuda(x, grad_spikes, tau, v_threshold, v_reset, alpha, detach_reset):
    p = _params(tau, v_threshold, v_reset, alpha, detach_reset)
    tl = _triton()
    if tl is not None:
        return tl.triton_backward(x, grad_spikes, p)
    return lif_backward(grad_spikes, lif_forward(x, p)[1], p).to(x.dtype)


@lif.register_fake
def _lif_fake(x, tau, v_threshold, v_reset, alpha, detach_reset):
    return _new_like(x)


@lif_backward_op.register_fake
def _lif_backward_fake(x, grad_spikes, tau, v_threshold, v_reset, alpha, detach_reset):
    cpu.check_grad(x, grad_spikes)
    return _new_like(x)


def _setup_context(ctx, inputs, output) -> None:
    x, *params = inputs
    ctx.save_for_backward(x)  # the input only: backward recomputes the membrane
    ctx.params = params


def _backward(ctx, grad_spikes, backward_op=lif_backward_op):
    (x,) = ctx.saved_tensors
    return backward_op(x, grad_spikes, *ctx.params), None, None, None, None, None


lif.register_autograd(_backward, setup_context=_setup_context)


class _EagerLIF(torch.autograd.Function):
    """``spikingformer::lif`` of CPU tensors in eager: its Python function with its registered
    autograd (:func:`_setup_context`, :func:`_backward`) as a plain autograd ``Function``, without the
    custom operator's dispatch and autograd wrapper, which cost about 0.06 ms per forward and
    backward (1.10-1.13x the time of 10^6 elements, 2x of 10^3: docs/performance-log.md, "The LIF
    operator's per-call cost")."""

    @staticmethod
    def forward(ctx, x, *params):  # not the setup_context form, whose apply inspects forward's signature each call
        spikes = lif._init_fn(x, *params)
        _setup_context(ctx, (x, *params), spikes)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        # with create_graph=True the backward operator, whose gradient then refuses a second
        # differentiation as the operator's does (the plain function's would pass as a constant)
        backward_op = lif_backward_op if torch.is_grad_enabled() else eager_or_op(lif_backward_op)
        return _backward(ctx, grad_spikes, backward_op)


def lif_op(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """``spikingformer::lif`` with the parameters of ``p``."""
    return lif(x, p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)


def lif_cpu(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Multi-step LIF with the fused CPU kernel (backend ``"cpu"``): the operator ``spikingformer::lif``,
    in eager through :class:`_EagerLIF` (the same functions without the dispatcher).

    Non-CPU tensors go to the ``"torch"`` backend; a kernel that cannot be built falls back to the
    torch loop inside the operator, warning once.
    """
    if x.device.type != "cpu":
        return lif_torch_loop(x, p)
    if _in_eager() and hasattr(lif, "_init_fn"):
        return _EagerLIF.apply(x, p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)
    return lif_op(x, p)


def lif_triton(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """Multi-step LIF with the Triton kernels (backend ``"triton"``): CUDA tensors through the
    operator, CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``; otherwise this raises)."""
    if x.device.type == "cuda":
        return lif_op(x, p)
    from spikingformer.kernels.triton_backend import lif_interpreted

    return lif_interpreted(x, p)


# ----------------------------------------------------------------------------- SN -> max-pool
# The tokenizer's SN -> MaxPool2d(3, 2, 1) on channels-last maps (T, B, H, W, C) in one pass each
# way, and its inference form with the BatchNorm in front (:mod:`spikingformer.kernels.cpu_backend`).


@torch.library.custom_op("spikingformer::lif_pool", mutates_args=(), device_types="cpu")
def lif_pool(x: torch.Tensor, tau: float, v_threshold: float, v_reset: float, alpha: float,
             detach_reset: bool) -> torch.Tensor:
    """Max-pooled spikes ``(T, B, Ho, Wo, C)`` of channels-last maps ``x`` ``(T, B, H, W, C)``."""
    return cpu.lif_pool_forward(x, _params(tau, v_threshold, v_reset, alpha, detach_reset), pool=True)


@torch.library.custom_op("spikingformer::lif_pool_backward", mutates_args=(), device_types="cpu")
def lif_pool_backward_op(x: torch.Tensor, grad_pooled: torch.Tensor, tau: float, v_threshold: float,
                         v_reset: float, alpha: float, detach_reset: bool) -> torch.Tensor:
    """Gradient of ``lif_pool`` with respect to ``x``."""
    return cpu.lif_pool_backward(x, grad_pooled, _params(tau, v_threshold, v_reset, alpha, detach_reset))


@torch.library.custom_op("spikingformer::bn_lif_pool", mutates_args=(), device_types="cpu")
def bn_lif_pool(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, eps: float, tau: float, v_threshold: float, v_reset: float,
                pool: bool, batch: bool = False) -> torch.Tensor:
    """BatchNorm, SN and, if ``pool``, the max-pool, of channels-last maps ``x`` ``(T, B, H, W, C)``
    in one kernel pass, never writing BN's output: with running statistics ``mean``, ``var``
    (inference), or with ``batch`` the batch's (training, from :func:`bn_batch_stats`; BN applied
    as PyTorch's training kernel does, for 16-bit maps under autocast rounded to their dtype as its
    mixed-precision kernel stores it). No autograd of its own: :func:`bn_spike_train`'s."""
    p = LIFParams(tau, v_threshold, v_reset)  # the forward needs no surrogate or reset detachment
    return cpu.lif_pool_forward(x, p, pool, (mean, var, weight, bias, eps), batch)


@lif_pool.register_fake
def _lif_pool_fake(x, tau, v_threshold, v_reset, alpha, detach_reset):
    cpu.check_maps(x, True)
    return x.new_empty(cpu.pooled_shape(x))


@lif_pool_backward_op.register_fake
def _lif_pool_backward_fake(x, grad_pooled, tau, v_threshold, v_reset, alpha, detach_reset):
    cpu.check_maps(x, True, grad=grad_pooled)
    return _new_like(x)


@bn_lif_pool.register_fake
def _bn_lif_pool_fake(x, mean, var, weight, bias, eps, tau, v_threshold, v_reset, pool, batch=False):
    cpu.check_maps(x, pool, (mean, var, weight, bias))
    return x.new_empty(cpu.pooled_shape(x)) if pool else _new_like(x)


def _lif_pool_backward(ctx, grad_pooled):
    (x,) = ctx.saved_tensors
    return lif_pool_backward_op(x, grad_pooled, *ctx.params), None, None, None, None, None


lif_pool.register_autograd(_lif_pool_backward, setup_context=_setup_context)


def lif_pool_op(x: torch.Tensor, p: LIFParams) -> torch.Tensor:
    """``spikingformer::lif_pool`` with the parameters of ``p``."""
    return lif_pool(x, p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)


# ----------------------------------------------------------------------------- spike linear
# A token linear on spikes: the forward sums weight columns (:func:`spike_linear.spike_linear_forward`)
# and the weight gradient sums output-gradient rows (:func:`spike_linear.spike_linear_weight_grad`),
# each the dense product where the input is not sparse spikes; the input gradient is a dense product.


@torch.library.custom_op("spikingformer::spike_linear", mutates_args=(), device_types="cpu")
def spike_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], max_density: float,
                 pack: bool = False, onednn: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x W^T + b, packed)`` for rows ``x`` ``(M, K)``; spikes (all 0 or 1) with a firing rate of at
    most ``max_density`` are summed as accumulations of weight columns. ``pack``: the caller
    guarantees spikes (a neuron's output; anything else raises), and autograd keeps them as bits
    (``packed``, 1/32 of the float32 input) instead of the input itself. ``onednn``: the dense
    products (the forward where the input is not sparse spikes, and the input gradient) through
    :mod:`~spikingformer.kernels.products` where it takes them, else PyTorch's."""
    return spike_kernels.spike_linear_forward(x, weight, bias, max_density, pack, onednn)


@torch.library.custom_op("spikingformer::spike_linear_weight_grad", mutates_args=(), device_types="cpu")
def spike_linear_weight_grad(x: torch.Tensor, grad: torch.Tensor, max_density: float) -> torch.Tensor:
    """``grad^T x`` ``(N, K)``: the weight gradient of ``spike_linear`` for its input ``x`` ``(M, K)``
    and output gradient ``grad`` ``(M, N)``."""
    return spike_kernels.spike_linear_weight_grad(x, grad, max_density)


@torch.library.custom_op("spikingformer::spike_linear_weight_grad_packed", mutates_args=(), device_types="cpu")
def spike_linear_weight_grad_packed(packed: torch.Tensor, k: int, grad: torch.Tensor, max_density: float,
                                    ) -> torch.Tensor:
    """``spike_linear_weight_grad`` for an input of ``k`` columns kept as ``spike_linear``'s packed bits."""
    return spike_kernels.spike_linear_weight_grad_packed(packed, k, grad, max_density)


@spike_linear.register_fake
def _spike_linear_fake(x, weight, bias, max_density, pack=False, onednn=False):
    spike_kernels.check_shapes(x, weight, bias)
    width = spike_kernels.packed_width(x.shape[1])
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty((x.shape[0], width) if pack else (0,), dtype=torch.int64)


@spike_linear_weight_grad.register_fake
def _spike_linear_weight_grad_fake(x, grad, max_density):
    spike_kernels.check_weight_grad_shapes(x.shape[0], x.shape[1], grad)
    return x.new_empty(grad.shape[1], x.shape[1])


@spike_linear_weight_grad_packed.register_fake
def _spike_linear_weight_grad_packed_fake(packed, k, grad, max_density):
    spike_kernels.check_weight_grad_shapes(packed.shape[0], k, grad, packed)
    return grad.new_empty(grad.shape[1], k)


def _spike_linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, max_density, pack, onednn = inputs  # defaults included
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1] if pack else x, weight)
    ctx.has_bias, ctx.max_density, ctx.pack, ctx.k = bias is not None, max_density, pack, x.shape[1]
    ctx.onednn = onednn


def _spike_linear_backward(ctx, grad, _grad_packed):
    x, weight = ctx.saved_tensors  # x: the input, or its packed bits
    gx = None
    if ctx.needs_input_grad[0]:
        gx = products.input_grad(grad, weight) if ctx.onednn and products.takes(grad, weight) else grad @ weight
    gw = None
    if ctx.needs_input_grad[1]:
        gw = (spike_linear_weight_grad_packed(x, ctx.k, grad, ctx.max_density) if ctx.pack
              else spike_linear_weight_grad(x, grad, ctx.max_density))
    gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb, None, None, None


spike_linear.register_autograd(_spike_linear_backward, setup_context=_spike_linear_setup)


# ----------------------------------------------------------------------------- BN -> SN [-> max-pool] in training
# A training BatchNorm, SN and, for maps, the max-pool, in one kernel pass each way (the routes
# ``fused_spike_pool`` and ``fused_bn_spike``): :func:`bn_spike_train`. Its pieces are operators, so
# that ``torch.compile`` keeps the kernels (and traces the running estimates' update as the first
# one's mutation); eager calls their Python functions (:func:`eager_or_op`).


def eager_or_op(op):
    """``op`` (a ``torch.library`` operator) under ``torch.compile``, which keeps it as an opaque call;
    in eager its Python function, the same computation without the dispatcher's per-call cost (about
    0.05 ms a call, measured: docs/performance-log.md, "torch.compile against eager"). (The function is
    ``CustomOpDef``'s ``_init_fn``; a PyTorch without it gets the operator in eager too.) Under
    ``torch.profiler`` the operator too, so that profiles list its time under its name."""
    return getattr(op, "_init_fn", op) if _in_eager() else op


def _in_eager() -> bool:
    """Neither ``torch.compile`` (or ``torch.export``) nor ``torch.jit.trace`` tracing, nor ``torch.profiler``
    recording: where :func:`eager_or_op` and :func:`lif_cpu` skip the dispatcher (a tracer must see the operator)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or getattr(torch.autograd.profiler, "_is_profiler_enabled", False))


def _bn_rows(x: torch.Tensor, tokens: bool) -> torch.Tensor:
    """BN's input ``x``, in the kernel's layout ``(T, B, H, W, C)``, as its module sees it: token rows
    ``(T*B*N, C)`` for BatchNorm1d (``tokens``: maps of N x 1 pixels), else the T*B channels-last
    maps ``(T*B, C, H, W)`` for BatchNorm2d."""
    return x.reshape(-1, x.shape[-1]) if tokens else x.flatten(0, 1).permute(0, 3, 1, 2)


def check_batch_norm_eps(eps: float, training: bool) -> None:
    """Raise the ``ValueError`` that the installed PyTorch's ``F.batch_norm`` raises for ``eps`` (in
    ``training`` or not), by asking it on one tiny batch: the native operators the fused routes call
    check nothing, and the rule differs between releases (2.14 refuses ``eps <= 0`` in training and
    ``eps < 0`` otherwise; 2.11 refuses ``eps <= 0`` always; 2.8 nothing). A positive ``eps`` is
    never refused, and costs one comparison."""
    if not eps > 0.0:
        torch.nn.functional.batch_norm(torch.zeros(2, 1), torch.zeros(1), torch.ones(1), training=training, eps=eps)


def _check_training_bn(x: torch.Tensor, tokens: bool, eps: float) -> None:
    """``F.batch_norm``'s checks in training: more than one value per channel, then ``eps``."""
    rows = _bn_rows(x, tokens)
    if rows.numel() == rows.shape[1]:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {rows.shape}")
    check_batch_norm_eps(eps, training=True)


@torch.library.custom_op("spikingformer::bn_batch_stats", device_types="cpu",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def bn_batch_stats(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                   num_batches_tracked: torch.Tensor, momentum: Optional[float], eps: float, tokens: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``nn.BatchNorm{1,2}d`` does in training before normalising ``x`` (in the kernel's layout
    ``(T, B, H, W, C)``; ``tokens``: BatchNorm1d over token rows): count the batch, check, find the
    batch mean and biased variance and update the running estimates as ``native_batch_norm``
    would (:func:`~spikingformer.kernels.batch_stats.batch_norm_update_stats`), in the module's order.
    No gradient flows through the statistics: :func:`bn_spike_train`'s backward is BN's whole backward."""
    num_batches_tracked.add_(1)  # before the checks, as the module counts the batch before F.batch_norm checks
    _check_training_bn(x, tokens, eps)
    factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    return batch_stats.batch_norm_update_stats(_bn_rows(x, tokens), running_mean, running_var, factor)


@torch.library.custom_op("spikingformer::bn_lif_pool_train_backward", mutates_args=(), device_types="cpu")
def bn_lif_pool_train_backward(x: torch.Tensor, grad: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                               weight: torch.Tensor, bias: torch.Tensor, eps: float, tau: float, v_threshold: float,
                               v_reset: float, alpha: float, detach_reset: bool, pool: bool, needs: list[bool],
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(x, weight, bias)`` of ``bn_lif_pool``'s spikes (with ``batch``) for their gradient ``grad``,
    each empty unless ``needs`` asks for it: one pass computing BN's output and the membrane again
    with BN's two reductions, one for BN's input gradient
    (:func:`~spikingformer.kernels.cpu_backend.bn_lif_pool_backward`)."""
    p = _params(tau, v_threshold, v_reset, alpha, detach_reset)
    invstd = cpu.bn_invstd(var, eps, batch=True)
    grads = cpu.bn_lif_pool_backward(x, grad, p, (mean, invstd, weight, bias), pool, eps, tuple(needs))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@bn_batch_stats.register_fake
def _bn_batch_stats_fake(x, running_mean, running_var, num_batches_tracked, momentum, eps, tokens):
    _check_training_bn(x, tokens, eps)
    return running_mean.new_empty(x.shape[-1]), running_var.new_empty(x.shape[-1])


@bn_lif_pool_train_backward.register_fake
def _bn_lif_pool_train_backward_fake(x, grad, mean, var, weight, bias, eps, tau, v_threshold, v_reset, alpha,
                                     detach_reset, pool, needs):
    cpu.check_maps(x, pool, (mean, var, weight, bias), grad)
    return tuple(t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip((x, weight, bias), needs))


class _BNSpikeTrain(torch.autograd.Function):
    """:func:`bn_spike_train`: autograd keeps BN's input and batch statistics, not its output."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps, p, pool):
        ctx.save_for_backward(x, weight, bias, mean, var)
        ctx.eps, ctx.p, ctx.pool = eps, p, pool
        return eager_or_op(bn_lif_pool)(x, mean, var, weight, bias, eps, p.tau, p.v_threshold, p.v_reset, pool, True)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel's backward has no backward: say so if asked
    def backward(ctx, grad):
        x, weight, bias, mean, var = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 3, 4)]  # x, weight, bias
        p = ctx.p
        grads = eager_or_op(bn_lif_pool_train_backward)(x, grad, mean, var, weight, bias, ctx.eps, p.tau,
                                                       p.v_threshold, p.v_reset, p.alpha, p.detach_reset,
                                                       ctx.pool, needs)
        gx, gw, gb = (g if need else None for g, need in zip(grads, needs))
        return gx, None, None, gw, gb, None, None, None


def bn_spike_train(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                   num_batches_tracked: torch.Tensor, momentum: Optional[float], weight: torch.Tensor,
                   bias: torch.Tensor, eps: float, p: LIFParams, pool: bool, tokens: bool) -> torch.Tensor:
    """Spikes of a training BatchNorm (running estimates and count updated as the module does; momentum
    ``None``: the cumulative average) -> SN [-> max-pool (``pool``)] of ``x`` in the kernel's layout
    ``(T, B, H, W, C)`` (``tokens``: BatchNorm1d over token rows), differentiable in ``x``, ``weight``
    and ``bias``: :func:`bn_batch_stats`, then :func:`bn_lif_pool` with the batch's statistics;
    backward :func:`bn_lif_pool_train_backward`."""
    mean, var = eager_or_op(bn_batch_stats)(x.detach(), running_mean, running_var, num_batches_tracked, momentum,
                                            eps, tokens)
    return _BNSpikeTrain.apply(x, mean, var, weight, bias, eps, p, pool)
