"""Shared test helpers: where ``../shared`` (real data and golden fixtures) lives, skipping without it,
the benchmarks folder on the path, the device and LIF backends the neuron tests run on, and which
tests are slow."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# the benchmark scripts and their helpers (benchmarks/*.py) are not part of the package: import them from the repository
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

# tests/test_neuron.py and tests/test_kernels.py run on this device (``benchmarks/gpu_check.sh`` sets cuda);
# the "triton" backend runs there on CUDA, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
# set by tests/test_kernels.py::test_triton_kernels_under_interpreter for a subprocess)
DEVICE = torch.device(os.environ.get("SPIKINGFORMER_TEST_DEVICE", "cpu"))
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_BACKENDS = ["torch", "cpu"] + (["triton"] if TRITON_INTERPRET or DEVICE.type == "cuda" else [])


def skip_unusable(backend: str) -> None:
    """Skip a LIF backend that cannot take tensors on ``DEVICE``."""
    if backend == "cpu" and DEVICE.type != "cpu":
        pytest.skip("the 'cpu' backend is for CPU tensors")


def require(path: Path) -> Path:
    """Skip the calling test with a clear reason if ``path`` (under ../shared) is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: golden fixtures and real data live in ../shared next to the repository")
    return path


# The slow tests, one list for the whole suite: ``python -m pytest -q`` leaves them out (pyproject's
# addopts ``-m "not slow"``), ``python -m pytest -q -m slow`` runs just them (``.ci/run`` runs both).
# Keys are "file::function" (every parametrisation of the function); each is a long integration
# run (training, compiling, building the native code again, subprocesses importing timm).
SLOW = {
    "tests/test_bench.py::test_bench_model_quick_prints_ratios",
    "tests/test_bench.py::test_bench_scaling_quick_runs",
    "tests/test_bench.py::test_bench_lif_quick_runs_as_a_script",
    "tests/test_bench.py::test_bench_lif_without_spikingjelly_says_so_and_drops_the_column",
    "tests/test_bench.py::test_caching_allocator_reuses_large_blocks_instead_of_faulting_them_in",
    "tests/test_bench.py::test_training_under_the_caching_allocator_is_unchanged",
    "tests/test_cli.py::test_import_is_light_and_timm_sees_the_zoo_when_imported_after",
    "tests/test_cli.py::test_timm_imported_first_sees_the_zoo_and_registering_again_changes_nothing",
    "tests/test_compile.py::test_compile_fullgraph_aot_eager_equals_eager",
    "tests/test_compile.py::test_compile_fullgraph_inductor_equals_eager",
    "tests/test_determinism.py::test_two_seeded_runs_are_identical",
    "tests/test_kernels.py::test_cpu_element_loops_vectorised",
    "tests/test_kernels.py::test_triton_kernels_under_interpreter",
    "tests/test_native.py::test_every_command_runs_with_an_unusable_cache",
    "tests/test_native.py::test_model_forward_with_a_broken_cache",
}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects on the markers
def pytest_collection_modifyitems(items):
    """Mark the tests listed in ``SLOW`` (tests/test_package_structure.py checks that each exists)."""
    for item in items:
        if f"{item.nodeid.split('::')[0]}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
