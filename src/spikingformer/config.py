"""Training configuration: one dataclass per concern, loaded from a YAML recipe, overridable per key.

A recipe (``configs/<name>.yaml``) has one section per dataclass below. Every field name is unique
across sections, so the command line overrides any of them with a flat flag
(``--epochs 3 --lr 1e-3 --model spikingformer_cifar10_4_384``); an unknown key, in a file or on the
command line, is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml


@dataclass
class ModelSection:
    model: str = "spikingformer_digits"  # a zoo name, see `spikingformer models`
    model_args: dict = field(default_factory=dict)  # overrides of ModelConfig fields, e.g. {time_steps: 8}
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under torchrun


@dataclass
class DataSection:
    dataset: str = "digits"  # digits, cifar10, cifar100, imagenet, cifar10_dvs, dvs128_gesture, nmnist, digits_dvs
    data_dir: str | None = None  # root of the data set on disk (not needed for digits / digits_dvs)
    batch_size: int = 64  # per process
    eval_batch_size: int = 128
    workers: int = 0  # DataLoader worker processes
    # static-image augmentation (timm create_transform; the authors' settings in the recipes)
    aa: str | None = None  # RandAugment string, e.g. rand-m9-n1-mstd0.4-inc1
    reprob: float = 0.0  # random erasing probability
    remode: str = "const"
    hflip: float = 0.5
    scale: list = field(default_factory=lambda: [1.0, 1.0])
    ratio: list = field(default_factory=lambda: [1.0, 1.0])
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    mean: list | None = None  # None: the data set's standard constants
    std: list | None = None
    # event data
    frames: int = 16  # T: number of frames events are integrated into
    split_by: str = "number"  # "number" (equal event counts, the authors') or "time"
    augment: bool = False  # digits: small affine jitter; event data: the authors' DVS augmentation (flip + one of shear/translate/rotate/cutout)
    cache_dir: str | None = None  # where integrated frames are cached (default: next to the data)


@dataclass
class OptimSection:
    opt: str = "adamw"  # any timm optimizer name
    lr: float = 5e-4
    weight_decay: float = 0.06
    opt_eps: float = 1e-8
    momentum: float = 0.9
    clip_grad: float | None = None  # max gradient norm; None: no clipping


@dataclass
class ScheduleSection:
    sched: str = "cosine"  # timm scheduler name, stepped once per epoch
    epochs: int = 30  # epochs of the schedule; cooldown epochs run after these
    warmup_epochs: int = 2
    cooldown_epochs: int = 0
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5


@dataclass
class MixupSection:
    mixup: float = 0.0  # mixup alpha; 0 disables
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0  # stop mixing from this epoch on (0: never)
    smoothing: float = 0.1  # label smoothing (inside the mixup targets when mixup is on)


@dataclass
class RunSection:
    seed: int = 42
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    amp: str = "auto"  # auto (bf16 on capable CPUs, fp16 on CUDA), off, bf16, fp16
    output: str = "runs"  # runs are written to <output>/<name>/
    name: str | None = None  # default: <config>-<model>
    resume: str | None = None  # a checkpoint path, or "auto" for <output>/<name>/last.pt
    eval_interval: int = 1  # evaluate every N epochs (and after the last)
    log_interval: int = 10  # progress-bar refresh, in steps
    deterministic: bool = True  # deterministic algorithms (CPU); cudnn.benchmark when False
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    compile: bool = False  # torch.compile the training forward: minutes to compile, faster steps (docs/performance.md)


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
            raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
        cfg = cls(config_name=name)
        for section, content in values.items():
            for key, value in (content or {}).items():
                cfg.set(key, value, section=section)
        return cfg

    def set(self, key: str, value: Any, section: str | None = None) -> None:
        """Set a field by its flat name (the section is found from the name), converting the type."""
        owner = section or FIELD_SECTION.get(key)
        valid = FIELDS_BY_SECTION.get(owner, [])
        if owner is None or key not in valid:
            where = f"in section '{section}' " if section else ""
            options = valid if section in FIELDS_BY_SECTION else sorted(FIELD_SECTION)
            raise ConfigError(f"unknown config key '{key}' {where}; valid keys: {', '.join(options)}")
        target = getattr(self, owner)
        setattr(target, key, _convert(value, _field_types(type(target))[key], key))


class ConfigError(ValueError):
    """A recipe or command-line option that does not exist or has the wrong type."""


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


FIELDS_BY_SECTION = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
FIELD_SECTION = {key: name for name, keys in FIELDS_BY_SECTION.items() for key in keys}
assert len(FIELD_SECTION) == sum(map(len, FIELDS_BY_SECTION.values())), "config field names must be unique"


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type (strings are parsed as YAML)."""
    allowed = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    if isinstance(value, str) and str not in allowed:
        value = yaml.safe_load(value)
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
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is str:
            return str(value)
        if isinstance(value, base):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key '{key}' expects {names}, got {value!r}")


def recipe_names() -> list[str]:
    """Names of the bundled recipes (``configs/*.yaml``)."""
    folder = resources.files("spikingformer") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A recipe by name (``digits``) or YAML path, with flat ``overrides`` applied on top."""
    name_or_path = name_or_path or "digits"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text, name = path.read_text(), path.stem
    else:
        if name_or_path not in recipe_names():
            raise ConfigError(f"unknown recipe '{name_or_path}'; bundled recipes: {', '.join(recipe_names())} (or pass a .yaml path)")
        text = (resources.files("spikingformer") / "configs" / f"{name_or_path}.yaml").read_text()
        name = name_or_path
    values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config {name_or_path} must be a mapping of sections")
    cfg = TrainConfig.from_dict({**values, "config_name": name})
    for key, value in (overrides or {}).items():
        cfg.set(key, value)
    return cfg
