"""A 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(2x2, 3x3), with its plain
PyTorch twin: less arithmetic than the direct convolution for any input, spikes or not.

Each 2x2 block of outputs comes from a 4x4 tile of inputs (tiles at stride 2, the maps padded by
one): ``Y = A^T [(G w G^T) * (B^T d B)] A`` (Lavin and Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016), so each input and output channel pair takes 16 products per tile where the
direct convolution takes 36 (2.25x fewer). Three steps:

* the input transform ``V = B^T d B`` of every tile (additions and subtractions only):
  ``(16, tiles, C_in)``, 4x the input's size;
* 16 products ``V[i] @ U[i]``, ``(tiles x C_in) @ (C_in x C_out)``, in one ``torch.bmm``, where
  ``U = G w G^T`` is the weight's transform ``(16, C_in, C_out)`` (:func:`weight_transform`; made
  at each call, a small cost beside the products: the weight has 9 values per channel pair where
  the products read 16 per tile);
* the output transform ``Y = A^T M A`` of each tile's 16 sums (additions again), then the bias.

In C++ each transform is one pass over channels-last maps (``csrc/winograd_cpu.cpp``, OpenMP over
tiles, channels in vector lanes); :func:`input_transform` and :func:`output_transform` are their
twins in plain PyTorch, the same additions in the same order (so the same bits). The batch goes
through in pieces whose transformed tiles (``V`` and ``M``) hold at most :data:`PIECE_BYTES`.

Rounding: the transforms add and subtract inputs before the products and sums after, so values
differ from the direct convolution's by rounding; against the float64 convolution the float32
results erred by 1.7e-7 to 5.0e-7 of the largest output on the zoo's tokenizer shapes, where
oneDNN's direct convolution erred by 1.1e-7 to 1.5e-6 (docs/performance-log.md, "Winograd
F(2x2, 3x3) against the direct convolution").

:func:`conv2d` is differentiable: the input gradient of a 3x3 convolution with padding 1 is the
3x3 convolution (padding 1) of the output gradient with the weight flipped in space and its
channels swapped, so it runs here too; the weight and bias gradients are PyTorch's
(``aten.convolution_backward``), which read the saved input. The route that calls it is
``winograd`` (:mod:`spikingformer.layers.winograd`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spikingformer.kernels import cpu_backend

PIECE_BYTES = 1 << 26  # V and M of one piece of the batch (the images are split between pieces)
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """``U = G w G^T`` for every (output, input) channel pair of ``weight`` ``(C_out, C_in, 3, 3)``:
    ``(16, C_in, C_out)`` (index ``4 i + j`` for the tile position ``(i, j)``), the products' right
    operands, in the weight's dtype: a view of ``(16, C_out, C_in)`` in memory, which ``bmm`` reads
    as it is. One product of ``G (x) G`` with the pairs' 9 weights (``U[i, j] = sum_ab G[i, a]
    G[j, b] w[a, b]``; the entries of ``G (x) G`` are 0, +-1/4, +-1/2 and 1, exact)."""
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    u = torch.kron(g, g) @ weight.reshape(-1, 9).T  # (16, C_out C_in)
    return u.view(16, weight.shape[0], weight.shape[1]).transpose(1, 2)


def _tiles(h: int, w: int) -> tuple[int, int]:
    return (h + 1) // 2, (w + 1) // 2


def input_transform(x: torch.Tensor) -> torch.Tensor:
    """``V = B^T d B`` for every 4x4 tile ``d`` of maps ``x`` ``(N, C, H, W)`` (stride 2, padding 1):
    ``(16, tiles, C)``, tiles in (image, row, column) order. The twin of ``sf_winograd_input``."""
    n, c, h, w = x.shape
    th, tw = _tiles(h, w)
    xp = F.pad(x, (1, 1 + 2 * tw - w, 1, 1 + 2 * th - h))
    d = xp.unfold(2, 4, 2).unfold(3, 4, 2).permute(4, 5, 0, 2, 3, 1)  # (4 rows, 4 cols, N, th, tw, C), a view
    rows = (d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3])  # B^T d: each (4 cols, N, th, tw, C)
    v = torch.empty((4, 4, n, th, tw, c), dtype=x.dtype, device=x.device)
    for i, r in enumerate(rows):  # (B^T d) B
        torch.sub(r[0], r[2], out=v[i, 0])
        torch.add(r[1], r[2], out=v[i, 1])
        torch.sub(r[2], r[1], out=v[i, 2])
        torch.sub(r[1], r[3], out=v[i, 3])
    return v.view(16, n * th * tw, c)


def output_transform(m: torch.Tensor, shape: tuple[int, int, int, int],
                     bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Y = A^T M A`` of every tile's 16 sums ``m`` ``(16, tiles, C_out)``, plus ``bias``: the
    ``(N, C_out, H, W)`` output of ``shape``, channels-last. The twin of ``sf_winograd_output``."""
    n, k, h, w = shape
    th, tw = _tiles(h, w)
    m = m.view(4, 4, n, th, tw, k)
    y = torch.empty((n, th, 2, tw, 2, k), dtype=m.dtype, device=m.device)
    for a, s in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T M: each (4, N, th, tw, K)
        y[:, :, a, :, 0] = s[0] + s[1] + s[2]
        y[:, :, a, :, 1] = s[1] - s[2] - s[3]
    if bias is not None:
        y += bias
    y = y.view(n, 2 * th, 2 * tw, k)[:, :h, :w].permute(0, 3, 1, 2)  # (N, K, H, W)
    return y.contiguous(memory_format=torch.channels_last)


def winograd_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What :func:`winograd_conv2d` computes, in plain PyTorch: ``conv2d(x, weight, bias, padding=1)``
    by F(2x2, 3x3), the output channels-last."""
    m = torch.bmm(input_transform(x), weight_transform(weight))
    return output_transform(m, (x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), bias)


def channels_last(x: torch.Tensor) -> bool:
    """Whether maps ``(N, C, H, W)`` lie in memory as ``(N, H, W, C)``, as the C++ transforms read them."""
    return x.permute(0, 2, 3, 1).is_contiguous()


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                    ) -> Optional[torch.Tensor]:
    """``conv2d(x, weight, bias, padding=1)`` by F(2x2, 3x3) with the C++ transforms, for float32 CPU
    maps ``x`` ``(N, C_in, H, W)``, weight ``(C_out, C_in, 3, 3)`` and bias ``(C_out,)``: the output
    ``(N, C_out, H, W)``, channels-last; the same bits as :func:`winograd_reference`. ``None`` for
    other dtypes or devices, or where the kernel library cannot be built. ``x`` not channels-last is
    copied so first."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    lib = cpu_backend.get_library()
    if lib is None:
        return None
    n, c, h, w = x.shape
    k, threads = weight.shape[0], torch.get_num_threads()
    xl = x.detach().permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): a view where x is channels-last
    u = weight_transform(weight.detach())
    b = bias.detach().contiguous() if bias is not None else None
    th, tw = _tiles(h, w)
    per_image = 16 * th * tw * (c + k) * 4
    images = max(1, min(n, PIECE_BYTES // per_image))
    y = torch.empty((n, h, w, k), dtype=x.dtype)
    v, m = torch.empty(16 * images * th * tw * c, dtype=x.dtype), torch.empty(16 * images * th * tw * k, dtype=x.dtype)
    for i in range(0, n, images):
        count = min(images, n - i)
        rows = count * th * tw  # this piece's tiles; its V and M fill the buffers' first elements
        vi, mi = v[:16 * rows * c].view(16, rows, c), m[:16 * rows * k].view(16, rows, k)
        lib.sf_winograd_input(xl[i].data_ptr(), vi.data_ptr(), count, h, w, c, threads)
        torch.bmm(vi, u, out=mi)
        lib.sf_winograd_output(mi.data_ptr(), b.data_ptr() if b is not None else None, y[i].data_ptr(), count, h, w, k,
                               threads)
    return y.permute(0, 3, 1, 2)


def _dense_or_winograd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = winograd_conv2d(x, weight, bias)
    return y if y is not None else F.conv2d(x, weight, bias, padding=1).contiguous(memory_format=torch.channels_last)


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight, padding=1)``'s input for the output gradient ``grad``
    ``(N, C_out, H, W)``: the same convolution of ``grad`` with ``weight`` flipped in space and its
    channels swapped, by F(2x2, 3x3); channels-last."""
    return _dense_or_winograd(grad, weight.flip(2, 3).transpose(0, 1), None)


class _Winograd(torch.autograd.Function):
    """:func:`conv2d`: the forward and the input gradient by F(2x2, 3x3), the weight's and bias's PyTorch's."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dense_or_winograd(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = input_grad(grad, weight) if need_x else None
        gw = gb = None
        if need_w or (ctx.has_bias and need_b):
            _, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                (False, need_w, ctx.has_bias and need_b))
        return gx, gw if need_w else None, gb if ctx.has_bias and need_b else None


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1)`` of float32 CPU maps by F(2x2, 3x3), channels-last,
    differentiable in all three (the input gradient by F(2x2, 3x3) too, the others PyTorch's);
    PyTorch's convolution where :func:`winograd_conv2d` declines (other dtypes or devices, no
    kernel library)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Winograd.apply(x, weight, bias)
    return _dense_or_winograd(x, weight, bias)
