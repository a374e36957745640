"""Torch datasets of event-camera recordings on disk, integrated into frames.

Every dataset returns ``(frames, label)`` with ``frames`` a float32 tensor of shape (T, 2, H, W), T =
``time_steps`` (per-pixel event counts, channel 0 = polarity 0, channel 1 = polarity 1) and ``label`` an int,
and has the attributes ``num_classes``, ``classes`` (names), ``sensor_size`` (H, W of the sensor) and
``frame_size`` (H, W of the returned frames; differs from ``sensor_size`` only for :class:`NMNIST` with
``pad_to``).

* :class:`CIFAR10DVS`: original AEDAT 2.0 files, the authors' remapping and 90/10 per-class split.
* :class:`DVS128Gesture`: original AEDAT 3.1 ``DvsGesture/`` tree, one sample per labelled gesture.
* :class:`NMNIST`: original ``Train/``/``Test/`` tree or the small ``.bs2`` copy with label lists.

(:class:`~spikingformer.data.digits_dvs.DigitsDVS` emulates its recordings instead.) Frames are built lazily
on first access and kept in a :class:`~spikingformer.data.frame_cache.FrameCache`; :meth:`build_cache`
builds them all up front.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spikingformer.data.event_files import (
    read_aedat2,
    read_aedat31,
    read_gesture_labels,
    read_nmnist,
    remap_cifar10dvs,
    split_gesture_segments,
)
from spikingformer.data.events import EventFileError, PathLike
from spikingformer.data.frame_cache import FrameCache, default_cache_dir
from spikingformer.data.frames import check_time_steps, integrate_frames, pad_frames

Transform = Callable[[torch.Tensor], torch.Tensor]

CIFAR10DVS_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                       "ship", "truck")
GESTURE_CLASSES: tuple[str, ...] = ("hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
                                    "right_arm_counter_clockwise", "left_arm_clockwise",
                                    "left_arm_counter_clockwise", "arm_roll", "air_drums", "air_guitar",
                                    "other_gestures")
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))


def _check_root(data_set: str, root: Path, layout: str) -> None:
    """A missing root, or a file given as it, is one error naming the expected layout."""
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"{data_set} root {root} {state}: {layout}")


def _visible(paths: Iterable[Path]) -> list[Path]:
    """``paths`` without hidden files: pathlib's ``glob("*.aedat")`` also matches macOS's ``._NAME.aedat``
    metadata copies, which would count as recordings (and move CIFAR10-DVS's train/test split)."""
    return [p for p in paths if not p.name.startswith(".")]


class _FileFrameDataset(Dataset, abc.ABC):
    """Shared machinery of the file-based datasets: lazily integrated, cached frames.

    Subclasses fill ``self._keys`` (cache keys), ``self._sources`` (source files per sample), ``self.targets``
    and implement :meth:`_build` (compute and cache the frames of sample i, possibly of its siblings too).
    """

    num_classes: int
    classes: tuple[str, ...]
    sensor_size: tuple[int, int]
    frame_size: tuple[int, int]

    def __init__(self, root: PathLike, time_steps: int, split_by: str, cache_dir: PathLike | None,
                 transform: Transform | None) -> None:
        check_time_steps(time_steps)
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        self.root = Path(root)
        self.time_steps = time_steps
        self.split_by = split_by
        self.transform = transform
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root)
        self.cache = FrameCache(base / f"frames_{split_by}_T{time_steps}", split_by, time_steps)
        self._keys: list[str] = []
        self._sources: list[list[Path]] = []
        self.targets: list[int] = []

    def __len__(self) -> int:
        return len(self._keys)

    @abc.abstractmethod
    def _build(self, i: int) -> np.ndarray:
        """Read, integrate and cache sample i; returns its frames (T, 2, *sensor_size)."""

    def frames_numpy(self, i: int) -> np.ndarray:
        """The (unpadded, untransformed) frames of sample i, (T, 2, *sensor_size), from the cache or built."""
        cached = self.cache.load(self._keys[i], self._sources[i])
        if cached is not None:
            return cached
        return self._build(i)

    def sample_source(self, i: int) -> str:
        """The file of sample i (for messages)."""
        return str(self._sources[i][0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {len(self)}")
        i = i % len(self)
        frames = torch.from_numpy(np.asarray(self.frames_numpy(i), dtype=np.float32))
        frames = pad_frames(frames, self.frame_size)
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, self.targets[i]

    def build_cache(self) -> None:
        """Integrate and cache the frames of every sample that has no valid cache entry yet."""
        for i in range(len(self)):
            if self.cache.load(self._keys[i], self._sources[i]) is None:
                self._build(i)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR10-DVS


class CIFAR10DVS(_FileFrameDataset):
    """CIFAR10-DVS (Li et al. 2017) from its original AEDAT 2.0 files, as the Spikingformer authors use it.

    Layout: ``root/<class>/*.aedat`` with the ten folders ``airplane automobile bird cat deer dog frog horse ship
    truck`` (labels 0..9 in that order). Events are read with :func:`~spikingformer.data.events.read_aedat2`,
    remapped with :func:`~spikingformer.data.events.remap_cifar10dvs` (x=127-y, y=127-x, p=1-p) and integrated
    into ``time_steps`` frames of 128x128. Split (SpikingJelly ``split_to_train_test_set(0.9, ..., random_split=False)``):
    within each class the files are sorted by name (plain lexicographic order, as SpikingJelly's DatasetFolder)
    and the first ``ceil(n * train_ratio)`` go to train, the rest to test (9000 / 1000 for the full set).

    Args:
        root: the folder holding the class folders.
        train: train (True) or test split.
        time_steps: number of frames T (the authors use 10 or 16).
        split_by: 'number' (the authors') or 'time'.
        cache_dir: frame cache folder (see the module doc); default ``<root>/.spikingformer_cache``.
        transform: optional callable on the (T, 2, 128, 128) tensor, e.g.
            :class:`~spikingformer.data.event_augment.EventAugment`.
        train_ratio: fraction of each class in train (0.9).

    Returns per item ``(frames (T, 2, 128, 128) float32, label int)``.
    """

    num_classes = 10
    classes = CIFAR10DVS_CLASSES
    sensor_size = (128, 128)
    frame_size = (128, 128)

    def __init__(self, root: PathLike, train: bool = True, time_steps: int = 16, split_by: str = "number",
                 cache_dir: PathLike | None = None, transform: Transform | None = None,
                 train_ratio: float = 0.9) -> None:
        root = Path(root)
        layout = (f"expected {root}/airplane/*.aedat, {root}/automobile/*.aedat, ..., {root}/truck/*.aedat "
                  f"(CIFAR10-DVS original AEDAT 2.0 files, one folder per class: {' '.join(self.classes)}); "
                  f"see docs/data.md")
        _check_root("CIFAR10-DVS", root, layout)
        per_class = []
        for name in self.classes:
            files = sorted(_visible((root / name).glob("*.aedat")), key=lambda p: p.name) if (root / name).is_dir() else []
            if not files:
                raise FileNotFoundError(f"CIFAR10-DVS: no {root / name}/*.aedat files: {layout}")
            per_class.append(files)
        super().__init__(root, time_steps, split_by, cache_dir, transform)
        self.train = train
        for label, files in enumerate(per_class):
            pos = math.ceil(len(files) * train_ratio)
            for f in (files[:pos] if train else files[pos:]):
                self._keys.append(f"{self.classes[label]}/{f.stem}")
                self._sources.append([f])
                self.targets.append(label)

    def _build(self, i: int) -> np.ndarray:
        src = self._sources[i][0]
        events = remap_cifar10dvs(read_aedat2(src))
        frames = integrate_frames(events, self.time_steps, 128, 128, self.split_by)
        self.cache.save(self._keys[i], self._sources[i], frames)
        return frames


# ----------------------------------------------------------------------------------------------------------------
# DVS128 Gesture


_USER_RE = re.compile(r"^user(\d+)_")


class DVS128Gesture(_FileFrameDataset):
    """DVS128 Gesture (Amir et al. 2017) from the original ``DvsGesture/`` AEDAT 3.1 tree.

    Layout: ``root`` is the ``DvsGesture`` folder (or its parent) with ``userNN_<lighting>.aedat`` recordings,
    their ``userNN_<lighting>_labels.csv`` files and the official lists ``trials_to_train.txt`` /
    ``trials_to_test.txt`` (one ``.aedat`` name a line). Without the lists, users 1-23 are train and 24-29 test
    (the official split). Each labelled segment [start, end) of a recording is one sample (1176 train / 288 test
    for the full set), with label = class - 1 (0..10, see ``classes``), frames 128x128. Samples are ordered by
    recording (list order) then by segment.

    Args:
        root: the ``DvsGesture`` folder or its parent.
        train, time_steps, split_by, cache_dir, transform: as for :class:`CIFAR10DVS`.

    Raises:
        FileNotFoundError: no recordings / missing labels csv (names the expected layout).
        EventFileError: a malformed recording or labels file (at first access of its samples).
    """

    num_classes = 11
    classes = GESTURE_CLASSES
    sensor_size = (128, 128)
    frame_size = (128, 128)

    def __init__(self, root: PathLike, train: bool = True, time_steps: int = 16, split_by: str = "number",
                 cache_dir: PathLike | None = None, transform: Transform | None = None) -> None:
        root = Path(root)
        if (root / "DvsGesture").is_dir():
            root = root / "DvsGesture"
        layout = (f"expected {root}/user01_fluorescent.aedat + user01_fluorescent_labels.csv, ... and "
                  f"trials_to_train.txt / trials_to_test.txt (the original DVS128 Gesture 'DvsGesture' folder, "
                  f"AEDAT 3.1); see docs/data.md")
        _check_root("DVS128 Gesture", root, layout)
        list_file = root / ("trials_to_train.txt" if train else "trials_to_test.txt")
        if list_file.is_file():
            names = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
            trials = [root / n for n in names]
            missing = [str(t) for t in trials if not t.is_file()]
            if missing:
                raise FileNotFoundError(f"DVS128 Gesture: {list_file} lists missing recordings {missing[:3]}"
                                        f"{' ...' if len(missing) > 3 else ''}: {layout}")
        else:
            trials = []
            for f in sorted(root.glob("user*_*.aedat")):
                m = _USER_RE.match(f.name)
                if m and ((int(m.group(1)) <= 23) == train):
                    trials.append(f)
        if not trials:
            raise FileNotFoundError(f"DVS128 Gesture: no {'train' if train else 'test'} recordings in {root}: "
                                    f"{layout}")
        super().__init__(root, time_steps, split_by, cache_dir, transform)
        self.train = train
        for aedat in trials:
            csv_path = aedat.with_name(aedat.stem + "_labels.csv")
            if not csv_path.is_file():
                raise FileNotFoundError(f"DVS128 Gesture: labels file {csv_path} for {aedat.name} is missing: "
                                        f"{layout}")
            labels = read_gesture_labels(csv_path)
            for k, lab in enumerate(labels["label"].tolist()):
                self._keys.append(f"{aedat.stem}/{k:03d}")
                self._sources.append([aedat, csv_path])
                self.targets.append(int(lab))

    def sample_source(self, i: int) -> str:
        """The recording of sample i and its segment (for messages)."""
        return f"{self._sources[i][0]} segment {self._keys[i].rsplit('/', 1)[1]}"

    def _build(self, i: int) -> np.ndarray:
        aedat, csv_path = self._sources[i]
        events = read_aedat31(aedat)
        segments = split_gesture_segments(events, read_gesture_labels(csv_path), source=csv_path)
        result = None
        for k, (_, seg) in enumerate(segments):
            key = f"{aedat.stem}/{k:03d}"
            frames = integrate_frames(seg, self.time_steps, 128, 128, self.split_by)
            self.cache.save(key, [aedat, csv_path], frames)
            if key == self._keys[i]:
                result = frames
        if result is None:
            raise EventFileError(f"{csv_path}: sample {self._keys[i]} is no longer in the labels file (it changed "
                                 f"after the dataset was created); recreate the dataset")
        return result


# ----------------------------------------------------------------------------------------------------------------
# N-MNIST


def _natural_key(p: Path) -> tuple:
    return tuple(int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p.name))


class NMNIST(_FileFrameDataset):
    """N-MNIST (Orchard et al. 2015): 34x34 ATIS recordings of MNIST digits under three saccades.

    Two layouts are accepted:

    * the original release: ``root/Train/<digit>/*.bin`` and ``root/Test/<digit>/*.bin`` (digit folders 0-9,
      files in natural numeric order);
    * the small copy (``nmnist-small``): ``root/<id>.bs2`` files with label lists ``root/train*.txt`` and
      ``root/test*.txt`` (e.g. ``train1K.txt`` / ``test100.txt``: a ``#sample #class`` header, then ``id label``
      lines), samples in list order.

    Args:
        root: the data folder.
        train, time_steps, split_by, cache_dir, transform: as for :class:`CIFAR10DVS`.
        pad_to: None (frames 34x34) or a size >= 34, e.g. 48 (a multiple of 16 for a patch-16 model): frames are
            zero-padded to (pad_to, pad_to), centred (48: 7 pixels on each side). The cache holds the unpadded
            frames. ``frame_size`` gives the returned size, ``sensor_size`` stays (34, 34).

    Returns per item ``(frames (T, 2, 34, 34) or (T, 2, pad_to, pad_to) float32, digit int)``.
    """

    num_classes = 10
    classes = DIGIT_CLASSES
    sensor_size = (34, 34)

    def __init__(self, root: PathLike, train: bool = True, time_steps: int = 16, split_by: str = "number",
                 cache_dir: PathLike | None = None, transform: Transform | None = None,
                 pad_to: int | None = None) -> None:
        root = Path(root)
        layout = (f"expected the original layout {root}/Train/<digit>/*.bin and {root}/Test/<digit>/*.bin, or the "
                  f"small layout {root}/<id>.bs2 with label lists {root}/train*.txt and {root}/test*.txt "
                  f"('#sample #class' header, then 'id label' lines); see docs/data.md")
        _check_root("N-MNIST", root, layout)
        if pad_to is not None and pad_to < 34:
            raise ValueError(f"pad_to must be >= 34 (the N-MNIST sensor size), got {pad_to}")
        self.frame_size = (pad_to, pad_to) if pad_to is not None else (34, 34)
        split_dir = root / ("Train" if train else "Test")
        entries: list[tuple[str, Path, int]] = []
        if split_dir.is_dir():
            for d in range(10):
                for f in sorted(_visible((split_dir / str(d)).glob("*.bin")), key=_natural_key):
                    entries.append((f"{split_dir.name}/{d}/{f.stem}", f, d))
        else:
            lists = sorted(root.glob(("train" if train else "test") + "*.txt"))
            if len(lists) > 1:
                raise FileNotFoundError(f"N-MNIST: several label lists {[p.name for p in lists]} in {root}; "
                                        f"keep one per split: {layout}")
            if lists:
                for n, line in enumerate(lists[0].read_text().splitlines(), start=1):
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    parts = line.split()
                    if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isdigit():
                        raise EventFileError(f"{lists[0]}: line {n}: expected 'id label', got {line!r}")
                    f = root / f"{parts[0]}.bs2"
                    if not f.is_file():
                        raise FileNotFoundError(f"N-MNIST: {lists[0]} line {n} names {f}, which is missing: "
                                                f"{layout}")
                    entries.append((f"bs2/{parts[0]}", f, int(parts[1])))
        if not entries:
            raise FileNotFoundError(f"N-MNIST: no {'train' if train else 'test'} recordings found in {root}: "
                                    f"{layout}")
        super().__init__(root, time_steps, split_by, cache_dir, transform)
        self.train = train
        self.pad_to = pad_to
        for key, f, label in entries:
            self._keys.append(key)
            self._sources.append([f])
            self.targets.append(label)

    def _build(self, i: int) -> np.ndarray:
        events = read_nmnist(self._sources[i][0])
        frames = integrate_frames(events, self.time_steps, 34, 34, self.split_by)
        self.cache.save(self._keys[i], self._sources[i], frames)
        return frames


__all__ = ["CIFAR10DVS", "DVS128Gesture", "NMNIST", "CIFAR10DVS_CLASSES", "GESTURE_CLASSES", "DIGIT_CLASSES"]
