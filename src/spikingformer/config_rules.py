"""Validation of a training configuration: every field's type (from :mod:`spikingformer.config`'s
dataclasses) and range (:data:`RULES`, one entry per field), and the names that refer to the zoo,
the data sets and timm, checked before any data is read or any folder is created."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, get_type_hints

from spikingformer.config import FIELD_SECTION, SECTIONS, ConfigError, TrainConfig, convert_value, field_types


def _at_least(low: float) -> tuple[Any, str]:
    return (lambda v: v >= low), f">= {low}"


def _between(low: float, high: float, high_open: bool = False) -> tuple[Any, str]:
    if high_open:
        return (lambda v: low <= v < high), f"in [{low}, {high})"
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


_POSITIVE = ((lambda v: v > 0), "> 0")
_PAIR = ((lambda v: len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)
          and v[0] <= v[1]), "two positive numbers [low, high] with low <= high")
_NUMBERS = ((lambda v: v is None or (len(v) > 0 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))),
            "a list of numbers")

# Range (or allowed values) of every field; None: any value of the field's type is valid.
RULES: dict[str, Any] = {
    # model (model and model_args are checked against the zoo and ModelConfig)
    "model": None, "model_args": None, "sync_bn": None, "initial_checkpoint": None,
    # data
    "dataset": None, "data_dir": None, "batch_size": _at_least(1), "eval_batch_size": _at_least(1),
    "workers": _at_least(0), "aa": None, "reprob": _between(0, 1), "remode": ("const", "rand", "pixel"),
    "hflip": _between(0, 1), "scale": _PAIR, "ratio": _PAIR,
    "interpolation": ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos", "random"),
    "crop_pct": ((lambda v: 0 < v <= 1), "in (0, 1]"), "mean": _NUMBERS,
    "std": ((lambda v: v is None or (len(v) > 0 and all(isinstance(x, (int, float)) and x > 0 for x in v))),
            "a list of positive numbers"),
    "time_steps": _at_least(1), "split_by": ("number", "time"), "augment": None, "cache_dir": None,
    # optim
    "opt": None, "lr": _POSITIVE, "weight_decay": _at_least(0), "opt_eps": _POSITIVE, "momentum": _between(0, 1),
    "clip_grad": _POSITIVE,
    # schedule
    # (not timm's "plateau": timm deprecates it and does not checkpoint its state, so a resumed run would restart it)
    "sched": ("cosine", "tanh", "step", "multistep", "poly", "constant", "wsd", "rsqrt"),
    "epochs": _at_least(1), "warmup_epochs": _at_least(0), "cooldown_epochs": _at_least(0),
    "warmup_lr": _at_least(0), "min_lr": _at_least(0), "decay_epochs": _POSITIVE,
    "decay_milestones": ((lambda v: len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
                          and list(v) == sorted(set(v))), "a rising list of positive whole epochs"),
    "decay_rate": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    # mixup
    "mixup": _at_least(0), "cutmix": _at_least(0), "mixup_prob": _between(0, 1), "mixup_switch_prob": _between(0, 1),
    "mixup_mode": ("batch", "pair", "elem"), "mixup_off_epoch": _at_least(0), "smoothing": _between(0, 1, high_open=True),
    # run
    "seed": _between(0, 2**63 - 1), "device": None, "amp": ("auto", "off", "bf16", "fp16"), "tf32": None, "output": None, "name": None,
    "resume": None, "overwrite": None, "compile": None, "eval_interval": _at_least(1), "log_interval": _at_least(1),
    "deterministic": None, "tensorboard": None,
}
assert set(RULES) == set(FIELD_SECTION), "every config field needs a rule (None: its type is enough)"

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def validate(cfg: TrainConfig, training: bool = False, names: bool = True) -> TrainConfig:
    """Check every field's type and range, and the names that refer to the zoo, data sets and timm
    (``training``: also that a data set read from disk has its ``data_dir``).

    Raises :class:`ConfigError` (one line naming the key, the value and what is valid) on the first
    problem. ``model_args`` values are converted to :class:`~spikingformer.models.ModelConfig`'s types.
    """
    for section in SECTIONS:
        target = getattr(cfg, section)
        for key, annotation in field_types(type(target)).items():
            value = convert_value(getattr(target, key), annotation, key)  # the type, also for fields set directly
            setattr(target, key, value)
            rule = RULES[key]
            if value is None or rule is None:
                continue
            if isinstance(rule, tuple) and isinstance(rule[0], str):
                if value not in rule:
                    raise ConfigError(f"config key '{key}' must be one of {', '.join(rule)}; got {value!r}")
                continue
            check, text = rule
            finite = not isinstance(value, float) or math.isfinite(value)
            if not finite or not check(value):
                raise ConfigError(f"config key '{key}' must be {text}; got {value!r}")
    if names:
        _validate_names(cfg, training)
    return cfg


def _validate_names(cfg: TrainConfig, training: bool) -> None:
    from spikingformer.data import check_dataset_name, model_mismatch, needs_data_dir
    from spikingformer.models import ModelConfig, model_config

    try:
        check_dataset_name(cfg.data.dataset)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if training and needs_data_dir(cfg.data.dataset) and not cfg.data.data_dir:
        raise ConfigError(f"dataset '{cfg.data.dataset}' is read from disk: pass its folder with --data-dir (layouts in docs/data.md)")
    if not _DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"config key 'device' must be auto, cpu, mps, cuda or cuda:N; got {cfg.run.device!r}")
    if cfg.schedule.sched == "rsqrt" and cfg.schedule.warmup_epochs == 0:
        raise ConfigError("--sched rsqrt decays as 1 / sqrt(epoch / --warmup-epochs) after its warm-up: it needs "
                          "--warmup-epochs 1 or more")
    start = cfg.model.initial_checkpoint
    if training and start and not Path(start).is_file():
        raise ConfigError(f"--initial-checkpoint {start}: " + ("a folder; pass the checkpoint file in it (e.g. best.pt)"
                                                               if Path(start).is_dir() else "no such file"))
    if training and (cfg.mixup.mixup > 0 or cfg.mixup.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"--batch-size {cfg.data.batch_size} is odd, and mixup and CutMix pair a batch's images: "
                          "pass an even --batch-size, or --mixup 0 --cutmix 0")
    if cfg.run.overwrite and cfg.run.resume is not None:
        raise ConfigError("--overwrite starts the run afresh and --resume continues one; pass only one of them")
    hints = get_type_hints(ModelConfig)
    args = {}
    for key, value in cfg.model.model_args.items():
        if key not in hints:
            raise ConfigError(f"unknown model_args key '{key}'; valid keys: {', '.join(hints)}")
        args[key] = convert_value(value, hints[key], f"model_args.{key}")
    cfg.model.model_args = args
    try:
        mcfg = model_config(cfg.model.model, **args)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for key in ("img_size", "in_channels", "num_classes", "embed_dim", "depth", "num_heads"):
        if getattr(mcfg, key) < 1:
            raise ConfigError(f"model_args key '{key}' must be >= 1; got {getattr(mcfg, key)}")
    steps = cfg.data.time_steps  # one number of time steps for the model and the data
    if steps is not None and args.get("time_steps", steps) != steps:
        raise ConfigError(f"time_steps is {steps} but model_args sets time_steps {args['time_steps']}; set the number of "
                          "time steps once, with --time-steps")
    if steps is not None and steps != mcfg.time_steps:
        cfg.model.model_args = args = {**args, "time_steps": steps}
        mcfg = model_config(cfg.model.model, **args)
    cfg.data.time_steps = mcfg.time_steps
    if mcfg.embed_dim % mcfg.num_heads:
        raise ConfigError(f"model_args: embed_dim {mcfg.embed_dim} is not divisible by num_heads {mcfg.num_heads}")
    if training and (mismatch := model_mismatch(cfg.data.dataset, cfg.model.model, mcfg.in_channels, mcfg.img_size)):
        raise ConfigError(mismatch)
    from timm.optim import list_optimizers

    opt = cfg.optim.opt.lower().removeprefix("lookahead_")
    if opt not in list_optimizers():
        raise ConfigError(f"unknown optimizer '{cfg.optim.opt}'; valid: timm's names, e.g. adamw, sgd, lamb")
