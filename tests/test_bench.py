"""Smoke tests of ``spikingformer bench`` and the allocator set-up (tiny sizes; no timing assertions)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from spikingformer import runtime
from spikingformer.cli import build_parser


def _has_spikingjelly() -> bool:
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return False
    return True


def test_bench_parser_merges_options():
    args = build_parser().parse_args(["bench", "--what", "model", "--quick", "--steps", "1", "--models", "cifar"])
    assert args.what == "model" and args.quick and args.steps == 1 and args.models == ["cifar"]


@pytest.mark.skipif(not _has_spikingjelly(), reason="the model benchmark compares against spikingjelly")
def test_bench_model_quick_prints_ratios(capsys):
    from spikingformer.cli import main

    rc = main(["bench", "--what", "model", "--quick", "--steps", "1", "--warmup", "0", "--models", "cifar",
               "--dtypes", "fp32", "--no-allocator-rows"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Command: `spikingformer bench" in out
    assert "torch " in out and "spikingjelly " in out and "CPU:" in out
    assert "authors' time / ours" in out and "ours peak / authors' peak" in out
    rows = [line for line in out.splitlines() if line.startswith("| spikingformer_cifar10_4_384, B=2 |")]
    assert len(rows) == 6  # train/infer x ours/authors' code/SJ neurons in our layers
    ours = [line.split("|") for line in rows if line.split("|")[4].strip() == "ours"]
    assert len(ours) == 2 and all(cells[-4].strip().endswith("x") and cells[-2].strip().endswith("x") for cells in ours)
    assert "fraction of dense matmul" in out and "Targets" in out


def test_bench_scaling_quick_runs(capsys):
    from spikingformer.benchmarking import scaling

    scaling.main(["--quick", "--steps", "1", "--warmup", "0", "--plot-dir", ""])
    out = capsys.readouterr().out
    assert "| T | 2 |" in out and "| batch | 2 |" in out and "| resolution | 64 |" in out


def test_bench_neuron_quick_via_cli(capsys):
    from spikingformer.cli import main

    rc = main(["bench", "--what", "neuron", "--quick", "--rounds", "1", "--budget", "0.01", "--max-reps", "3",
               "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "# LIF neuron benchmark" in out and "| 4 | 1e+05 | fwd |" in out


def test_allocator_switch_and_user_settings_win():
    assert runtime.allocator_disabled({"SPIKINGFORMER_MALLOC": "0"})
    assert runtime.allocator_disabled({"SPIKINGFORMER_MALLOC": "off"})
    assert not runtime.allocator_disabled({})
    assert runtime.user_tuned_allocator({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert runtime.user_tuned_allocator({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})
    assert not runtime.user_tuned_allocator({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})


@pytest.mark.parametrize("switch", ["1", "0"])
def test_configure_allocator_in_a_fresh_process(switch):
    code = ("from spikingformer import runtime; r = runtime.configure_allocator(); "
            "print(repr(r)); print(runtime.allocator_state())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["SPIKINGFORMER_MALLOC"] = switch
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    if switch == "1" and glibc:
        assert "mmap_threshold=1073741824" in out and "tuned by spikingformer.runtime" in out
    else:
        assert out.startswith("None") and "C library defaults" in out


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_configured_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    """A freed 64 MB tensor's pages are reused by the next one (glibc's default maps them afresh)."""
    code = (
        "import resource, sys\n"
        "from spikingformer import runtime\n"
        "runtime.configure_allocator()\n"
        "import torch\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "torch.ones(16 * 2**20)\n"
        "f0 = faults()\n"
        "for _ in range(4): torch.ones(16 * 2**20)\n"
        "print((faults() - f0) / 4)\n"
    )
    counts = {}
    for switch in ("1", "0"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        env["SPIKINGFORMER_MALLOC"] = switch
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        counts[switch] = float(out.split()[-1])
    pages = 64 * 2**20 / 4096
    assert counts["0"] > pages / 2  # default glibc: every 64 MB block is page-faulted in again
    # tuned: the block is reused and its pages stay mapped (not all of them here: the VM's memory
    # reclaimer, kdamond, pages out some idle heap memory, which then faults back in)
    assert counts["1"] < counts["0"] / 2, counts
