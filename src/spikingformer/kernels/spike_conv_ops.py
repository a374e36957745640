"""The 3x3 convolution of spike maps (:mod:`spikingformer.kernels.spike_conv`) as PyTorch operators,
so that autograd and ``torch.compile`` see it (the route ``spike_conv``,
:mod:`spikingformer.layers.spike_conv`, calls them).

Each operator decides inside, from its inputs' values, how it computes
``conv2d(x, weight, bias, padding=1)``: by the firing rate of a sample of the maps
(:func:`sampled_rate`, which the caller passes where it has counted it, else the operator counts
it) and whether the weights are finite (a non-finite weight takes PyTorch's convolution, which
propagates NaN and inf as the module does). To the compiler they are opaque calls with fixed
output layouts (channels-last maps, whatever the way), so a compiled model keeps the
data-dependent choice; eager calls their Python functions
(:func:`~spikingformer.kernels.ops.eager_or_op`). :func:`convolve` and :func:`convolve_train`
(differentiable) are what the route calls.

* ``spikingformer::spike_conv`` (inference): by accumulation of the windows' spikes' weights up to
  ``max_density``; else on a CPU with 8-bit matrix tiles (AMX) in integer arithmetic (the weight's
  pieces made once for each value the weight takes); else PyTorch's float32 convolution.
* ``spikingformer::spike_conv_train`` (training): the forward by accumulation up to ``limit``, else
  as inference's above its limit (the int8 pieces on a CPU with AMX, made again whenever the weight
  changed, i.e. once per optimizer step; else PyTorch's); autograd keeps the spikes as bits
  (1/32 of the float32 maps). Its backward
  ``spikingformer::spike_conv_train_backward``: the input gradient by PyTorch's convolution
  backward (the module's, bit for bit), the weight gradient by accumulation of the output gradient
  at every window's spike up to ``grad_limit``, else PyTorch's of the unpacked spikes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from spikingformer.cpu_features import native_int8
from spikingformer.kernels import spike_conv as kernels
from spikingformer.kernels import winograd as winograd_kernels
from spikingformer.kernels.finite import all_finite
from spikingformer.kernels.ops import eager_or_op
from spikingformer.kernels.spike_linear import pack_spikes, packed_width, unpack_spikes

ONCE_DIFFERENTIABLE = ("spike_conv: the tokenizer's convolutions of sparse spikes are differentiable once (autograd "
                       "keeps their input as bits); for second-order gradients (create_graph=True) turn the route "
                       "off: SPIKINGFORMER_ROUTES=-spike_conv")

# weight tensor -> what the operators keep of it (_Weight); weak, so a dropped weight frees it
_held = WeakIdKeyDictionary()
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> its bits' dtype


class _Weight:
    """What the operators keep of one weight tensor, for the values it had (a copy, and the version
    and storage it was read from): whether it is finite, and its packed pieces once the int8 way
    needs them."""

    def __init__(self, weight: torch.Tensor, key: tuple[int, int]) -> None:
        self.key, self.values = key, weight.detach().clone()
        self.finite, self.pieces = all_finite(self.values), None


def _weight(weight: torch.Tensor) -> _Weight:
    """``weight``'s :class:`_Weight`, made again whenever its values changed: a new version or storage
    says so at once, and where neither is new the values are compared in full, since not every
    change makes a new version of the tensor (PyTorch's fused optimizers step in place without one,
    as do writes through ``.data``); about 0.1 ms for CIFAR 4-384's widest weight, where its pieces
    take 11 ms to make. An inference tensor (a weight made under ``torch.inference_mode``, e.g. a
    model built there) has no version: its values are always compared."""
    key = (-1 if weight.is_inference() else weight._version, weight.data_ptr())
    held = _held.get(weight)
    if held is None or held.key != key or not _same(held.values, weight):
        held = _held[weight] = _Weight(weight, key)
    return held


def _finite(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is finite: held by :func:`_weight` for a float32 weight (whose int8 pieces it
    may hold too); a bf16 weight is autocast's cast, a new tensor at each call, checked at once."""
    return _weight(weight).finite if weight.dtype == torch.float32 else all_finite(weight)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values bit for bit, NaN included (``torch.equal`` says NaN differs from itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = _BITS[a.element_size()]
    return torch.equal(a.view(bits), b.detach().view(bits))


RATE_SAMPLES = 8  # maps whose firing rate decides the way


def sampled_rate(x: torch.Tensor) -> float:
    """The firing rate of :data:`RATE_SAMPLES` maps spread evenly over the ``N`` maps of ``x`` (every
    ``ceil(N / 8)``-th, from the first), which decides the way: the accumulation lists every map's
    spikes before it knows the rate (and then declines above its limit), which costs time where the
    maps fire above it. The blocks' maps are time-major (``T B`` flattened), so the samples reach
    every time step: the first map alone (t = 0, every membrane at rest) fired at 0.000-0.002 in the
    CIFAR model's tokenizer where its maps fired at 0.05-0.26, and sent dense maps in."""
    maps = x[::-(-x.shape[0] // RATE_SAMPLES)]
    # spikes are 0 or 1: their float32 sum counts them (exact up to 2^24), 5-12x as fast as
    # count_nonzero on these strided maps (0.6 ms a call in the event model's bf16 inference)
    return float(maps.detach().sum(dtype=torch.float32)) / maps.numel()


def _rate(x: torch.Tensor, rate: float) -> float:
    """``rate`` where the caller counted it, else (negative) :func:`sampled_rate` of ``x``."""
    return sampled_rate(x) if rate < 0 else rate


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], winograd: bool) -> torch.Tensor:
    """PyTorch's convolution, its output channels-last (as the other ways write it); by F(2x2, 3x3)
    where ``winograd`` (the route's choice: float32, or bf16 under CPU bf16 autocast) and the weight is finite."""
    if winograd and _finite(weight):
        return winograd_kernels.conv2d(x, weight, bias)
    y = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    return y.contiguous(memory_format=torch.channels_last)


def _output_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty(n, weight.shape[0], h, w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("spikingformer::spike_conv", mutates_args=(), device_types="cpu")
def spike_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], max_density: float,
               rate: float = -1.0, winograd: bool = False) -> torch.Tensor:
    """Inference: ``conv2d(x, weight, bias, padding=1)`` of spike maps ``x`` ``(N, C_in, H, W)`` (``x``,
    ``weight`` and ``bias`` float32, or all bf16), channels-last; ``rate``: the maps'
    :func:`sampled_rate` where the caller has counted it (negative: count it here); ``winograd``:
    PyTorch's convolution, where it runs, by F(2x2, 3x3) (the route ``winograd``'s choice)."""
    if _rate(x, rate) <= max_density and _finite(weight):
        y = kernels.accumulate_conv2d(x, weight, bias, max_density)
        if y is not None:
            return y
    return _dense(x, weight, bias, winograd)


def _dense(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], winograd: bool) -> torch.Tensor:
    """The maps the accumulation does not take: float32 maps on a CPU with 8-bit matrix tiles (AMX)
    by the int8 pieces (made once for each value of the weight), else, and for a weight that is not
    finite, PyTorch's convolution (by F(2x2, 3x3) where ``winograd``: :func:`_conv`)."""
    held = _weight(weight) if native_int8() and weight.dtype == torch.float32 else None
    if held is None or not held.finite:
        return _conv(x, weight, bias, winograd)
    if held.pieces is None:
        held.pieces = kernels.PackedPieces(weight)
    return kernels.spike_conv2d(x, held.pieces, bias)


@torch.library.custom_op("spikingformer::spike_conv_train", mutates_args=(), device_types="cpu")
def spike_conv_train(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], limit: float,
                     grad_limit: float, rate: float = -1.0, winograd: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Training: ``(conv2d(x, weight, bias, padding=1), packed)`` for spike maps ``x`` ``(N, C_in, H, W)``
    (dtypes as for ``spike_conv``), the output channels-last, ``packed`` the spikes as bits
    (``(N H W, packed_width(C_in))``, what autograd keeps); ``rate`` as for ``spike_conv``;
    ``grad_limit`` is the backward's; ``winograd`` as for ``spike_conv``."""
    n, c, h, w = x.shape
    y = None
    if _rate(x, rate) <= limit and _finite(weight):
        packed = torch.empty(n * h * w, packed_width(c), dtype=torch.int64)
        y = kernels.accumulate_conv2d(x, weight, bias, limit, packed)
    if y is None:  # (the accumulation, where it declined, may not have written the bits)
        y = _dense(x, weight, bias, winograd)
        packed = pack_spikes(x.permute(0, 2, 3, 1).reshape(n * h * w, c))
    return y, packed


def _convolution_backward(grad, x, weight, mask):
    """PyTorch's backward of ``conv2d(x, weight, padding=1)``, the gradients of ``mask``."""
    return torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.custom_op("spikingformer::spike_conv_train_backward", mutates_args=(), device_types="cpu")
def spike_conv_train_backward(packed: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, shape: list[int],
                              channels_last: bool, grad_limit: float, needs: list[bool], winograd: bool = False,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(x, weight, bias)`` of ``spike_conv_train`` for the output gradient ``grad``, each
    empty unless ``needs`` asks for it; the input's gradient in its layout (``channels_last``), the
    others contiguous. A bf16 weight gradient is summed in float32 and rounded once. ``winograd``: the
    input gradient by F(2x2, 3x3) (the convolution of ``grad`` with the flipped weight) where the
    weight is finite, and the weight gradient by F(2x2, 3x3) where it is not summed."""
    layout = _layout(channels_last)
    gx, gw, gb = (grad.new_empty(0) for _ in range(3))  # distinct: an operator's outputs may not alias
    if needs[0] and winograd and _finite(weight):
        gx = winograd_kernels.input_grad(grad, weight).contiguous(memory_format=layout)
    elif needs[0]:  # the input's values are not read: an empty one of its layout
        x = torch.empty(shape, dtype=weight.dtype, memory_format=layout)
        gx = _convolution_backward(grad, x, weight, (True, False, False))[0].contiguous(memory_format=layout)
    if needs[1]:
        gw = kernels.accumulate_conv_weight_grad(packed, torch.Size(shape), grad, grad_limit)
        if gw is None:
            n, c, h, w = shape
            x = unpack_spikes(packed, c, weight.dtype).view(n, h, w, c).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=layout)
            gw = (winograd_kernels.weight_grad(x, grad, weight) if winograd
                  else _convolution_backward(grad, x, weight, (False, True, False))[1])
        gw = gw.to(weight.dtype).contiguous()
    if needs[2]:
        gb = grad.sum((0, 2, 3))
    return gx, gw, gb


@spike_conv.register_fake
def _spike_conv_fake(x, weight, bias, max_density, rate=-1.0, winograd=False):
    return _output_like(x, weight)


@spike_conv_train.register_fake
def _spike_conv_train_fake(x, weight, bias, limit, grad_limit, rate=-1.0, winograd=False):
    n, c, h, w = x.shape
    return _output_like(x, weight), x.new_empty(n * h * w, packed_width(c), dtype=torch.int64)


@spike_conv_train_backward.register_fake
def _spike_conv_train_backward_fake(packed, grad, weight, shape, channels_last, grad_limit, needs, winograd=False):
    return (torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=_layout(channels_last))
            if needs[0] else grad.new_empty(0),
            weight.new_empty(weight.shape) if needs[1] else grad.new_empty(0),
            grad.new_empty(grad.shape[1]) if needs[2] else grad.new_empty(0))


class _SpikeConvTrain(torch.autograd.Function):
    """:func:`convolve_train`: autograd keeps the spikes as bits."""

    @staticmethod
    def forward(ctx, x, weight, bias, limit, grad_limit, rate, winograd):
        y, packed = eager_or_op(spike_conv_train)(x, weight, bias, limit, grad_limit, rate, winograd)
        ctx.save_for_backward(packed, weight)
        ctx.shape, ctx.has_bias, ctx.grad_limit, ctx.winograd = list(x.shape), bias is not None, grad_limit, winograd
        ctx.channels_last = x.is_contiguous(memory_format=torch.channels_last)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # backward with create_graph=True: a second-order gradient is wanted
            raise RuntimeError(ONCE_DIFFERENTIABLE)
        packed, weight = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = eager_or_op(spike_conv_train_backward)(packed, grad, weight, ctx.shape, ctx.channels_last,
                                                       ctx.grad_limit, needs, ctx.winograd)
        return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


def convolve_train(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], limit: float,
                   grad_limit: float, rate: float = -1.0, winograd: bool = False) -> torch.Tensor:
    """``spike_conv_train``'s output, differentiable (once) in ``x``, ``weight`` and ``bias``; backward
    ``spike_conv_train_backward`` of the bits it kept."""
    return _SpikeConvTrain.apply(x, weight, bias, limit, grad_limit, rate, winograd)


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], max_density: float,
             rate: float = -1.0, winograd: bool = False) -> torch.Tensor:
    """``spike_conv`` (inference: no autograd)."""
    return eager_or_op(spike_conv)(x, weight, bias, max_density, rate, winograd)
