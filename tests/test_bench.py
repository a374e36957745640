"""Smoke tests of the benchmark scripts in ``benchmarks/`` and the allocator set-up (tiny sizes; no timing assertions)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import bench_lif
import bench_model
import bench_scaling
from conftest import BENCHMARKS
from spikingformer import allocator


def _has_spikingjelly() -> bool:
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_spikingjelly(), reason="the model benchmark compares against spikingjelly")
def test_bench_model_quick_prints_ratios(capsys):
    bench_model.main(["--quick", "--steps", "1", "--warmup", "0", "--models", "cifar", "--dtypes", "fp32",
                      "--no-allocator-rows"])
    out = capsys.readouterr().out
    assert "Command: `" in out and "--models cifar" in out
    assert "torch " in out and "spikingjelly " in out and "CPU:" in out
    assert "authors' time / ours" in out and "ours peak / authors' peak" in out
    rows = [line for line in out.splitlines() if line.startswith("| spikingformer_cifar10_4_384, B=2 |")]
    assert len(rows) == 6  # train/infer x ours/authors' code/SJ neurons in our layers
    ours = [line.split("|") for line in rows if line.split("|")[4].strip() == "ours"]
    assert len(ours) == 2 and all(cells[-4].strip().endswith("x") and cells[-2].strip().endswith("x") for cells in ours)
    assert "fraction of dense matmul" in out and "Targets" in out


@pytest.mark.slow
def test_bench_scaling_quick_runs(capsys):
    bench_scaling.main(["--quick", "--steps", "1", "--warmup", "0", "--plot-dir", ""])
    out = capsys.readouterr().out
    assert "| T | 2 |" in out and "| batch | 2 |" in out and "| resolution | 64 |" in out


@pytest.mark.slow
def test_bench_lif_quick_runs_as_a_script():
    """``python benchmarks/bench_lif.py`` from a clean process (the folder is not a package)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_lif.py"), "--quick", "--rounds", "1",
                           "--budget", "0.01", "--max-reps", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# LIF neuron benchmark" in proc.stdout and "| 4 | 1e+05 | fwd |" in proc.stdout
    assert "bench_lif.py --quick" in proc.stdout  # the command is echoed


@pytest.mark.slow
def test_bench_lif_without_spikingjelly_says_so_and_drops_the_column(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly", None)  # as if it were not installed
    bench_lif.main(["--quick", "--rounds", "1", "--budget", "0.01", "--max-reps", "3", "--threads", "1"])
    out = capsys.readouterr().out
    assert "spikingjelly not installed" in out
    assert "SpikingJelly is not installed, so there is no comparison column" in out and "spikingformer[bench]" in out
    assert "x SJ" not in out and "| 4 | 1e+05 | fwd | torch | float32 |" in out


def test_bench_model_without_spikingjelly_is_one_line_and_exit_2(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly", None)
    with pytest.raises(SystemExit) as done:
        bench_model.main(["--quick", "--dtypes", "fp32"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compares against SpikingJelly's neurons" in err[0] and "spikingformer[bench]" in err[0]


@pytest.mark.parametrize("env, disabled", [({"SPIKINGFORMER_ALLOCATOR": "0"}, True), ({"SPIKINGFORMER_ALLOCATOR": "off"}, True),
                                          ({"SPIKINGFORMER_ALLOCATOR": "1"}, False), ({}, False)],
                         ids=["0", "off", "1", "unset"])
def test_allocator_switch(env, disabled):
    assert allocator.allocator_disabled(env) is disabled


def _run(code: str, switch: str = "1", **env_extra) -> str:
    env = dict(os.environ, SPIKINGFORMER_ALLOCATOR=switch, **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="the caching allocator is Linux-only")


@linux_only
@pytest.mark.parametrize("switch", ["1", "0"])
def test_configure_allocator_in_a_fresh_process(switch):
    out = _run("from spikingformer import allocator; print(allocator.configure_allocator()); "
               "print(allocator.allocator_state())", switch)
    if switch == "1":
        assert out.startswith("True") and "spikingformer caching allocator" in out
    else:
        assert out.startswith("False") and "SPIKINGFORMER_ALLOCATOR=0" in out


_FAULTS = """
import resource, torch
from spikingformer import allocator
allocator.configure_allocator()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 2**20)
f0 = faults()
for _ in range(4): torch.ones(16 * 2**20)
print((faults() - f0) / 4, allocator.cache_stats()["hits"])
"""


@pytest.mark.slow
@linux_only
def test_caching_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    """A freed 64 MB tensor's block serves the next one (PyTorch's default maps and zeroes it afresh)."""
    ours = _run(_FAULTS, "1").split()
    default = _run(_FAULTS, "0").split()
    pages = 64 * 2**20 / 4096
    assert float(default[-2]) > pages / 2  # glibc: every 64 MB block is page-faulted in again
    assert float(ours[-2]) < pages / 100 and int(ours[-1]) >= 4  # served from the cache, no faults


_TRAIN = """
import torch
from spikingformer import allocator
print("installed", allocator.configure_allocator())
from spikingformer.models.zoo import create_model
torch.manual_seed(0)
model = create_model("spikingformer_digits")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
data = torch.utils.data.TensorDataset(torch.arange(4))
loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=2, collate_fn=lambda b: torch.ones(2**19) * b[0][0])
print("workers", sum(float(t[0]) for t in loader))  # 2 MB tensors made in forked workers
print("loss %.10f" % loss.item(), "weight %.10f" % model.head.fc.weight.double().abs().sum().item())
"""


@pytest.mark.slow
@linux_only
def test_training_under_the_caching_allocator_is_unchanged():
    """Same losses and weights as under PyTorch's default allocator; forked DataLoader workers work."""
    ours = _run(_TRAIN, "1").splitlines()
    default = _run(_TRAIN, "0").splitlines()
    assert "installed True" in ours and "installed False" in default
    assert "workers 6.0" in ours
    assert [ln for ln in ours if ln.startswith("loss")] == [ln for ln in default if ln.startswith("loss")]


@linux_only
def test_allocator_build_failure_keeps_the_default_with_a_notice(tmp_path):
    out = _run("import warnings; from spikingformer import allocator; print(allocator.configure_allocator()); "
               "print(allocator.allocator_state())", "1", CXX=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.startswith("False")
    assert "did not build" in out and "no-such-compiler" in out and "RuntimeWarning" in out


def test_bench_model_on_cuda_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the benchmark would run")
    with pytest.raises(SystemExit) as done:
        bench_model.main(["--device", "cuda", "--quick"])
    assert done.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err
