"""The ``spikingformer`` command: ``train | eval | models | audit | energy | fuse | bench``.

Each sub-command lives with the code it drives and adds itself through a ``register(subparsers)``
function listed in ``COMMAND_MODULES``; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "spikingformer.engine.commands",  # train, eval, models
    "spikingformer.analysis.commands",  # audit, energy, fuse
    "spikingformer.bench",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    from spikingformer import __version__

    parser = argparse.ArgumentParser(
        prog="spikingformer",
        description="Spike-driven transformers: train, evaluate and analyse Spikingformer / Spikformer models.",
    )
    parser.add_argument("--version", action="version", version=f"spikingformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from spikingformer.runtime import configure_allocator

    configure_allocator()  # cache large CPU blocks across steps instead of faulting them in (docs/performance.md)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # errors a user can cause carry a message naming the problem and the fix
        print(f"spikingformer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
