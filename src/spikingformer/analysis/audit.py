"""Spike audit: what every synaptic layer and attention product of a model receives.

A *synaptic layer* is any ``nn.Linear`` or convolution (``nn.Conv1d/2d/3d``), found by module type,
never by name. For each one, forward hooks record the **input** tensor's statistics; for every
:class:`~spikingformer.layers.SpikingSelfAttention` they record the **outputs** of ``q_lif``,
``k_lif`` and ``v_lif`` (the operands of the attention product ``Q K^T V``). Per layer:

* the set of values seen (exactly, up to ``max_values`` distinct values) and their counts;
* for real-valued inputs a fixed-bin histogram instead (bins set by the first batch's range);
* the nonzero ratio, the mean, and the firing rate (= the mean, for binary inputs);
* the geometry needed to count operations (output positions per call, kernel, channels).

Layers are grouped per block (``tokenizer``, ``blocks.0``, ..., ``head``). The input of each
block's first ConvBN (the q/k/v projection) is what the paper's Figures 3 (Spikformer: integers
0..16) and 4 (Spikingformer: 0/1, with its firing rate) show; :func:`block_inputs` returns it.

Every statistic is a count over all elements of all recorded batches, so a firing rate is
``sum / numel`` over the whole recording (weighted by batch size; the authors average per-batch
rates, which is the same number for equal batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from spikingformer.checkpoints import write_json
from spikingformer.layers import SpikingSelfAttention
from spikingformer.modes import evaluating

SYNAPTIC_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)
ATTENTION_OPERANDS = ("q", "k", "v")


@dataclass
class InputStats:
    """Statistics of everything one layer received during a recording.

    ``kind`` is ``"conv"``, ``"linear"`` or ``"attention_q|k|v"`` (an operand of ``Q K^T V``, recorded
    at the output of the LIF that produces it, shape ``(T, B, N, D)``).
    """

    name: str
    kind: str
    group: str
    geometry: dict = field(default_factory=dict)  # in/out channels, kernel, stride, padding, groups, bias, heads
    numel: int = 0
    nonzero: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    integer_valued: bool = True
    value_counts: dict[float, int] | None = field(default_factory=dict)  # None: more than max_values distinct values
    real_histogram: dict | None = None  # {"edges": [...], "counts": [...]} for non-integer inputs
    calls: int = 0
    leading_items: int = 0  # sum over calls of the input's first dimension (T*B, or B for the static stem)
    out_positions: int = 0  # conv: sum of N*H_out*W_out; linear: sum of output rows
    call_nonzeros: list[int] = field(default_factory=list)  # attention operands: nonzeros per call
    last_shape: tuple[int, ...] = ()

    @property
    def binary(self) -> bool:
        """True if every value seen is exactly 0 or 1 (a spike tensor)."""
        return self.numel > 0 and self.integer_valued and self.minimum >= 0 and self.maximum <= 1

    @property
    def integer(self) -> bool:
        """True for non-negative integer inputs (spike counts, e.g. Spikformer's residual sums)."""
        return self.numel > 0 and self.integer_valued and self.minimum >= 0

    @property
    def nonzero_ratio(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0

    @property
    def mean(self) -> float:
        return self.total / self.numel if self.numel else 0.0

    @property
    def firing_rate(self) -> float | None:
        """Fraction of ones for binary inputs, ``None`` otherwise."""
        return self.mean if self.binary else None

    @property
    def value_kind(self) -> str:
        return "spike" if self.binary else ("integer" if self.integer else "real")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value_counts"] = None if self.value_counts is None else {str(k): v for k, v in self.value_counts.items()}
        d.update(binary=self.binary, value_kind=self.value_kind, nonzero_ratio=self.nonzero_ratio,
                 mean=self.mean, firing_rate=self.firing_rate)
        return d


@dataclass
class AttentionOperands:
    """Where the operands of one attention product were recorded (names of their :class:`InputStats`)."""

    name: str  # the SpikingSelfAttention module, e.g. "blocks.0.attn"
    group: str
    heads: int
    scale: float
    q: str
    k: str
    v: str


@dataclass
class SpikeRecord:
    """Everything recorded from one model over some batches (see :func:`record_activity`)."""

    layers: dict[str, InputStats]
    attention: dict[str, AttentionOperands]
    images: int  # inputs fed (the first dim of each model input)
    time_steps: int | None  # the model's T for static images (None for models without a config)
    head_kind: str | None
    arch: str | None
    model_name: str | None = None
    real_by_design: tuple[str, ...] = ()  # the model's real_input_layers(): not expected to read spikes
    encoding_layer: str | None = None  # the layer that reads the model input (the model's ENCODING_LAYER)

    def synaptic_layers(self) -> list[InputStats]:
        return [s for s in self.layers.values() if not s.kind.startswith("attention_")]

    def groups(self) -> list[str]:
        """Group names in model order."""
        seen: dict[str, None] = {}
        for s in self.layers.values():
            seen.setdefault(s.group, None)
        return list(seen)

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "arch": self.arch,
            "images": self.images,
            "time_steps": self.time_steps,
            "head_kind": self.head_kind,
            "real_by_design": list(self.real_by_design),
            "layers": {n: s.to_dict() for n, s in self.layers.items()},
            "attention": {n: asdict(a) for n, a in self.attention.items()},
            "non_spike_layers": non_spike_layers(self),
        }

    def to_json(self, path) -> None:
        write_json(path, self.to_dict())


def group_of(name: str) -> str:
    """``"blocks.3.attn.q.linear"`` -> ``"blocks.3"``; ``"tokenizer.stages.0.conv"`` -> ``"tokenizer"``."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _geometry(module: nn.Module) -> dict:
    if isinstance(module, nn.Linear):
        return dict(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)
    return dict(
        in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=list(module.kernel_size),
        stride=list(module.stride), padding=list(module.padding), groups=module.groups, bias=module.bias is not None,
    )


def _count_values(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values and their counts of an integer-valued 1-D tensor."""
    lo, hi = float(flat.min()), float(flat.max())
    if lo >= 0 and hi < 65536:
        counts = torch.bincount(flat.long())
        values = torch.nonzero(counts).flatten()
        return values.to(flat.dtype), counts[values]
    return torch.unique(flat, return_counts=True)


def update_stats(stats: InputStats, x: torch.Tensor, max_values: int = 64, hist_bins: int = 50) -> None:
    """Add one tensor (any shape) to a layer's statistics."""
    flat = x.detach().reshape(-1)
    if flat.numel() == 0:
        return
    lo_t, hi_t = torch.aminmax(flat)
    lo, hi = float(lo_t), float(hi_t)
    nonzero = int(torch.count_nonzero(flat))
    total = float(flat.sum(dtype=torch.float64))
    stats.numel += flat.numel()
    stats.nonzero += nonzero
    stats.total += total
    stats.minimum, stats.maximum = min(stats.minimum, lo), max(stats.maximum, hi)
    # values in [0, 1] whose sum equals their nonzero count are all exactly 0 or 1
    is_binary = lo >= 0 and hi <= 1 and total == nonzero
    if stats.integer_valued and not is_binary and not torch.equal(flat, torch.round(flat)):
        stats.integer_valued = False
        stats.value_counts = None
    if stats.integer_valued and stats.value_counts is not None:
        if is_binary:
            pairs = [(0.0, flat.numel() - nonzero), (1.0, nonzero)]
        else:
            values, counts = _count_values(flat)
            pairs = zip(values.tolist(), counts.tolist())
        for v, c in pairs:
            if c:
                stats.value_counts[float(v)] = stats.value_counts.get(float(v), 0) + int(c)
        if len(stats.value_counts) > max_values:
            stats.value_counts = None
    if not stats.integer_valued:
        _update_real_histogram(stats, flat, lo, hi, hist_bins)


def _update_real_histogram(stats: InputStats, flat: torch.Tensor, lo: float, hi: float, bins: int) -> None:
    """Fixed-bin histogram; edges come from the first real-valued batch, later values are clamped into it."""
    if stats.real_histogram is None:
        if hi <= lo:
            hi = lo + 1.0
        stats.real_histogram = {"edges": torch.linspace(lo, hi, bins + 1).tolist(), "counts": [0] * bins}
    edges = stats.real_histogram["edges"]
    lo, hi = edges[0], edges[-1]
    counts = torch.histc(flat.float().clamp(lo, hi), bins=len(edges) - 1, min=lo, max=hi)
    stats.real_histogram["counts"] = [a + int(b) for a, b in zip(stats.real_histogram["counts"], counts.tolist())]


class SpikeRecorder:
    """Context manager that hooks a model and fills :class:`InputStats` per layer.

    With ``values=False`` only shapes are recorded (calls, output positions, operand shapes), so the
    model may run on the meta device (see :func:`spikingformer.analysis.geometry.record_shapes`).

    Example::

        with SpikeRecorder(model) as rec:
            model(images)
        record = rec.record()
    """

    def __init__(self, model: nn.Module, max_values: int = 64, hist_bins: int = 50, values: bool = True) -> None:
        self.model = model
        self.max_values = max_values
        self.hist_bins = hist_bins
        self.values = values
        self.layers: dict[str, InputStats] = {}
        self.attention: dict[str, AttentionOperands] = {}
        self.images = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "SpikeRecorder":
        self._handles.append(self.model.register_forward_pre_hook(self._count_images))
        operands = {}  # LIF module name -> (attention module name, operand)
        for name, module in self.model.named_modules():
            if isinstance(module, SpikingSelfAttention):
                self.attention[name] = AttentionOperands(
                    name, group_of(name), module.num_heads, module.scale,
                    **{op: f"{name}.{op}_lif" for op in ATTENTION_OPERANDS},
                )
                operands.update({f"{name}.{op}_lif": (name, op) for op in ATTENTION_OPERANDS})
        for name, module in self.model.named_modules():  # model order: q/k/v LIFs come after q/k/v
            if isinstance(module, SYNAPTIC_TYPES):
                self._hook_synaptic(name, module)
            elif name in operands:
                self._hook_operand(name, module, *operands[name])
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _count_images(self, module: nn.Module, inputs: tuple) -> None:
        self.images += int(inputs[0].shape[0])

    def _hook_synaptic(self, name: str, module: nn.Module) -> None:
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        stats = self.layers[name] = InputStats(name, kind, group_of(name), _geometry(module))

        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            x = inputs[0]
            self._record(stats, x)
            if kind == "linear":
                stats.out_positions += output.numel() // mod.out_features
            else:
                stats.out_positions += output.shape[0] * math.prod(output.shape[2:])

        self._handles.append(module.register_forward_hook(hook))

    def _hook_operand(self, name: str, lif: nn.Module, attention: str, op: str) -> None:
        """Record the output of ``q_lif``/``k_lif``/``v_lif``: an operand of the attention product."""
        heads = self.attention[attention].heads
        stats = self.layers[name] = InputStats(name, f"attention_{op}", group_of(name), dict(heads=heads))

        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._record(stats, output)
            if self.values:
                stats.call_nonzeros.append(int(torch.count_nonzero(output)))

        self._handles.append(lif.register_forward_hook(hook))

    def _record(self, stats: InputStats, x: torch.Tensor) -> None:
        """One call's input shape, and its values unless only shapes are recorded."""
        stats.calls += 1
        stats.last_shape = tuple(x.shape)
        stats.leading_items += int(x.shape[0])
        if self.values:
            update_stats(stats, x, self.max_values, self.hist_bins)

    def record(self, model_name: str | None = None) -> SpikeRecord:
        config = getattr(self.model, "config", None)
        real_by_design = getattr(self.model, "real_input_layers", tuple)()
        return SpikeRecord(
            layers=dict(self.layers),
            attention=dict(self.attention),
            images=self.images,
            time_steps=getattr(config, "time_steps", None),
            head_kind=getattr(config, "head", None),
            arch=getattr(config, "arch", None),
            model_name=model_name,
            real_by_design=tuple(real_by_design),
            encoding_layer=getattr(self.model, "ENCODING_LAYER", None),
        )


@torch.no_grad()
def record_activity(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    max_values: int = 64,
    model_name: str | None = None,
) -> SpikeRecord:
    """Run ``model`` in eval mode over ``batches`` (model inputs, e.g. ``(B, C, H, W)`` images or
    ``(B, T, C, H, W)`` event frames) and return what each layer received."""
    with evaluating(model), SpikeRecorder(model, max_values) as rec:
        for x in batches:
            model(x)
    if rec.images == 0:
        raise ValueError("no input batches were given: nothing to record")
    return rec.record(model_name)


def documented_non_spike_layers(record: SpikeRecord) -> set[str]:
    """Layers whose input is real-valued by design, as the model declares them
    (:meth:`~spikingformer.models.SpikingTransformer.real_input_layers`)."""
    return set(record.real_by_design)


def non_spike_layers(record: SpikeRecord, include_documented: bool = False) -> list[str]:
    """Names of synaptic layers and attention operands that received anything other than 0/1.

    The strict audit: for Spikingformer this is empty; for Spikformer it names every layer fed by
    the integer-valued residual stream. Layers in :func:`documented_non_spike_layers` are left out
    unless ``include_documented``.
    """
    skip = set() if include_documented else documented_non_spike_layers(record)
    return [n for n, s in record.layers.items() if s.numel and not s.binary and n not in skip]


def silent_layers(record: SpikeRecord) -> list[str]:
    """Layers that received only zeros (an audit over them proves nothing)."""
    return [n for n, s in record.layers.items() if s.numel and s.nonzero == 0]


@dataclass
class BlockInput:
    """The data of one panel of the paper's Figures 3/4: the input of a block's first ConvBN."""

    group: str
    layer: str
    value_counts: dict[float, int] | None
    nonzero_ratio: float
    firing_rate: float | None
    binary: bool
    max_value: float


def block_inputs(record: SpikeRecord) -> list[BlockInput]:
    """Per transformer block, the input of its q/k/v projection (paper Figures 3 and 4)."""
    out = []
    for attn in record.attention.values():
        name = next(
            (n for n, s in record.layers.items()
             if s.group == attn.group and s.kind != "attention_q" and n.startswith(f"{attn.name}.q")),
            None,
        )
        if name is None:
            continue
        s = record.layers[name]
        out.append(BlockInput(attn.group, name, s.value_counts, s.nonzero_ratio, s.firing_rate, s.binary, s.maximum))
    return out


def iter_group_layers(record: SpikeRecord, group: str) -> Iterator[InputStats]:
    return (s for s in record.layers.values() if s.group == group)


def format_audit(record: SpikeRecord, max_shown_values: int = 6) -> str:
    """A text table: one row per layer (grouped per block) with value kind, values, rates."""
    lines = [f"{'layer':<34} {'kind':<12} {'values':<8} {'seen':<26} {'nonzero':>8} {'mean/fr':>8}"]
    for group in record.groups():
        lines.append(f"[{group}]")
        for s in iter_group_layers(record, group):
            lines.append(
                f"  {s.name:<32} {s.kind:<12} {s.value_kind:<8} {_values_text(s, max_shown_values):<26} "
                f"{s.nonzero_ratio:>8.4f} {s.mean:>8.4f}"
            )
    bad = non_spike_layers(record)
    documented = sorted(documented_non_spike_layers(record) & set(record.layers))
    lines.append(f"images: {record.images}; non-spike by design (not checked): {', '.join(documented) or '-'}")
    lines.append("strict audit: " + ("PASS, every other input is 0/1" if not bad else f"FAIL, non-binary inputs: {', '.join(bad)}"))
    return "\n".join(lines)


def _values_text(s: InputStats, limit: int) -> str:
    if s.value_counts is None:
        kind = "ints" if s.integer_valued else "real"
        return f"{kind} in [{s.minimum:.3g}, {s.maximum:.3g}]"
    values = sorted(s.value_counts)
    text = ",".join(f"{v:g}" for v in values[:limit])
    return "{" + text + (",..." if len(values) > limit else "") + "}"
