"""Data sets by name, as the recipes and the command line use them.

Static images come out as ``(C, H, W)`` tensors, event data as ``(T, 2, H, W)`` frames (batched
by the DataLoader to ``(B, C, H, W)`` and ``(B, T, 2, H, W)``, the models' input convention).
Every data set carries ``num_classes`` and ``classes``. Load them with :func:`collate` (it leaves
out images a folder data set could not decode) and check each batch with :func:`check_batch`.
The names, :func:`check_dataset_name`, :func:`needs_data_dir` and :func:`is_event_dataset` import
no PyTorch (the configuration checks use them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spikingformer.suggest import unknown_name

if TYPE_CHECKING:
    import torch
    from torch.utils.data import DataLoader, Dataset

STATIC = ("digits", "cifar10", "cifar100", "imagenet")
EVENT = ("digits_dvs", "nmnist", "cifar10_dvs", "dvs128_gesture")
DATASETS = STATIC + EVENT
NEEDS_DIR = ("cifar10", "cifar100", "imagenet", "nmnist", "cifar10_dvs", "dvs128_gesture")
TONIC_PREFIX = "tonic:"  # tonic:<Name> is tonic.datasets.<Name> (data/tonic_source.py)


_IMAGE_TRANSFORM = ("aa", "reprob", "remode", "hflip", "scale", "ratio", "interpolation", "crop_pct", "mean", "std")
_EVENT_FILES = ("augment", "split_by", "cache_dir")
READS = {  # the data settings each data set reads, beyond its name, folder, batch sizes, workers and time steps
    "digits": ("augment",), "cifar10": _IMAGE_TRANSFORM, "cifar100": _IMAGE_TRANSFORM, "imagenet": _IMAGE_TRANSFORM,
    "digits_dvs": ("augment", "split_by"), "nmnist": _EVENT_FILES, "cifar10_dvs": _EVENT_FILES,
    "dvs128_gesture": _EVENT_FILES, TONIC_PREFIX: ("augment", "split_by"),
}


CHANNELS = {"digits": 1, "cifar10": 3, "cifar100": 3, "imagenet": 3}  # event data: 2, the ON and OFF polarities
NMNIST_SIDE = 34  # N-MNIST's sensor is 34 x 34; its frames are zero-padded up to the model's input side


def model_mismatch(name: str, model: str, in_channels: int, img_size: int, fix: str | None = None) -> str | None:
    """Why the model ``model`` (``in_channels``, ``img_size``) cannot take data set ``name``'s inputs,
    with ``fix`` (default: how to train a model that can), or ``None``: a data set with another
    number of channels (the digits' model, the default, given CIFAR-10), or N-MNIST's frames larger
    than the model's input side."""
    channels = CHANNELS.get(name, 2)
    recipe = f"train with the data set's recipe, --config {name}, or " if name in DATASETS else ""
    if in_channels != channels:
        kind = "images" if name in CHANNELS else "event frames (ON and OFF polarities)"
        problem = f"--dataset {name} gives {channels}-channel {kind}, but the model {model} takes {in_channels}-channel inputs"
        training_fix = f"{recipe}name a model for it with --model (`spikingformer models` lists them)"
    elif name == "nmnist" and img_size < NMNIST_SIDE:
        problem = (f"--dataset {name} gives {NMNIST_SIDE}x{NMNIST_SIDE} frames, larger than the {img_size}x{img_size} "
                   f"input of the model {model}")
        training_fix = f"{recipe}set the model's input side: --model-args '{{img_size: 48}}'"
    else:
        return None
    return f"{problem}; {fix or training_fix}"


def unread_settings(data_cfg) -> str | None:
    """A line naming the data settings given (different from their defaults) that ``data_cfg.dataset``
    does not read, e.g. ``--aa`` for event data; ``None`` when there are none."""
    from spikingformer.config import DataSection

    name = data_cfg.dataset
    reads = READS[TONIC_PREFIX if name.startswith(TONIC_PREFIX) else name]
    default = DataSection()
    unread = [k for k in dict.fromkeys(sum(READS.values(), ())) if k not in reads and getattr(data_cfg, k) != getattr(default, k)]
    if not unread:
        return None
    groups: dict[tuple[str, ...], list[str]] = {}
    for key in unread:
        readers = tuple(n.replace(TONIC_PREFIX, "tonic:<Name>") for n, keys in READS.items() if key in keys)
        groups.setdefault(readers, []).append(f"--{key.replace('_', '-')}")
    parts = " or ".join(f"{', '.join(flags)} (for {', '.join(readers)})" for readers, flags in groups.items())
    return f"spikingformer: {name} does not read {parts}; {'it has' if len(unread) == 1 else 'they have'} no effect in this run"


def check_dataset_name(name: str) -> None:
    """A ``ValueError`` naming the closest valid names unless ``name`` is one of :data:`DATASETS`
    or ``tonic:<Name>``."""
    if name in DATASETS or (name.startswith(TONIC_PREFIX) and name[len(TONIC_PREFIX):].isidentifier()):
        return
    raise ValueError(unknown_name("dataset", name, DATASETS,
                                  "valid datasets (or tonic:<Name> for tonic.datasets.<Name>)"))


def needs_data_dir(name: str) -> bool:
    """Whether the data set is read from a folder (``--data-dir``); digits and digits_dvs are embedded."""
    return name in NEEDS_DIR or name.startswith(TONIC_PREFIX)


def is_event_dataset(name: str) -> bool:
    return name in EVENT or name.startswith(TONIC_PREFIX)


FOLDERS = ("data_dir", "cache_dir")  # the data settings that name folders


def local_folder(path: str | None) -> str | None:
    """``path`` as an absolute path, ``~`` expanded (a recipe's ``data_dir: ~/data/cifar10``)."""
    import os

    return None if path is None else os.path.abspath(os.path.expanduser(path))


def with_local_folders(data_cfg):
    """``data_cfg`` with its :data:`FOLDERS` as :func:`local_folder` gives them; a run's checkpoint
    records them so, whatever folder it is evaluated or resumed from."""
    import dataclasses

    return dataclasses.replace(data_cfg, **{key: local_folder(getattr(data_cfg, key)) for key in FOLDERS})


def build_dataset(data_cfg, img_size: int, train: bool) -> Dataset:
    """The data set named by ``data_cfg.dataset`` (a :class:`~spikingformer.config.DataSection`).

    ``img_size`` is the model's input side: static images are resized/cropped to it; event frames
    smaller than it (N-MNIST's 34x34) are zero-padded, centred, to it.
    """
    name = data_cfg.dataset
    check_dataset_name(name)
    data_cfg = with_local_folders(data_cfg)
    if name.startswith(TONIC_PREFIX):  # a data set of the tonic library, e.g. tonic:NMNIST
        return _tonic_dataset(data_cfg, img_size, train)
    if needs_data_dir(name) and not data_cfg.data_dir:
        raise ValueError(f"dataset '{name}' is read from disk: pass its folder with --data-dir (layouts in docs/data.md)")

    from spikingformer.data import static

    if name == "digits":
        return static.Digits(train, img_size=img_size, augment=data_cfg.augment)
    if name in ("cifar10", "cifar100", "imagenet"):
        mean, std = {
            "cifar10": (static.CIFAR10_MEAN, static.CIFAR10_STD),
            "cifar100": (static.CIFAR100_MEAN, static.CIFAR100_STD),
            "imagenet": (static.IMAGENET_MEAN, static.IMAGENET_STD),
        }[name]
        transform = static.image_transform(data_cfg, img_size, train, mean, std)
        if name == "imagenet":
            return static.imagenet(data_cfg.data_dir, train, transform)
        return static.cifar(name, data_cfg.data_dir, train, transform)
    return _event_dataset(data_cfg, img_size, train)


def _event_dataset(data_cfg, img_size: int, train: bool) -> Dataset:
    from spikingformer.data.digits_dvs import DigitsDVS
    from spikingformer.data.event_augment import EventAugment
    from spikingformer.data.event_datasets import CIFAR10DVS, NMNIST, DVS128Gesture

    transform = EventAugment() if (train and data_cfg.augment) else None
    common = dict(train=train, time_steps=data_cfg.time_steps, split_by=data_cfg.split_by, transform=transform)
    name = data_cfg.dataset
    if name == "digits_dvs":
        return DigitsDVS(size=img_size, **common)
    files = dict(root=data_cfg.data_dir, cache_dir=data_cfg.cache_dir, **common)
    if name == "nmnist":
        return NMNIST(pad_to=img_size, **files)
    if name == "cifar10_dvs":
        return CIFAR10DVS(**files)
    return DVS128Gesture(**files)


def collate(samples: list):
    """``default_collate`` of the samples a data set could read: ``None`` items (files
    :class:`~spikingformer.data.static.ImageFolder` could not decode, each named in a warning) are
    left out of the batch."""
    kept = [s for s in samples if s is not None]
    if not kept:
        raise ValueError(f"none of the {len(samples)} images of a batch could be read (the warnings above name "
                         f"the files); check the data folder")
    from torch.utils.data import default_collate

    return default_collate(kept)


def sample_name(dataset: Dataset, index: int) -> str:
    """The file behind item ``index`` of ``dataset`` (through any ``Subset``), or ``item <index>``."""
    from torch.utils.data import Subset

    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    samples = getattr(dataset, "samples", None)  # torchvision's ImageFolder
    if samples is not None:
        return str(samples[index][0])
    source = getattr(dataset, "sample_source", None)  # the event data sets
    return source(index) if source is not None else f"item {index} of {type(dataset).__name__}"


def check_batch(images: torch.Tensor, loader: DataLoader, step: int) -> None:
    """Stop with :class:`~spikingformer.models.transformer.NonFiniteInputError` if batch ``step`` of
    ``loader`` holds NaN or infinite values, naming the batch and the files of the bad samples.

    One sum of the batch (``check_finite``) per batch; the files are looked up only on failure, by
    replaying the loader's (deterministic) batch sampler. Call it before mixing samples (mixup).
    """
    from spikingformer.models.transformer import check_finite

    def names(rows: list[int]) -> list[str]:
        sampler = getattr(loader, "batch_sampler", None)
        batch = next((b for i, b in enumerate(sampler) if i == step), None) if sampler is not None else None
        if batch is None or len(batch) != len(images):  # unknown, or unreadable files were left out
            return []
        return [sample_name(loader.dataset, batch[r]) for r in rows]

    check_finite(images, f"batch {step} (from 0) of the data", names)


def _tonic_dataset(data_cfg, img_size: int, train: bool) -> Dataset:
    from spikingformer.data.event_augment import EventAugment
    from spikingformer.data.tonic_source import tonic_dataset

    if not data_cfg.data_dir:
        raise ValueError(f"dataset '{data_cfg.dataset}' is read from disk: pass tonic's save_to folder with --data-dir")
    transform = EventAugment() if (train and data_cfg.augment) else None
    return tonic_dataset(data_cfg.dataset, data_cfg.data_dir, train, data_cfg.time_steps, data_cfg.split_by, img_size, transform)
