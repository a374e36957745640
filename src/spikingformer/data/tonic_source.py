"""Events and data sets of the `tonic <https://tonic.readthedocs.io>`_ library as a source for this
project's frame integration and event recipes.

tonic gives events as numpy structured arrays with fields ``x``, ``y``, ``t``, ``p`` (any field
order; integer, float or bool dtypes) and data sets whose items are ``(events, target)``.

* :func:`events_from_tonic` converts such an array to this project's :data:`~spikingformer.data.events.EVENT_DTYPE`
  (``t`` in integer microseconds, ``p`` 0/1), after which :func:`~spikingformer.data.frames.integrate_frames`
  and everything downstream apply unchanged.
* :class:`TonicFrames` wraps a tonic data set (or any object of that shape) as a data set of
  ``(frames (T, 2, H, W) float32 tensor, target int)``, the input of the event models.
* :func:`tonic_dataset` builds ``tonic.datasets.<Name>`` from files already on disk for the recipes'
  ``dataset: tonic:<Name>`` (e.g. ``tonic:NMNIST``, ``tonic:DVSGesture``).

Conventions that differ between tonic and this project (docs/data.md, "Event data from tonic"):
tonic's ``sensor_size`` is ``(width, height, polarities)``, this project's ``(height, width)``;
``ToFrame(n_event_bins=T)`` drops the ``N mod T`` last events, ``integrate_frames_by_count`` puts them
into the last frame (SpikingJelly's rule); ``ToFrame(n_time_bins=T)`` drops the events after
``t0 + T * ((t1 - t0) // T)``, ``integrate_frames_by_time`` puts them into the last frame (T = ``time_steps``,
:mod:`spikingformer.data.frames`).

Only :func:`tonic_dataset` imports tonic (``pip install 'spikingformer[tonic]'``); the rest works on
any arrays and data sets of tonic's shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from spikingformer.data import TONIC_PREFIX
from spikingformer.data.events import make_events
from spikingformer.data.frames import check_time_steps, integrate_frames, pad_frames


def events_from_tonic(events: np.ndarray, time_unit_us: float = 1.0) -> np.ndarray:
    """Convert tonic events (structured array with fields x, y, t, p) to :data:`~spikingformer.data.events.EVENT_DTYPE`.

    Args:
        events: tonic's events, shape (N,).
        time_unit_us: microseconds per unit of ``t`` (1 for tonic's data sets, which count in us;
            1e6 for timestamps in seconds). Non-integer results are rounded to the nearest microsecond.

    Returns:
        Events of dtype ``EVENT_DTYPE``, in the given order, ``p = 1`` where tonic's polarity is
        positive (True, 1), else 0 (False, 0, or -1 of the datasets that code OFF as -1).
    """
    names = getattr(getattr(events, "dtype", None), "names", None) or ()
    missing = [f for f in ("x", "y", "t", "p") if f not in names]
    if missing:
        raise ValueError(f"tonic events need the fields x, y, t, p; missing {', '.join(missing)} (fields: "
                         f"{', '.join(names) or 'none, not a structured array'})")
    t = np.asarray(events["t"])
    if time_unit_us != 1.0 or np.issubdtype(t.dtype, np.floating):
        t = np.rint(t.astype(np.float64) * time_unit_us)
    return make_events(t.astype(np.int64), events["x"], events["y"], np.asarray(events["p"]) > 0)


def sensor_height_width(sensor_size: Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from tonic's ``sensor_size = (width, height, polarities)`` with two polarities."""
    if len(sensor_size) != 3 or int(sensor_size[2]) != 2:
        raise ValueError(f"expected tonic's sensor_size (width, height, 2), got {tuple(sensor_size)}: the event "
                         "models read two polarity channels")
    return int(sensor_size[1]), int(sensor_size[0])


class TonicFrames(Dataset):
    """A tonic data set as ``(frames (T, 2, H, W) float32, target)`` items, integrated by this project's rules.

    Args:
        dataset: items ``(events, target)``, events a tonic structured array (a tonic data set without
            ``transform``, or any object with ``__len__`` and ``__getitem__`` of that shape).
        time_steps: number of frames T.
        split_by: ``"number"`` (equal event counts, the authors') or ``"time"``; see
            :func:`~spikingformer.data.frames.integrate_frames`.
        sensor_size: tonic's ``(width, height, 2)``; default: ``dataset.sensor_size``.
        pad_to: None, or a side >= the sensor's: frames are zero-padded, centred, to ``(pad_to, pad_to)``.
        classes: class names; default: ``dataset.classes``. ``num_classes`` is their number.
        transform: applied to the frames tensor (e.g. :class:`~spikingformer.data.event_augment.EventAugment`).
        time_unit_us: see :func:`events_from_tonic`.
    """

    def __init__(self, dataset: Any, time_steps: int, split_by: str = "number", sensor_size: Sequence[int] | None = None,
                 pad_to: int | None = None, classes: Sequence[str] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None, time_unit_us: float = 1.0) -> None:
        check_time_steps(time_steps)
        if split_by not in ("number", "time"):
            raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")
        sensor_size = sensor_size if sensor_size is not None else getattr(dataset, "sensor_size", None)
        if sensor_size is None:
            raise ValueError("the data set has no sensor_size attribute: pass sensor_size=(width, height, 2)")
        self.sensor_size = sensor_height_width(sensor_size)
        h, w = self.sensor_size
        if pad_to is not None and pad_to < max(h, w):
            raise ValueError(f"pad_to must be >= the sensor's {h}x{w}, got {pad_to}")
        self.frame_size = (pad_to, pad_to) if pad_to is not None else (h, w)
        classes = classes if classes is not None else getattr(dataset, "classes", None)
        if classes is None:
            raise ValueError("the data set has no classes attribute: pass classes=[...] (their number sets num_classes)")
        self.classes = tuple(str(c) for c in classes)
        self.num_classes = len(self.classes)
        self.dataset, self.time_steps, self.split_by = dataset, time_steps, split_by
        self.transform, self.time_unit_us = transform, time_unit_us

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        events, target = self.dataset[i]
        h, w = self.sensor_size
        frames = integrate_frames(events_from_tonic(events, self.time_unit_us), self.time_steps, h, w, self.split_by)
        out = pad_frames(torch.from_numpy(frames), self.frame_size)
        if self.transform is not None:
            out = self.transform(out)
        return out, int(target)


def tonic_dataset(name: str, root: str, train: bool, time_steps: int, split_by: str, img_size: int,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TonicFrames:
    """``tonic.datasets.<Class>(save_to=root, train=train)`` as :class:`TonicFrames` for a recipe's
    ``dataset: tonic:<Class>``; frames smaller than ``img_size`` are zero-padded to it.

    The files must already be in tonic's layout under ``root``: where tonic would download them, a
    ``FileNotFoundError`` says so instead (nothing is downloaded at run time).
    """
    try:
        import tonic
    except ImportError as err:
        raise ValueError(f"dataset {name!r} needs the tonic package: pip install 'spikingformer[tonic]'") from err
    cls_name = name[len(TONIC_PREFIX):] if name.startswith(TONIC_PREFIX) else name
    cls = getattr(tonic.datasets, cls_name, None)
    if not inspect.isclass(cls):
        known = sorted(n for n in dir(tonic.datasets) if inspect.isclass(getattr(tonic.datasets, n)))
        raise ValueError(f"tonic has no data set {cls_name!r}; tonic.datasets has: {', '.join(known)}")
    if "train" not in inspect.signature(cls).parameters:
        raise ValueError(f"tonic.datasets.{cls_name} has no train/test split (no 'train' argument); wrap its "
                         "splits in TonicFrames from Python instead")
    h, w = sensor_height_width(cls.sensor_size)
    if max(h, w) > img_size:
        raise ValueError(f"tonic.datasets.{cls_name} frames are {h}x{w}, larger than the model's {img_size}x{img_size} "
                         "input; pick a model with --model-args '{img_size: N}' for N >= the sensor side")
    def refuse_download(self) -> None:
        raise FileNotFoundError(f"tonic.datasets.{cls_name}: its files are not in tonic's layout under {root} "
                                f"(tonic would download them now); put them there first, see docs/data.md")

    # the same name, as tonic keeps the files under save_to/<class name>
    offline = type(cls.__name__, (cls,), {"download": refuse_download})
    return TonicFrames(offline(save_to=root, train=train), time_steps, split_by, pad_to=img_size, transform=transform)
