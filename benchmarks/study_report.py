"""Report of the comparison study in docs/analysis.md ("Spikingformer vs Spikformer, trained").

Reads the runs of ``benchmarks/study_train.sh`` (``<runs>/<recipe>-<arch>-s<seed>/``), runs
``spikingformer energy --checkpoint <Spikingformer last.pt> --compare-checkpoint <Spikformer last.pt>``
for every recipe and seed (the commands are printed), and prints the accuracy, per-layer input
rates and energy per image as Markdown tables; draws the figure.

    python benchmarks/study_report.py --runs runs/study --plot docs/img/study_spikingformer_vs_spikformer.png
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

RECIPES = ("digits", "digits_dvs")
ARCHS = ("spikingformer", "spikformer")
SEEDS = (0, 1, 2)
EPOCHS = {"digits": 20, "digits_dvs": 20}  # the recipes' schedules


def run_dir(runs: Path, recipe: str, arch: str, seed: int) -> Path:
    return runs / f"{recipe}-{arch}-s{seed}"


def finished(runs: Path, recipe: str, seed: int) -> bool:
    """Both architectures' runs of this seed completed their schedule."""
    for arch in ARCHS:
        folder = run_dir(runs, recipe, arch, seed)
        if not (folder / "last.pt").is_file() or not (folder / "metrics.jsonl").is_file():
            return False
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if not epochs or epochs[-1] + 1 < EPOCHS[recipe]:
            return False
    return True


def accuracy(folder: Path) -> dict:
    """Test top-1 after the last epoch, and the best over the epochs (chosen on the test set)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tested = [r for r in rows if "test_top1" in r]
    return {"last": tested[-1]["test_top1"], "best": max(r["test_top1"] for r in tested), "epochs": rows[-1]["epoch"] + 1}


def energy_comparison(runs: Path, recipe: str, seed: int, first: str = "spikingformer") -> dict:
    """``energy --checkpoint <first> --compare-checkpoint <Spikformer>`` of one recipe and seed (cached)."""
    out = runs / "energy" / (f"{recipe}-s{seed}" if first == "spikingformer" else f"{recipe}-{first}-s{seed}")
    sf, kf = (run_dir(runs, recipe, a, seed) / "last.pt" for a in (first, "spikformer"))
    cmd = [sys.executable, "-m", "spikingformer", "energy", "--checkpoint", str(sf), "--compare-checkpoint", str(kf),
           "--output", str(out)]
    print("$ spikingformer " + " ".join(shlex.quote(c) for c in cmd[3:]), flush=True)
    if not (out / "comparison.json").is_file():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=os.environ)
    return json.loads((out / "comparison.json").read_text())


def mean_range(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(sum(values) / len(values))} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def blocks_energy_uj(comparison: dict, side: int) -> float:
    """Energy per image of the transformer blocks alone (tokenizer and head left out), µJ."""
    return sum(r["energy_pj"] for r in comparison["reports"][side]["rows"] if r["name"].startswith("blocks.")) * 1e-6


def layer_rates(comparison: dict, side: int) -> dict[str, float]:
    """Input rate per synaptic layer: firing rate of spikes, mean value of integer inputs."""
    return {r["name"]: r["rate"] for r in comparison["reports"][side]["rows"] if r["op"] != "attention"}


def report(runs: Path, plot: Path | None) -> None:
    results: dict[str, dict] = {}
    for recipe in RECIPES:
        seeds = [s for s in SEEDS if finished(runs, recipe, s)]
        if not seeds:
            print(f"{recipe}: no seed has finished runs of both models yet")
            continue
        acc = {a: [accuracy(run_dir(runs, recipe, a, s)) for s in seeds] for a in ARCHS}
        comps = [energy_comparison(runs, recipe, s) for s in seeds]
        results[recipe] = {"seeds": seeds, "accuracy": acc, "comparisons": comps}

    print("\n| recipe | seeds | model | test top-1 after the last epoch: mean (range) | best epoch | energy per image (µJ) | of which blocks (µJ) | ACs per image (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe, r in results.items():
        for side, arch in enumerate(ARCHS):
            last = [a["last"] for a in r["accuracy"][arch]]
            best = [a["best"] for a in r["accuracy"][arch]]
            energy = [c["totals"][side]["energy_mj"] * 1e3 for c in r["comparisons"]]
            acs = [c["totals"][side]["ac_g"] * 1e3 for c in r["comparisons"]]
            blocks = [blocks_energy_uj(c, side) for c in r["comparisons"]]
            print(f"| {recipe} | {len(r['seeds'])} | {arch} | {mean_range(last)} | {mean_range(best)} | {mean_range(energy, '{:.3f}')} "
                  f"| {mean_range(blocks, '{:.3f}')} | {mean_range(acs, '{:.3f}')} |")
    print("\n| recipe | seed | energy ratio Spikingformer / Spikformer | the same, blocks alone | images |")
    print("|---|---|---|---|---|")
    for recipe, r in results.items():
        for seed, c in zip(r["seeds"], r["comparisons"]):
            print(f"| {recipe} | {seed} | {c['energy_ratio']:.3f} | {blocks_energy_uj(c, 0) / blocks_energy_uj(c, 1):.3f} "
                  f"| {c['images']} |")

    print("\nInput rate per layer (firing rate of 0/1 inputs; mean value of Spikformer's integer inputs), mean over the seeds")
    for recipe, r in results.items():
        print(f"\n{recipe}:\n\n| layer | Spikingformer | Spikformer | Spikformer input |")
        print("|---|---|---|---|")
        names = list(layer_rates(r["comparisons"][0], 0))
        for name in names:
            sf = [layer_rates(c, 0)[name] for c in r["comparisons"]]
            kf = [layer_rates(c, 1)[name] for c in r["comparisons"]]
            kinds = {row["name"]: row["input_kind"] for row in r["comparisons"][0]["reports"][1]["rows"]}
            print(f"| {name} | {sum(sf) / len(sf):.4f} | {sum(kf) / len(kf):.4f} | {kinds[name]} |")
    control(runs)
    if plot:
        draw(results, plot)
        print(f"\nwrote {plot}")


def control(runs: Path) -> None:
    """Spikingformer with Spikformer's tau (2.0) on digits_dvs, against the same Spikformer runs."""
    seeds = [s for s in SEEDS if (run_dir(runs, "digits_dvs", "spikingformer_tau2", s) / "last.pt").is_file()]
    if not seeds:
        return
    comps = [energy_comparison(runs, "digits_dvs", s, "spikingformer_tau2") for s in seeds]
    last = [accuracy(run_dir(runs, "digits_dvs", "spikingformer_tau2", s))["last"] for s in seeds]
    tok = [sum(r["rate"] for r in c["reports"][0]["rows"] if r["name"].startswith("tokenizer.stages.")
               and not r["name"].endswith(".0.conv")) / 4 for c in comps]
    print(f"\ncontrol, digits_dvs, Spikingformer with tau 2.0 ({len(seeds)} seeds):\n")
    print("| test top-1 after the last epoch | energy per image (µJ) | of which blocks (µJ) | energy ratio to Spikformer "
          "| the same, blocks alone | mean tokenizer input rate (stages 1-4) |")
    print("|---|---|---|---|---|---|")
    print(f"| {mean_range(last)} | {mean_range([c['totals'][0]['energy_mj'] * 1e3 for c in comps], '{:.3f}')} "
          f"| {mean_range([blocks_energy_uj(c, 0) for c in comps], '{:.3f}')} "
          f"| {mean_range([c['energy_ratio'] for c in comps], '{:.3f}')} "
          f"| {mean_range([blocks_energy_uj(c, 0) / blocks_energy_uj(c, 1) for c in comps], '{:.3f}')} "
          f"| {mean_range(tok, '{:.4f}')} |")


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"spikingformer": "tab:blue", "spikformer": "tab:orange"}
    fig, axes = plt.subplots(len(results), 3, figsize=(14, 4.2 * len(results)), squeeze=False)
    for row, (recipe, r) in enumerate(results.items()):
        ax_acc, ax_energy, ax_rate = axes[row]
        for side, arch in enumerate(ARCHS):
            x = [side + 0.08 * (s - 1) for s in r["seeds"]]
            ax_acc.scatter(x, [a["last"] for a in r["accuracy"][arch]], color=colors[arch], label=arch)
            ax_energy.scatter(x, [c["totals"][side]["energy_mj"] * 1e3 for c in r["comparisons"]], color=colors[arch],
                              label=arch)
        for ax, title, unit in ((ax_acc, "test top-1 after the last epoch", "%"),
                                (ax_energy, "theoretical energy per image (Eq. 19)", "µJ")):
            ax.set_xticks([0, 1], ARCHS)
            ax.set_xlim(-0.5, 1.5)
            ax.set_title(f"{recipe}: {title}, {len(r['seeds'])} seeds", fontsize=10)
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
        ax_energy.set_ylim(bottom=0)
        names = list(layer_rates(r["comparisons"][0], 0))
        names = [n for n in names if n not in ("tokenizer.stages.0.conv", "head.fc")]  # real-valued inputs
        width = 0.4
        for side, arch in enumerate(ARCHS):
            means = [sum(layer_rates(c, side)[n] for c in r["comparisons"]) / len(r["comparisons"]) for n in names]
            ax_rate.bar([i + (side - 0.5) * width for i in range(len(names))], means, width, color=colors[arch],
                        label=arch)
        ax_rate.set_xticks(range(len(names)), [n.replace("tokenizer.stages.", "tok.").replace(".linear", "")
                                               .replace("blocks.", "b") for n in names], rotation=60, fontsize=8)
        ax_rate.set_title(f"{recipe}: input rate per layer (integers: mean value)", fontsize=10)
        ax_rate.legend(fontsize=8)
        ax_rate.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/study"), help="folder of benchmarks/study_train.sh")
    ap.add_argument("--plot", type=Path, help="write the figure (PNG) here")
    args = ap.parse_args()
    report(args.runs, args.plot)


if __name__ == "__main__":
    main()
