"""Building blocks shared by Spikingformer and Spikformer.

Tensor layout inside the network is time first: images ``(T, B, C, H, W)`` in the tokenizer,
tokens ``(T, B, N, C)`` in the transformer blocks (channels last, so every pointwise ConvBN is a
plain matrix product followed by a BatchNorm over the flattened ``T*B*N`` rows; BatchNorm
statistics are therefore shared across time steps, as in the authors' code).

The two models differ only in where the spiking neuron (SN) sits relative to ConvBN:

* ``ResidualStyle.SPIKE_DRIVEN`` (Spikingformer, paper Eq. 3-8): every branch is
  ``SN -> ConvBN -> ... -> ConvBN`` and is added to a real-valued stream, so every ConvBN and
  matrix product receives spikes.
* ``ResidualStyle.SPIKFORMER`` (Eq. 1-2): every branch is ``ConvBN -> SN -> ... -> ConvBN -> SN``,
  so the stream is a sum of spikes (integers) and the next block's layers receive integers > 1.
"""

from __future__ import annotations

import enum
from functools import partial
from typing import Callable

import torch
from torch import nn

from spikingformer.neuron import MultiStepLIF, multistep_lif


class ResidualStyle(str, enum.Enum):
    SPIKE_DRIVEN = "spike_driven"  # Spikingformer: SN -> ConvBN -> add
    SPIKFORMER = "spikformer"  # Spikformer: ConvBN -> SN -> add


LIFFactory = Callable[..., MultiStepLIF]


def lif_factory(tau: float = 2.0, backend: str = "auto") -> LIFFactory:
    """A constructor for the model's neurons: shared tau and backend, per-layer threshold."""
    return partial(MultiStepLIF, tau=tau, detach_reset=True, backend=backend)


class ConvBN(nn.Module):
    """3x3 convolution (stride 1, pad 1, no bias) + BatchNorm2d on ``(T, B, C, H, W)``.

    Runs in the channels-last memory format (the output keeps it): the CPU convolution (oneDNN),
    BatchNorm and max-pool kernels work on it without reordering, and the tokenizer's final
    ``(T, B, D, H, W) -> (T, B, N, D)`` becomes a free view. Only strides change, not values.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution alone (the BN input), ``(T, B, C, H, W)`` -> ``(T, B, C_out, H, W)``."""
        t, b = x.shape[:2]
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # no copy if already channels-last
        y = self.conv(x)
        return y.view(t, b, *y.shape[1:])

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        """The BatchNorm of :meth:`convolve`'s output, on the flattened ``T*B`` maps."""
        z = self.bn(y.flatten(0, 1))
        return z.view(y.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.convolve(x))


def _bn_spike_pool(stage: ConvBN, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``[MP](SN(BN(y)))``: the BN of ``stage`` on its conv output ``y``, the neuron, the optional max-pool.

    In inference (no autograd, BN with running statistics) the BN overwrites ``y``, a temporary of
    the tokenizer's, instead of allocating a second map of the same size: PyTorch's own BN kernel
    with ``out=`` its input, so the values are those of the module call. ``y`` must therefore own
    its memory (no expanded view; see :meth:`SpikingTokenizer.encode_static`).
    """
    bn = stage.bn
    if not torch.is_grad_enabled() and isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.affine \
            and bn.running_mean is not None:
        flat = y.flatten(0, 1)
        torch.ops.aten.native_batch_norm.out(flat, bn.weight, bn.bias, bn.running_mean, bn.running_var, False, 0.0,
                                             bn.eps, out=flat, save_mean=bn.running_mean.new_empty(0),
                                             save_invstd=bn.running_mean.new_empty(0))
        z = y
    else:
        z = stage.normalize(y)
    x = _spike_channels_last(lif, z)
    return _max_pool(x) if pool else x


def _recompute_bn_spike_pool(stage: ConvBN, lif: MultiStepLIF, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """:func:`_bn_spike_pool` in training mode again, bit for bit, for the backward of
    :class:`_RecomputedBNSpikePool`: BN with the batch statistics, without touching the running
    estimates a second time, and no module calls, so forward hooks (firing-rate meters) do not
    see the batch twice."""
    bn = stage.bn
    z = nn.functional.batch_norm(y.flatten(0, 1), None, None, bn.weight, bn.bias, True, 0.0, bn.eps).view(y.shape)
    x = multistep_lif(z.permute(0, 1, 3, 4, 2), lif.params, lif.backend).permute(0, 1, 4, 2, 3)
    return _max_pool(x) if pool else x


class _RecomputedBNSpikePool(torch.autograd.Function):
    """:func:`_bn_spike_pool` in training, keeping only its input ``y`` for backward.

    Between two tokenizer convolutions sit BN -> SN -> max-pool. Autograd would keep the BN output
    (the neuron's input), the spikes (the max-pool's input) and the max-pool's int64 indices: three
    tensors the size of the largest feature maps and one of half that. This function keeps only the
    conv output (which BN's own backward keeps anyway) and recomputes the rest in backward: one
    more pass of BN, the fused neuron and the max-pool over maps that are freed right after.
    Forward values, running statistics and gradients are those of the plain module calls, bit for
    bit (``tests/test_model_efficiency.py``).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, stage, lif, pool):
        ctx.stage, ctx.lif, ctx.pool = stage, lif, pool
        device = y.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(y)
        return _bn_spike_pool(stage, lif, pool, y.detach())  # module calls: running statistics, hooks

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        bn = ctx.stage.bn
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            y = y.detach().requires_grad_()
            out = _recompute_bn_spike_pool(ctx.stage, ctx.lif, ctx.pool, y)
        wanted = [t for t, need in zip((y, bn.weight, bn.bias), ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None, None, None)


def bn_spike_pool(stage: ConvBN, lif: nn.Module, pool: bool, y: torch.Tensor) -> torch.Tensor:
    """``[MP](SN(BN(y)))`` for a :class:`ConvBN`'s conv output: memory-lean when training (see
    :class:`_RecomputedBNSpikePool`, for maps of at least :data:`RECOMPUTE_MIN_ELEMENTS` elements),
    the plain module calls otherwise (eval, no grad, a fused BN, small maps, or a neuron that keeps
    state between calls and so cannot be run twice)."""
    bn = stage.bn
    # Not under torch.compile: the compiler cannot trace the autograd.grad in its backward (a graph
    # break); its own partitioner decides what to recompute there.
    if (torch.is_grad_enabled() and isinstance(bn, nn.BatchNorm2d) and bn.training and bn.affine
            and type(lif) is MultiStepLIF and y.numel() >= RECOMPUTE_MIN_ELEMENTS
            and not torch.compiler.is_compiling()):
        return _RecomputedBNSpikePool.apply(y, bn.weight, bn.bias, stage, lif, pool)
    return _bn_spike_pool(stage, lif, pool, y)


ONEDNN_MIN_WEIGHTS = 1 << 16  # smaller layers (e.g. 64 x 64) run faster through F.linear
RECOMPUTE_MIN_ELEMENTS = 1 << 24  # maps of 64 MB (fp32) and up: event and ImageNet resolutions


class TokenLinear(nn.Linear):
    """``nn.Linear`` over the channel (last) dimension of tokens, computed by the faster GEMM on the CPU.

    For float32 CPU tensors outside autocast, PyTorch's ``F.linear`` calls MKL's ``sgemm``, which on
    this project's benchmark machine (AMD EPYC, AVX-512) runs 25-35% slower than oneDNN, the library
    PyTorch's CPU convolutions use (forward+backward of the MLP shapes: 145 vs 200 GFLOP/s). The
    layer then computes the same product as a 1x1 convolution over a channels-last view of the same
    memory (no copy in, no copy out), which oneDNN runs, and whose backward is oneDNN's too.
    Everywhere else (CUDA, bf16/fp16, autocast, float64, and layers with fewer than
    :data:`ONEDNN_MIN_WEIGHTS` weights, where the convolution's set-up costs more than it saves)
    it is plain ``F.linear``. The values differ
    from ``F.linear``'s only by float32 rounding (another summation order); the weights, the state
    dict and the hooks the analysis tools attach are those of ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
                or self.weight.numel() < ONEDNN_MIN_WEIGHTS):
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])  # a view for the contiguous tensors the blocks pass
        m, k = rows.shape
        image = rows.view(1, m, 1, k).permute(0, 3, 1, 2)  # (1, K, M, 1), channels-last strides
        y = nn.functional.conv2d(image, self.weight.view(*self.weight.shape, 1, 1), self.bias)
        return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


class TokenConvBN(nn.Module):
    """Pointwise (1x1) convolution over tokens + BatchNorm1d, on ``(T, B, N, C)``.

    A 1x1 convolution over channels is a linear map, so it is stored as ``nn.Linear`` weights
    ``(out, in)``; the authors' Conv1d ``(out, in, 1)`` and Conv2d ``(out, in, 1, 1)`` weights load
    into it by reshaping (see :mod:`spikingformer.models.authors`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.linear = TokenLinear(in_features, out_features, bias=bias)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.reshape(-1, y.shape[-1])).view(y.shape)


def _spike_channels_last(lif: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lif(x)`` for ``(T, B, C, H, W)`` maps, run on the ``(T, B, H, W, C)`` permutation.

    The neuron is elementwise over everything but T, so the permutation changes no value; for the
    channels-last maps :class:`ConvBN` produces it is a contiguous view, so the neuron reads and
    writes memory in order (no copy in, no copy out) and its spikes stay channels-last.
    """
    return lif(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    """MaxPool2d(kernel 3, stride 2, padding 1) on ``(T, B, C, H, W)``."""
    t, b = x.shape[:2]
    y = nn.functional.max_pool2d(x.flatten(0, 1), kernel_size=3, stride=2, padding=1)
    return y.view(t, b, *y.shape[1:])


class SpikingTokenizer(nn.Module):
    """Spiking Tokenizer (paper s.3.2, Eq. 9-10): images ``(T, B, C_in, H, W)`` -> tokens ``(T, B, N, D)``.

    Five ConvBN stages with channels ``C_in -> D/8 -> D/4 -> D/2 -> D -> D``. Stage 0 encodes the
    input (it sees the real-valued image or event counts). Between stages sits an SN, and a
    max-pool (kernel 3, stride 2) in front of the last ``num_pools`` stages: 2 for CIFAR (x4
    downsampling, SPE SPE SPED SPED), 4 for ImageNet and event data (x16, SPED x4).

    * Spikingformer: ``... SN -> [MP] -> ConvBN``; the output is the last BN (real-valued).
    * Spikformer: stages 1-3 as above, then ``SN -> [MP]`` gives ``x_feat`` and stage 4 is the
      relative-position branch: ``x_feat + SN(ConvBN(x_feat))``.
    """

    def __init__(
        self, in_channels: int, embed_dim: int, num_pools: int, style: ResidualStyle, lif: LIFFactory
    ) -> None:
        super().__init__()
        if embed_dim % 8:
            raise ValueError(f"embed_dim must be divisible by 8 (the tokenizer uses D/8 channels), got {embed_dim}")
        if num_pools not in range(5):
            raise ValueError(f"num_pools must be 0..4, got {num_pools}")
        d = embed_dim
        channels = [in_channels, d // 8, d // 4, d // 2, d, d]
        self.style = ResidualStyle(style)
        self.num_pools = num_pools
        self.stages = nn.ModuleList(ConvBN(channels[i], channels[i + 1]) for i in range(5))
        n_lifs = 4 if self.style is ResidualStyle.SPIKE_DRIVEN else 5
        self.lifs = nn.ModuleList(lif() for _ in range(n_lifs))

    def _pool_before(self, stage: int) -> bool:
        return stage > 4 - self.num_pools

    def _spikes_for(self, stage: int, y: torch.Tensor) -> torch.Tensor:
        """The input of ``stages[stage]``: BN of the previous stage's conv output ``y``, SN, [MP]."""
        return bn_spike_pool(self.stages[stage - 1], self.lifs[stage - 1], self._pool_before(stage), y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, B, C_in, H, W)`` (images repeated over T, or event frames) -> ``(T, B, N, D)``."""
        return self._forward_after_stem(self.stages[0].convolve(x))

    def encode_static(self, images: torch.Tensor, time_steps: int) -> torch.Tensor:
        """Tokens for static images ``(B, C, H, W)`` repeated over ``time_steps`` (direct encoding).

        Same result as ``forward(images.expand(T, ...))``, but the first convolution runs once
        instead of T times (every step sees the same image); BatchNorm still sees all T copies,
        so its batch statistics and running estimates are exactly those of the repeated input.
        The T copies are materialised (``contiguous``, not ``reshape``, which for a batch of one
        would return a stride-0 view of one map): the stages after the stem may overwrite their
        input in place (:func:`_bn_spike_pool`), which needs memory of its own.
        """
        y = self.stages[0].conv(images.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = y.unsqueeze(0).expand(time_steps, *y.shape).contiguous().flatten(0, 1).permute(0, 3, 1, 2)  # (T*B, C, H, W)
        return self._forward_after_stem(y.view(time_steps, images.shape[0], *y.shape[1:]))

    def _forward_after_stem(self, y: torch.Tensor) -> torch.Tensor:
        """Stages 1-4 from the stem's conv output ``y`` (before its BN)."""
        for i in range(1, 4):
            y = self.stages[i].convolve(self._spikes_for(i, y))
        x = self._spikes_for(4, y)
        if self.style is ResidualStyle.SPIKE_DRIVEN:
            x = self.stages[4](x)
        else:
            x = x + _spike_channels_last(self.lifs[4], self.stages[4](x))
        return x.flatten(3).transpose(2, 3)  # (T, B, D, H, W) -> (T, B, N, D): a view of channels-last maps


def spike_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``Q K^T V * s`` without softmax on ``(..., N, d)`` tensors.

    Both association orders give the same numbers (all operands are spikes, every partial sum is a
    small integer, and ``s`` is a power of two in the zoo), so the cheaper one is used:
    ``(Q K^T) V`` costs ``2 N^2 d`` multiply-adds, ``Q (K^T V)`` costs ``2 N d^2``.
    """
    n, d = q.shape[-2:]
    if n <= d:
        return (q @ k.transpose(-2, -1)) @ v * scale
    return q @ (k.transpose(-2, -1) @ v) * scale


class SpikingSelfAttention(nn.Module):
    """Spiking Self Attention (paper Eq. 11-13) on tokens ``(T, B, N, D)``.

    ``Q, K, V = SN(ConvBN(X'))``; ``SSA = ConvBN(SN_attn(Q K^T V * s))`` with the attention SN at
    threshold 0.5 and s = 0.125. Spikingformer puts an SN in front (``X' = SN(X)``); Spikformer
    puts one after the projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        style: ResidualStyle,
        lif: LIFFactory,
        qkv_bias: bool = False,
        attn_threshold: float = 0.5,
        scale: float = 0.125,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = scale
        spike_driven = ResidualStyle(style) is ResidualStyle.SPIKE_DRIVEN
        self.in_lif = lif() if spike_driven else nn.Identity()
        self.q = TokenConvBN(dim, dim, qkv_bias)
        self.k = TokenConvBN(dim, dim, qkv_bias)
        self.v = TokenConvBN(dim, dim, qkv_bias)
        self.q_lif, self.k_lif, self.v_lif = lif(), lif(), lif()
        self.attn_lif = lif(v_threshold=attn_threshold)
        self.proj = TokenConvBN(dim, dim, bias=True)
        self.out_lif = nn.Identity() if spike_driven else lif()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        t, b, n, c = x.shape
        return x.view(t, b, n, self.num_heads, c // self.num_heads).transpose(2, 3)  # (T, B, h, N, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_lif(x)
        q = self._heads(self.q_lif(self.q(x)))
        k = self._heads(self.k_lif(self.k(x)))
        v = self._heads(self.v_lif(self.v(x)))
        y = spike_attention(q, k, v, self.scale)  # (T, B, h, N, d)
        y = y.transpose(2, 3).flatten(3)  # (T, B, N, D), channel = head * d + j
        return self.out_lif(self.proj(self.attn_lif(y)))


class SpikingMLP(nn.Module):
    """Spiking MLP on tokens ``(T, B, N, D)``: two pointwise ConvBNs with an SN between them.

    Spikingformer: ``SN -> ConvBN -> SN -> ConvBN``; Spikformer: ``ConvBN -> SN -> ConvBN -> SN``.
    """

    def __init__(self, dim: int, hidden_dim: int, style: ResidualStyle, lif: LIFFactory) -> None:
        super().__init__()
        spike_driven = ResidualStyle(style) is ResidualStyle.SPIKE_DRIVEN
        self.in_lif = lif() if spike_driven else nn.Identity()
        self.fc1 = TokenConvBN(dim, hidden_dim, bias=True)
        self.hidden_lif = lif()
        self.fc2 = TokenConvBN(hidden_dim, dim, bias=True)
        self.out_lif = nn.Identity() if spike_driven else lif()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_lif(self.fc2(self.hidden_lif(self.fc1(self.in_lif(x)))))


class SpikingTransformerBlock(nn.Module):
    """``X = X + SSA(X); X = X + MLP(X)`` on tokens ``(T, B, N, D)`` (paper Eq. 5-8)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        style: ResidualStyle,
        lif: LIFFactory,
        qkv_bias: bool = False,
        attn_threshold: float = 0.5,
        attn_scale: float = 0.125,
    ) -> None:
        super().__init__()
        self.attn = SpikingSelfAttention(dim, num_heads, style, lif, qkv_bias, attn_threshold, attn_scale)
        self.mlp = SpikingMLP(dim, int(dim * mlp_ratio), style, lif)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


HEAD_KINDS = ("avgpool_fc", "sn_avgpool_fc", "fc_avgpool", "sn_fc_avgpool")


class ClassificationHead(nn.Module):
    """The four classifiers of paper Eq. 14-17 on tokens ``(T, B, N, D)`` -> logits ``(B, K)``.

    AvgPooling averages over tokens and time steps.

    * ``avgpool_fc``    Eq. 14 ``FC(AvgPool(X))`` (the default; the FC reads real values: MACs)
    * ``sn_avgpool_fc`` Eq. 15 ``FC(AvgPool(SN(X)))``
    * ``fc_avgpool``    Eq. 16 ``AvgPool(FC(X))``
    * ``sn_fc_avgpool`` Eq. 17 ``AvgPool(FC(SN(X)))`` (the FC reads spikes: accumulations only)

    FC and AvgPool are both linear, so Eq. 16 equals Eq. 14 and Eq. 17 equals Eq. 15 up to
    rounding; the forms differ in the operations a chip performs (the energy analysis counts them
    by what the FC actually receives).
    """

    def __init__(self, dim: int, num_classes: int, kind: str, lif: LIFFactory) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head {kind!r}; valid heads: {', '.join(HEAD_KINDS)}")
        self.kind = kind
        self.lif = lif() if kind.startswith("sn_") else nn.Identity()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lif(x)
        if self.kind.endswith("avgpool_fc"):
            return self.fc(x.mean(dim=2).mean(dim=0))
        return self.fc(x).mean(dim=2).mean(dim=0)
