"""Sub-commands ``audit``, ``energy`` and ``fuse`` of the ``spikingformer`` command.

Examples::

    spikingformer audit --model spikingformer_digits --strict --output runs/audit
    spikingformer energy --model spikingformer_cifar10_4_256 --dataset random --batch-size 4 --measured
    spikingformer energy --model spikingformer_digits --compare
    spikingformer energy --checkpoint runs/a/last.pt --compare-checkpoint runs/b/last.pt
    spikingformer energy --model spikingformer_8_384 --model-args '{embed_dim: 64, depth: 2}' --checkpoint authors.pth --dataset random
    spikingformer energy --paper-log spikingformer_8_768 --ssa-heads 12
    spikingformer fuse --checkpoint runs/digits-spikingformer_digits/best.pt   # writes best-fused.pt beside it

Without ``--checkpoint`` the zoo model is untrained; its BatchNorm statistics are then calibrated
on the analysed inputs (see :func:`spikingformer.analysis.inputs.calibrate_batchnorm`) so that
its spiking activity is representative rather than nearly silent. The printout says which weights
(trained or not) and how many images every number comes from; the inputs default to the whole test
split of the data set a checkpoint was trained on.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spikingformer.cli import at_least, yaml_mapping

if TYPE_CHECKING:  # torch is imported by the commands that run, not to build the parser
    import torch
    from torch import nn

    from spikingformer.analysis.inputs import InputBatches
    from spikingformer.checkpoints import Checkpoint


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="zoo model name (spikingformer.list_models())")
    p.add_argument("--model-args", metavar="YAML", type=yaml_mapping,
                   help="overrides of the model's ModelConfig fields, e.g. '{embed_dim: 64, depth: 2}' for an "
                        "authors' checkpoint of a size outside the zoo")
    p.add_argument("--checkpoint", metavar="PATH", help="weights: this project's checkpoint (plain or fused) or the authors' (with --model)")
    p.add_argument("--dataset", dest="data", metavar="NAME",
                   help="data set name, or 'random' for synthetic inputs (default: the data set the checkpoint was "
                        "trained on; digits for the digits models)")
    p.add_argument("--data", dest="data", help=argparse.SUPPRESS)  # the former name
    p.add_argument("--data-dir", metavar="DIR", help="folder of the data set on disk")
    p.add_argument("--batches", type=at_least(1), default=None, metavar="N",
                   help="number of input batches (default: the whole test split; 2 with --dataset random)")
    p.add_argument("--batch-size", type=at_least(1), default=16, metavar="B", help="images per batch (default 16)")
    p.add_argument("--workers", type=at_least(0), default=None, metavar="N",
                   help="DataLoader worker processes reading the data set (default: the training run's, else 0)")
    p.add_argument("--calibrate-bn", type=at_least(0), default=None, metavar="N",
                   help="set BatchNorm statistics from N input batches first (default: all batches for an "
                        "untrained zoo model, 0 with --checkpoint)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of --dataset random and of untrained weights")
    p.add_argument("--output", dest="out", metavar="DIR", help="write JSON and PNG outputs into this folder")
    p.add_argument("--out", dest="out", help=argparse.SUPPRESS)  # the former name


def register(subparsers) -> None:
    """Add ``audit``, ``energy`` and ``fuse`` to the ``spikingformer`` command's sub-parsers."""
    p = subparsers.add_parser("audit", help="record every layer's inputs: values, histograms, firing rates; strict spike check",
                              description="Spike audit (paper Appendix E, Figures 3/4).")
    _add_common(p)
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 if any layer other than the image conv / real-input head receives non-binary values")
    p.add_argument("--max-values", type=at_least(1), default=64, help="distinct values tracked per layer (default 64)")
    p.set_defaults(func=run_audit)

    p = subparsers.add_parser("energy", help="per-layer FLOPs, SOPs and theoretical energy (paper Eq. 18-20)",
                              description="Theoretical energy per image (paper s.3.4), counted as the authors' code.")
    _add_common(p)
    p.add_argument("--integer-inputs", choices=("ac_count", "mac"), default="ac_count",
                   help="non-binary integer inputs (Spikformer): value n = n ACs (Appendix G way 1, default) or MACs (way 2)")
    p.add_argument("--compare", action="store_true",
                   help="also run the other architecture of the same size on the same inputs (untrained, BatchNorm "
                        "calibrated on the inputs, unless --compare-checkpoint gives its weights)")
    p.add_argument("--compare-checkpoint", metavar="PATH",
                   help="trained weights of the model to compare with (implies --compare): this project's checkpoint "
                        "of any model, or the authors' checkpoint of the other architecture of the same size")
    p.add_argument("--measured", action="store_true",
                   help="run the accumulate-only (event-driven) path and print measured additions beside the estimate")
    p.add_argument("--paper-log", metavar="NAME", choices=("spikingformer_8_512", "spikingformer_8_768"),
                   help="no forward pass: the energy table from the authors' logged firing rates")
    p.add_argument("--ssa-heads", type=at_least(1), metavar="H", help="head count of the SSA term (the 8-768 log used 12)")
    p.set_defaults(func=run_energy)

    p = subparsers.add_parser("fuse", help="fold every BatchNorm into its conv/linear layer and save the fused model",
                              description="ConvBN fusion (paper Appendix B).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint to fuse")
    p.add_argument("--model", metavar="NAME", help="zoo model name (needed for the authors' checkpoints)")
    p.add_argument("--output", metavar="PATH", help="where to write the fused checkpoint (default: <name>-fused.pt beside --checkpoint)")
    p.set_defaults(func=run_fuse)


# ----------------------------------------------------------------------------------------------
# shared steps


@dataclass
class LoadedModel:
    """A model to analyse, with what the printout says about its weights."""

    model: nn.Module
    name: str
    trained: bool  # weights from a checkpoint (else: random initialisation)
    source: str  # "trained weights from PATH", or "untrained: random weights (seed S)"
    checkpoint: Checkpoint | None = None  # the checkpoint read (None for an untrained model)


def load_model(model_name: str | None, checkpoint: str | None, seed: int = 0, model_args: dict | None = None,
               name_if_needed: str | None = None) -> LoadedModel:
    """The model (in eval mode) of ``--model`` / ``--checkpoint`` / ``--model-args``.

    ``name_if_needed`` is the zoo name used for a checkpoint that does not describe its model
    (the authors' files) when ``model_name`` is not given.
    """
    import torch

    from spikingformer import checkpoints
    from spikingformer.models import create_model, model_from_checkpoint

    model_args = model_args or {}
    if checkpoint:
        ckpt = checkpoints.read(checkpoint)
        if not model_name and ckpt.kind != checkpoints.FORMAT:
            model_name = name_if_needed
        model = model_from_checkpoint(ckpt, model_name, **model_args)
        name = model_name or ckpt.model_name or Path(checkpoint).stem
        return LoadedModel(model.eval(), name, True, f"trained weights from {checkpoint}", ckpt)
    if not model_name:
        raise ValueError("name a model with --model NAME (see `spikingformer models`) or give --checkpoint PATH")
    torch.manual_seed(seed)
    return LoadedModel(create_model(model_name, **model_args).eval(), model_name, False,
                       f"untrained: random weights (seed {seed})")


@dataclass
class Inputs:
    """The analysed input batches and a description of them for the printout."""

    batches: InputBatches  # read on every pass, never all in memory
    description: str  # e.g. "the whole digits test split"

    @property
    def images(self) -> int:
        return self.batches.images

    def __str__(self) -> str:
        return f"{self.images} images: {self.description}"


def load_inputs(args: argparse.Namespace, loaded: LoadedModel) -> Inputs:
    """The inputs of ``--dataset`` (default: the checkpoint's training data set, else the model family's)."""
    from spikingformer.analysis.inputs import RANDOM, dataset_batches, default_dataset, synthetic_batches

    config = loaded.model.config
    if args.data == RANDOM:
        batches = synthetic_batches(config, args.batches or 2, args.batch_size, args.seed)
        return Inputs(batches, f"synthetic (--dataset random, seed {args.seed})")
    from spikingformer.engine.evaluation import data_section_for

    # a file of this project's that records its training data (training, fused, exported), as eval reads it
    recorded = loaded.checkpoint is not None and loaded.checkpoint.recorded_data is not None
    dataset = args.data or (None if recorded else default_dataset(config))
    if dataset is None and not recorded:
        raise ValueError("name the input data with --dataset (a data set, or 'random' for synthetic inputs); "
                         "only the digits models and this project's checkpoints have a default")
    section = data_section_for(loaded.checkpoint, dataset, args.data_dir, config.time_steps)
    if args.workers is not None:
        section.workers = args.workers
    batches = dataset_batches(config, section, args.batches, args.batch_size)
    whole = args.batches is None or len(batches) < args.batches
    what = "the whole" if whole else f"the first {len(batches)} batch(es) of {args.batch_size} of the"
    return Inputs(batches, f"{what} {section.dataset} test split")


def _prepare(args: argparse.Namespace) -> tuple[LoadedModel, Inputs]:
    loaded = load_model(args.model, args.checkpoint, args.seed, args.model_args)
    inputs = load_inputs(args, loaded)
    _calibrate_if_needed(loaded, inputs.batches, args.calibrate_bn)
    return loaded, inputs


def _calibrate_if_needed(loaded: LoadedModel, batches: InputBatches, n: int | None) -> None:
    from spikingformer.analysis.inputs import calibrate_batchnorm
    from spikingformer.deploy.fuse import is_fused

    n = (0 if loaded.trained else len(batches)) if n is None else n
    if n > 0 and is_fused(loaded.model):
        raise ValueError("a fused model has no BatchNorm to calibrate; drop --calibrate-bn")
    if n > 0:
        used = batches.first(n)
        calibrate_batchnorm(loaded.model, used)
        loaded.source += f", BatchNorm calibrated on {used.images} images"
        print(f"note: {loaded.name}: BatchNorm statistics calibrated on {len(used)} input batch(es)"
              + ("" if loaded.trained else " (untrained weights)"))


def _out_dir(args: argparse.Namespace) -> Path | None:
    if not args.out:
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------
# audit


def run_audit(args: argparse.Namespace) -> int:
    from spikingformer.analysis.audit import format_audit, non_spike_layers, record_activity, silent_layers

    loaded, inputs = _prepare(args)
    print(f"{loaded.name}, {loaded.source}; inputs: {inputs}")
    record = record_activity(loaded.model, inputs.batches, args.max_values, model_name=loaded.name)
    print(format_audit(record))
    silent = silent_layers(record)
    if silent:
        print(f"note: these layers received only zeros: {', '.join(silent)}")
    out = _out_dir(args)
    if out:
        from spikingformer.analysis.plots import plot_block_inputs, plot_firing_rates

        record.to_json(out / "audit.json")
        plot_block_inputs(record, out / "block_inputs.png")
        plot_firing_rates(record, out / "firing_rates.png")
        print(f"wrote {out / 'audit.json'}, {out / 'block_inputs.png'}, {out / 'firing_rates.png'}")
    bad = non_spike_layers(record)
    if args.strict and bad:
        print(f"spikingformer audit: strict check failed, non-binary inputs in: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# energy


def run_energy(args: argparse.Namespace) -> int:
    if args.paper_log:
        return _paper_energy(args)
    from spikingformer.analysis.audit import record_activity
    from spikingformer.analysis.energy import energy_from_record

    loaded, inputs = _prepare(args)
    print(f"{loaded.name}, {loaded.source}; inputs: {inputs}")
    record = record_activity(loaded.model, inputs.batches, model_name=loaded.name)
    report = energy_from_record(record, args.integer_inputs)
    if args.measured:
        _attach_measured(report, loaded.model, inputs.batches)
    print(report.table())
    out = _out_dir(args)
    if out:
        from spikingformer.analysis.plots import plot_energy_breakdown

        report.to_json(out / "energy.json")
        plot_energy_breakdown(report, out / "energy_breakdown.png")
        print(f"wrote {out / 'energy.json'}, {out / 'energy_breakdown.png'}")
    if args.compare or args.compare_checkpoint:
        _compare(args, loaded, inputs, out)
    return 0


def _attach_measured(report, model: nn.Module, batches: InputBatches) -> None:
    import torch

    from spikingformer.deploy.accumulate import run_accumulate

    logits, counts = run_accumulate(model, batches)
    with torch.no_grad():
        diff = max(float((model(x) - y).abs().max()) for x, y in zip(batches, logits))
    report.attach_measured(counts)
    report.notes.append(
        f"measured: accumulate-only run on the same {counts.images} inputs; max |logit difference| to the dense "
        f"model {diff:.3g}; 'estimate' = weight FLOPs x rate (Eq. 18 without the bias term)"
    )


def _compare(args: argparse.Namespace, loaded: LoadedModel, inputs: Inputs, out: Path | None) -> None:
    from spikingformer.analysis.compare import compare_models, counterpart_name

    if args.compare_checkpoint:
        other = load_model(None, args.compare_checkpoint, args.seed, args.model_args,
                           name_if_needed=_counterpart_or_none(loaded.name))
    else:
        other = load_model(counterpart_name(loaded.name), None, args.seed, args.model_args)
    _calibrate_if_needed(other, inputs.batches, None)
    comparison = compare_models((loaded.model, other.model), inputs.batches, (loaded.name, other.name),
                                args.integer_inputs, sources=(loaded.source, other.source),
                                trained=(loaded.trained, other.trained), inputs=str(inputs))
    print()
    print(f"{other.name}, {other.source}; the same inputs")
    print(comparison.reports[1].table())
    print()
    print(comparison.table())
    if out:
        from spikingformer.checkpoints import write_json

        write_json(out / "comparison.json", comparison.to_dict())
        print(f"wrote {out / 'comparison.json'}")


def _counterpart_or_none(name: str) -> str | None:
    from spikingformer.analysis.compare import counterpart_name

    try:
        return counterpart_name(name)
    except ValueError:
        return None


def _paper_energy(args: argparse.Namespace) -> int:
    from spikingformer.analysis.energy import energy_from_rates
    from spikingformer.analysis.paper_rates import PAPER_LOGS, paper_rates
    from spikingformer.models import model_config

    log = PAPER_LOGS[args.paper_log]
    report = energy_from_rates(model_config(log.model_name), paper_rates(log), args.integer_inputs, args.ssa_heads,
                               model_name=log.model_name)
    print(report.table())
    print(f"authors' log ({log.ssa_heads} heads in the SSA term): MACs {log.mac_g} G, ACs {log.ac_g} G, "
          f"energy {log.energy_mj} mJ")
    out = _out_dir(args)
    if out:
        report.to_json(out / "energy.json")
    return 0


# ----------------------------------------------------------------------------------------------
# fuse


def run_fuse(args: argparse.Namespace) -> int:
    import torch

    from spikingformer import checkpoints
    from spikingformer.analysis.inputs import random_batches
    from spikingformer.deploy.fuse import fuse_model, is_fused
    from spikingformer.models import model_from_checkpoint

    output = Path(args.output) if args.output is not None else checkpoints.beside(args.checkpoint, "-fused.pt")
    if output.exists() and output.resolve() == Path(args.checkpoint).resolve():
        raise ValueError(f"--output {output} is the checkpoint being fused; writing there would drop the optimizer "
                         "state a resumed training needs. Choose another --output (default: <name>-fused.pt beside it)")
    ckpt = checkpoints.read(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.model).eval()
    if is_fused(model):
        raise ValueError(f"{args.checkpoint} is already fused (it has no BatchNorm left to fold); use it as it is")
    name = args.model or ckpt.model_name
    fused = fuse_model(model)
    checkpoints.save_fused(fused, output, name, ckpt.train_config)
    name = name or Path(args.checkpoint).stem
    x = random_batches(model.config, 1, 2)[0]
    with torch.no_grad():
        diff = float((model(x) - fused(x)).abs().max())
    print(f"fused {name}: every BatchNorm folded into its conv/linear layer; max |logit difference| on a random "
          f"batch {diff:.3g}; wrote {output}")
    return 0
