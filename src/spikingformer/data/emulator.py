"""A small DVS emulator: turn static grayscale images into event streams by moving them in saccades.

N-MNIST (Orchard et al. 2015) was recorded by a DVS/ATIS sensor on a pan-tilt unit that made three short
straight saccades forming a triangle in front of a static MNIST digit on a monitor. :func:`emulate_dvs` mimics
that: it renders the image at sub-pixel shifts along a trajectory (bilinear interpolation, zero outside the
image), converts each rendering to log intensity ``L = log(I + eps)`` and, per pixel, compares ``L`` with a
stored reference level. Whenever ``L - ref`` reaches ``+k * theta`` it emits k ON events (p=1), whenever it
reaches ``-k * theta`` k OFF events (p=0), and moves the reference by ``+-k * theta``. Each event gets the time
at which the linearly interpolated log intensity crosses its level within the step, so several events of one
pixel in one step are spread over the step. ``theta`` has a per-pixel mismatch (Gaussian, ``threshold_sigma``
relative), drawn from ``numpy.random.default_rng(seed)``: the output is a deterministic function of the inputs
and the seed. A static image (zero motion) gives no events.

Everything is vectorised over pixels and over a batch of images; the only Python loop runs over the time steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from spikingformer.data.events import EVENT_DTYPE, make_events


def saccade_path(amplitude: float = 2.0, steps_per_saccade: int = 10) -> np.ndarray:
    """Positions (dx, dy) in pixels of the three N-MNIST-like saccades forming a triangle.

    The image moves from (0, 0) to (amplitude / 2, amplitude) (down-right), then to (amplitude, 0) (up-right),
    then back to (0, 0) (left), each leg in ``steps_per_saccade`` equal steps.

    Returns:
        float64 array of shape (3 * steps_per_saccade + 1, 2); row 0 is the start (0, 0).
    """
    if steps_per_saccade < 1:
        raise ValueError(f"steps_per_saccade must be >= 1, got {steps_per_saccade}")
    vertices = np.array([[0.0, 0.0], [amplitude / 2, amplitude], [amplitude, 0.0], [0.0, 0.0]])
    frac = np.arange(1, steps_per_saccade + 1) / steps_per_saccade
    legs = [vertices[k] + frac[:, None] * (vertices[k + 1] - vertices[k]) for k in range(3)]
    return np.concatenate([vertices[:1]] + legs, axis=0)


def _shift_axis(img: np.ndarray, shift: float, axis: int) -> np.ndarray:
    """Shift ``img`` (B, H, W) by ``shift`` pixels along ``axis`` (1 or 2), bilinear, zeros enter at the edge.

    out[..., i, ...] = img(i - shift) with linear interpolation between the two nearest samples.
    """
    if shift == 0.0:
        return img
    n = img.shape[axis]
    pad = int(math.ceil(abs(shift))) + 1
    widths = [(0, 0)] * img.ndim
    widths[axis] = (pad, pad)
    padded = np.pad(img, widths)
    src = -shift  # out[i] = img[i + src]
    f0 = int(math.floor(src))
    a = src - f0
    lo = [slice(None)] * img.ndim
    hi = [slice(None)] * img.ndim
    lo[axis] = slice(pad + f0, pad + f0 + n)
    hi[axis] = slice(pad + f0 + 1, pad + f0 + 1 + n)
    w0, w1 = img.dtype.type(1.0 - a), img.dtype.type(a)
    return w0 * padded[tuple(lo)] + w1 * padded[tuple(hi)]


def render_shifted(images: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Render ``images`` (B, H, W) translated by (dx, dy) pixels (x right, y down), bilinear, zero fill.

    Returns:
        float32 array of shape (B, H, W).
    """
    out = _shift_axis(np.asarray(images, dtype=np.float32), float(dx), axis=2)
    return _shift_axis(out, float(dy), axis=1)


def emulate_dvs_batch(images: np.ndarray, *, threshold: float = 0.25, threshold_sigma: float = 0.03,
                      eps: float = 0.25, path: np.ndarray | None = None, amplitude: float = 2.0,
                      steps_per_saccade: int = 10, step_us: int = 10_000,
                      seed: int | Sequence[int | Sequence[int]] = 0) -> list[np.ndarray]:
    """Emulate a DVS watching each image of a batch move along ``path``; see :func:`emulate_dvs`.

    Args:
        images: float array (B, H, W) with intensities in [0, 1].
        seed: an int: the threshold mismatch of the whole batch is drawn as one (B, H, W) block from
            ``default_rng(seed)`` (so image b's events depend on the seed and on b); or a sequence of B seeds
            (each an int or a tuple of ints): image b uses ``default_rng(seed[b])`` and its events do not depend
            on the rest of the batch.
        (the other arguments as in :func:`emulate_dvs`).

    Returns:
        A list of B event arrays (dtype :data:`~spikingformer.data.events.EVENT_DTYPE`), each sorted by time
        (ties in row-major pixel order), with x in [0, W) and y in [0, H).
    """
    imgs = np.asarray(images, dtype=np.float32)
    if imgs.ndim != 3:
        raise ValueError(f"images must have shape (B, H, W), got {imgs.shape}")
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (log(I + eps) must be finite), got {eps}")
    if path is None:
        path = saccade_path(amplitude, steps_per_saccade)
    path = np.asarray(path, dtype=np.float64)
    if path.ndim != 2 or path.shape[1] != 2 or path.shape[0] < 1:
        raise ValueError(f"path must have shape (K, 2) of (dx, dy) positions, got {path.shape}")
    B, H, W = imgs.shape
    if isinstance(seed, (int, np.integer)):
        noise = np.random.default_rng(int(seed)).standard_normal((B, H, W))
    else:
        if len(seed) != B:
            raise ValueError(f"seed: expected an int or {B} per-image seeds, got {len(seed)}")
        noise = np.stack([np.random.default_rng(s).standard_normal((H, W)) for s in seed]) if B else \
            np.zeros((0, H, W))
    theta = threshold * (1.0 + threshold_sigma * noise)
    theta = np.maximum(theta, 0.1 * threshold).astype(np.float32)
    eps32 = np.float32(eps)

    ref = np.log(render_shifted(imgs, *path[0]) + eps32)
    prev = ref.copy()
    t_parts: list[np.ndarray] = []
    flat_parts: list[np.ndarray] = []
    p_parts: list[np.ndarray] = []
    for k in range(1, path.shape[0]):
        cur = np.log(render_shifted(imgs, *path[k]) + eps32)
        diff = cur - ref
        n_ev = (np.abs(diff) / theta).astype(np.int64)  # floor of a non-negative ratio
        hit = np.flatnonzero(n_ev)
        if hit.size:
            counts = n_ev.reshape(-1)[hit]
            pix = np.repeat(hit, counts)
            # crossing number (1-based) of each event within its pixel
            first = np.cumsum(counts) - counts
            i = np.arange(pix.size) - np.repeat(first, counts) + 1
            sign = np.sign(diff.reshape(-1)[pix]).astype(np.float64)
            th = theta.reshape(-1)[pix].astype(np.float64)
            ref_p = ref.reshape(-1)[pix].astype(np.float64)
            prev_p = prev.reshape(-1)[pix].astype(np.float64)
            cur_p = cur.reshape(-1)[pix].astype(np.float64)
            level = ref_p + sign * i * th
            span = cur_p - prev_p
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.where(span != 0, (level - prev_p) / span, 1.0)
            frac = np.clip(frac, 0.0, 1.0)
            t_ev = np.round(((k - 1) + frac) * step_us).astype(np.int64)
            t_parts.append(t_ev)
            flat_parts.append(pix)
            p_parts.append((sign > 0).astype(np.uint8))
            ref.reshape(-1)[hit] += np.sign(diff.reshape(-1)[hit]) * counts * theta.reshape(-1)[hit]
        prev = cur

    if t_parts:
        t_all = np.concatenate(t_parts)
        flat_all = np.concatenate(flat_parts)
        p_all = np.concatenate(p_parts)
    else:
        t_all = np.zeros(0, np.int64)
        flat_all = np.zeros(0, np.int64)
        p_all = np.zeros(0, np.uint8)
    b_all = flat_all // (H * W)
    order = np.lexsort((flat_all, t_all, b_all))
    t_all, flat_all, p_all, b_all = t_all[order], flat_all[order], p_all[order], b_all[order]
    rem = flat_all % (H * W)
    ev = make_events(t_all, rem % W, rem // W, p_all)
    bounds = np.searchsorted(b_all, np.arange(1, B))
    return list(np.split(ev, bounds))


def emulate_dvs(image: np.ndarray, *, threshold: float = 0.25, threshold_sigma: float = 0.03, eps: float = 0.25,
                path: np.ndarray | None = None, amplitude: float = 2.0, steps_per_saccade: int = 10,
                step_us: int = 10_000, seed: int = 0) -> np.ndarray:
    """Turn a static grayscale image into DVS events by moving it in saccades (see the module docstring).

    Args:
        image: float array (H, W), intensities in [0, 1].
        threshold: contrast threshold theta in log-intensity units.
        threshold_sigma: relative standard deviation of the per-pixel threshold mismatch (0 disables it).
        eps: offset in ``log(I + eps)``; bounds the log contrast of black regions.
        path: (K, 2) array of image positions (dx, dy) in pixels at times 0, step_us, ..., (K-1)*step_us;
            default :func:`saccade_path` ``(amplitude, steps_per_saccade)``: three saccades forming a triangle.
            A path of identical positions (or amplitude=0) gives no events.
        amplitude: saccade size in pixels (default path only).
        steps_per_saccade: time steps per saccade (default path only).
        step_us: duration of one time step in microseconds (default 10 ms, so the default path lasts 300 ms like
            an N-MNIST recording).
        seed: seed of the threshold mismatch.

    Returns:
        Events (dtype :data:`~spikingformer.data.events.EVENT_DTYPE`), shape (N,), sorted by time, with x in
        [0, W), y in [0, H), p = 1 for ON (brighter) and 0 for OFF (darker), t in [0, (K-1) * step_us].
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must have shape (H, W), got {img.shape}")
    return emulate_dvs_batch(img[None], threshold=threshold, threshold_sigma=threshold_sigma, eps=eps, path=path,
                             amplitude=amplitude, steps_per_saccade=steps_per_saccade, step_us=step_us,
                             seed=seed)[0]


__all__ = ["saccade_path", "render_shifted", "emulate_dvs", "emulate_dvs_batch", "EVENT_DTYPE"]
