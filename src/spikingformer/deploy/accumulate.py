"""Accumulate-only (event-driven) inference for the fused Spikingformer, with operation counts.

Every layer whose input is a spike tensor is computed without multiplications: the output starts
at the layer's bias (BN already folded in, :mod:`spikingformer.deploy.fuse`) and every active input
spike adds the weight column it connects to. This is vectorised (``nonzero`` -> ``index_select`` ->
``index_add_``, in chunks), never a Python loop per spike:

* linear / 1x1 conv, input rows ``x (R, C_in)``: each spike ``x[r, c] = 1`` adds ``W[:, c]`` to
  row r: ``C_out`` additions per spike;
* k x k conv (stride s, padding p), input ``(B, C_in, H, W)``: for each of the k*k kernel taps, a
  spike at ``(c, y, x)`` adds ``W[:, c, ky, kx]`` to output ``((y+p-ky)/s, (x+p-kx)/s)`` when that
  position exists: ``C_out`` additions per spike and valid tap (a spike on the border of a padded
  map has fewer valid taps than k*k: the Eq. 18 estimate ``k*k*C_in*C_out*H*W*fr`` counts them all);
* attention ``Q K^T V`` per head, as the authors' SSA term counts it: ``K^T V`` (d x d) by letting
  every spike of the sparser operand (fewer nonzeros in the call) add a row of the other
  (``d`` additions each), then ``Q (K^T V)`` by letting every spike of Q add a row of the integer
  matrix ``K^T V`` (``d`` additions each): ``(min(nnz_K, nnz_V) + nnz_Q) * d`` additions, which is
  ``T*h*N*d^2*(min(fr_k, fr_v) + fr_q)`` per image. The scale s = 0.125 is folded into the
  attention neuron (threshold / s; exact for a power-of-two s, paper Appendix C), so no
  multiplication remains.

Layers whose input is not a spike tensor (the image conv, the ``avgpool_fc`` head, any integer
input in a Spikformer) run densely; their multiply-accumulates are counted as ``multiplies``. The
neurons' own leak (``/tau``) and the max-pools (OR of spikes) are not synaptic operations and are
not counted, as in the paper.

Counts are totals over everything run; divide by :attr:`OperationCounts.images` for per image.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from spikingformer.deploy.fuse import fuse_model, is_fused
from spikingformer.layers import SpikingSelfAttention
from spikingformer.neuron import MultiStepLIF

CHUNK_ELEMENTS = 1 << 22  # gathered weight elements per index_add_ call (bounds temporary memory)


@dataclass
class LayerCount:
    """Operations one layer performed: accumulate-only additions, and dense MACs (non-spike inputs)."""

    additions: int = 0
    multiplies: int = 0
    calls: int = 0
    spike_calls: int = 0  # calls whose input was a spike tensor (computed by accumulation)


@dataclass
class OperationCounts:
    """Per-layer counts, keyed by the layer's name in the original model (attention: the SSA module)."""

    layers: dict[str, LayerCount] = field(default_factory=dict)
    images: int = 0

    def layer(self, name: str) -> LayerCount:
        return self.layers.setdefault(name, LayerCount())

    @property
    def additions(self) -> int:
        return sum(c.additions for c in self.layers.values())

    @property
    def multiplies(self) -> int:
        return sum(c.multiplies for c in self.layers.values())

    def per_image(self) -> dict[str, dict[str, float]]:
        n = max(self.images, 1)
        return {k: {"additions": c.additions / n, "multiplies": c.multiplies / n} for k, c in self.layers.items()}


def is_spike_tensor(x: torch.Tensor) -> bool:
    """True if every element is exactly 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def _chunks(n: int, width: int) -> Iterable[slice]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


def accumulate_rows(
    out: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, sources: torch.Tensor
) -> int:
    """``out[targets[i]] += table[sources[i]]`` for all i (vectorised, chunked); returns the additions."""
    width = table.shape[1]
    for s in _chunks(targets.numel(), width):
        out.index_add_(0, targets[s], table.index_select(0, sources[s]))
    return targets.numel() * width


def accumulate_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``x @ W^T + b`` for a spike tensor ``x (..., C_in)`` by accumulation; weight ``(C_out, C_in)``.

    Returns ``(output (..., C_out), additions)`` with ``additions = nnz(x) * C_out``.
    """
    rows = x.reshape(-1, x.shape[-1])
    c_out = weight.shape[0]
    out = (bias.expand(rows.shape[0], c_out).clone() if bias is not None
           else rows.new_zeros(rows.shape[0], c_out))
    r, c = rows.nonzero(as_tuple=True)
    adds = accumulate_rows(out, r, weight.t().contiguous(), c)
    return out.view(*x.shape[:-1], c_out), adds


def accumulate_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
) -> tuple[torch.Tensor, int]:
    """2-D convolution (zero padding, groups 1) of a spike tensor ``x (B, C_in, H, W)`` by accumulation.

    weight ``(C_out, C_in, kh, kw)``. Returns ``(output (B, C_out, H_out, W_out), additions)``;
    additions = ``C_out`` x (number of (spike, tap) pairs that land inside the output map).
    """
    b, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = x.new_zeros(b * h_out * w_out, c_out)
    if bias is not None:
        out += bias
    n, c, y, xx = x.nonzero(as_tuple=True)
    adds = 0
    for ky in range(kh):
        for kx in range(kw):
            oy_s = y + padding[0] - ky * dilation[0]
            ox_s = xx + padding[1] - kx * dilation[1]
            oy, ox = torch.div(oy_s, stride[0], rounding_mode="floor"), torch.div(ox_s, stride[1], rounding_mode="floor")
            valid = ((oy_s % stride[0] == 0) & (ox_s % stride[1] == 0)
                     & (oy >= 0) & (oy < h_out) & (ox >= 0) & (ox < w_out))
            targets = (n[valid] * h_out + oy[valid]) * w_out + ox[valid]
            adds += accumulate_rows(out, targets, weight[:, :, ky, kx].t().contiguous(), c[valid])
    return out.view(b, h_out, w_out, c_out).permute(0, 3, 1, 2).contiguous(), adds


def accumulate_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Unscaled ``Q K^T V`` of spike tensors ``(..., N, d)`` by accumulation, in the order ``Q (K^T V)``.

    Returns ``(output (..., N, d), additions)`` with additions ``(min(nnz_K, nnz_V) + nnz_Q) * d``.
    """
    *lead, n, d = q.shape
    g = math.prod(lead)
    qf, kf, vf = (t.reshape(g, n, d) for t in (q, k, v))
    ktv = q.new_zeros(g * d, d)
    if int(torch.count_nonzero(kf)) <= int(torch.count_nonzero(vf)):
        # spike k[g, n, i] adds row v[g, n, :] to (K^T V)[g, i, :]
        gi, ni, ii = kf.nonzero(as_tuple=True)
        adds = accumulate_rows(ktv, gi * d + ii, vf.reshape(g * n, d), gi * n + ni)
    else:
        # spike v[g, n, j] adds row k[g, n, :] to (V^T K)[g, j, :] = column j of K^T V
        gi, ni, ji = vf.nonzero(as_tuple=True)
        adds = accumulate_rows(ktv, gi * d + ji, kf.reshape(g * n, d), gi * n + ni)
        ktv = ktv.view(g, d, d).transpose(1, 2).reshape(g * d, d)
    out = q.new_zeros(g * n, d)
    gi, ni, ii = qf.nonzero(as_tuple=True)
    adds += accumulate_rows(out, gi * n + ni, ktv, gi * d + ii)
    return out.view(*lead, n, d), adds


class CountingLinear(nn.Module):
    """An ``nn.Linear`` computed by accumulation when its input is a spike tensor, densely otherwise."""

    def __init__(self, layer: nn.Linear, name: str, counts: OperationCounts) -> None:
        super().__init__()
        self.layer, self.name, self.counts = layer, name, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.counts.layer(self.name)
        c.calls += 1
        if is_spike_tensor(x):
            y, adds = accumulate_linear(x, self.layer.weight, self.layer.bias)
            c.additions += adds
            c.spike_calls += 1
            return y
        c.multiplies += x.numel() * self.layer.out_features
        return self.layer(x)


class CountingConv2d(nn.Module):
    """An ``nn.Conv2d`` (groups 1, zero padding) computed by accumulation for spike inputs."""

    def __init__(self, layer: nn.Conv2d, name: str, counts: OperationCounts) -> None:
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"{name}: accumulate-only convolution supports groups=1 and numeric zero padding")
        self.layer, self.name, self.counts = layer, name, counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.counts.layer(self.name)
        c.calls += 1
        layer = self.layer
        if is_spike_tensor(x):
            y, adds = accumulate_conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
            c.additions += adds
            c.spike_calls += 1
            return y
        y = layer(x)
        c.multiplies += y.shape[0] * math.prod(y.shape[2:]) * layer.out_channels * layer.in_channels * math.prod(layer.kernel_size)
        return y


def _scaled_lif(lif: MultiStepLIF, scale: float) -> MultiStepLIF:
    """The same neuron fed ``x`` instead of ``x * scale``: threshold and reset divided by ``scale``."""
    p = lif.params
    return MultiStepLIF(p.tau, p.v_threshold / scale, p.v_reset / scale, p.alpha, p.detach_reset, lif.backend)


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


class AccumulateProduct:
    """The attention product ``Q K^T V * s`` of a :class:`~spikingformer.layers.SpikingSelfAttention`
    computed by accumulation, counted under the attention's name.

    With ``fold_scale`` it returns the unscaled product (the attention neuron then has threshold and
    reset divided by ``s``, :func:`_scaled_lif`), so no multiplication remains.
    """

    def __init__(self, name: str, counts: OperationCounts, fold_scale: bool) -> None:
        self.name, self.counts, self.fold_scale = name, counts, fold_scale

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        c = self.counts.layer(self.name)
        c.calls += 1
        if is_spike_tensor(q) and is_spike_tensor(k) and is_spike_tensor(v):
            y, adds = accumulate_attention(q, k, v)
            c.additions += adds
            c.spike_calls += 1
        else:
            y = q @ (k.transpose(-2, -1) @ v)
            c.multiplies += 2 * q.numel() * q.shape[-1]
        if self.fold_scale:
            return y
        c.multiplies += y.numel()
        return y * scale


def _accumulate_attention_in(attn: SpikingSelfAttention, name: str, counts: OperationCounts) -> None:
    """Give ``attn`` the accumulate-only product, and fold its scale into the attention neuron when
    the scale is a power of two (exact, paper Appendix C)."""
    fold_scale = _is_power_of_two(attn.scale) and isinstance(attn.attn_lif, MultiStepLIF)
    if fold_scale:
        attn.attn_lif = _scaled_lif(attn.attn_lif, attn.scale)
    attn.product = AccumulateProduct(name, counts, fold_scale)


class AccumulateModel(nn.Module):
    """Event-driven twin of a fused model: same weights, same logits, operation counts in ``counts``.

    ``AccumulateModel(model)`` fuses a copy of ``model`` first if it still has BatchNorms.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model = copy.deepcopy(model) if is_fused(model) else fuse_model(model)
        self.counts = OperationCounts()
        _replace_layers(model, self.counts)
        self.model = model.eval()
        self.config = getattr(model, "config", None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.counts.images += int(x.shape[0])
        return self.model(x)

    def reset_counts(self) -> None:
        self.counts.layers.clear()
        self.counts.images = 0


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def _replace_layers(model: nn.Module, counts: OperationCounts) -> None:
    """Swap every Linear/Conv2d for its counting, accumulate-only twin, and every SpikingSelfAttention's
    product for :class:`AccumulateProduct`."""
    named = list(model.named_modules())
    for name, m in named:
        if isinstance(m, nn.Linear):
            _set_submodule(model, name, CountingLinear(m, name, counts))
        elif isinstance(m, nn.Conv2d):
            _set_submodule(model, name, CountingConv2d(m, name, counts))
        elif isinstance(m, nn.modules.conv._ConvNd):
            raise ValueError(f"{name}: accumulate-only inference supports Linear and Conv2d layers, not {type(m).__name__}")
    for name, m in named:
        if isinstance(m, SpikingSelfAttention):
            _accumulate_attention_in(m, name, counts)


@torch.no_grad()
def run_accumulate(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], OperationCounts]:
    """Run the accumulate-only twin of ``model`` over ``batches``; returns the logits per batch and the counts."""
    acc = AccumulateModel(model)
    logits = [acc(x) for x in batches]
    return logits, acc.counts
