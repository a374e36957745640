"""``spikingformer bench``: the neuron, model and scaling benchmarks from the installed package.

* ``--what neuron``: :mod:`spikingformer.benchmarking.lif` (``benchmarks/bench_lif.py``);
* ``--what model``: :mod:`spikingformer.benchmarking.model` (``benchmarks/bench_model.py``);
* ``--what scaling``: :mod:`spikingformer.benchmarking.scaling` (``benchmarks/bench_scaling.py``);
* ``--what all``: neuron, then model (scaling writes plots, so it runs only when asked for).

Options are those of the scripts; an option applies to every benchmark that has it (``--quick``,
``--threads``, ``--steps``, ...). Each report is markdown on stdout, with the command, the machine
and versions, and the ratios measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import sys

WHAT = ("neuron", "model", "scaling", "all")


def _modules(what: str):
    from spikingformer.benchmarking import lif, model, scaling

    return {"neuron": [lif], "model": [model], "scaling": [scaling], "all": [lif, model]}[what]


def _add_merged_arguments(parser: argparse.ArgumentParser) -> None:
    """The union of the benchmarks' options (help from the first definition; tagged with every user)."""
    from spikingformer.benchmarking import lif, model, scaling

    actions: dict[str, tuple[argparse.Action, list[str]]] = {}
    for module in (lif, model, scaling):
        probe = argparse.ArgumentParser(add_help=False)
        module.add_arguments(probe)
        for action in probe._actions:
            flag = action.option_strings[0]
            actions.setdefault(flag, (action, []))[1].append(module.__name__.rsplit(".", 1)[1])
    for flag, (action, users) in actions.items():
        kwargs = dict(dest=action.dest, default=argparse.SUPPRESS, help=f"{action.help or ''} [{', '.join(users)}]")
        if isinstance(action, argparse._StoreTrueAction):
            parser.add_argument(*action.option_strings, action="store_true", **kwargs)
        else:
            parser.add_argument(*action.option_strings, type=action.type, nargs=action.nargs, choices=action.choices,
                                **kwargs)


def _namespace_for(module, given: argparse.Namespace) -> argparse.Namespace:
    """The module's defaults, overridden by the options the user gave that the module knows."""
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in vars(given).items():
        if key in vars(args):
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> int:
    given = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("what", "func", "command")})
    command = "spikingformer " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "spikingformer bench"
    for i, module in enumerate(_modules(args.what)):
        if i:
            print()
        margs = _namespace_for(module, given)
        if getattr(margs, "profile", False):
            module.print_profile(margs, command)
        else:
            module.run_benchmark(margs, command)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: the LIF neuron and the model against SpikingJelly, scaling with T/batch/resolution",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--what", default="all", choices=WHAT,
                        help="neuron (LIF kernels), model (training step / inference vs SpikingJelly's neurons), "
                        "scaling (time and memory vs T, batch, resolution; writes plots), all (neuron + model)")
    _add_merged_arguments(parser)
    parser.set_defaults(func=run)
