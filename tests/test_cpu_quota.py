"""The CPUs a process may use (cpu_features.usable_cpus): its affinity and its cgroup's CPU quota,
read from cgroup files laid out as the kernel does, and the command line's thread count fitted to them."""

from __future__ import annotations

import os

import pytest
import torch

from spikingformer import cpu_features
from spikingformer.cli import main


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_binds_from_the_own_cgroup_or_any_parent(tmp_path):
    _write(tmp_path / "kubepods" / "cpu.max", "150000 100000\n")  # the pod's limit: 1.5 CPUs
    _write(tmp_path / "kubepods" / "pod1" / "cpu.max", "max 100000\n")  # the container's own: none
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cpu_features._cgroup_quotas(tmp_path, "0::/kubepods/pod1\n") == [1.5]
    assert cpu_features._cgroup_quotas(tmp_path, "0::/\n") == []  # the root's "max": no quota
    _write(tmp_path / "cpu.max", "400000 100000\n")  # a container's namespaced view of its own limit
    assert cpu_features._cgroup_quotas(tmp_path, "0::/\n") == [4.0]


def test_cgroup_v1_quota_of_the_cpu_controller(tmp_path):
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "250000\n")  # the container's view: its own quota at the mount
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000\n")
    own = "4:cpu,cpuacct:/docker/0123abc\n3:memory:/docker/0123abc\n"  # a host path that the mount does not show
    assert cpu_features._cgroup_quotas(tmp_path, own) == [2.5]
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_features._cgroup_quotas(tmp_path, own) == []
    _write(tmp_path / "cpu" / "sub" / "cpu.cfs_quota_us", "50000\n")
    _write(tmp_path / "cpu" / "sub" / "cpu.cfs_period_us", "100000\n")
    assert cpu_features._cgroup_quotas(tmp_path, "1:cpu:/sub\n") == [0.5]
    _write(tmp_path / "cpu" / "sub" / "cpu.cfs_quota_us", "garbage\n")
    assert cpu_features._cgroup_quotas(tmp_path, "1:cpu:/sub\n") == []


def test_usable_cpus_is_the_affinity_at_most_the_quota_rounded_up(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpu_features, "_cgroup_quotas", lambda root: [])
    assert cpu_features.usable_cpus() == 4
    monkeypatch.setattr(cpu_features, "_cgroup_quotas", lambda root: [1.5, 8.0])
    assert cpu_features.usable_cpus() == 2
    monkeypatch.setattr(cpu_features, "_cgroup_quotas", lambda root: [0.2])
    assert cpu_features.usable_cpus() == 1


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("omp, expected", [(None, 1), ("2", 2)])
def test_the_command_line_fits_torch_threads_to_the_quota_unless_told(threads, monkeypatch, capsys, omp, expected):
    # a container limited to 1 CPU on 2 cores: two threads took 1.22x as long to train the digits (docs/performance.md)
    monkeypatch.setattr(cpu_features, "usable_cpus", lambda cgroup=None: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)  # the user's own choice stands
    assert main(["models"]) == 0
    assert torch.get_num_threads() == expected


def test_the_quota_benchmark_parses_its_arguments(capsys):
    # it needs root and a cgroup CPU controller to run (docs/performance.md); its options at least parse
    import bench_cpu_quota

    with pytest.raises(SystemExit) as done:
        bench_cpu_quota.main(["--help"])
    assert done.value.code == 0 and "--cpus CPUS" in capsys.readouterr().out
