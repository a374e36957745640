"""Spikingformer vs Spikformer of the same size on the same inputs (paper Table 1, Appendix E/G).

Both models are recorded on identical batches; the result holds both recordings and energy
tables, the per-block input statistics, and the energy ratio ``E_Spikingformer / E_Spikformer``
(the paper's "-57.34%" for 8-768 is ``1 - ratio``).
"""

from __future__ import annotations

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

    @property
    def energy_ratio(self) -> float:
        """Energy of the first model over the second's (per image)."""
        return self.reports[0].energy_pj / self.reports[1].energy_pj

    @property
    def saving(self) -> float:
        """``1 - energy_ratio``: the relative energy saving of the first model."""
        return 1.0 - self.energy_ratio

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "energy_ratio": self.energy_ratio,
            "saving": self.saving,
            "totals": {n: r.totals() for n, r in zip(self.names, self.reports)},
            "non_spike_layers": {n: non_spike_layers(rec) for n, rec in zip(self.names, self.records)},
            "block_inputs": {
                n: [
                    {"block": b.group, "nonzero_ratio": b.nonzero_ratio, "firing_rate": b.firing_rate,
                     "max_value": b.max_value}
                    for b in block_inputs(rec)
                ]
                for n, rec in zip(self.names, self.records)
            },
        }

    def table(self) -> str:
        """Totals, per-block input statistics and the energy ratio as text."""
        a, b = self.names
        ra, rb = self.reports
        w = max(len(a), len(b), 12)
        lines = [f"{'':<26} {a:>{w}} {b:>{w}}"]
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
        for name, rec in zip(self.names, self.records):
            bad = non_spike_layers(rec)
            lines.append(f"non-spike inputs in {name}: {', '.join(bad) if bad else 'none'}")
        lines.append(f"energy ratio {a} / {b}: {self.energy_ratio:.4f} (saving {self.saving * 100:.2f}%)")
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
    batches: list[torch.Tensor],
    names: tuple[str, str] = ("spikingformer", "spikformer"),
    integer_inputs: str = "ac_count",
) -> ModelComparison:
    """Record both models on the same ``batches`` and build their energy tables."""
    records = tuple(record_activity(m, batches, model_name=n) for m, n in zip(models, names))
    reports = tuple(energy_from_record(r, integer_inputs) for r in records)
    return ModelComparison(names, records, reports)
