"""Synaptic operations and theoretical energy per image (paper s.3.4, Eq. 18-20), counted as the
authors' code counts them, but by module type rather than module name. Layer sizes come from the
shapes a forward pass of the model records (:mod:`spikingformer.analysis.geometry`); the layers
that read real values by design are those the model declares (``real_input_layers``).

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

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from spikingformer.analysis.audit import ATTENTION_OPERANDS, InputStats, SpikeRecord
from spikingformer.analysis.geometry import AttentionSpec, LayerSpec, attention_spec, layer_spec, record_shapes
from spikingformer.checkpoints import write_json

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
        write_json(path, self.to_dict())

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
# The tables: layer shapes recorded from the model, firing rates given or recorded


def energy_from_rates(
    config,
    rates: Mapping[str, "float | InputActivity"],
    integer_inputs: str = "ac_count",
    ssa_heads: int | None = None,
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
    model_name: str | None = None,
) -> EnergyReport:
    """Energy table of a model config from given firing rates. The layer shapes come from a forward
    pass on the meta device (:func:`~spikingformer.analysis.geometry.record_shapes`; no values computed).

    ``rates`` maps layer names (as in :func:`~spikingformer.analysis.geometry.layer_specs`, plus
    ``blocks.{i}.attn.{q,k,v}_lif`` for the attention operands) to a firing rate in [0, 1] (a spike
    input) or an :class:`InputActivity`. The layers the model declares real-valued by design (the
    encoding conv, a head without SN) may be omitted: they count as MACs.
    ``ssa_heads`` sets the head count of the SSA term only (to reproduce the 8-768 log, which used 12).
    """
    _check_integer_inputs(integer_inputs)
    shapes = record_shapes(config)
    missing = [n for n in shapes.layers if n not in rates and n not in shapes.real_by_design]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(f"no firing rate given for {len(missing)} layer(s): {shown}")

    def synaptic(stats: InputStats) -> EnergyRow:
        act = InputActivity.of(rates[stats.name]) if stats.name in rates else InputActivity("real")
        return synaptic_row(layer_spec(stats, shapes.images, shapes.time_steps), act, integer_inputs, e_mac, e_ac)

    def attention(name: str) -> EnergyRow:
        spec = attention_spec(shapes, name, ssa_heads)
        fr = [InputActivity.of(rates[getattr(shapes.attention[name], op)]).mean for op in ATTENTION_OPERANDS]
        return attention_row(spec, spec.sops(*fr), e_ac)

    report = _report(shapes, synaptic, attention, integer_inputs, e_mac, e_ac, model_name, images=None)
    if ssa_heads and ssa_heads != config.num_heads:
        report.notes.append(f"SSA term computed with {ssa_heads} heads; the model has {config.num_heads}")
    return report


def energy_from_record(
    record: SpikeRecord,
    integer_inputs: str = "ac_count",
    e_mac: float = E_MAC_PJ,
    e_ac: float = E_AC_PJ,
) -> EnergyReport:
    """Energy table from a :class:`~spikingformer.analysis.audit.SpikeRecord` (rates measured by hooks).

    The SSA term is evaluated per forward call with that call's operand counts, and summed."""
    _check_integer_inputs(integer_inputs)

    def synaptic(stats: InputStats) -> EnergyRow:
        act = InputActivity(stats.value_kind, stats.mean if stats.value_kind != "real" else 1.0)
        return synaptic_row(layer_spec(stats, record.images, record.time_steps), act, integer_inputs, e_mac, e_ac)

    def attention(name: str) -> EnergyRow:
        spec = attention_spec(record, name)
        q, k, v = (record.layers[getattr(record.attention[name], op)] for op in ATTENTION_OPERANDS)
        additions = sum((min(nk, nv) + nq) * spec.head_dim
                        for nq, nk, nv in zip(q.call_nonzeros, k.call_nonzeros, v.call_nonzeros))
        row = attention_row(spec, additions / record.images, e_ac)
        if not (q.binary and k.binary and v.binary):
            row.input_kind = "integer" if (q.integer and k.integer and v.integer) else "real"
        return row

    return _report(record, synaptic, attention, integer_inputs, e_mac, e_ac, record.model_name, record.images)


def _report(record: SpikeRecord, synaptic, attention, integer_inputs: str, e_mac: float, e_ac: float,
            model_name: str | None, images: int | None) -> EnergyReport:
    """The table in model order (each attention product after the last of its operands), with the
    encoding layer's MACs as the model computes them."""
    order = {name: i for i, name in enumerate(record.layers)}
    closing = {max((getattr(a, op) for op in ATTENTION_OPERANDS), key=order.__getitem__): a.name
               for a in record.attention.values()}
    rows = []
    for name, stats in record.layers.items():
        if not stats.kind.startswith("attention_"):
            rows.append(synaptic(stats))
        elif name in closing:
            rows.append(attention(closing[name]))
    report = EnergyReport(rows, integer_inputs, e_mac, e_ac, model_name, images)
    stem = record.layers.get(record.encoding_layer)
    if stem is not None:
        spec = layer_spec(stem, record.images, record.time_steps)
        report.stem_computed_macs = spec.flops / spec.repeats_counted
        if spec.repeats_counted > 1:
            report.notes.append(
                f"first conv counted {spec.repeats_counted} times (once per time step, as the authors' code); the "
                f"model computes it once per image: {fmt_count(report.stem_computed_macs)} MACs instead of "
                f"{fmt_count(spec.flops)}")
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
