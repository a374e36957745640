"""PNG figures of a recording or an energy table (matplotlib, Agg backend; no display needed).

* :func:`plot_block_inputs` -- one panel per block: histogram of the values entering the block's
  first ConvBN, like the paper's Figure 3 (Spikformer, log10 counts, "nonzero ratio") and
  Figure 4 (Spikingformer, 0/1 counts, "fr");
* :func:`plot_firing_rates` -- input firing rate (or mean, for non-binary inputs) of every layer, per block;
* :func:`plot_energy_breakdown` -- energy per layer, MAC and AC parts coloured apart.

Each ``plot_*`` saves the figure its ``*_figure`` function draws (a matplotlib ``Figure``, for
inspection or further editing).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from spikingformer.analysis.audit import SpikeRecord, block_inputs  # noqa: E402
from spikingformer.analysis.energy import EnergyReport  # noqa: E402
from spikingformer.checkpoints import write_atomic  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def plot_block_inputs(record: SpikeRecord, path: str | Path, title: str | None = None) -> Path:
    """Save :func:`block_inputs_figure` as a PNG."""
    return _save(block_inputs_figure(record, title), path)


def block_inputs_figure(record: SpikeRecord, title: str | None = None) -> Figure:
    """Per-block histograms of the q/k/v ConvBN input (paper Figures 3/4). Non-binary inputs use log10 counts."""
    panels = block_inputs(record)
    if not panels:
        raise ValueError("the recording has no transformer blocks to plot")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, b in zip(axes.flat, panels):
        counts = b.value_counts or {}
        values = sorted(counts)
        heights = [counts[v] for v in values]
        if b.binary:
            ax.bar([f"{v:g}" for v in values], heights, color="tab:blue")
            ax.set_title(f"{b.group}   fr: {b.firing_rate:.4f}", fontsize=9)
        else:
            ax.bar([f"{v:g}" for v in values], [math.log10(h) for h in heights], color="tab:red")
            ax.set_ylabel("log10(#inputs)", fontsize=8)
            ax.set_title(f"{b.group}   nonzero ratio: {b.nonzero_ratio:.4f}", fontsize=9)
        ax.set_xlabel("input value", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or f"{record.model_name or 'model'}: input of each block's q/k/v ConvBN ({record.images} images)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def plot_firing_rates(record: SpikeRecord, path: str | Path, title: str | None = None) -> Path:
    """Save :func:`firing_rates_figure` as a PNG."""
    return _save(firing_rates_figure(record, title), path)


def firing_rates_figure(record: SpikeRecord, title: str | None = None) -> Figure:
    """Bar chart: every recorded layer's input mean (= firing rate for spikes), grouped per block."""
    layers = list(record.layers.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers)), 3.6))
    colors = {"spike": "tab:blue", "integer": "tab:red", "real": "tab:gray"}
    x = range(len(layers))
    ax.bar(x, [s.mean if s.value_kind != "real" else 0.0 for s in layers],
           color=[colors[s.value_kind] for s in layers])
    ax.set_xticks(list(x))
    ax.set_xticklabels([s.name.replace("tokenizer.stages.", "tok.").replace("blocks.", "b") for s in layers],
                       rotation=90, fontsize=6)
    ax.set_ylabel("input firing rate / mean value")
    labels = {"spike": "spikes (rate)", "integer": "integers (mean)", "real": "real-valued (not shown)"}
    ax.legend(handles=[Patch(color=c, label=labels[k]) for k, c in colors.items()], fontsize=7)
    ax.set_title(title or f"{record.model_name or 'model'}: input activity per layer ({record.images} images)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_energy_breakdown(report: EnergyReport, path: str | Path, title: str | None = None) -> Path:
    """Save :func:`energy_breakdown_figure` as a PNG."""
    return _save(energy_breakdown_figure(report, title), path)


def energy_breakdown_figure(report: EnergyReport, title: str | None = None) -> Figure:
    """Horizontal bars: energy per image of each layer in microjoules, MAC rows red, AC rows blue."""
    rows = report.rows
    fig, ax = plt.subplots(figsize=(7.0, max(3.0, 0.2 * len(rows))))
    y = range(len(rows))
    ax.barh(list(y), [r.energy_pj * 1e-6 for r in rows],
            color=["tab:red" if r.counted_as == "MAC" else "tab:blue" for r in rows])
    ax.set_yticks(list(y))
    ax.set_yticklabels([r.name for r in rows], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("energy per image (uJ)")
    ax.legend(handles=[Patch(color="tab:red", label=f"MAC ({report.e_mac_pj} pJ)"),
                       Patch(color="tab:blue", label=f"AC ({report.e_ac_pj} pJ)")], fontsize=7)
    ax.set_title(title or f"{report.model_name or 'model'}: {report.energy_mj:.4g} mJ per image "
                 f"({report.mac_g:.4g} G MAC, {report.ac_g:.4g} G AC)", fontsize=9)
    fig.tight_layout()
    return fig
