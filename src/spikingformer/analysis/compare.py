"""Spikingformer vs Spikformer of the same size on the same inputs (paper Table 1, Appendix E/G).

Both models are recorded on identical batches; the result holds both recordings and energy
tables, the per-block input statistics, and the energy ratio ``E_Spikingformer / E_Spikformer``
(the paper's "-57.34%" for 8-768 is ``1 - ratio``).

The ratio rests on firing rates, which training changes: a comparison says for each side whether
its weights were trained, and warns when one is not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from spikingformer.analysis.audit import SpikeRecord, block_inputs, non_spike_layers, record_activity
from spikingformer.analysis.energy import EnergyReport, energy_from_record


@dataclass
class ModelComparison:
    """Two models' recordings and energy tables on the same inputs."""

    names: tuple[str, str]
    records: tuple[SpikeRecord, SpikeRecord]
    reports: tuple[EnergyReport, EnergyReport]
    sources: tuple[str, str] = ("", "")  # where each side's weights come from (a checkpoint path, "untrained ...")
    trained: tuple[bool, bool] | None = None  # None: not stated
    inputs: str = ""  # what the inputs were, e.g. "360 images: the whole digits test split"

    @property
    def images(self) -> int:
        return self.records[0].images

    def labels(self) -> tuple[str, str]:
        """Column labels: the names, with "(trained)" / "(untrained)" when known."""
        if self.trained is None:
            return self.names
        return tuple(f"{n} ({'trained' if t else 'untrained'})" for n, t in zip(self.names, self.trained))

    @property
    def energy_ratio(self) -> float:
        """Energy of the first model over the second's (per image)."""
        return self.reports[0].energy_pj / self.reports[1].energy_pj

    @property
    def saving(self) -> float:
        """``1 - energy_ratio``: the relative energy saving of the first model."""
        return 1.0 - self.energy_ratio

    def to_dict(self) -> dict:
        labels = self.labels()
        return {
            "names": list(self.names),
            "labels": list(labels),
            "sources": list(self.sources),
            "trained": None if self.trained is None else list(self.trained),
            "images": self.images,
            "inputs": self.inputs,
            "energy_ratio": self.energy_ratio,
            "saving": self.saving,
            "totals": [r.totals() for r in self.reports],
            "reports": [r.to_dict() for r in self.reports],
            "non_spike_layers": [non_spike_layers(rec) for rec in self.records],
            "block_inputs": [
                [
                    {"block": b.group, "nonzero_ratio": b.nonzero_ratio, "firing_rate": b.firing_rate,
                     "max_value": b.max_value}
                    for b in block_inputs(rec)
                ]
                for rec in self.records
            ],
        }

    def table(self) -> str:
        """Totals, per-block input statistics and the energy ratio as text."""
        a, b = self.labels()
        ra, rb = self.reports
        w = max(len(a), len(b), 12)
        lines = [f"{'':<26} {a:>{w}} {b:>{w}}"]
        if self.sources != ("", ""):
            lines = [f"{n}: {src}" for n, src in zip(self.names, self.sources)] + lines
        for label, get in (
            ("MACs per image (G)", lambda r: f"{r.mac_g:.6g}"),
            ("ACs / SOPs per image (G)", lambda r: f"{r.ac_g:.6g}"),
            ("  of which SSA (G)", lambda r: f"{r.ssa_ac_ops / 1e9:.6g}"),
            ("energy per image (mJ)", lambda r: f"{r.energy_mj:.6g}"),
        ):
            lines.append(f"{label:<26} {get(ra):>{w}} {get(rb):>{w}}")
        ba, bb = (block_inputs(rec) for rec in self.records)
        for xa, xb in zip(ba, bb):
            lines.append(f"{xa.group + ' input':<26} {_block_text(xa):>{w}} {_block_text(xb):>{w}}")
        for name, rec in zip((a, b), self.records):
            bad = non_spike_layers(rec)
            lines.append(f"non-spike inputs in {name}: {', '.join(bad) if bad else 'none'}")
        lines.append(f"energy ratio {a} / {b}: {self.energy_ratio:.4f} (saving {self.saving * 100:.2f}%)"
                     f" on {self.inputs or f'{self.images} images'}")
        untrained = [n for n, t in zip(self.names, self.trained or (True, True)) if not t]
        if untrained:
            lines.append(f"warning: {' and '.join(untrained)} untrained: random weights fire at other rates than "
                         "trained ones, so this ratio is not the trained models' (give trained weights with "
                         "--checkpoint / --compare-checkpoint)")
        return "\n".join(lines)


def _block_text(b) -> str:
    if b.binary:
        return f"fr {b.firing_rate:.4f}"
    return f"nz {b.nonzero_ratio:.4f} max {b.max_value:g}"


def counterpart_name(name: str) -> str:
    """The zoo name of the other architecture of the same size: ``spikingformer_8_512`` <-> ``spikformer_8_512``."""
    for a, b in (("spikingformer_", "spikformer_"), ("spikformer_", "spikingformer_")):
        if name.startswith(a):
            return b + name[len(a):]
    raise ValueError(f"{name!r} is not a spikingformer_* or spikformer_* zoo name")


def compare_models(
    models: tuple[nn.Module, nn.Module],
    batches: Iterable[torch.Tensor],
    names: tuple[str, str] = ("spikingformer", "spikformer"),
    integer_inputs: str = "ac_count",
    sources: tuple[str, str] = ("", ""),
    trained: tuple[bool, bool] | None = None,
    inputs: str = "",
) -> ModelComparison:
    """Record both models on the same ``batches`` and build their energy tables (the other
    arguments only label the result)."""
    records = tuple(record_activity(m, batches, model_name=n) for m, n in zip(models, names))
    reports = tuple(energy_from_record(r, integer_inputs) for r in records)
    return ModelComparison(names, records, reports, sources, trained, inputs)
