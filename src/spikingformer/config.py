"""Training configuration: one dataclass per concern, loaded from a YAML recipe, overridable per key.

A recipe (``configs/<name>.yaml``) has one section per dataclass below. Every field name is unique
across sections, so the command line overrides any of them with a flat flag
(``--epochs 3 --lr 1e-3 --model spikingformer_cifar10_4_384``); an unknown key, in a file or on the
command line, is an error that lists the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from spikingformer.suggest import did_you_mean, unknown_name


def option(default: Any, help: str, group: str | None = None, synonyms: tuple[str, ...] = (),
           aliases: tuple[str, ...] = ()) -> Any:
    """A config field with its command-line description.

    ``group``: the ``train --help`` group when it is not the section's own; ``synonyms``: names other
    tools give this option (``learning_rate``), suggested when such an unknown flag is given;
    ``aliases``: former names of this option, still read in recipes, on the command line and in the
    configuration a checkpoint records. Lists and dicts are copied for every instance.
    """
    metadata = {"help": help, "group": group, "synonyms": synonyms, "aliases": aliases}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


AUG = "augmentation"  # data options shown with mixup and label smoothing in `train --help`


@dataclass
class ModelSection:
    model: str = option("spikingformer_digits", "zoo model name (`spikingformer models` lists them)", synonyms=("arch",))
    model_args: dict = option({}, "overrides of the model's fields as a YAML mapping, e.g. \"{time_steps: 8, head: sn_fc_avgpool}\"")
    sync_bn: bool = option(False, "convert BatchNorm to SyncBatchNorm under torchrun")
    initial_checkpoint: str | None = option(None, "start from these weights (a checkpoint or .safetensors export of this "
                                            "project, or the authors'): fine-tuning; a head with another number of "
                                            "classes starts afresh; not read when resuming",
                                            synonyms=("pretrained_path", "finetune", "init_checkpoint"))


@dataclass
class DataSection:
    dataset: str = option("digits", "digits, cifar10, cifar100, imagenet, cifar10_dvs, dvs128_gesture, nmnist or digits_dvs")
    data_dir: str | None = option(None, "root of the data set on disk (not needed for digits and digits_dvs)", synonyms=("data_path", "root"))
    batch_size: int = option(64, "training images per batch, per process", synonyms=("batch", "bs"))
    eval_batch_size: int = option(128, "images per batch when evaluating", synonyms=("validation_batch_size", "test_batch_size"))
    workers: int = option(0, "DataLoader worker processes (0: load in the training process)", synonyms=("num_workers",))
    time_steps: int | None = option(None, "the number of time steps T: static images are repeated T times, events are integrated into T frames (unset: the model's time_steps)",
                                    synonyms=("num_frames", "frames_number", "timesteps"), aliases=("frames",))
    # static-image augmentation (timm create_transform; the authors' settings in the recipes)
    aa: str | None = option(None, "RandAugment / AutoAugment policy string, e.g. rand-m9-n1-mstd0.4-inc1 (static images)", AUG, ("auto_augment",))
    reprob: float = option(0.0, "random erasing probability (static images)", AUG, ("re_prob",))
    remode: str = option("const", "random erasing fill: const (zeros), rand (per-channel noise) or pixel (per-pixel noise)", AUG, ("re_mode",))
    hflip: float = option(0.5, "horizontal flip probability (static images)", AUG)
    scale: list = option([1.0, 1.0], "random-resized-crop area range [min, max] as fractions of the image (static images)", AUG)
    ratio: list = option([1.0, 1.0], "random-resized-crop aspect ratio range [min, max] (static images)", AUG)
    interpolation: str = option("bicubic", "resize interpolation: bicubic, bilinear, nearest or random (static images)")
    crop_pct: float = option(1.0, "centre-crop fraction at evaluation (static images; 1.0 keeps the whole image)")
    mean: list | None = option(None, "per-channel normalisation mean (unset: the data set's standard constants)")
    std: list | None = option(None, "per-channel normalisation standard deviation (unset: the data set's standard constants)")
    # event data
    split_by: str = option("number", "how events are split into frames: number (equal event counts, the authors') or time")
    augment: bool = option(False, "digits: small affine jitter; event data: the authors' DVS augmentation (flip + one of shear, translate, rotate, cutout)", AUG)
    cache_dir: str | None = option(None, "where integrated event frames are cached (unset: next to the data)")


@dataclass
class OptimSection:
    opt: str = option("adamw", "optimizer: any timm optimizer name (adamw, sgd, lamb, ...)", synonyms=("optimizer",))
    lr: float = option(5e-4, "peak learning rate, reached at the end of the warm-up", synonyms=("learning_rate", "base_lr"))
    weight_decay: float = option(0.06, "weight decay", synonyms=("wd",))
    opt_eps: float = option(1e-8, "optimizer epsilon (Adam-type optimizers)", synonyms=("eps",))
    momentum: float = option(0.9, "momentum (SGD-type optimizers)")
    clip_grad: float | None = option(None, "clip the gradient norm to this value (unset: no clipping)", synonyms=("grad_clip", "max_grad_norm"))


@dataclass
class ScheduleSection:
    sched: str = option("cosine", "learning-rate schedule: a timm scheduler name (cosine, step, multistep, wsd, ...), stepped once per epoch", synonyms=("scheduler", "lr_scheduler"))
    epochs: int = option(30, "epochs of the schedule; the cooldown epochs run after these", synonyms=("num_epochs", "n_epochs", "max_epochs"))
    warmup_epochs: int = option(2, "epochs of linear warm-up from --warmup-lr to --lr", synonyms=("warmup",))
    cooldown_epochs: int = option(0, "epochs at --min-lr after the schedule ends")
    warmup_lr: float = option(1e-5, "learning rate at the start of the warm-up")
    min_lr: float = option(1e-5, "lowest learning rate of the schedule", synonyms=("lr_min", "final_lr"))
    decay_epochs: float | None = option(None, "step: epochs between decays by --decay-rate; wsd, rsqrt: epochs of the final "
                                        "decay (below 1: a fraction of the schedule) (unset: timm's 90 for step, 0.2 for wsd and rsqrt)")
    decay_milestones: list = option([90, 180, 270], "multistep: the epochs (counted from 1, as the epoch lines) from which the rate is multiplied by --decay-rate once more")
    decay_rate: float = option(0.1, "step, multistep: the factor of each decay", synonyms=("gamma", "lr_decay"))


@dataclass
class MixupSection:
    mixup: float = option(0.0, "mixup alpha (0 disables mixup)", synonyms=("mixup_alpha",))
    cutmix: float = option(0.0, "CutMix alpha (0 disables CutMix)", synonyms=("cutmix_alpha",))
    mixup_prob: float = option(1.0, "probability of applying mixup or CutMix to a batch")
    mixup_switch_prob: float = option(0.5, "probability of CutMix instead of mixup when both are enabled")
    mixup_mode: str = option("batch", "how mixup parameters are drawn: batch, pair or elem")
    mixup_off_epoch: int = option(0, "stop mixing after this many epochs, as timm (0: never stop)")
    smoothing: float = option(0.1, "label smoothing (inside the mixup targets when mixup is on)", synonyms=("label_smoothing",))


@dataclass
class RunSection:
    seed: int = option(42, "random seed (weights, data order, augmentation)")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps (an Apple GPU)")
    amp: str = option("auto", "mixed precision: auto (bf16 on capable CPUs, fp16 on CUDA), off, bf16 or fp16", synonyms=("precision",))
    tf32: bool = option(False, "on NVIDIA GPUs (Ampere and newer): float32 products and convolutions on TF32 tensor "
                               "cores, as the authors' Conv1d layers ran under PyTorch's defaults; off: full float32")
    output: str = option("runs", "runs are written to <output>/<name>/", synonyms=("output_dir", "out", "outdir"))
    name: str | None = option(None, "run folder name (unset: <recipe>-<model>)", synonyms=("experiment", "run_name"))
    resume: str | None = option(None, "a last.pt checkpoint to resume from, or auto for <output>/<name>/last.pt")
    overwrite: bool = option(False, "replace the run already in <output>/<name>/ (without it, training there is refused)")
    eval_interval: int = option(1, "evaluate every N epochs (and after the last)")
    log_interval: int = option(10, "update the progress bar's loss, accuracy and firing rate every N steps",
                               synonyms=("print_freq",))
    deterministic: bool = option(True, "deterministic algorithms (CPU); cudnn.benchmark when false")
    tensorboard: bool = option(True, "also log to <output>/<name>/tensorboard/ (needs the tensorboard package)")
    compile: bool = option(False, "torch.compile the training forward (the project's kernels stay in the graph); on the "
                                "CPU about as fast as eager after 15-25 s of compiling (docs/performance.md)")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "mixup": MixupSection,
    "run": RunSection,
}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    mixup: MixupSection = field(default_factory=MixupSection)
    run: RunSection = field(default_factory=RunSection)
    config_name: str = "digits"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        name = values.pop("config_name", "custom")
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section '{unknown[0]}'{_placed(unknown[0], None, SECTIONS)} valid sections: "
                              f"{', '.join(SECTIONS)}")
        cfg = cls(config_name=name)
        for section, content in values.items():
            if content is not None and not isinstance(content, dict):
                raise ConfigError(f"config section '{section}' must be a mapping of key: value lines, "
                                  f"got a {type(content).__name__}")
            twice = [key for key in (content or {}) if key in ALIASES and ALIASES[key] in content]
            if twice:
                raise ConfigError(f"config section '{section}' sets '{ALIASES[twice[0]]}' twice, also under its former "
                                  f"name '{twice[0]}'; keep '{ALIASES[twice[0]]}' only")
            for key, value in (content or {}).items():
                cfg.set(key, value, section=section)
        return cfg

    def set(self, key: str, value: Any, section: str | None = None) -> None:
        """Set a field by its flat name or a former name (the section is found from the name), converting the type."""
        key = ALIASES.get(key, key)
        owner = section or FIELD_SECTION.get(key)
        valid = FIELDS_BY_SECTION.get(owner, [])
        if owner is None or key not in valid:
            where = f" in section '{section}'" if section else ""
            options = valid if section in FIELDS_BY_SECTION else sorted(FIELD_SECTION)
            raise ConfigError(f"unknown config key '{key}'{where}{_placed(key, section, options)} valid keys: {', '.join(options)}")
        target = getattr(self, owner)
        setattr(target, key, convert_value(value, field_types(type(target))[key], key))


class ConfigError(ValueError):
    """A recipe or command-line option that does not exist or has the wrong type."""

    # every process torchrun starts reads the same options: said once (see distributed.alike_everywhere)
    alike_everywhere = True


def field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


FIELDS_BY_SECTION = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
FIELD_SECTION = {key: name for name, keys in FIELDS_BY_SECTION.items() for key in keys}
assert len(FIELD_SECTION) == sum(map(len, FIELDS_BY_SECTION.values())), "config field names must be unique"
ALIASES = {alias: f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls) for alias in f.metadata["aliases"]}
assert not set(ALIASES) & set(FIELD_SECTION), "a former name may not be a field's name"


def current_names(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded config section (a checkpoint's ``train_config``) with former key names renamed to today's."""
    return {ALIASES.get(key, key): value for key, value in values.items()}


def _placed(name: str, section: str | None, choices: Iterable[str]) -> str:
    """``"; 'lr' is a key of section 'optim';"`` where ``name`` is a key of another section (a recipe
    nests each key under its section), else the closest of ``choices`` (``"; did you mean 'epochs'?"``),
    else ``";"``."""
    owner = FIELD_SECTION.get(ALIASES.get(name, name))
    if owner is not None and owner != section:
        return f"; '{name}' is a key of section '{owner}' (in a recipe: indented under '{owner}:');"
    return did_you_mean(name, choices) or ";"


def convert_value(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type (strings are parsed as YAML)."""
    allowed = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if isinstance(value, str) and str not in allowed:
        value = parse_yaml(value, f"the value of '{key}'")
        if isinstance(value, str) and float in allowed:  # YAML reads "3e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key '{key}' may not be null")
    for typ in allowed:
        if typ is type(None):
            continue
        base = get_origin(typ) or typ
        if isinstance(value, bool) and base is not bool:
            continue  # YAML's true/false are not numbers
        if base is float and isinstance(value, (int, float)):
            return float(value)
        if base is str and isinstance(value, (str, int, float)):
            return str(value)
        if isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key '{key}' expects {names}, got {value!r}")


def recipe_names() -> list[str]:
    """Names of the bundled recipes (``configs/*.yaml``)."""
    folder = resources.files("spikingformer") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None, *,
                check_names: bool = True) -> TrainConfig:
    """A recipe by name (``digits``) or YAML path, with flat ``overrides`` applied on top.

    ``check_names=False`` checks types and ranges only, without importing the model and data
    modules (and so PyTorch): the command line uses it to show a recipe's values in ``--help``.
    """
    name_or_path = name_or_path or "digits"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text, name = path.read_text(), path.stem
    else:
        if name_or_path not in recipe_names():
            raise ConfigError(unknown_name("recipe", name_or_path, recipe_names(), "bundled recipes") + " (or pass a .yaml path)")
        text = (resources.files("spikingformer") / "configs" / f"{name_or_path}.yaml").read_text()
        name = name_or_path
    values = parse_yaml(text, f"config {name_or_path}") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config {name_or_path} must be a mapping of sections")
    cfg = TrainConfig.from_dict({**values, "config_name": name})
    for key, value in (overrides or {}).items():
        cfg.set(key, value)
    _ignore_frames_of_static_data(cfg, [values.get("data") or {}, overrides or {}])
    from spikingformer.config_rules import validate

    validate(cfg, names=check_names)
    return cfg


def _ignore_frames_of_static_data(cfg: TrainConfig, given: list[dict]) -> None:
    """The former ``frames`` counted the frames of event data only: run folders of static-image runs
    recorded it without effect, so with a static data set it is ignored unless ``time_steps`` is given too."""
    from spikingformer.data import is_event_dataset

    names = {key for keys in given for key in keys}
    if "frames" in names and "time_steps" not in names and not is_event_dataset(cfg.data.dataset):
        cfg.data.time_steps = None


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` whose errors (syntax, ``!!python/...`` tags) are one :class:`ConfigError` line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = "; only plain YAML is read (no !!python tags)" if "tag" in problem else ""
        raise ConfigError(f"cannot parse {what}: {problem}{where}{hint}") from None



def __getattr__(name: str) -> Any:
    """``validate`` and ``RULES`` where they lived before :mod:`spikingformer.config_rules` (which reads
    this module's sections, so it is imported when first asked for)."""
    if name in ("validate", "RULES"):
        from spikingformer import config_rules

        return getattr(config_rules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
