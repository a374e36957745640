"""The ``spikingformer`` command: ``train | eval | models | export | audit | energy | fuse | info``.

Each sub-command lives with the code it drives and adds itself through a ``register(subparsers)``
function listed in ``COMMAND_MODULES``; this file only assembles them. Building the parser imports
no PyTorch (command modules import their heavy dependencies in the function that runs the command),
so ``--help`` and argument errors answer without the seconds an ``import torch`` takes
(``benchmarks/startup.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

from spikingformer.suggest import closest, did_you_mean

COMMAND_MODULES = [
    "spikingformer.engine.commands",  # train, eval, models
    "spikingformer.analysis.commands",  # audit, energy, fuse
    "spikingformer.info",  # info
]


class CommandParser(argparse.ArgumentParser):
    """The parser of the command and of each sub-command.

    * options are never abbreviated (``--epoch`` is an error, not ``--epochs``);
    * an unknown option or choice names the closest known ones; ``synonyms`` maps names other
      tools use (``--learning-rate``) to this parser's option (``--lr``);
    * ``populate(parser, args)``, when given, adds options on first use, seeing the arguments being
      parsed (``train`` shows the values of the recipe its ``--config`` names).
    """

    def __init__(self, *args, populate: Callable[[CommandParser, list[str]], None] | None = None, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)
        self._populate = populate
        self.synonyms: dict[str, str] = {}
        self.commands: argparse._SubParsersAction | None = None

    def ensure_populated(self, args: Sequence[str] = ()) -> CommandParser:
        """Add the options ``populate`` adds (once), as for parsing ``args``; returns the parser."""
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self, list(args))
        return self

    def add_subparsers(self, **kwargs) -> argparse._SubParsersAction:
        self.commands = super().add_subparsers(parser_class=CommandParser, **kwargs)
        return self.commands

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self.ensure_populated(args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self
            if self.commands is not None and getattr(namespace, self.commands.dest, None) in self.commands.choices:
                parser = self.commands.choices[getattr(namespace, self.commands.dest)]
            parser.error(f"unrecognized arguments: {' '.join(extras)}{parser.flag_hint(extras)}")
        return namespace

    def flag_hint(self, extras: Sequence[str]) -> str:
        """``"; did you mean --lr?"`` for the unknown options among ``extras``."""
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        # a token starting with "-" is an option unless it is a negative number
        flags = [t.split("=", 1)[0] for t in extras if t.startswith("-") and not t[1:2].isdigit() and t[1:2] != "."]
        hints = []
        for flag in flags:
            spelled = flag.replace("_", "-")
            match = self.synonyms.get(spelled) or next(iter(closest(spelled, known, n=1)), None)
            if match:
                hints.append(match if len(flags) == 1 else f"{match} (for {flag})")
        return f"; did you mean {', '.join(hints)}?" if hints else ""

    def _check_value(self, action: argparse.Action, value) -> None:
        # argparse's check, with the closest choices named ("invalid choice: 'trian'; did you mean 'train'?")
        if action.choices is not None and value not in action.choices:
            hint = did_you_mean(str(value), [str(c) for c in action.choices])
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint} (choose from {choices})")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of at least ``minimum`` (counts, sizes, seeds), so that
    ``--batch-size 0`` is an argument error naming the option, as ``train``'s checks name theirs."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return whole_number


def first_process() -> bool:
    """Whether this is the process that speaks for all: RANK 0 under torchrun, or the only one. Every
    process torchrun starts meets the same configuration errors and interrupts, and holds the same
    summed results; the first one prints them."""
    return os.environ.get("RANK", "0") == "0"


def says(err: Exception) -> bool:
    """Whether this process prints ``err``. Under torchrun every process meets alike an error marked
    :func:`~spikingformer.engine.distributed.alike_everywhere` (a configuration error, a diverged
    loss: RANK 0 says it); the processes of one machine meet its files alike (LOCAL_RANK 0 says an
    error marked :func:`~spikingformer.engine.distributed.alike_on_this_machine`: another machine may
    lack them); any other error, each process that meets it (a bad batch is in one's share)."""
    if getattr(err, "alike_everywhere", False):
        return first_process()
    if getattr(err, "alike_on_this_machine", False):
        return os.environ.get("LOCAL_RANK", "0") == "0"
    return True


def yaml_mapping(text: str) -> dict:
    """The argparse type of ``--model-args``: a YAML mapping, such as ``{embed_dim: 64, depth: 2}``."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{embed_dim: 64, depth: 2}}', got {text!r}")
    return value


def build_parser() -> CommandParser:
    from spikingformer import __version__

    parser = CommandParser(
        prog="spikingformer",
        description="Spike-driven transformers: train, evaluate and analyse Spikingformer / Spikformer models.",
    )
    parser.add_argument("--version", action="version", version=f"spikingformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """The package's own warnings (they start with ``spikingformer:`` or are of its own categories) as
    their message alone, one line (:mod:`spikingformer.progress` sets them apart from a bar)."""
    own = str(message).startswith("spikingformer") or category.__module__.startswith("spikingformer.")
    return f"{message}\n" if own else _default_formatwarning(message, category, filename, lineno, line)


_default_formatwarning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from spikingformer.allocator import configure_allocator
    from spikingformer.cpu_features import fit_threads_to_quota
    from spikingformer.native import calm_gnu_openmp

    calm_gnu_openmp()  # before PyTorch loads its OpenMP runtime

    configure_allocator()  # cache large CPU blocks across steps instead of faulting them in (docs/performance.md)
    fit_threads_to_quota()  # a container's CPU limit, which PyTorch's default thread count does not read
    try:
        with _sigterm_as_interrupt():
            status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a reader that left is seen below, not at exit
        return status
    except BrokenPipeError:  # the output's reader left (`spikingformer models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice: no flush error at exit
        return 1
    except (ValueError, FileNotFoundError, KeyError) as err:
        # errors a user can cause carry a message naming the problem and the fix (said once where every process meets it)
        if says(err):
            print(f"spikingformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a run that diverged: not a usage error, and no traceback helps
        if says(err):
            print(f"spikingformer {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: no traceback; train says what it kept
        if first_process():  # under torchrun every process is interrupted: one line for all
            how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
            print(f"spikingformer {args.command}: {how}{f'; {err}' if str(err) else ''}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """A SIGTERM: a batch scheduler's time limit, torchrun stopping the other processes, ``kill``.
    Handled as Ctrl-C is (train says what it kept), with the exit status of the signal, 143."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` in the main thread for the block (Python's default ends
    the process at once: no line in a job's log, no word about the checkpoint kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
