"""Spike attention's products on the CPU (``csrc/attention_cpu.cpp``, in the library of
:mod:`spikingformer.kernels.cpu_backend`) as the operator ``spikingformer::spike_attention``, and
their plain PyTorch twin.

For token rows ``q``, ``k``, ``v`` of shape ``(R, N, C)`` with ``heads`` heads of ``d = C / heads``
channels each (head ``h``: channels ``[h d, (h + 1) d)``), the operator returns the rows of
``(Q_h (K_h^T V_h)) * scale``: what :func:`~spikingformer.layers.blocks.spike_attention` computes
for ``N > d``, without the copies into head-major layouts that PyTorch's batched product needs
(route ``fused_attention``, :mod:`spikingformer.layers.routes`). Sums in float32; ``K^T V`` and its
product with ``Q`` rounded to the storage dtype (float32 or bfloat16) as PyTorch's products store
them, then the scale: for spikes (sums of integers, exact) the plain path's values bit for bit.

Its backward, ``spikingformer::spike_attention_backward``, computes the gradients of ``q``, ``k``
and ``v`` likewise from and into rows (``G = grad * scale`` and ``K^T V`` again; ``G (K^T V)^T``,
``Q^T G``, and that product's with ``V`` and ``K``, each rounded to the dtype as the batched
products' backward rounds them): the same arithmetic but for the order of the sums. Both are
registered with fake implementations, and the forward with its autograd, so ``torch.compile``
and ``torch.export`` keep each as one opaque call.
"""

from __future__ import annotations

import torch

from spikingformer.kernels import cpu_backend

HEAD_DIMS = (16, 32, 48, 64)  # those the kernel is built for
DTYPES = (torch.float32, torch.bfloat16)


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``(R, N, C)`` as heads ``(R, heads, N, C / heads)`` (a view)."""
    r, n, c = x.shape
    return x.view(r, n, heads, c // heads).transpose(1, 2)


def _join(x: torch.Tensor) -> torch.Tensor:
    """Heads ``(R, h, N, d)`` as rows ``(R, N, h d)`` (contiguous)."""
    r, h, n, d = x.shape
    return x.transpose(1, 2).reshape(r, n, h * d)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """What the kernel computes, in plain PyTorch: the heads of the rows ``(R, N, C)`` as
    ``(R, heads, N, d)``, ``q @ (k^T @ v) * scale``, back to rows (contiguous)."""
    qh, kh, vh = (_split(x, heads) for x in (q, k, v))
    return _join(qh @ (kh.transpose(-2, -1) @ vh) * scale)


def kernel_takes(q: torch.Tensor, heads: int) -> bool:
    """Whether the kernel computes rows like ``q`` (its dtype, its head dimension) with ``heads`` heads."""
    c = q.shape[-1]
    return q.dtype in DTYPES and c % heads == 0 and c // heads in HEAD_DIMS


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> None:
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"spike_attention: q, k and v must be token rows (R, N, C) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"spike_attention: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if heads <= 0 or q.shape[-1] % heads:
        raise ValueError(f"spike_attention: {q.shape[-1]} channels do not split into {heads} heads")


def attention_backward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, heads: int,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the backward kernel computes, in plain PyTorch: the gradients of :func:`attention_reference`'s
    rows for ``grad``, as its batched products' backward computes them (``G = grad * scale``,
    ``M = K^T V``; ``G M^T``, ``gM = Q^T G``, ``V gM^T``, ``K gM``, each in the inputs' dtype)."""
    qh, kh, vh, g = (_split(x, heads) for x in (q, k, v, grad * scale))
    m, gm = kh.transpose(-2, -1) @ vh, qh.transpose(-2, -1) @ g
    return _join(g @ m.transpose(-2, -1)), _join(vh @ gm.transpose(-2, -1)), _join(kh @ gm)


def _takes(q: torch.Tensor, heads: int):
    """The kernel library where it takes rows like ``q`` with ``heads`` heads, else None."""
    lib = cpu_backend.get_library()
    return lib if lib is not None and kernel_takes(q, heads) else None


def _call(entry, tensors: list[torch.Tensor], outputs: int, heads: int, scale: float) -> list[torch.Tensor]:
    """``outputs`` new tensors shaped like ``tensors[0]``, filled by the library's ``entry`` from ``tensors``."""
    r, n, c = tensors[0].shape
    tensors = [x.contiguous() for x in tensors]  # held until the call returns
    outs = [torch.empty(tensors[0].shape, dtype=tensors[0].dtype) for _ in range(outputs)]
    if tensors[0].numel():
        ptrs = [x.data_ptr() for x in tensors] + [o.data_ptr() for o in outs]
        rc = entry(*ptrs, r, n, c, c // heads, cpu_backend.DTYPE_CODES[tensors[0].dtype], scale, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"{entry.__name__} failed with code {rc}")
    return outs


@torch.library.custom_op("spikingformer::spike_attention", mutates_args=(), device_types="cpu")
def spike_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The rows of ``(Q_h (K_h^T V_h)) * scale`` (see the module docstring); :func:`attention_reference`
    where the kernel does not take the rows (dtype, head dimension) or the library cannot be built."""
    _check(q, k, v, heads)
    lib = _takes(q, heads)
    if lib is None:
        return attention_reference(q, k, v, heads, scale)
    return _call(lib.sf_spike_attention, [q, k, v], 1, heads, scale)[0]


@torch.library.custom_op("spikingformer::spike_attention_backward", mutates_args=(), device_types="cpu")
def spike_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, heads: int,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``spike_attention``'s rows with respect to ``q``, ``k``, ``v`` for its output's
    gradient ``grad``; :func:`attention_backward_reference` where the kernel does not take them."""
    _check(q, k, v, heads)
    grad = grad.to(q.dtype)
    lib = _takes(q, heads)
    if lib is None:
        return attention_backward_reference(q, k, v, grad, heads, scale)
    gq, gk, gv = _call(lib.sf_spike_attention_backward, [q, k, v, grad], 3, heads, scale)
    return gq, gk, gv


@spike_attention.register_fake
def _spike_attention_fake(q, k, v, heads, scale):
    _check(q, k, v, heads)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@spike_attention_backward.register_fake
def _spike_attention_backward_fake(q, k, v, grad, heads, scale):
    _check(q, k, v, heads)
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, heads, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    return *spike_attention_backward(q, k, v, grad, ctx.heads, ctx.scale), None, None


spike_attention.register_autograd(_backward, setup_context=_setup_context)
