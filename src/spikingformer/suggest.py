"""Near-miss suggestions for error messages: "did you mean ...?" (difflib)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``name``, best first (none when nothing is close)."""
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'a' or 'b'?"`` for the choices closest to ``name``, or ``""``."""
    close = closest(name, choices)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str], what: str | None = None) -> str:
    """``unknown model 'x'; did you mean 'y'? available models: a, b, c``."""
    choices = sorted(choices)
    hint = did_you_mean(name, choices) or ";"
    return f"unknown {kind} {name!r}{hint} {what or f'available {kind}s'}: {', '.join(choices)}"
