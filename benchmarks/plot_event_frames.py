"""Plot a few event-frame samples of N-MNIST and digits_dvs (ON events red, OFF events blue).

Writes ``docs/img/event_frames_nmnist.png`` (needs the N-MNIST small copy, by default
``../shared/data/nmnist-small`` next to the repository) and ``docs/img/event_frames_digits_dvs.png``.

    python benchmarks/plot_event_frames.py [--nmnist-root DIR] [--out DIR] [--T 6] [--samples 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from spikingformer.data.digits_dvs import DigitsDVS  # noqa: E402
from spikingformer.data.event_datasets import NMNIST  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def to_rgb(frame: torch.Tensor, vmax: float) -> np.ndarray:
    """(2, H, W) counts -> (H, W, 3) on white: ON (channel 1) red, OFF (channel 0) blue, both purple."""
    off = np.clip(frame[0].numpy() / vmax, 0, 1)
    on = np.clip(frame[1].numpy() / vmax, 0, 1)
    return np.stack([1 - off, 1 - np.maximum(on, off), 1 - on], axis=-1)


def plot(dataset: torch.utils.data.Dataset, indices: list[int], title: str, out: Path) -> None:
    samples = [dataset[i] for i in indices]
    T = samples[0][0].shape[0]
    fig, axes = plt.subplots(len(samples), T, figsize=(1.3 * T, 1.4 * len(samples)), squeeze=False)
    for r, (frames, label) in enumerate(samples):
        vmax = max(float(np.percentile(frames[frames > 0].numpy(), 95)) if (frames > 0).any() else 1.0, 1.0)
        for c in range(T):
            ax = axes[r, c]
            ax.imshow(to_rgb(frames[c], vmax), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"label {label}", fontsize=8)
    fig.suptitle(f"{title}: ON red, OFF blue ({T} frames, split_by='number')", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nmnist-root", type=Path, default=REPO.parent / "shared" / "data" / "nmnist-small")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--T", type=int, default=6)
    ap.add_argument("--samples", type=int, default=4)
    args = ap.parse_args(argv)

    digits = DigitsDVS(train=False, time_steps=args.T)
    picks = [next(i for i, y in enumerate(digits.targets) if y == d) for d in range(args.samples)]
    plot(digits, picks, "digits_dvs (emulated saccades)", args.out / "event_frames_digits_dvs.png")

    if not args.nmnist_root.is_dir():
        print(f"N-MNIST root {args.nmnist_root} not found; skipped event_frames_nmnist.png", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as cache:
        nmnist = NMNIST(args.nmnist_root, train=False, time_steps=args.T, cache_dir=cache)
        plot(nmnist, list(range(args.samples)), "N-MNIST", args.out / "event_frames_nmnist.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
