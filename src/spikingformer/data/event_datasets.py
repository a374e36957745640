"""Torch datasets of event-camera recordings integrated into frames.

Every dataset returns ``(frames, label)`` with ``frames`` a float32 tensor of shape (T, 2, H, W) (per-pixel event
counts, channel 0 = polarity 0, channel 1 = polarity 1) and ``label`` an int, and has the attributes
``num_classes``, ``classes`` (names), ``sensor_size`` (H, W of the sensor) and ``frame_size`` (H, W of the
returned frames; differs from ``sensor_size`` only for :class:`NMNIST` with ``pad_to``).

* :class:`CIFAR10DVS`: original AEDAT 2.0 files, the authors' remapping and 90/10 per-class split.
* :class:`DVS128Gesture`: original AEDAT 3.1 ``DvsGesture/`` tree, one sample per labelled gesture.
* :class:`NMNIST`: original ``Train/``/``Test/`` tree or the small ``.bs2`` copy with label lists.
* :class:`DigitsDVS`: scikit-learn's 8x8 digits turned into events by :mod:`spikingformer.data.emulator`.

Frame cache (file-based sets): the frames of each sample are stored once as a compressed ``.npz`` under
``<cache_dir>/frames_<split_by>_T<T>/`` (default ``cache_dir``: ``<root>/.spikingformer_cache``; when the root is
read-only -- not writable, or with no write permission bit set, which is honoured even for root -- and no
``cache_dir`` is given, ``~/.cache/spikingformer/<root name>-<hash of the absolute root path>``). Each cache file
records the size and modification time (ns) of its source files and is rebuilt when they change. Writes are
atomic (temporary file + ``os.replace``), so concurrent DataLoader workers are safe. Frames are built lazily on
first access; :meth:`build_cache` builds them all up front.
"""

from __future__ import annotations

import abc

import hashlib
import math
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from spikingformer.data.emulator import emulate_dvs_batch
from spikingformer.data.events import (
    EventFileError,
    integrate_frames,
    read_aedat2,
    read_aedat31,
    read_gesture_labels,
    read_nmnist,
    remap_cifar10dvs,
    split_gesture_segments,
)

PathLike = str | os.PathLike
Transform = Callable[[torch.Tensor], torch.Tensor]

CIFAR10DVS_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                       "ship", "truck")
GESTURE_CLASSES: tuple[str, ...] = ("hand_clapping", "right_hand_wave", "left_hand_wave", "right_arm_clockwise",
                                    "right_arm_counter_clockwise", "left_arm_clockwise",
                                    "left_arm_counter_clockwise", "arm_roll", "air_drums", "air_guitar",
                                    "other_gestures")
DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Frame cache


def _is_writable_dir(path: Path) -> bool:
    """True when ``path`` is a directory we may write to: os.access says so and some write bit is set."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(stat.S_IMODE(mode) & 0o222)


def default_cache_dir(root: PathLike) -> Path:
    """The cache folder used for ``root`` when no ``cache_dir`` is given.

    ``<root>/.spikingformer_cache`` when ``root`` (or an existing ``<root>/.spikingformer_cache``) is writable,
    else ``~/.cache/spikingformer/<root name>-<first 12 hex digits of sha1(absolute root)>``.
    """
    root = Path(root).resolve()
    local = root / ".spikingformer_cache"
    if (local.is_dir() and _is_writable_dir(local)) or (not local.exists() and _is_writable_dir(root)):
        return local
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return Path(os.path.expanduser("~")) / ".cache" / "spikingformer" / f"{root.name}-{digest}"


def _stamp(sources: Sequence[Path]) -> np.ndarray:
    """int64 array [size0, mtime_ns0, size1, mtime_ns1, ...] of the source files."""
    out = []
    for s in sources:
        st = os.stat(s)
        out += [st.st_size, st.st_mtime_ns]
    return np.asarray(out, dtype=np.int64)


def _compact(frames: np.ndarray) -> np.ndarray:
    """Store integer counts in the smallest exact dtype (uint8 / uint16), else float32."""
    mx = float(frames.max()) if frames.size else 0.0
    if mx <= np.iinfo(np.uint8).max:
        return frames.astype(np.uint8)
    if mx <= np.iinfo(np.uint16).max:
        return frames.astype(np.uint16)
    return frames.astype(np.float32)


class FrameCache:
    """Per-sample ``.npz`` frame cache keyed by integration method and T, validated by source size + mtime.

    Args:
        directory: the folder holding this cache (``.../frames_<split_by>_T<T>``); created on first write.
        split_by: 'number' or 'time'.
        T: number of frames.
    """

    def __init__(self, directory: Path, split_by: str, T: int) -> None:
        self.directory = Path(directory)
        self.split_by = split_by
        self.T = T

    def path(self, key: str) -> Path:
        """Cache file of sample ``key`` (a relative, '/'-separated name)."""
        return self.directory / f"{key}.npz"

    def load(self, key: str, sources: Sequence[Path]) -> np.ndarray | None:
        """The cached frames (T, 2, H, W) of ``key`` if present and built from the current ``sources``."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if (int(z["version"]) != _CACHE_VERSION or str(z["split_by"]) != self.split_by
                        or int(z["T"]) != self.T or not np.array_equal(z["stamp"], _stamp(sources))):
                    return None
                return z["frames"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
            return None  # unreadable or partial file: rebuild it

    def save(self, key: str, sources: Sequence[Path], frames: np.ndarray) -> None:
        """Atomically write the frames (T, 2, H, W) of ``key`` with the stamp of ``sources``."""
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise OSError(f"cannot write the frame cache {path}: {e}; pass a writable cache_dir= to the "
                          f"dataset") from e
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, frames=_compact(frames), stamp=_stamp(sources),
                                    split_by=np.array(self.split_by), T=np.array(self.T),
                                    version=np.array(_CACHE_VERSION))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def _pad_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad (T, 2, h, w) frames to (T, 2, *size), centred (the extra pixel of an odd margin goes last)."""
    h, w = frames.shape[-2:]
    H, W = size
    if (H, W) == (h, w):
        return frames
    top, left = (H - h) // 2, (W - w) // 2
    return torch.nn.functional.pad(frames, (left, W - w - left, top, H - h - top))


class _FileFrameDataset(Dataset, abc.ABC):
    """Shared machinery of the file-based datasets: lazily integrated, cached frames.

    Subclasses fill ``self._keys`` (cache keys), ``self._sources`` (source files per sample), ``self.targets``
    and implement :meth:`_build` (compute and cache the frames of sample i, possibly of its siblings too).
    """

    num_classes: int
    classes: tuple[str, ...]
    sensor_size: tuple[int, int]
    frame_size: tuple[int, int]

    def __init__(self, root: PathLike, T: int, split_by: str, cache_dir: PathLike | None,
                 transform: Transform | None) -> None:
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        self.root = Path(root)
        self.T = T
        self.split_by = split_by
        self.transform = transform
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir(self.root)
        self.cache = FrameCache(base / f"frames_{split_by}_T{T}", split_by, T)
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
        frames = _pad_frames(frames, self.frame_size)
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
    into T frames of 128x128. Split (SpikingJelly ``split_to_train_test_set(0.9, ..., random_split=False)``):
    within each class the files are sorted by name (plain lexicographic order, as SpikingJelly's DatasetFolder)
    and the first ``ceil(n * train_ratio)`` go to train, the rest to test (9000 / 1000 for the full set).

    Args:
        root: the folder holding the class folders.
        train: train (True) or test split.
        T: number of frames (the authors use 10 or 16).
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

    def __init__(self, root: PathLike, train: bool = True, T: int = 16, split_by: str = "number",
                 cache_dir: PathLike | None = None, transform: Transform | None = None,
                 train_ratio: float = 0.9) -> None:
        root = Path(root)
        layout = (f"expected {root}/airplane/*.aedat, {root}/automobile/*.aedat, ..., {root}/truck/*.aedat "
                  f"(CIFAR10-DVS original AEDAT 2.0 files, one folder per class: {' '.join(self.classes)}); "
                  f"see docs/data.md")
        if not root.is_dir():
            raise FileNotFoundError(f"CIFAR10-DVS root {root} does not exist: {layout}")
        per_class = []
        for name in self.classes:
            files = sorted((root / name).glob("*.aedat"), key=lambda p: p.name) if (root / name).is_dir() else []
            if not files:
                raise FileNotFoundError(f"CIFAR10-DVS: no {root / name}/*.aedat files: {layout}")
            per_class.append(files)
        super().__init__(root, T, split_by, cache_dir, transform)
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
        frames = integrate_frames(events, self.T, 128, 128, self.split_by)
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
        train, T, split_by, cache_dir, transform: as for :class:`CIFAR10DVS`.

    Raises:
        FileNotFoundError: no recordings / missing labels csv (names the expected layout).
        EventFileError: a malformed recording or labels file (at first access of its samples).
    """

    num_classes = 11
    classes = GESTURE_CLASSES
    sensor_size = (128, 128)
    frame_size = (128, 128)

    def __init__(self, root: PathLike, train: bool = True, T: int = 16, split_by: str = "number",
                 cache_dir: PathLike | None = None, transform: Transform | None = None) -> None:
        root = Path(root)
        if (root / "DvsGesture").is_dir():
            root = root / "DvsGesture"
        layout = (f"expected {root}/user01_fluorescent.aedat + user01_fluorescent_labels.csv, ... and "
                  f"trials_to_train.txt / trials_to_test.txt (the original DVS128 Gesture 'DvsGesture' folder, "
                  f"AEDAT 3.1); see docs/data.md")
        if not root.is_dir():
            raise FileNotFoundError(f"DVS128 Gesture root {root} does not exist: {layout}")
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
        super().__init__(root, T, split_by, cache_dir, transform)
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
            frames = integrate_frames(seg, self.T, 128, 128, self.split_by)
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
        train, T, split_by, cache_dir, transform: as for :class:`CIFAR10DVS`.
        pad_to: None (frames 34x34) or a size >= 34, e.g. 48 (a multiple of 16 for a patch-16 model): frames are
            zero-padded to (pad_to, pad_to), centred (48: 7 pixels on each side). The cache holds the unpadded
            frames. ``frame_size`` gives the returned size, ``sensor_size`` stays (34, 34).

    Returns per item ``(frames (T, 2, 34, 34) or (T, 2, pad_to, pad_to) float32, digit int)``.
    """

    num_classes = 10
    classes = DIGIT_CLASSES
    sensor_size = (34, 34)

    def __init__(self, root: PathLike, train: bool = True, T: int = 16, split_by: str = "number",
                 cache_dir: PathLike | None = None, transform: Transform | None = None,
                 pad_to: int | None = None) -> None:
        root = Path(root)
        layout = (f"expected the original layout {root}/Train/<digit>/*.bin and {root}/Test/<digit>/*.bin, or the "
                  f"small layout {root}/<id>.bs2 with label lists {root}/train*.txt and {root}/test*.txt "
                  f"('#sample #class' header, then 'id label' lines); see docs/data.md")
        if not root.is_dir():
            raise FileNotFoundError(f"N-MNIST root {root} does not exist: {layout}")
        if pad_to is not None and pad_to < 34:
            raise ValueError(f"pad_to must be >= 34 (the N-MNIST sensor size), got {pad_to}")
        self.frame_size = (pad_to, pad_to) if pad_to is not None else (34, 34)
        split_dir = root / ("Train" if train else "Test")
        entries: list[tuple[str, Path, int]] = []
        if split_dir.is_dir():
            for d in range(10):
                for f in sorted((split_dir / str(d)).glob("*.bin"), key=_natural_key):
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
        super().__init__(root, T, split_by, cache_dir, transform)
        self.train = train
        self.pad_to = pad_to
        for key, f, label in entries:
            self._keys.append(key)
            self._sources.append([f])
            self.targets.append(label)

    def _build(self, i: int) -> np.ndarray:
        events = read_nmnist(self._sources[i][0])
        frames = integrate_frames(events, self.T, 34, 34, self.split_by)
        self.cache.save(self._keys[i], self._sources[i], frames)
        return frames


# ----------------------------------------------------------------------------------------------------------------
# Digits DVS (emulated, embedded)


class DigitsDVS(Dataset):
    """scikit-learn's handwritten digits (1,797 8x8 images, shipped with scikit-learn) as emulated DVS recordings.

    Each image (values 0..16) is scaled to [0, 1], upsampled bicubically to ``digit_size`` x ``digit_size``,
    contrast-stretched with ``clip((v - 0.3) / 0.4, 0, 1)`` (sharp strokes on black, as the MNIST digits that
    N-MNIST filmed; without it the blurry 8x8 gradients fire events all over the digit) and zero-padded
    (centred) to ``size`` x ``size``, then moved in three N-MNIST-like saccades by
    :func:`~spikingformer.data.emulator.emulate_dvs_batch` (amplitude ``amplitude`` px, 10 steps of 10 ms per
    saccade, threshold 0.25, eps 0.25, per-image seed ``(seed, image index)``), and the events are integrated into T
    frames. Split: ``sklearn.model_selection.train_test_split(indices, test_size=0.2, random_state=0,
    stratify=labels)``, giving 1437 train / 360 test samples. All samples of the split are computed at
    construction (about a second) and held in memory as uint8/uint16 counts.

    Args:
        train: train (True) or test split.
        T: number of frames.
        split_by: 'number' or 'time'.
        size: frame size (default 32).
        digit_size: size of the upsampled digit inside the frame (default ``max(8, 3 * size // 4)``, 24 for
            size 32, leaving a margin for the motion).
        amplitude: saccade amplitude in pixels of the upsampled image (default 2.0).
        seed: emulator seed.
        transform: optional callable on the (T, 2, size, size) tensor.

    Returns per item ``(frames (T, 2, size, size) float32, digit int)``.
    """

    num_classes = 10
    classes = DIGIT_CLASSES

    def __init__(self, train: bool = True, T: int = 16, split_by: str = "number", size: int = 32,
                 digit_size: int | None = None, amplitude: float = 2.0, seed: int = 0,
                 transform: Transform | None = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if digit_size is None:
            digit_size = max(8, size * 3 // 4)
        if not 8 <= digit_size <= size:
            raise ValueError(f"need 8 <= digit_size <= size, got digit_size={digit_size}, size={size}")
        digits = load_digits()
        labels = digits.target.astype(np.int64)
        idx_train, idx_test = train_test_split(np.arange(labels.size), test_size=0.2, random_state=0,
                                               stratify=labels)
        idx = np.asarray(idx_train if train else idx_test)
        imgs = torch.from_numpy(digits.images[idx].astype(np.float32) / 16.0)[:, None]
        imgs = torch.nn.functional.interpolate(imgs, size=(digit_size, digit_size), mode="bicubic",
                                               align_corners=False)[:, 0]
        # contrast stretch: sharp strokes on a black background, like the MNIST digits N-MNIST shows on screen
        imgs = ((imgs - 0.3) / 0.4).clamp(0, 1).numpy()
        lo = (size - digit_size) // 2
        imgs = np.pad(imgs, ((0, 0), (lo, size - digit_size - lo), (lo, size - digit_size - lo)))
        events = emulate_dvs_batch(imgs, amplitude=amplitude, seed=[(seed, int(i)) for i in idx])
        frames = np.stack([integrate_frames(ev, T, size, size, split_by) for ev in events]) if len(idx) else \
            np.zeros((0, T, 2, size, size), np.float32)
        self.frames = torch.from_numpy(_compact(frames))
        self.targets = labels[idx].tolist()
        self.indices = idx
        self.train = train
        self.T = T
        self.split_by = split_by
        self.transform = transform
        self.sensor_size = (size, size)
        self.frame_size = (size, size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        frames = self.frames[i].float()
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, self.targets[i]


__all__ = ["CIFAR10DVS", "DVS128Gesture", "NMNIST", "DigitsDVS", "FrameCache", "default_cache_dir",
           "CIFAR10DVS_CLASSES", "GESTURE_CLASSES"]

