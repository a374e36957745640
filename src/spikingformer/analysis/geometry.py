"""Operation counts per layer, from the shapes a forward pass of the model records.

Every count comes from the model itself: the hooks of :class:`~spikingformer.analysis.audit.SpikeRecorder`
note each synaptic layer's weights and output positions and each attention operand's shape during
a forward pass. A recording of real inputs carries them; :func:`record_shapes` records them for a
:class:`~spikingformer.models.ModelConfig` alone, from one zero input on the meta device (no values
are computed, no memory is allocated).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from spikingformer.analysis.audit import InputStats, SpikeRecord, SpikeRecorder, group_of
from spikingformer.analysis.inputs import input_shape
from spikingformer.models import SpikingTransformer


@dataclass(frozen=True)
class LayerSpec:
    """Operation counts of one synaptic layer per image (all T steps), before any firing rate."""

    name: str
    op: str  # "conv" or "linear"
    weight_flops: float
    bias_flops: float = 0.0
    repeats_counted: int = 1  # >1: computed once per image but counted this many times (static stem)
    description: str = ""

    @property
    def group(self) -> str:
        return group_of(self.name)

    @property
    def flops(self) -> float:
        return self.weight_flops + self.bias_flops


@dataclass(frozen=True)
class AttentionSpec:
    """Size of one attention product per image: T, heads h, tokens N, head dim d."""

    name: str
    time_steps: int
    heads: int
    tokens: int
    head_dim: int

    @property
    def group(self) -> str:
        return group_of(self.name)

    @property
    def flops(self) -> float:
        """``T*h*N*d^2``: the dense size of one of the two ``d x d``-sized products."""
        return float(self.time_steps * self.heads * self.tokens * self.head_dim**2)

    def sops(self, fr_q: float, fr_k: float, fr_v: float) -> float:
        """The authors' SSA term: ``T*h*N*d^2*(min(fr_k, fr_v) + fr_q)``."""
        return self.flops * (min(fr_k, fr_v) + fr_q)


def layer_spec(stats: InputStats, images: int, time_steps: int | None) -> LayerSpec:
    """Per-image operation counts of a recorded layer, from its weights and output positions.

    Counted as the authors' code counts them: a conv that ran once per image on a static input (the
    encoding conv) is counted ``time_steps`` times, as their model ran it once per time step.
    """
    g = stats.geometry
    positions = stats.out_positions / images
    repeats = 1
    if stats.kind == "linear":
        weight = g["in_features"] * g["out_features"] * positions
        bias = g["out_features"] * positions if g["bias"] else 0.0
        desc = f"linear {g['in_features']}->{g['out_features']} x {positions:g} rows"
    else:
        if time_steps and time_steps > 1 and stats.leading_items == images:
            repeats = time_steps  # ran once per image on a static input; the authors ran it T times
        positions *= repeats
        k = math.prod(g["kernel_size"])
        weight = k * g["in_channels"] // g["groups"] * g["out_channels"] * positions
        bias = g["out_channels"] * positions if g["bias"] else 0.0
        kernel = "x".join(map(str, g["kernel_size"]))
        desc = f"conv{kernel} {g['in_channels']}->{g['out_channels']} x {positions:g} positions"
    return LayerSpec(stats.name, stats.kind, float(weight), float(bias), repeats, desc)


def attention_spec(record: SpikeRecord, name: str, heads: int | None = None) -> AttentionSpec:
    """Size of a recorded attention product, from the shape ``(T, B, N, D)`` of its Q operand;
    ``heads`` overrides the module's head count (the authors' 8-768 log used 12)."""
    ops = record.attention[name]
    h = heads or ops.heads
    t, _, n, dim = record.layers[ops.q].last_shape
    if dim % h:
        raise ValueError(f"embed_dim {dim} is not divisible by {h} heads")
    return AttentionSpec(name, t, h, n, dim // h)


@torch.no_grad()
def record_shapes(config) -> SpikeRecord:
    """The shapes of a model built from ``config``, recorded on one zero input (batch of one) on the
    meta device: layer geometry and output positions, no values."""
    with torch.device("meta"):  # any neuron backend gives the same shapes; "auto" runs on the meta device
        model = SpikingTransformer(dataclasses.replace(config, lif_backend="auto")).eval()
    x = torch.zeros(input_shape(config, 1), device="meta")
    with SpikeRecorder(model, values=False) as rec:
        model(x)
    return rec.record()


def layer_specs(config) -> list[LayerSpec]:
    """Every synaptic layer of a model built from ``config``, in model order."""
    shapes = record_shapes(config)
    return [layer_spec(s, shapes.images, shapes.time_steps) for s in shapes.synaptic_layers()]
