"""Static image data sets: scikit-learn's digits (embedded), CIFAR-10/100 and ImageNet from disk.

Nothing is downloaded: CIFAR is read from torchvision's python-pickle layout or from class-folder
trees, ImageNet from ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``. Training transforms are
timm's ``create_transform`` with the recipe's settings (the authors' RandAugment, random erasing,
crop and normalisation constants).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import Dataset

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits split into 1,437 train / 360 test images, stratified, fixed seed 0.

    Returns ``(train_images, train_labels, test_images, test_labels)``; images ``(n, 8, 8)`` in [0, 16].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=0.2, random_state=seed, stratify=labels)
    return x_tr, y_tr, x_te, y_te


class Digits(Dataset):
    """scikit-learn's handwritten digits (1,797 real 8x8 grey images shipped inside scikit-learn).

    Split by :func:`digits_split` (1,437 train / 360 test). Images are scaled to [0, 1], resized
    (bilinear) to ``img_size`` and normalised with the training set's mean and standard deviation.
    Training samples get a small random affine jitter (+-10 degrees, +-1 original pixel) when
    ``augment`` is on. Items: ``(image (1, S, S) float32, label)``.
    """

    num_classes = 10
    classes = [str(i) for i in range(10)]

    def __init__(self, train: bool, img_size: int = 16, augment: bool = False) -> None:
        x_tr, y_tr, x_te, y_te = digits_split()
        train_images = _resize(x_tr, img_size)
        mean, std = float(train_images.mean()), float(train_images.std())
        images, labels = (train_images, y_tr) if train else (_resize(x_te, img_size), y_te)
        self.images = (images - mean) / std
        self.labels = torch.from_numpy(labels)
        self.background = -mean / std  # value of an empty pixel after normalisation
        self.augment = None
        if train and augment:
            from torchvision.transforms import v2

            self.augment = v2.RandomAffine(degrees=10, translate=(1 / 8, 1 / 8), fill=self.background)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        return image, int(self.labels[index])


def _resize(images: np.ndarray, size: int) -> torch.Tensor:
    """``(n, 8, 8)`` digits in [0, 16] -> ``(n, 1, size, size)`` in [0, 1], bilinear."""
    x = torch.from_numpy(images / 16.0).float().unsqueeze(1)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _layout_error(name: str, root: Path, expected: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name} not found under {root}. Expected {expected}. Nothing is downloaded at run time: "
        f"fetch the data set yourself and pass its folder with --data-dir (see docs/data.md)."
    )


class UnreadableImageWarning(UserWarning):
    """A file in an image folder could not be decoded and was left out of its batch."""


class ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ``ImageFolder`` that skips a file it cannot decode instead of failing mid-epoch,
    and hidden files and folders (names starting with ``.``).

    Such a file (not an image, truncated, unreadable) gives one :class:`UnreadableImageWarning`
    naming it, and the item comes back as ``None``, which :func:`spikingformer.data.collate` leaves
    out of the batch (evaluation then counts one image less, shown in its ``samples``). Hidden
    entries are what other tools leave in a data folder (Jupyter's ``.ipynb_checkpoints/``, macOS's
    ``._NAME.jpg`` copies of metadata): torchvision counts a hidden folder as a class, which shifts
    every label after it, and reads each ``._NAME.jpg`` as a broken image.
    """

    def __init__(self, root: str, **kwargs) -> None:
        start = len(os.path.join(os.path.expanduser(root), ""))  # torchvision joins root, class and file names

        def visible_image(path: str) -> bool:
            inside = os.sep + path[start:]  # the part below root: a hidden entry shows as "/."
            return os.sep + "." not in inside and path.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)

        try:
            super().__init__(root, is_valid_file=visible_image, **kwargs)
        except FileNotFoundError as err:  # a class folder without images, or none at all
            raise FileNotFoundError(f"{root}: {err}") from None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """The class folders of ``directory``, hidden ones left out, sorted (torchvision's order)."""
        classes, _ = super().find_classes(directory)
        classes = [c for c in classes if not c.startswith(".")]
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as err:
            warnings.warn(f"skipping {path}: not a readable image ({type(err).__name__}: {err}); delete or "
                          f"replace the file", UnreadableImageWarning, stacklevel=2)
            return None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def _with_classes(dataset: Dataset, classes: list[str]) -> Dataset:
    dataset.num_classes = len(classes)
    dataset.classes = list(classes)
    return dataset


def cifar(name: str, root: str | Path, train: bool, transform) -> Dataset:
    """CIFAR-10 / CIFAR-100 from torchvision's pickle layout or from a class-folder tree.

    Accepted layouts under ``root``: ``cifar-10-batches-py/`` (or ``cifar-100-python/``), that
    folder itself, or ``train/<class>/*.png|jpg`` + ``test/<class>/...`` (class folders sort into
    the standard label order).
    """
    root = Path(root)
    pickle_dir = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    if root.name == pickle_dir:
        root = root.parent
    if (root / pickle_dir).is_dir():
        try:
            ds = cls(str(root), train=train, transform=transform, download=False)
        except RuntimeError:  # torchvision's "not found or corrupted. You can use download=True"
            raise ValueError(_damaged_pickles(name, cls, root / pickle_dir)) from None
        return _with_classes(ds, ds.classes)
    split = root / ("train" if train else "test")
    if split.is_dir():
        ds = ImageFolder(str(split), transform=transform)
        expected_classes = 10 if name == "cifar10" else 100
        if len(ds.classes) != expected_classes:
            raise ValueError(f"{split} has {len(ds.classes)} class folders, {name} has {expected_classes}")
        return _with_classes(ds, ds.classes)
    raise _layout_error(
        name, root, f"{root}/{pickle_dir}/ (torchvision's python version) or {root}/train/<class>/*.png and {root}/test/<class>/*.png"
    )


def _damaged_pickles(name: str, cls, folder: Path) -> str:
    """Which of torchvision's CIFAR files in ``folder`` are missing or fail their MD5 check."""
    from torchvision.datasets.utils import check_integrity

    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    problems = [f"{file} missing" if not (folder / file).is_file() else f"{file} damaged (its MD5 differs)"
                for file, md5 in files if not check_integrity(str(folder / file), md5)]
    return (f"{name} in {folder} is incomplete or damaged: {', '.join(problems) or 'unreadable'}; unpack "
            f"{cls.filename} there again (nothing is downloaded)")


def imagenet(root: str | Path, train: bool, transform) -> Dataset:
    """ImageNet-1k from ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``."""
    root = Path(root)
    split = root / ("train" if train else "val")
    if not split.is_dir():
        raise _layout_error("ImageNet", root, f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG (val sorted into class folders)")
    ds = ImageFolder(str(split), transform=transform)
    return _with_classes(ds, ds.classes)


def image_transform(data_cfg, img_size: int, train: bool, mean, std):
    """timm's transform with the recipe's augmentation (train) or resize + centre crop (eval), its
    posterize ops taking 0 bits (:func:`posterize`)."""
    from timm.data import auto_augment, create_transform

    transform = create_transform(
        input_size=img_size,
        is_training=train,
        scale=tuple(data_cfg.scale),
        ratio=tuple(data_cfg.ratio),
        hflip=data_cfg.hflip,
        color_jitter=0.0,
        auto_augment=data_cfg.aa,
        interpolation=data_cfg.interpolation,
        mean=tuple(data_cfg.mean or mean),
        std=tuple(data_cfg.std or std),
        re_prob=data_cfg.reprob,
        re_mode=data_cfg.remode,
        crop_pct=data_cfg.crop_pct,
    )
    for op in augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize op, where keeping 0 bits gives the black image that Pillow before 13 (and
    TensorFlow's RandAugment) gave: Pillow 13 refuses ``ImageOps.posterize(img, 0)`` with a
    ValueError, which stopped training in a DataLoader worker. timm asks for 0 bits at magnitude 10
    of the ``inc1`` policies (the CIFAR and ImageNet recipes' ``rand-m9-n1-mstd0.4-inc1`` draws
    magnitudes around 9 that reach it: 53 times in 200,000 draws of the CIFAR recipe's RandAugment,
    about 13 an epoch of CIFAR-10; a run stopped in its first steps), below 2.5 of the others, and
    in AutoAugment's ``v0`` policy."""
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform) -> list:
    """timm's ``AugmentOp`` instances inside ``transform``: in a ``Compose``, RandAugment's and AugMix's
    ``ops`` and AutoAugment's ``policy`` (lists of sub-policies)."""
    from timm.data.auto_augment import AugmentOp

    if isinstance(transform, AugmentOp):
        return [transform]
    children = transform if isinstance(transform, (list, tuple)) else [
        child for name in ("transforms", "ops", "policy") for child in (getattr(transform, name, None) or ())]
    return [op for child in children for op in augment_ops(child)]
