"""Two seeded runs of one configuration on one machine give the same metrics and weights, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikingformer import checkpoints
from spikingformer.cli import main

TIMING = {"epoch_time_s", "images_per_s"}  # wall-clock fields, the only ones allowed to differ


def short_run(tmp_path: Path, name: str, start_method: str | None = None) -> Path:
    """One epoch of the default recipe, smaller; augmentation on, two DataLoader workers, started
    by Python's default method here (fork on Linux before Python 3.14) or, in a process of its own,
    by ``start_method``."""
    argv = ["train", "--output", str(tmp_path), "--name", name, "--epochs", "1", "--warmup-epochs", "0",
            "--model-args", "{embed_dim: 32, num_heads: 2}", "--batch-size", "64", "--workers", "2",
            "--augment", "true", "--amp", "off", "--tensorboard", "false", "--seed", "5"]
    if start_method is None:
        assert main(argv) == 0
    else:
        run = subprocess.run([sys.executable, "-c", START_METHOD_RUN, start_method, *argv], capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / name


START_METHOD_RUN = """
import multiprocessing, sys
multiprocessing.set_start_method(sys.argv[1])
from spikingformer.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("start_method", [None, "spawn"], ids=["default", "spawn"])
def test_two_seeded_runs_are_identical(tmp_path, start_method):
    """Also where the workers start by spawn (macOS's and Windows' default; Python 3.14's forkserver
    on Linux pickles the data set alike): nothing they need is inherited from the main process."""
    a, b = short_run(tmp_path, "a"), short_run(tmp_path, "b", start_method)
    rows = [[json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()] for f in (a, b)]
    assert len(rows[0]) == 1 and rows[0][0]["train_loss"] > 0
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in rows[1]]
    for file in ("last.pt", "best.pt"):
        wa, wb = (checkpoints.load_checkpoint(f / file)["model"] for f in (a, b))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (file, k)


PROBE = """
import ctypes, torch
from spikingformer.cpu_features import pin_threads
gomp = ctypes.CDLL("libgomp.so.1")
assert gomp.omp_get_dynamic() == 1, "OMP_DYNAMIC=true should start dynamic"
threads = torch.get_num_threads()
assert pin_threads() == threads == torch.get_num_threads()
print(gomp.omp_get_dynamic())
"""


def test_pinned_threads_do_not_follow_the_load():
    """With OMP_DYNAMIC=true GNU OpenMP sizes its teams by the load average: training turns that off."""
    env = {**os.environ, "OMP_DYNAMIC": "true"}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"


def test_training_pins_threads(monkeypatch):
    from spikingformer.engine import trainer

    calls = []
    monkeypatch.setattr(trainer, "pin_threads", lambda: calls.append(1))
    trainer.seed_everything(0, deterministic=True)
    assert calls == [1]
