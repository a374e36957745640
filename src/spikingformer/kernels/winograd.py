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

Maps in float32 or bfloat16 (all tensors in one dtype). In bfloat16 each transform reads its
values into float32, adds there and rounds once to bfloat16 (the weight's transform too); the
products are bfloat16's ``bmm`` (float32 sums rounded once). Tiles of spikes transform exactly
(integers up to 4 in magnitude); otherwise the rounding of ``V``, ``U`` and ``M`` comes on top
of the direct convolution's one rounding of each output.

Rounding: the transforms add and subtract inputs before the products and sums after, so values
differ from the direct convolution's by rounding; against the float64 convolution the float32
results erred by 1.7e-7 to 5.0e-7 of the largest output on the zoo's tokenizer shapes, where
oneDNN's direct convolution erred by 1.1e-7 to 1.5e-6 (docs/performance-log.md, "Winograd
F(2x2, 3x3) against the direct convolution").

:func:`conv2d` is differentiable: the input gradient of a 3x3 convolution with padding 1 is the
3x3 convolution (padding 1) of the output gradient with the weight flipped in space and its
channels swapped, so it runs here too. The weight gradient runs the three steps backwards
(:func:`winograd_weight_grad`): the input's tiles ``V`` (computed again from the saved input), the
output gradient's tiles ``dM = A dY A^T`` (:func:`grad_tiles`, the output transform's adjoint, one
C++ pass), 16 products ``V[i]^T dM[i]`` summed over tiles (one ``bmm`` per piece of the batch,
pieces summed in float32), and the weight transform's adjoint ``G^T dU G``. The bias gradient is
the output gradient's sum. The route that calls it is ``winograd`` (:mod:`spikingformer.layers.winograd`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spikingformer.kernels import cpu_backend

PIECE_BYTES = 1 << 26  # V and M of one piece of the batch (the images are split between pieces)
DTYPES = (torch.float32, torch.bfloat16)  # what the C++ transforms read and write
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _g_kron_g(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``G (x) G`` ``(16, 9)``: row ``4 i + j`` maps a 3x3 kernel to its transform at tile position (i, j)."""
    g = torch.tensor(_G, dtype=dtype, device=device)
    return torch.kron(g, g)


def weight_transform(weight: torch.Tensor) -> torch.Tensor:
    """``U = G w G^T`` for every (output, input) channel pair of ``weight`` ``(C_out, C_in, 3, 3)``:
    ``(16, C_in, C_out)`` (index ``4 i + j`` for the tile position ``(i, j)``), the products' right
    operands, in the weight's dtype: a view of ``(16, C_out, C_in)`` in memory, which ``bmm`` reads
    as it is. One product of ``G (x) G`` with the pairs' 9 weights (``U[i, j] = sum_ab G[i, a]
    G[j, b] w[a, b]``; the entries of ``G (x) G`` are 0, +-1/4, +-1/2 and 1, exact)."""
    wide = weight.float() if weight.dtype == torch.bfloat16 else weight  # bfloat16: in float32, rounded once
    with torch.autocast(weight.device.type, enabled=False):
        u = (_g_kron_g(wide.dtype, weight.device) @ wide.reshape(-1, 9).T).to(weight.dtype)  # (16, C_out C_in)
    return u.view(16, weight.shape[0], weight.shape[1]).transpose(1, 2)


def _tiles(h: int, w: int) -> tuple[int, int]:
    return (h + 1) // 2, (w + 1) // 2


def input_transform(x: torch.Tensor) -> torch.Tensor:
    """``V = B^T d B`` for every 4x4 tile ``d`` of maps ``x`` ``(N, C, H, W)`` (stride 2, padding 1):
    ``(16, tiles, C)``, tiles in (image, row, column) order, in x's dtype (bfloat16: computed in
    float32, rounded once). The twin of ``sf_winograd_input``."""
    if x.dtype == torch.bfloat16:
        return input_transform(x.float()).to(x.dtype)
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
    ``(N, C_out, H, W)`` output of ``shape``, channels-last, in m's dtype (bfloat16: computed in
    float32 with the bias in float32, rounded once). The twin of ``sf_winograd_output``."""
    if m.dtype == torch.bfloat16:
        return output_transform(m.float(), shape, bias.float() if bias is not None else None).to(m.dtype)
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


def _pieces(n: int, h: int, w: int, c: int, k: int, dtype: torch.dtype):
    """The batch of ``n`` images in pieces whose tiles of ``c`` and ``k`` channels hold at most
    :data:`PIECE_BYTES`: for each, ``(first image, images, V, M)``, V ``(16, tiles, c)`` and M
    ``(16, tiles, k)`` views of two buffers made once (a piece's tiles fill their first elements)."""
    th, tw = _tiles(h, w)
    images = max(1, min(n, PIECE_BYTES // (16 * th * tw * (c + k) * dtype.itemsize)))
    v, m = torch.empty(16 * images * th * tw * c, dtype=dtype), torch.empty(16 * images * th * tw * k, dtype=dtype)
    for i in range(0, n, images):
        count = min(images, n - i)
        rows = count * th * tw
        yield i, count, v[:16 * rows * c].view(16, rows, c), m[:16 * rows * k].view(16, rows, k)


def _library(*tensors: torch.Tensor):
    """The kernel library where the C++ transforms take ``tensors`` (CPU, all float32 or all bfloat16), else None."""
    if tensors[0].dtype not in DTYPES or any(t.dtype != tensors[0].dtype or t.device.type != "cpu" for t in tensors):
        return None
    return cpu_backend.get_library()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Maps ``(N, C, H, W)`` as ``(N, H, W, C)`` rows: a view where they are channels-last, else a copy."""
    return x.detach().permute(0, 2, 3, 1).contiguous()


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
                    ) -> Optional[torch.Tensor]:
    """``conv2d(x, weight, bias, padding=1)`` by F(2x2, 3x3) with the C++ transforms, for CPU maps
    ``x`` ``(N, C_in, H, W)``, weight ``(C_out, C_in, 3, 3)`` and bias ``(C_out,)``, all float32 or
    all bfloat16: the output ``(N, C_out, H, W)`` in that dtype, channels-last; the same bits as
    :func:`winograd_reference`. ``None`` for other dtypes or devices, mixed dtypes, or where the
    kernel library cannot be built. ``x`` not channels-last is copied so first."""
    lib = _library(*((x, weight) if bias is None else (x, weight, bias)))
    if lib is None:
        return None
    n, c, h, w = x.shape
    k, threads, code = weight.shape[0], torch.get_num_threads(), cpu_backend.DTYPE_CODES[x.dtype]
    xl, u = _rows(x), weight_transform(weight.detach())
    b = bias.detach().float().contiguous() if bias is not None else None  # the C++ pass adds it in float32
    y = torch.empty((n, h, w, k), dtype=x.dtype)
    for i, count, v, m in _pieces(n, h, w, c, k, x.dtype):
        lib.sf_winograd_input(xl[i].data_ptr(), v.data_ptr(), count, h, w, c, code, threads)
        torch.bmm(v, u, out=m)
        lib.sf_winograd_output(m.data_ptr(), b.data_ptr() if b is not None else None, y[i].data_ptr(), count, h, w, k,
                               code, threads)
    return y.permute(0, 3, 1, 2)


def grad_tiles(g: torch.Tensor) -> torch.Tensor:
    """``dM = A dY A^T`` for the 2x2 block ``dY`` of every tile of the output gradient ``g``
    ``(N, K, H, W)`` (zeros beyond H and W): ``(16, tiles, K)``, the adjoint of
    :func:`output_transform`'s ``A^T M A``, in g's dtype (bfloat16: computed in float32, rounded
    once). The twin of ``sf_winograd_grad_tiles``."""
    if g.dtype == torch.bfloat16:
        return grad_tiles(g.float()).to(g.dtype)
    n, k, h, w = g.shape
    th, tw = _tiles(h, w)
    d = F.pad(g, (0, 2 * tw - w, 0, 2 * th - h)).unfold(2, 2, 2).unfold(3, 2, 2).permute(4, 5, 0, 2, 3, 1)
    rows = (d[0], d[0] + d[1], d[0] - d[1], -d[1])  # A dY: each (2 cols, N, th, tw, K)
    dm = torch.empty((4, 4, n, th, tw, k), dtype=g.dtype, device=g.device)
    for i, r in enumerate(rows):  # (A dY) A^T
        dm[i, 0] = r[0]
        torch.add(r[0], r[1], out=dm[i, 1])
        torch.sub(r[0], r[1], out=dm[i, 2])
        torch.neg(r[1], out=dm[i, 3])
    return dm.view(16, n * th * tw, k)


def _weight_from_tiles(du: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight gradient ``(K, C, 3, 3)`` in ``dtype`` from the gradient ``du`` ``(16, C, K)`` of
    :func:`weight_transform`'s ``U`` (its adjoint: ``G^T dU G``), computed in du's dtype."""
    _, c, k = du.shape
    with torch.autocast(du.device.type, enabled=False):
        dw = _g_kron_g(du.dtype, du.device).T @ du.transpose(1, 2).reshape(16, k * c)  # (9, K C)
    return dw.T.reshape(k, c, 3, 3).to(dtype)


def weight_grad_reference(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight, padding=1)``'s weight for the output gradient ``g`` by
    F(2x2, 3x3), in plain PyTorch: the products of the input's tiles and :func:`grad_tiles` summed
    over tiles (one ``bmm``; bfloat16: its sums rounded once, then in float32), taken back through
    the weight's transform. What :func:`winograd_weight_grad` computes in one piece."""
    du = torch.bmm(input_transform(x).transpose(1, 2), grad_tiles(g))
    return _weight_from_tiles(du if du.dtype == torch.float64 else du.float(), x.dtype)


def winograd_weight_grad(x: torch.Tensor, g: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`weight_grad_reference` with the C++ transforms, for CPU maps ``x`` ``(N, C_in, H, W)``
    and output gradient ``g`` ``(N, C_out, H, W)``, both float32 or both bfloat16: ``(C_out, C_in, 3,
    3)`` in their dtype, the pieces' products summed in float32. ``None`` where
    :func:`winograd_conv2d` declines."""
    lib = _library(x, g)
    if lib is None:
        return None
    n, c, h, w = x.shape
    k, threads, code = g.shape[1], torch.get_num_threads(), cpu_backend.DTYPE_CODES[x.dtype]
    xl, gl = _rows(x), _rows(g)
    du = torch.zeros((16, c, k), dtype=torch.float32)
    for i, count, v, m in _pieces(n, h, w, c, k, x.dtype):
        lib.sf_winograd_input(xl[i].data_ptr(), v.data_ptr(), count, h, w, c, code, threads)
        lib.sf_winograd_grad_tiles(gl[i].data_ptr(), m.data_ptr(), count, h, w, k, code, threads)
        du += torch.bmm(v.transpose(1, 2), m)
    return _weight_from_tiles(du, x.dtype)


def _dense_or_winograd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = winograd_conv2d(x, weight, bias)
    return y if y is not None else F.conv2d(x, weight, bias, padding=1).contiguous(memory_format=torch.channels_last)


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight, padding=1)``'s input for the output gradient ``grad``
    ``(N, C_out, H, W)``: the same convolution of ``grad`` with ``weight`` flipped in space and its
    channels swapped, by F(2x2, 3x3); channels-last."""
    return _dense_or_winograd(grad, weight.flip(2, 3).transpose(0, 1), None)


def weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of ``conv2d(x, weight, padding=1)``'s weight for the output gradient ``grad``: by
    F(2x2, 3x3) (:func:`winograd_weight_grad`), else (where that declines) PyTorch's."""
    gw = winograd_weight_grad(x, grad)
    if gw is None:
        gw = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                 (False, True, False))[1]
    return gw


class _Winograd(torch.autograd.Function):
    """:func:`conv2d`: the forward and the input and weight gradients by F(2x2, 3x3), the bias's a sum."""

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
        gw = weight_grad(x, grad, weight) if need_w else None
        gb = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
        return gx, gw, gb


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``conv2d(x, weight, bias, padding=1)`` of float32 or bfloat16 CPU maps by F(2x2, 3x3), channels-last,
    differentiable in all three (the input's and weight's gradients by F(2x2, 3x3) too);
    PyTorch's convolution where :func:`winograd_conv2d` declines (other dtypes or devices, no
    kernel library)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _Winograd.apply(x, weight, bias)
    return _dense_or_winograd(x, weight, bias)
