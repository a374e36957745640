"""Shared test helpers: where ``../shared`` (real data and golden fixtures) lives, and skipping without it."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"


def require(path: Path) -> Path:
    """Skip the calling test with a clear reason if ``path`` (under ../shared) is absent."""
    if not path.exists():
        pytest.skip(f"{path} not found: golden fixtures and real data live in ../shared next to the repository")
    return path
