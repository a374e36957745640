"""Sub-commands ``train``, ``eval``, ``models`` and ``export`` of the ``spikingformer`` command."""

from __future__ import annotations

import argparse
import dataclasses

from spikingformer.cli import at_least, first_process, yaml_mapping
from spikingformer.config import SECTIONS, load_config, recipe_names
from spikingformer.suggest import did_you_mean

# `train --help` groups (key: title), in the order timm's train script shows them. A field goes to
# the group named by its metadata (the data section's augmentation options), else to its section's
# own group; the mixup section joins augmentation.
GROUPS = {
    "model": "model",
    "data": "data",
    "augmentation": "augmentation and regularization",
    "optim": "optimizer",
    "schedule": "learning-rate schedule",
    "run": "run",
}
SECTION_GROUP = {"mixup": "augmentation"}


def _shown(value) -> str:
    """A recipe value as it would be written on the command line or in YAML."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _config_options() -> list[tuple[str, str, dataclasses.Field]]:
    """``(group, section, field)`` of every recipe key, in ``train --help`` order."""
    rows = [(f.metadata.get("group") or SECTION_GROUP.get(section, section), section, f)
            for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    return sorted(rows, key=lambda row: list(GROUPS).index(row[0]))


def _add_recipe_options(parser, args: list[str]) -> None:
    """One flag per recipe key, its help ending with the value of the recipe ``--config`` names."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="digits")
    recipe = pre.parse_known_args(args)[0].config
    try:
        cfg = load_config(recipe, check_names=False)
    except (ValueError, OSError):  # a bad recipe: run_train reports it in one line; help shows no values
        cfg = None
    groups = {}
    for group, section, f in _config_options():
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{GROUPS[group]} options")
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if cfg is not None:
            text += f" [{cfg.config_name} recipe: {_shown(getattr(getattr(cfg, section), f.name))}]"
        kind = dict(nargs="?", const="true", metavar="BOOL") if f.type in ("bool", bool) else dict(metavar=f.name.upper())
        groups[group].add_argument(flag, dest=f.name, default=None, help=text, **kind)
        for alias in f.metadata["aliases"]:  # a former name, still read; not shown
            groups[group].add_argument("--" + alias.replace("_", "-"), dest=f.name, default=None, help=argparse.SUPPRESS, **kind)
        for synonym in f.metadata["synonyms"]:
            parser.synonyms["--" + synonym.replace("_", "-")] = flag


def _overrides(args: argparse.Namespace) -> dict:
    keys = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def run_train(args: argparse.Namespace) -> int:
    from spikingformer.engine.trainer import train

    cfg = load_config(args.config, _overrides(args))
    result = train(cfg)
    if not result["is_main"]:
        return 0
    best, last = result["best"], result["metrics"]
    print(f"\nfinal test top-1 {last.get('test_top1', float('nan')):.2f}%  top-5 {last.get('test_top5', float('nan')):.2f}%  "
          f"(best top-1 {best['top1']:.2f}% at epoch {best['epoch'] + 1})")
    _print_energy(result["checkpoint"], cfg)
    print(f"checkpoint: {result['checkpoint']}  (last epoch: {result['last']}; metrics: {result['folder']}/metrics.jsonl)")
    return 0


def _print_energy(checkpoint: str, cfg) -> None:
    """Theoretical energy per image of the best model on a few test batches (paper Eq. 19-20)."""
    from spikingformer.analysis.energy import energy_report_for_checkpoint

    report = energy_report_for_checkpoint(checkpoint, cfg.data, batches=2)
    print(f"theoretical energy per image: {report.energy_mj:.3g} mJ  ({report.mac_g * 1e3:.3g} M MACs, "
          f"{report.ac_g * 1e3:.3g} M ACs; Eq. 19-20 with firing rates measured on {report.images} test images)")


def run_eval(args: argparse.Namespace) -> int:
    from spikingformer.engine.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint, model_name=args.model, dataset=args.data, data_dir=args.data_dir, batch_size=args.batch_size,
        device=args.device, amp=args.amp, time_steps=args.time_steps, tf32=args.tf32, model_args=args.model_args,
        workers=args.workers,
    )
    if first_process():  # under torchrun every process holds the summed result
        rate = result["firing_rate"]  # NaN for an ONNX file: its graph's spikes are not seen
        print(f"{result['model']} on {result['dataset']} ({result['samples']} images): top-1 {result['top1']:.2f}%  "
              f"top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
              + ("(ONNX Runtime)" if rate != rate else f"firing rate {rate:.4f}"))
        if args.output:
            from spikingformer.checkpoints import write_json

            rate = result["firing_rate"]
            write_json(args.output, {**result, "firing_rate": None if rate != rate else rate, "checkpoint": str(args.checkpoint)})
            print(f"wrote {args.output}")
    return 0


def run_models(args: argparse.Namespace) -> int:
    import torch

    from spikingformer.models import ZOO, create_model, list_models

    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no zoo model matches {args.pattern!r}{did_you_mean(args.pattern, ZOO)} "
                         "(`spikingformer models` lists them all)")
    print(f"{'model':34s} {'params':>12s}  {'T':>3s}  {'input':>11s}  classes")
    for name in names:
        cfg = ZOO[name]
        with torch.device("meta"):  # shapes only: counted without allocating or initialising the weights
            n = sum(p.numel() for p in create_model(name).parameters())
        size = f"{cfg['in_channels']}x{cfg['img_size']}x{cfg['img_size']}"
        print(f"{name:34s} {n:>12,d}  {cfg['time_steps']:>3d}  {size:>11s}  {cfg['num_classes']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model with a recipe (default: Spikingformer on the embedded digits, on the CPU)",
        description="Train with a recipe; every recipe key can be overridden by the flag of the same name. Each option "
        "shows its value in the recipe --config names (`train --config cifar10 --help` shows cifar10's). "
        "Under torchrun: torchrun --nproc_per_node=N -m spikingformer train ...",
        usage="%(prog)s [-h] [--config RECIPE] [--KEY VALUE ...]",
        populate=_add_recipe_options,
    )
    p.add_argument("--config", default="digits", metavar="RECIPE",
                   help=f"a bundled recipe ({', '.join(recipe_names())}) or the path of a YAML file (default: digits)")
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint (this project's or the authors') and print top-1/top-5")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="path to a checkpoint (.pt/.pth/.pth.tar/.safetensors), or an .onnx file of spikingformer export "
                        "(run on ONNX Runtime)")
    e.add_argument("--model", default=None, metavar="NAME", help="zoo model name; required for the authors' checkpoints")
    e.add_argument("--model-args", metavar="YAML", type=yaml_mapping, default=None,
                   help="overrides of the model's ModelConfig fields, e.g. '{embed_dim: 64, depth: 2}' for an "
                        "authors' checkpoint of a size outside the zoo")
    e.add_argument("--dataset", dest="data", default=None, metavar="NAME",
                   help="data set name (default: the one the checkpoint was trained on)")
    e.add_argument("--data", dest="data", help=argparse.SUPPRESS)  # the former name
    e.add_argument("--data-dir", default=None, metavar="DIR", help="data set folder (default: the training run's)")
    e.add_argument("--batch-size", type=at_least(1), default=64, metavar="B", help="images per batch (default: 64)")
    e.add_argument("--workers", type=at_least(0), default=None, metavar="N",
                   help="DataLoader worker processes (default: the training run's, else 0)")
    e.add_argument("--time-steps", type=at_least(1), default=None, metavar="T",
                   help="evaluate at T time steps: static images repeated T times, events integrated into T frames "
                        "(default: the training run's)")
    e.add_argument("--frames", type=at_least(1), dest="time_steps", help=argparse.SUPPRESS)  # the former name
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (an Apple GPU; default: auto)")
    e.add_argument("--amp", default="off", help="mixed precision: off, auto, bf16 or fp16 (default: off)")
    e.add_argument("--output", default=None, metavar="FILE",
                   help="also write the results as JSON into this file (top-1, top-5, loss, firing rate, images, "
                        "time steps, model, data set, checkpoint)")
    e.add_argument("--tf32", action="store_true",
                   help="on NVIDIA GPUs: float32 products and convolutions on TF32 tensor cores (default: full float32)")
    e.set_defaults(func=run_eval)

    m = sub.add_parser("models", help="list the model zoo with parameter counts")
    m.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'spikingformer_*' (default: all)")
    m.set_defaults(func=run_models)

    add_export(sub)


def add_export(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser(
        "export", help="write a checkpoint's weights as .safetensors (with the model description) or the model as .onnx",
        description="Export weights to safetensors (create_model(name, checkpoint_path=...) and timm.create_model read "
        "them back, and eval/energy/fuse take the file like any checkpoint), or the whole model as an ONNX graph for "
        "inference runtimes (--output NAME.onnx; needs pip install 'spikingformer[onnx]'). The format follows "
        "--output's suffix.",
    )
    x.add_argument("--checkpoint", required=True, help="this project's checkpoint (plain or fused) or the authors' (with --model)")
    x.add_argument("--output", default=None,
                   help="the .safetensors or .onnx file to write (default: <name>.safetensors beside --checkpoint)")
    x.add_argument("--model", default=None, help="zoo model name; required for the authors' checkpoints")
    x.add_argument("--model-args", metavar="YAML", type=yaml_mapping, default=None,
                   help="overrides of the model's ModelConfig fields, e.g. '{embed_dim: 64, depth: 2}' for an "
                        "authors' checkpoint of a size outside the zoo")
    x.add_argument("--time-steps", type=at_least(1), default=None, metavar="T",
                   help=".onnx only: the number of time steps the graph unrolls (default: the model's)")
    x.set_defaults(func=run_export)


EXPORT_SUFFIXES = (".safetensors", ".onnx")


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spikingformer import checkpoints
    from spikingformer.engine.evaluation import model_overrides
    from spikingformer.models import model_from_checkpoint

    output = Path(args.output) if args.output is not None else checkpoints.beside(args.checkpoint, ".safetensors")
    if output.suffix not in EXPORT_SUFFIXES:
        raise ValueError(f"--output {output} must end in .safetensors (weights) or .onnx (the model's graph): the "
                         "format is chosen by the name")
    if output.suffix == ".onnx":
        from spikingformer.deploy.onnx_export import require_packages

        require_packages()  # before the checkpoint is read
    elif args.time_steps is not None:
        raise ValueError("--time-steps sets the T an .onnx graph unrolls; the weights do not depend on it (evaluate "
                         "at another T with eval --time-steps)")
    ckpt = checkpoints.read(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.model, **model_overrides(args.model_args, args.time_steps))
    if output.suffix == ".onnx":
        from spikingformer.deploy.onnx_export import export_onnx

        check = export_onnx(model, output, model_name=args.model or ckpt.model_name, train_config=ckpt.train_config)
        print(f"wrote {output} (the model's inference graph, batch size free, T = {model.config.time_steps} unrolled)")
        print(check if check is not None else "onnxruntime is not installed: the file was not run")
        return 0
    path = checkpoints.export_safetensors(model, output, args.model or ckpt.model_name, ckpt.train_config)
    print(f"wrote {path} (weights and model description; load with spikingformer.create_model(name, checkpoint_path=...))")
    return 0
