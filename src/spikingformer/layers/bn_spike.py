"""BN -> SN [-> max-pool] of the tokenizer's stages and the blocks' token layers, by the routes on
(:mod:`spikingformer.layers.routes`: ``channels_last``, ``inplace_bn``, ``recompute``,
``fused_spike_pool``, ``fused_bn_spike``), and the map helpers around them.

Each function computes what the module calls compute (BatchNorm, then the neuron, then the
max-pool), through the fused C++ kernels where they take the tensors and the modules, else by the
module calls themselves.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from spikingformer import kernels
from spikingformer.kernels import ops
from spikingformer.layers import routes
from spikingformer.neuron import MultiStepLIF, multistep_lif


# ----------------------------------------------------------------------------- channels_last


def spike_maps(neuron: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``neuron(x)`` for ``(T, B, C, H, W)`` maps; with ``channels_last``, run on the ``(T, B, H, W, C)``
    permutation (elementwise over all but T, so the same values), which for channels-last maps is
    a contiguous view: the neuron reads and writes memory in order and its spikes stay channels-last."""
    if routes.enabled("channels_last"):
        return neuron(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
    return neuron(x)


def repeat_steps(y: torch.Tensor, time_steps: int) -> torch.Tensor:
    """``(1, B, C, H, W)`` -> ``(T, B, C, H, W)``: T copies in memory of their own (later stages may
    overwrite their input, ``inplace_bn``), each map in the tokenizer's memory format."""
    if routes.enabled("channels_last"):
        z = y.permute(0, 1, 3, 4, 2)
        return z.expand(time_steps, *z.shape[1:]).contiguous().permute(0, 1, 4, 2, 3)
    return y.expand(time_steps, *y.shape[1:]).contiguous()


def max_pool(x: torch.Tensor) -> torch.Tensor:
    """MaxPool2d(kernel 3, stride 2, padding 1) on ``(T, B, C, H, W)``."""
    t, b = x.shape[:2]
    y = nn.functional.max_pool2d(x.flatten(0, 1), kernel_size=3, stride=2, padding=1)
    return y.view(t, b, *y.shape[1:])


# ----------------------------------------------------------------------------- inplace_bn, recompute


def _kernel_takes(lif: nn.Module, x: torch.Tensor) -> bool:
    """Whether the C++ tokenizer kernel (:func:`kernels.cpu_backend.lif_pool_forward`) computes SN of
    ``x`` in its layout ``(T, B, H, W, C)`` for ``lif``: contiguous float32 or bfloat16 CPU values,
    a plain :class:`MultiStepLIF` on the CPU kernel with no hooks to call (firing-rate meters must
    see its spikes), and the kernel library built."""
    return (x.device.type == "cpu" and x.dtype in kernels.cpu_backend.MAP_DTYPES and x.dim() == 5
            and x.is_contiguous() and type(lif) is MultiStepLIF and lif.backend in ("auto", "cpu")
            and not (lif._forward_hooks or lif._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
            and kernels.select_backend(x) == "cpu")


def _fused_kernel_takes(lif: nn.Module, z: torch.Tensor) -> bool:
    """Whether ``fused_spike_pool`` computes SN [-> max-pool] of the channels-last maps ``z``
    ``(T, B, C, H, W)`` for ``lif`` (:func:`_kernel_takes`)."""
    return routes.enabled("fused_spike_pool") and z.dim() == 5 and _kernel_takes(lif, z.permute(0, 1, 3, 4, 2))


def spike_pool(neuron: Callable[[torch.Tensor], torch.Tensor], lif: nn.Module, pool: bool,
               z: torch.Tensor) -> torch.Tensor:
    """``[MP](neuron(z))`` for BN output maps ``z``; ``neuron`` is ``lif`` or a hook-free call of its
    maths. With ``fused_spike_pool``, SN -> max-pool runs as one kernel pass each way."""
    if pool and _fused_kernel_takes(lif, z):
        return ops.lif_pool_op(z.permute(0, 1, 3, 4, 2), lif.params).permute(0, 1, 4, 2, 3)
    x = spike_maps(neuron, z)
    return max_pool(x) if pool else x


def _inference_bn(bn: nn.Module, kind: type[nn.Module] = nn.BatchNorm2d) -> bool:
    return (not torch.is_grad_enabled() and isinstance(bn, kind) and not bn.training and bn.affine
            and bn.running_mean is not None)


def _kernel_bn(bn: nn.Module, kind: type[nn.Module]) -> bool:
    """An inference BatchNorm (:func:`_inference_bn`) the inference kernel applies as PyTorch would: no
    hooks to call, an eps this PyTorch takes (else the module call raises F.batch_norm's error), and
    the kernel's rounding that of PyTorch's CPU kernel in use."""
    return (_inference_bn(bn, kind) and _eps_accepted(bn.eps) and not (bn._forward_hooks or bn._forward_pre_hooks)
            and kernels.cpu_backend.kernel_reproduces_bn())


def _eps_accepted(eps: float) -> bool:
    """Whether this PyTorch's ``F.batch_norm`` takes ``eps`` in inference (:func:`ops.check_batch_norm_eps`)."""
    try:
        ops.check_batch_norm_eps(eps, training=False)
    except ValueError:
        return False
    return True


def _bn_lif_kernel(bn: nn.Module, lif: nn.Module, pool: bool, x: torch.Tensor) -> torch.Tensor:
    """BN with running statistics -> SN [-> max-pool] of ``x`` in the kernel's layout ``(T, B, H, W, C)``,
    one pass of the inference kernel."""
    p = lif.params
    return ops.bn_lif_pool(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, p.tau, p.v_threshold,
                           p.v_reset, pool)


def bn_spike_pool_plain(stage: nn.Module, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``[MP](SN(BN(y)))`` by module calls: the BN of ``stage`` (a ConvBN) on its conv output ``y``.

    In inference (no autograd, BN with running statistics): with ``fused_spike_pool`` the three run as
    one kernel pass; else with ``inplace_bn`` the BN overwrites ``y``, which must then own its
    memory (no expanded view). Not while ``torch.compile`` traces: the compiler plans the memory
    itself, and Dynamo of PyTorch 2.11 refuses that ``out=`` (a channels-last view).
    """
    bn = stage.bn
    if _inference_bn(bn):  # F.batch_norm's check, which the native operators below skip
        ops.check_batch_norm_eps(bn.eps, training=False)
    if _kernel_bn(bn, nn.BatchNorm2d) and _fused_kernel_takes(lif, y):
        return _from_kernel(_bn_lif_kernel(bn, lif, pool, _to_kernel(y)), tokens=False)
    if routes.enabled("inplace_bn") and _inference_bn(bn) and not torch.compiler.is_compiling():
        flat = y.flatten(0, 1)
        torch.ops.aten.native_batch_norm.out(flat, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0,
                                             bn.eps, out=flat, save_mean=bn.running_mean.new_empty(0),
                                             save_invstd=bn.running_mean.new_empty(0))
        z = y
    else:
        z = stage.normalize(y)
    return spike_pool(lif, lif, pool, z)


def _bn_spike_pool_again(stage: nn.Module, lif: MultiStepLIF, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """:func:`bn_spike_pool_plain` in training again, bit for bit, for :class:`_RecomputedBNSpikePool`'s
    backward: batch statistics without touching the running estimates a second time, and no module
    calls, so forward hooks (firing-rate meters) do not see the batch twice."""
    bn = stage.bn
    z = nn.functional.batch_norm(y.flatten(0, 1), None, None, bn.weight, bn.bias, True, 0.0, bn.eps).view(y.shape)
    return spike_pool(lambda s: multistep_lif(s, lif.params, lif.backend), lif, pool, z)


class _RecomputedBNSpikePool(torch.autograd.Function):
    """:func:`bn_spike_pool_plain` in training, keeping only its input ``y`` for backward.

    Autograd would keep the BN output, the spikes and the max-pool's int64 indices, the size of the
    largest feature maps; this keeps the conv output (which BN's backward keeps anyway) and
    recomputes BN, neuron and max-pool in backward.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, stage, lif, pool):
        ctx.stage, ctx.lif, ctx.pool = stage, lif, pool
        device = y.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(y)
        return bn_spike_pool_plain(stage, lif, pool, y.detach())  # module calls: running statistics, hooks

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        bn = ctx.stage.bn
        device, enabled_, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled_):
            y = y.detach().requires_grad_()
            out = _bn_spike_pool_again(ctx.stage, ctx.lif, ctx.pool, y)
        wanted = [t for t, need in zip((y, bn.weight, bn.bias), ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None, None, None)


def _training_bn(bn: nn.Module) -> bool:
    """A plain training BatchNorm (1d over token rows, 2d over maps) with running statistics and
    affine parameters, no hooks, whose output the kernel computes with PyTorch's rounding."""
    return (type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d) and bn.training and bn.affine and bn.track_running_stats
            and bn.running_mean is not None and not (bn._forward_hooks or bn._forward_pre_hooks)
            and kernels.cpu_backend.kernel_reproduces_bn())


# A BN input in the fused kernel's layout (T, B, H, W, C) and back, and as its BatchNorm module sees
# it: channels-last maps (T, B, C, H, W) for BatchNorm2d over T*B maps, tokens (T, B, N, C) (as maps
# of N x 1 pixels) for BatchNorm1d over T*B*N rows.
def _to_kernel(y: torch.Tensor) -> torch.Tensor:
    return y.unsqueeze(3) if y.dim() == 4 else y.permute(0, 1, 3, 4, 2)


def _from_kernel(x: torch.Tensor, tokens: bool) -> torch.Tensor:
    return x.squeeze(3) if tokens else x.permute(0, 1, 4, 2, 3)


def _bn_view(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, y.shape[-1]) if y.dim() == 4 else y.flatten(0, 1)


def _fused_bn_spike(bn: nn.Module, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``fused_spike_pool`` (maps, with a max-pool) and ``fused_bn_spike`` (tokens) in training:
    BN -> SN [-> max-pool] of ``y`` by :func:`~spikingformer.kernels.ops.bn_spike_train`, which
    keeps only BN's input and batch statistics for backward: BN's output is neither written nor
    kept, and backward computes it again in its one pass."""
    tokens = y.dim() == 4
    out = ops.bn_spike_train(_to_kernel(y), bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum,
                             bn.weight, bn.bias, bn.eps, lif.params, pool, tokens)
    return _from_kernel(out, tokens)


def bn_spike_pool(stage: nn.Module, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``[MP](SN(BN(y)))`` for a ConvBN's conv output ``y``. In training (not for a neuron with state
    or hooks): with ``fused_spike_pool``, :func:`_fused_bn_spike` (under ``torch.compile`` too: an
    operator); else with ``recompute`` (not under ``torch.compile``, whose partitioner decides what
    to keep) memory-lean for maps of at least :data:`~spikingformer.layers.routes.RECOMPUTE_MIN_ELEMENTS` elements;
    :func:`bn_spike_pool_plain` otherwise."""
    bn = stage.bn
    training = torch.is_grad_enabled()
    if training and _training_bn(bn) and _fused_kernel_takes(lif, y):
        return _fused_bn_spike(bn, lif, pool, y)
    if (routes.enabled("recompute") and training and not torch.compiler.is_compiling() and isinstance(bn, nn.BatchNorm2d)
            and bn.training and bn.affine and type(lif) is MultiStepLIF and y.numel() >= routes.RECOMPUTE_MIN_ELEMENTS):
        return _RecomputedBNSpikePool.apply(y, bn.weight, bn.bias, stage, lif, pool)
    return bn_spike_pool_plain(stage, lif, pool, y)


def bn_spike_tokens(bn: nn.Module, lif: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``lif(bn(y))`` for a token linear's output ``y`` ``(T, B, N, C)`` and the BatchNorm1d ``bn``
    over its rows. With ``fused_bn_spike``: in training, :func:`_fused_bn_spike`: no BN output kept
    for the neuron's backward, which the kernel computes again from ``y``, the tensor BN's backward
    keeps anyway; in inference (no autograd, running statistics), one pass of the kernel: no BN
    output written."""
    if routes.enabled("fused_bn_spike") and y.dim() == 4 and _kernel_takes(lif, _to_kernel(y)):
        if torch.is_grad_enabled() and _training_bn(bn):
            return _fused_bn_spike(bn, lif, False, y)
        if _kernel_bn(bn, nn.BatchNorm1d):
            return _from_kernel(_bn_lif_kernel(bn, lif, False, _to_kernel(y)), tokens=True)
    return lif(bn(_bn_view(y)).view(y.shape))
