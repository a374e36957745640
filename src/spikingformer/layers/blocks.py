"""The paper's building blocks, in the paper's order: ConvBN, the Spiking Tokenizer, Spiking Self
Attention, the spiking MLP, the Spiking Transformer Block and the classification head.

Tensor layout is time first: maps ``(T, B, C, H, W)`` in the tokenizer, tokens ``(T, B, N, C)`` in
the blocks, where every pointwise ConvBN is a matrix product followed by a BatchNorm over the
``T*B*N`` rows (statistics shared across time steps, as in the authors' code).

Spikingformer and Spikformer differ only in where the spiking neuron (SN) sits (paper s.3.1-3.2):

* ``ResidualStyle.SPIKE_DRIVEN``, Spikingformer's spike-driven residual learning (paper s.3.2):
  every branch is ``SN -> ConvBN -> ... -> ConvBN`` added to a real-valued stream, so every ConvBN
  and matrix product receives spikes.
* ``ResidualStyle.SEW_ADD``, Spikformer's (and SEW ResNet's) ADD residual: every branch is
  ``ConvBN -> SN -> ... -> ConvBN -> SN`` added to the stream, which becomes a sum of spikes, so
  the next block's layers receive integers > 1.

Where a faster or leaner computation of the same block exists, the block asks
:mod:`spikingformer.layers.routes`; with every route off it runs the plain module calls.
"""

from __future__ import annotations

import enum
from functools import partial
from typing import Callable

import torch
from torch import nn

import spikingformer.layers.routes as routes
from spikingformer.kernels import attention
from spikingformer.layers import batch_pieces, bn_spike, spike_conv, winograd
from spikingformer.layers.token_linear import TokenLinear
from spikingformer.neuron import MultiStepLIF


class ResidualStyle(str, enum.Enum):
    SPIKE_DRIVEN = "spike_driven"  # Spikingformer: SN -> ConvBN, added to a real-valued stream
    SEW_ADD = "sew_add"  # Spikformer / SEW ResNet ADD: ConvBN -> SN, added to a stream of spike sums

    @classmethod
    def _missing_(cls, value):
        return cls.SEW_ADD if value == "spikformer" else None  # this member's earlier value


LIFFactory = Callable[..., MultiStepLIF]


def lif_factory(tau: float = 2.0, backend: str = "auto") -> LIFFactory:
    """A constructor for the model's neurons: shared tau and backend, per-layer threshold."""
    return partial(MultiStepLIF, tau=tau, detach_reset=True, backend=backend)


def conv_maps(x: torch.Tensor) -> torch.Tensor:
    """``(T, B, C, H, W)`` maps as a convolution's input ``(T*B, C, H, W)``, in the tokenizer's memory
    format (route ``channels_last``) and dtype (:func:`~spikingformer.layers.batch_pieces.conv_dtype`):
    a view where they are so already, else one copy where the dtype stays, which flattens a strided
    view (event frames, a piece of the batch) into the format. Where autocast's cast is due too (the
    same rounding), on the CPU two: the cast into time-major maps in the default format, then the
    format. PyTorch's CPU copy that casts into a permuted layout takes its slow path: for event
    frames (2 channels, 128 x 128, T = 16) 2.2-2.4x the two copies' time (2 threads, an AMD Zen 5)."""
    fmt = torch.channels_last if routes.enabled("channels_last") else torch.contiguous_format
    dtype = batch_pieces.conv_dtype(x)
    if dtype == x.dtype and x[0].is_contiguous(memory_format=fmt) and x.stride(0) == x.shape[1] * x.stride(1):
        return x.flatten(0, 1)  # a view
    if dtype != x.dtype and x.device.type == "cpu":
        cast = torch.empty(x.shape, dtype=dtype, device=x.device)
        cast.copy_(x)
        return cast.flatten(0, 1).contiguous(memory_format=fmt)
    maps = torch.empty(x.shape[0] * x.shape[1], *x.shape[2:], dtype=dtype, device=x.device, memory_format=fmt)
    maps.view(x.shape).copy_(x)
    return maps


class ConvBN(nn.Module):
    """3x3 convolution (stride 1, pad 1, no bias) + BatchNorm2d on ``(T, B, C, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def convolve(self, x: torch.Tensor, spikes: bool = False) -> torch.Tensor:
        """The convolution alone (the BN input), ``(T, B, C, H, W)`` -> ``(T, B, C_out, H, W)``.
        ``spikes``: ``x`` is a spiking neuron's output, which the ``spike_conv`` route may take."""
        t, b = x.shape[:2]
        maps = conv_maps(x)
        y = spike_conv.convolve(self.conv, maps) if spikes else winograd.convolve(self.conv, maps)
        return y.view(t, b, *y.shape[1:])

    def normalize(self, y: torch.Tensor) -> torch.Tensor:
        """The BatchNorm of :meth:`convolve`'s output, on the flattened ``T*B`` maps."""
        z = self.bn(y.flatten(0, 1))
        return z.view(y.shape)

    def forward(self, x: torch.Tensor, spikes: bool = False) -> torch.Tensor:
        return self.normalize(self.convolve(x, spikes))


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

    def spikes(self, lif: nn.Module, x: torch.Tensor, spikes_in: bool = False) -> torch.Tensor:
        """``lif(self(x))``: the layer followed by a neuron (or ``nn.Identity``), through
        :func:`bn_spike.bn_spike_tokens`. ``spikes_in``: ``x`` is a spiking neuron's output, which a
        :class:`TokenLinear` may then keep as bits (a module that replaced it, e.g.
        deployment's counting linear, is called as ``nn.Linear``)."""
        packable = spikes_in and isinstance(self.linear, TokenLinear)
        y = self.linear(x, spikes=True) if packable else self.linear(x)
        return bn_spike.bn_spike_tokens(self.bn, lif, y)


def fires(neuron: nn.Module) -> bool:
    """Whether ``neuron``'s output is spikes (0 or 1): a :class:`MultiStepLIF`, not ``nn.Identity``."""
    return isinstance(neuron, MultiStepLIF)


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
        self.stem_channels = channels[1]  # (deployment may replace the stem's modules)
        n_lifs = 4 if self.style is ResidualStyle.SPIKE_DRIVEN else 5
        self.lifs = nn.ModuleList(lif() for _ in range(n_lifs))

    def _pool_before(self, stage: int) -> bool:
        return stage > 4 - self.num_pools

    def _spikes_for(self, stage: int, y: torch.Tensor) -> torch.Tensor:
        """The input of ``stages[stage]``: BN of the previous stage's conv output ``y``, SN, [MP]."""
        return bn_spike.bn_spike_pool(self.stages[stage - 1], self.lifs[stage - 1], self._pool_before(stage), y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, B, C_in, H, W)`` (images repeated over T, or event frames) -> ``(T, B, N, D)``; in
        inference possibly in pieces of the batch (route ``batch_pieces``)."""
        stem = x.numel() // x.shape[2] * self.stem_channels
        return batch_pieces.in_pieces(self, x, 1, stem, lambda part: self._forward_after_stem(self.stages[0].convolve(part)))

    def encode_static(self, images: torch.Tensor, time_steps: int) -> torch.Tensor:
        """Tokens for static images ``(B, C, H, W)`` repeated over ``time_steps`` (direct encoding):
        ``forward`` of the images repeated T times, or with the ``stem_once`` route the stem
        convolution once per image, its output repeated (BatchNorm still sees all T copies)."""
        if not routes.enabled("stem_once"):
            return self(images.expand(time_steps, *images.shape))
        stem = time_steps * images.numel() // images.shape[1] * self.stem_channels

        def encode(part: torch.Tensor) -> torch.Tensor:
            y = self.stages[0].convolve(part.unsqueeze(0))
            return self._forward_after_stem(bn_spike.repeat_steps(y, time_steps))

        return batch_pieces.in_pieces(self, images, 0, stem, encode)

    def _forward_after_stem(self, y: torch.Tensor) -> torch.Tensor:
        """Stages 1-4 from the stem's conv output ``y`` (before its BN)."""
        for i in range(1, 4):
            y = self._spikes_for(i, y)  # drops the conv output before the next convolution (inference frees it)
            y = self.stages[i].convolve(y, fires(self.lifs[i - 1]))
        x = self._spikes_for(4, y)
        if self.style is ResidualStyle.SPIKE_DRIVEN:
            x = self.stages[4](x, spikes=fires(self.lifs[3]))
        else:
            x = x + bn_spike.spike_maps(self.lifs[4], self.stages[4](x, spikes=fires(self.lifs[3])))
        return x.flatten(3).transpose(2, 3)  # (T, B, D, H, W) -> (T, B, N, D); contiguous for channels-last maps


def spike_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``Q K^T V * s`` without softmax on ``(..., N, d)`` tensors (paper Eq. 12), as ``(Q K^T) V``.

    With the ``attention_order`` route and N > d it computes ``Q (K^T V)`` (``2 N d^2`` multiply-adds
    instead of ``2 N^2 d``): the same numbers for spikes, whose partial sums are small integers, and
    a power-of-two ``s``. With the ``fused_attention`` route too, heads that are views of token rows
    (:meth:`SpikingSelfAttention._heads`) go to the CPU kernels of :mod:`spikingformer.kernels.attention`
    (forward and backward): a view of its rows, with the same values for spikes.
    """
    n, d = q.shape[-2:]
    if n > d and routes.enabled("attention_order"):
        fused = _fused_attention(q, k, v, scale) if routes.enabled("fused_attention") else None
        return fused if fused is not None else q @ (k.transpose(-2, -1) @ v) * scale
    return (q @ k.transpose(-2, -1)) @ v * scale


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor | None:
    """``Q (K^T V) * s`` of heads ``(..., h, N, d)`` by ``spikingformer::spike_attention`` on their token rows
    ``(..., N, h d)``, as a view of its output in the heads' shape; None where it does not apply: not CPU
    tensors, heads that are not views of contiguous rows, or a dtype or head dimension
    (:func:`~spikingformer.kernels.attention.kernel_takes`) the kernel does not take. Under CPU
    autocast it computes in autocast's dtype, as the product would."""
    heads = (q, k, v)
    if (q.device.type != "cpu" or q.dim() < 3
            or any(x.shape != q.shape or not x.transpose(-3, -2).is_contiguous() for x in heads)):
        return None
    # autocast casts floats but float64 (and leaves the rest); mixed dtypes: the product's error, not ours to hide
    autocast = torch.is_autocast_enabled("cpu") and all(x.is_floating_point() and x.dtype != torch.float64
                                                         for x in heads)
    dtype = torch.get_autocast_dtype("cpu") if autocast else q.dtype
    *lead, h, n, d = q.shape
    mixed = not autocast and any(x.dtype != dtype for x in heads)
    if dtype not in attention.DTYPES or d not in attention.HEAD_DIMS or mixed:
        return None
    rows = [x.transpose(-3, -2).reshape(-1, n, h * d).to(dtype) for x in heads]
    return attention.spike_attention(*rows, h, scale).view(*lead, n, h, d).transpose(-3, -2)


class SpikingSelfAttention(nn.Module):
    """Spiking Self Attention (paper Eq. 11-13) on tokens ``(T, B, N, D)``.

    ``Q, K, V = SN(ConvBN(X'))``; ``SSA = ConvBN(SN_attn(product(Q, K, V, s)))`` with the attention
    SN at threshold 0.5 and s = 0.125. Spikingformer puts an SN in front (``X' = SN(X)``);
    Spikformer puts one after the projection. ``product`` is :func:`spike_attention`; deployment
    replaces it (:mod:`spikingformer.deploy.accumulate`).
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
        self.product: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] = spike_attention
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
        x, spiking = self.in_lif(x), fires(self.in_lif)
        q = self._heads(self.q.spikes(self.q_lif, x, spiking))
        k = self._heads(self.k.spikes(self.k_lif, x, spiking))
        v = self._heads(self.v.spikes(self.v_lif, x, spiking))
        y = self.product(q, k, v, self.scale)  # (T, B, h, N, d)
        y = y.transpose(2, 3).flatten(3)  # (T, B, N, D), channel = head * d + j
        return self.proj.spikes(self.out_lif, self.attn_lif(y), fires(self.attn_lif))


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
        hidden = self.fc1.spikes(self.hidden_lif, self.in_lif(x), fires(self.in_lif))
        return self.fc2.spikes(self.out_lif, hidden, fires(self.hidden_lif))


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
