"""Synaptic operations and theoretical energy per image (paper s.3.4, Eq. 18-20), counted as the
authors' code counts them, but by module type rather than module name.

Per synaptic layer (every ``nn.Linear`` and convolution), per image, all T steps:

* ``FLOPs`` (multiply-accumulates) -- conv: ``K*K*C_in/groups*C_out*(T*H_out*W_out)`` plus
  ``C_out*T*H_out*W_out`` if it has a bias; linear: ``in*out*rows`` plus ``out*rows`` for a bias
  (rows = T*N for token layers, 1 for the ``avgpool_fc`` head). For static images the first conv
  is counted **T times**, as in the authors' code (their model ran it T times; ours computes it
  once per image and repeats the result, see :attr:`EnergyReport.stem_computed_macs`).
* input firing rate ``fr`` (fraction of ones, from hooks or given);
* ``SOPs = FLOPs x fr`` (Eq. 18) if the input is a spike tensor, counted as accumulates (AC);
  a real-valued input (the image conv, the head) counts all its FLOPs as MACs;
* integer inputs (Spikformer's residual sums; paper Appendix G): ``integer_inputs="ac_count"``
  (their "way 1)": an input value n costs n ACs, i.e. ``SOPs = FLOPs x mean input``) or ``"mac"``
  (their "way 2)" and the authors' code with ``Nspks_max=1``: non-binary inputs are MACs).

Per attention product ``Q K^T V`` (SSA), as the authors count it::

    SOP_SSA = T * h * N * d^2 * (min(fr_k, fr_v) + fr_q)

It prices ``K^T V`` first (``d x d`` per head) by letting every spike of the sparser operand add one
row of ``d`` values of the other, then ``Q (K^T V)`` by letting every spike of Q add one row of
the integer ``d x d`` matrix: ``(min(nnz_K, nnz_V) + nnz_Q) * d`` additions. The event-driven path
(:mod:`spikingformer.deploy.accumulate`) performs exactly these additions. In a recording over
several batches the term is evaluated per forward call (with that batch's counts) and summed,
which is what the event-driven engine does when it picks the sparser operand per call.

Energy: ``E = E_MAC * MACs + E_AC * ACs`` with E_MAC = 4.6 pJ, E_AC = 0.9 pJ (45 nm, Horowitz 2014),
i.e. ``E[mJ] = 4.6 * MACs[G] + 0.9 * ACs[G]`` (Eq. 19; Eq. 20 when the first layer also reads spikes).

The column ``estimate`` (``weight FLOPs x fr``, i.e. without the authors' bias term) is the
event-driven count Eq. 18 predicts: it is what :mod:`spikingformer.deploy.accumulate` measures
exactly for 1x1 convs / linear layers and the attention products, and overestimates for padded
3x3 convolutions (border taps fall outside the map; see docs/analysis.md).

Everything here is a **theoretical estimate** from firing rates; measured operation counts come
from :mod:`spikingformer.deploy.accumulate` and are shown beside it when attached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from spikingformer.analysis.audit import (
    REAL_INPUT_HEADS,
    STEM_CONV,
    InputStats,
    SpikeRecord,
    group_of,
)

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
INTEGER_INPUTS = ("ac_count", "mac")


@dataclass(frozen=True)
class InputActivity:
    """What a layer receives: ``kind`` ``"spike"`` (0/1), ``"integer"`` (counts >= 0) or ``"real"``;
    ``mean`` = mean input value (the firing rate for spikes, the mean count for integers)."""

    kind: str
    mean: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("spike", "integer", "real"):
            raise ValueError(f"input kind must be 'spike', 'integer' or 'real', got {self.kind!r}")
        if self.kind == "spike" and not 0.0 <= self.mean <= 1.0:
            raise ValueError(f"a firing rate must lie in [0, 1] (a fraction, not a percentage), got {self.mean}")

    @classmethod
    def of(cls, value: "float | InputActivity") -> "InputActivity":
        return value if isinstance(value, InputActivity) else cls("spike", float(value))


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


@dataclass
class EnergyRow:
    """One line of the energy table (per image)."""

    name: str
    group: str
    op: str  # "conv", "linear" or "attention"
    flops: float  # authors' FLOPs (with the bias term); attention: T*h*N*d^2
    input_kind: str
    rate: float  # firing rate / mean input; attention: min(fr_k, fr_v) + fr_q; MAC rows: 1
    counted_as: str  # "AC" or "MAC"
    ops: float  # SOPs (AC rows, Eq. 18) or FLOPs (MAC rows)
    energy_pj: float
    estimate: float | None = None  # AC rows: event-driven additions predicted by Eq. 18 (weight FLOPs x rate)
    measured_additions: float | None = None  # from the accumulate-only run, per image
    measured_macs: float | None = None
    description: str = ""


@dataclass
class EnergyReport:
    """Per-layer energy table and totals per image. See the module docstring for the conventions."""

    rows: list[EnergyRow]
    integer_inputs: str = "ac_count"
    e_mac_pj: float = E_MAC_PJ
    e_ac_pj: float = E_AC_PJ
    model_name: str | None = None
    images: int | None = None
    stem_computed_macs: float | None = None  # the first conv's MACs as the model computes it (once per image)
    notes: list[str] = field(default_factory=list)

    @property
    def mac_ops(self) -> float:
        return sum(r.ops for r in self.rows if r.counted_as == "MAC")

    @property
    def ac_ops(self) -> float:
        return sum(r.ops for r in self.rows if r.counted_as == "AC")

    @property
    def conv_ac_ops(self) -> float:
        """ACs of the synaptic layers (convs and linear layers; the paper's sum of SOP_Conv)."""
        return sum(r.ops for r in self.rows if r.counted_as == "AC" and r.op != "attention")

    @property
    def ssa_ac_ops(self) -> float:
        return sum(r.ops for r in self.rows if r.op == "attention")

    @property
    def mac_g(self) -> float:
        return self.mac_ops / 1e9

    @property
    def ac_g(self) -> float:
        return self.ac_ops / 1e9

    @property
    def energy_pj(self) -> float:
        return sum(r.energy_pj for r in self.rows)

    @property
    def energy_mj(self) -> float:
        return self.energy_pj * 1e-9

    def row(self, name: str) -> EnergyRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the energy table")

    def attach_measured(self, counts) -> "EnergyReport":
        """Copy measured per-image counts (:class:`spikingformer.deploy.accumulate.OperationCounts`) into the rows."""
        if not counts.images:
            raise ValueError("the measured counts cover no images")
        for r in self.rows:
            c = counts.layers.get(r.name)
            if c is not None:
                r.measured_additions = c.additions / counts.images
                r.measured_macs = c.multiplies / counts.images
        return self

    def totals(self) -> dict:
        return {
            "mac_g": self.mac_g,
            "ac_g": self.ac_g,
            "conv_ac_g": self.conv_ac_ops / 1e9,
            "ssa_ac_g": self.ssa_ac_ops / 1e9,
            "energy_mj": self.energy_mj,
            "stem_computed_mac_g": None if self.stem_computed_macs is None else self.stem_computed_macs / 1e9,
        }

    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "images": self.images,
            "integer_inputs": self.integer_inputs,
            "e_mac_pj": self.e_mac_pj,
            "e_ac_pj": self.e_ac_pj,
            "totals": self.totals(),
            "notes": self.notes,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def table(self, measured: bool | None = None) -> str:
        """The per-layer table and the totals as text (per image)."""
        if measured is None:
            measured = any(r.measured_additions is not None for r in self.rows)
        head = f"{'layer':<30} {'op':<9} {'FLOPs':>9} {'input':<7} {'rate':>7} {'as':<3} {'ops':>9} {'E (uJ)':>9}"
        if measured:
            head += f" {'estimate':>9} {'measured':>9} {'diff':>7}"
        lines = [head]
        for r in self.rows:
            line = (f"{r.name:<30} {r.op:<9} {fmt_count(r.flops):>9} {r.input_kind:<7} {r.rate:>7.4f} "
                    f"{r.counted_as:<3} {fmt_count(r.ops):>9} {r.energy_pj * 1e-6:>9.4g}")
            if measured:
                line += _measured_cells(r)
            lines.append(line)
        t = self.totals()
        lines.append(
            f"total per image: MACs {t['mac_g']:.6g} G, ACs {t['ac_g']:.6g} G "
            f"(layers {t['conv_ac_g']:.6g} G + SSA {t['ssa_ac_g']:.6g} G), "
            f"energy {t['energy_mj']:.6g} mJ  [E_MAC {self.e_mac_pj} pJ, E_AC {self.e_ac_pj} pJ, "
            f"integer inputs: {self.integer_inputs}]"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _measured_cells(r: EnergyRow) -> str:
    if r.counted_as == "MAC":
        return f" {'-':>9} {fmt_count(r.measured_macs):>9} {'(MAC)':>7}"
    if r.estimate is None or r.measured_additions is None:
        return f" {fmt_count(r.estimate) if r.estimate is not None else '-':>9} {'-':>9} {'':>7}"
    diff = (r.measured_additions - r.estimate) / r.estimate * 100 if r.estimate else 0.0
    return f" {fmt_count(r.estimate):>9} {fmt_count(r.measured_additions):>9} {diff:>6.2f}%"


def fmt_count(x: float | None) -> str:
    """4 significant digits with a k/M/G suffix: ``205520896 -> '205.5M'``."""
    if x is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{suffix}"
    return f"{x:.4g}"


# ----------------------------------------------------------------------------------------------
# Rows from specs and activities (shared by the config path and the recording path)


def _check_integer_inputs(integer_inputs: str) -> None:
    if integer_inputs not in INTEGER_INPUTS:
        raise ValueError(f"integer_inputs must be one of {', '.join(INTEGER_INPUTS)}, got {integer_inputs!r}")


def synaptic_row(spec: LayerSpec, act: InputActivity, integer_inputs: str, e_mac: float, e_ac: float) -> EnergyRow:
    """Energy row of one conv/linear layer: AC (``SOPs = FLOPs x rate``) for spike inputs (and integer
    inputs under ``"ac_count"``), MAC (all FLOPs) otherwise."""
    as_ac = act.kind == "spike" or (act.kind == "integer" and integer_inputs == "ac_count")
    if as_ac:
        ops = spec.flops * act.mean
        return EnergyRow(spec.name, spec.group, spec.op, spec.flops, act.kind, act.mean, "AC", ops, ops * e_ac,
                         estimate=spec.weight_flops * act.mean, description=spec.description)
    return EnergyRow(spec.name, spec.group, spec.op, spec.flops, act.kind, 1.0, "MAC", spec.flops, spec.flops * e_mac,
                     description=spec.description)


def attention_row(spec: AttentionSpec, sops: float, e_ac: float) -> EnergyRow:
    rate = sops / spec.flops if spec.flops else 0.0
    desc = f"QK^TV T={spec.time_steps} h={spec.heads} N={spec.tokens} d={spec.head_dim}"
    return EnergyRow(spec.name, spec.group, "attention", spec.flops, "spike", rate, "AC", sops, sops * e_ac,
                     estimate=sops, description=desc)


# ----------------------------------------------------------------------------------------------
# Pure-config path: geometry from a ModelConfig, firing rates given


def _pooled(size: int) -> int:
    """Output side of MaxPool2d(kernel 3, stride 2, padding 1)."""
    return (size + 2 - 3) // 2 + 1


def tokenizer_specs(config) -> list[LayerSpec]:
    """The five 3x3 ConvBN stages (no conv bias) with the authors' counting (stem x T for static data)."""
    t, d = config.time_steps, config.embed_dim
    channels = [config.in_channels, d // 8, d // 4, d // 2, d, d]
    static = config.family != "event"
    specs, side = [], config.img_size
    for i in range(5):
        if i > 4 - config.num_pools:
            side = _pooled(side)
        cin, cout = channels[i], channels[i + 1]
        repeats = t if (i == 0 and static) else 1
        specs.append(LayerSpec(
            f"tokenizer.stages.{i}.conv", "conv", float(9 * cin * cout * t * side * side), 0.0, repeats,
            f"conv3x3 {cin}->{cout} @{side}x{side} x T={t}",
        ))
    return specs


def block_specs(config, index: int) -> list[LayerSpec]:
    """The six pointwise layers of one transformer block (q, k, v, proj, fc1, fc2)."""
    d, hidden = config.embed_dim, int(config.embed_dim * config.mlp_ratio)
    rows = config.time_steps * config.num_tokens
    p = f"blocks.{index}"
    layers = [
        (f"{p}.attn.q.linear", d, d, config.qkv_bias),
        (f"{p}.attn.k.linear", d, d, config.qkv_bias),
        (f"{p}.attn.v.linear", d, d, config.qkv_bias),
        (f"{p}.attn.proj.linear", d, d, True),
        (f"{p}.mlp.fc1.linear", d, hidden, True),
        (f"{p}.mlp.fc2.linear", hidden, d, True),
    ]
    return [
        LayerSpec(name, "linear", float(i * o * rows), float(o * rows) if bias else 0.0, 1, f"1x1 {i}->{o} x {rows} rows")
        for name, i, o, bias in layers
    ]


def head_spec(config) -> LayerSpec:
    rows = 1 if config.head.endswith("avgpool_fc") else config.time_steps * config.num_tokens
    d, k = config.embed_dim, config.num_classes
    return LayerSpec("head.fc", "linear", float(d * k * rows), float(k * rows), 1, f"fc {d}->{k} x {rows} rows")


def layer_specs(config) -> list[LayerSpec]:
    """Every synaptic layer of a zoo model (:class:`~spikingformer.models.transformer.ModelConfig`), in model order."""
    specs = tokenizer_specs(config)
    for i in range(config.depth):
        specs.extend(block_specs(config, i))
    specs.append(head_spec(config))
    return specs


def attention_specs(config, heads: int | None = None) -> list[AttentionSpec]:
    """One SSA product per block; ``heads`` overrides the head count (the 8-768 log used 12)."""
    h = heads or config.num_heads
    if config.embed_dim % h:
        raise ValueError(f"embed_dim {config.embed_dim} is not divisible by {h} heads")
    return [
        AttentionSpec(f"blocks.{i}.attn", config.time_steps, h, config.num_tokens, config.embed_dim // h)
        for i in range(config.depth)
    ]


def _real_by_design(config) -> set[str]:
    names = {STEM_CONV}
    if config.head in REAL_INPUT_HEADS:
        names.add("head.fc")
    return names


def energy_from_rates(
    config,
    rates: Mapping[str, "float | InputActivity"],
    integer_inputs: str = "ac_count",
    ssa_heads: int | None = None,
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
    model_name: str | None = None,
) -> EnergyReport:
    """Energy table of a model config from given firing rates (no forward pass).

    ``rates`` maps layer names (as in :func:`layer_specs`, plus ``blocks.{i}.attn.{q,k,v}_lif`` for the
    attention operands) to a firing rate in [0, 1] (a spike input) or an :class:`InputActivity`.
    The image conv and a real-input head may be omitted (they read real values: MACs).
    ``ssa_heads`` sets the head count of the SSA term only (to reproduce the 8-768 log, which used 12).
    """
    _check_integer_inputs(integer_inputs)
    real = _real_by_design(config)
    specs, attention = layer_specs(config), attention_specs(config, ssa_heads)
    needed = [s.name for s in specs if s.name not in real]
    needed += [f"{a.name}.{op}_lif" for a in attention for op in ("q", "k", "v")]
    missing = [n for n in needed if n not in rates]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(f"no firing rate given for {len(missing)} layer(s): {shown}")
    rows = []
    for spec in specs:
        act = InputActivity.of(rates[spec.name]) if spec.name in rates else InputActivity("real")
        rows.append(synaptic_row(spec, act, integer_inputs, e_mac, e_ac))
    for spec in attention:
        fr = {op: InputActivity.of(rates[f"{spec.name}.{op}_lif"]).mean for op in ("q", "k", "v")}
        rows.append(attention_row(spec, spec.sops(fr["q"], fr["k"], fr["v"]), e_ac))
    rows = _model_order(rows)
    report = EnergyReport(rows, integer_inputs, e_mac, e_ac, model_name)
    stem = report.row(STEM_CONV)
    repeats = tokenizer_specs(config)[0].repeats_counted
    report.stem_computed_macs = stem.flops / repeats
    if repeats > 1:
        report.notes.append(_stem_note(repeats, stem.flops))
    if ssa_heads and ssa_heads != config.num_heads:
        report.notes.append(f"SSA term computed with {ssa_heads} heads; the model has {config.num_heads}")
    return report


def _stem_note(repeats: int, flops: float) -> str:
    return (f"first conv counted {repeats} times (once per time step, as the authors' code); the model computes "
            f"it once per image: {fmt_count(flops / repeats)} MACs instead of {fmt_count(flops)}")


def _model_order(rows: list[EnergyRow]) -> list[EnergyRow]:
    """Attention rows placed after their block's v projection (stable otherwise)."""
    out: list[EnergyRow] = []
    attn = {r.name: r for r in rows if r.op == "attention"}
    for r in rows:
        if r.op == "attention":
            continue
        out.append(r)
        for name, a in attn.items():
            if r.name == f"{name}.v.linear":
                out.append(a)
    placed = {r.name for r in out}
    out.extend(a for a in attn.values() if a.name not in placed)
    return out


# ----------------------------------------------------------------------------------------------
# Recording path: geometry and rates from forward hooks


def spec_from_stats(stats: InputStats, images: int, time_steps: int | None) -> LayerSpec:
    """Per-image operation counts of a recorded layer, from its geometry and output positions."""
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


def attention_from_record(record: SpikeRecord, name: str, e_ac: float) -> EnergyRow:
    """SSA row from the recorded operands: the authors' term evaluated per forward call, summed."""
    ops = record.attention[name]
    q, k, v = (record.layers[n] for n in (ops.q, ops.k, ops.v))
    t, _, n, dim = q.last_shape
    spec = AttentionSpec(name, t, ops.heads, n, dim // ops.heads)
    additions = sum(
        (min(nk, nv) + nq) * spec.head_dim for nq, nk, nv in zip(q.call_nonzeros, k.call_nonzeros, v.call_nonzeros)
    )
    row = attention_row(spec, additions / record.images, e_ac)
    if not (q.binary and k.binary and v.binary):
        row.input_kind = "integer" if (q.integer and k.integer and v.integer) else "real"
    return row


def energy_from_record(
    record: SpikeRecord,
    integer_inputs: str = "ac_count",
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
) -> EnergyReport:
    """Energy table from a :class:`~spikingformer.analysis.audit.SpikeRecord` (rates measured by hooks)."""
    _check_integer_inputs(integer_inputs)
    rows = []
    stem_once, stem_repeats = None, 1
    for stats in record.synaptic_layers():
        spec = spec_from_stats(stats, record.images, record.time_steps)
        act = InputActivity(stats.value_kind, stats.mean if stats.value_kind != "real" else 1.0)
        rows.append(synaptic_row(spec, act, integer_inputs, e_mac, e_ac))
        if spec.name == STEM_CONV:
            stem_once = spec.flops / spec.repeats_counted
            stem_repeats = spec.repeats_counted
    rows.extend(attention_from_record(record, name, e_ac) for name in record.attention)
    report = EnergyReport(_model_order(rows), integer_inputs, e_mac, e_ac, record.model_name, record.images)
    report.stem_computed_macs = stem_once
    if stem_once is not None and stem_repeats > 1:
        report.notes.append(_stem_note(stem_repeats, stem_once * stem_repeats))
    return report


def energy_report_for_checkpoint(checkpoint, data_cfg, batches: int = 2, integer_inputs: str = "ac_count") -> EnergyReport:
    """Energy table of a checkpoint on the first ``batches`` test batches of ``data_cfg``
    (a :class:`~spikingformer.config.DataSection`; batches of ``data_cfg.eval_batch_size``)."""
    from spikingformer.analysis.audit import record_activity
    from spikingformer.analysis.inputs import dataset_batches
    from spikingformer.models import model_from_checkpoint

    model = model_from_checkpoint(checkpoint).eval()
    inputs = dataset_batches(model.config, data_cfg, batches, data_cfg.eval_batch_size)
    return energy_from_record(record_activity(model, inputs), integer_inputs)
