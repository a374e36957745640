"""Integration of events into frames, as the event models read them.

:func:`integrate_frames_by_count` (SpikingJelly's ``integrate_events_by_fixed_frames_number`` with
``split_by='number'``, as used by the Spikingformer authors) and :func:`integrate_frames_by_time`
(``split_by='time'``); :func:`integrate_frames` picks one by name. All return float32
``(time_steps, 2, H, W)`` per-pixel event counts, channel 0 holding the p=0 events and channel 1 the p=1
events. :func:`pad_frames` zero-pads frames, centred, to a model's input size.
"""

from __future__ import annotations

import numpy as np
import torch

def check_time_steps(time_steps: int) -> None:
    """Raise ``ValueError`` unless ``time_steps`` is an integer >= 1."""
    if isinstance(time_steps, bool) or not isinstance(time_steps, (int, np.integer)) or time_steps < 1:
        raise ValueError(f"time_steps must be an integer >= 1, got {time_steps!r}")


def _check_frame_args(events: np.ndarray, time_steps: int, height: int, width: int) -> None:
    check_time_steps(time_steps)
    if events.size == 0:
        return
    x, y, p = events["x"], events["y"], events["p"]
    if x.min() < 0 or y.min() < 0 or x.max() >= width or y.max() >= height:
        raise ValueError(
            f"event coordinates out of the {height}x{width} frame: x in [{x.min()}, {x.max()}], "
            f"y in [{y.min()}, {y.max()}]; pass the sensor's height and width (e.g. 128x128 for DVS128, 34x34 for "
            f"N-MNIST)")
    if p.max() > 1:
        raise ValueError(f"polarities must be 0 or 1, found {p.max()}")


def _accumulate(events: np.ndarray, frame_idx: np.ndarray, time_steps: int, height: int, width: int) -> np.ndarray:
    plane = height * width
    flat = (frame_idx.astype(np.int64) * (2 * plane) + events["p"].astype(np.int64) * plane
            + events["y"].astype(np.int64) * width + events["x"].astype(np.int64))
    counts = np.bincount(flat, minlength=time_steps * 2 * plane)
    return counts.astype(np.float32).reshape(time_steps, 2, height, width)


def integrate_frames_by_count(events: np.ndarray, time_steps: int, height: int, width: int) -> np.ndarray:
    """Integrate events into T = ``time_steps`` frames holding equal numbers of events (SpikingJelly
    ``split_by='number'``).

    Exactly ``integrate_events_by_fixed_frames_number(events, 'number', T, H, W)`` of SpikingJelly: with N
    events in their given order and di = N // T, frame j < T-1 takes events [j*di, (j+1)*di) and the last frame
    takes [(T-1)*di, N) (so it also gets the N mod T remainder; when N < T all events land in the last frame).
    ``frame[j, p, y, x]`` is the number of events of polarity p at pixel (x, y) in slice j.

    Args:
        events: dtype :data:`~spikingformer.data.events.EVENT_DTYPE`, shape (N,).
        time_steps: number of frames T.
        height, width: frame size (the sensor size).

    Returns:
        float32 array of shape (T, 2, height, width) of event counts.
    """
    _check_frame_args(events, time_steps, height, width)
    n = events.size
    di = n // time_steps
    if di == 0:
        idx = np.full(n, time_steps - 1, dtype=np.int64)
    else:
        idx = np.minimum(np.arange(n, dtype=np.int64) // di, time_steps - 1)
    return _accumulate(events, idx, time_steps, height, width)


def integrate_frames_by_time(events: np.ndarray, time_steps: int, height: int, width: int) -> np.ndarray:
    """Integrate events into T = ``time_steps`` frames of equal duration (SpikingJelly ``split_by='time'``
    semantics).

    With t0 = t[0] and t1 = t[-1] (first and last event in the given order, which for a time-sorted stream
    are the earliest and latest) and dt = (t1 - t0) // T (integer microseconds, as in SpikingJelly), frame
    j < T-1 holds the events with t0 + j*dt <= t < t0 + (j+1)*dt (left-inclusive, right-exclusive) and the
    last frame holds every event with t >= t0 + (T-1)*dt, so t1 and the rounding remainder of the last
    window are included. This equals SpikingJelly for time-sorted streams, except that a window without
    events gives an all-zero frame here where SpikingJelly raises IndexError. When dt == 0 (duration shorter
    than T us) every event lands in the last frame, the same rule as :func:`integrate_frames_by_count` for
    N < T. Events earlier than t[0] (unsorted input) are counted in frame 0.

    Args:
        events: dtype :data:`~spikingformer.data.events.EVENT_DTYPE`, shape (N,).
        time_steps: number of frames T.
        height, width: frame size.

    Returns:
        float32 array of shape (T, 2, height, width) of event counts.
    """
    _check_frame_args(events, time_steps, height, width)
    n = events.size
    if n == 0:
        return np.zeros((time_steps, 2, height, width), np.float32)
    t = events["t"].astype(np.int64)
    t0 = int(t[0])
    dt = (int(t[-1]) - t0) // time_steps
    if dt <= 0:
        idx = np.full(n, time_steps - 1, dtype=np.int64)
    else:
        idx = np.clip((t - t0) // dt, 0, time_steps - 1)
    return _accumulate(events, idx, time_steps, height, width)


def integrate_frames(events: np.ndarray, time_steps: int, height: int, width: int,
                     split_by: str = "number") -> np.ndarray:
    """Dispatch to :func:`integrate_frames_by_count` (``split_by='number'``) or
    :func:`integrate_frames_by_time` (``split_by='time'``). Returns float32 (time_steps, 2, height, width)."""
    if split_by == "number":
        return integrate_frames_by_count(events, time_steps, height, width)
    if split_by == "time":
        return integrate_frames_by_time(events, time_steps, height, width)
    raise ValueError(f"split_by must be 'number' or 'time', got {split_by!r}")


def pad_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad (T, 2, h, w) frames to (T, 2, *size), centred (the extra pixel of an odd margin goes last)."""
    h, w = frames.shape[-2:]
    H, W = size
    if (H, W) == (h, w):
        return frames
    top, left = (H - h) // 2, (W - w) // 2
    return torch.nn.functional.pad(frames, (left, W - w - left, top, H - h - top))


__all__ = ["check_time_steps", "integrate_frames_by_count", "integrate_frames_by_time", "integrate_frames", "pad_frames"]
