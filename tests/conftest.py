"""Shared test helpers: where ``../shared`` (real data and golden fixtures) lives, skipping without it, and the benchmarks folder on the path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# the benchmark scripts and their helpers (benchmarks/*.py) are not part of the package: import them from the repository
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"


def require(path: Path) -> Path:
    """Skip the calling test with a clear reason if ``path`` (under ../shared) is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: golden fixtures and real data live in ../shared next to the repository")
    return path
