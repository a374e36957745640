"""Digits DVS: scikit-learn's embedded 8x8 digits as emulated DVS recordings, integrated into frames."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from spikingformer.data.emulator import emulate_dvs_batch
from spikingformer.data.event_datasets import DIGIT_CLASSES, Transform
from spikingformer.data.frame_cache import compact_counts
from spikingformer.data.frames import check_time_steps, integrate_frames


class DigitsDVS(Dataset):
    """scikit-learn's handwritten digits (1,797 8x8 images, shipped with scikit-learn) as emulated DVS recordings.

    Each image (values 0..16) is scaled to [0, 1], upsampled bicubically to ``digit_size`` x ``digit_size``,
    contrast-stretched with ``clip((v - 0.3) / 0.4, 0, 1)`` (sharp strokes on black, as the MNIST digits that
    N-MNIST filmed; without it the blurry 8x8 gradients fire events all over the digit) and zero-padded
    (centred) to ``size`` x ``size``, then moved in three N-MNIST-like saccades by
    :func:`~spikingformer.data.emulator.emulate_dvs_batch` (amplitude ``amplitude`` px, 10 steps of 10 ms per
    saccade, threshold 0.25, eps 0.25, per-image seed ``(seed, image index)``), and the events are integrated
    into ``time_steps`` frames. Split: ``sklearn.model_selection.train_test_split(indices, test_size=0.2,
    random_state=0, stratify=labels)``, giving 1437 train / 360 test samples. All samples of the split are
    computed at construction and held in memory as uint8/uint16 counts.

    Args:
        train: train (True) or test split.
        time_steps: number of frames T.
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

    def __init__(self, train: bool = True, time_steps: int = 16, split_by: str = "number", size: int = 32,
                 digit_size: int | None = None, amplitude: float = 2.0, seed: int = 0,
                 transform: Transform | None = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        check_time_steps(time_steps)
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
        frames = np.stack([integrate_frames(ev, time_steps, size, size, split_by) for ev in events]) if len(idx) else \
            np.zeros((0, time_steps, 2, size, size), np.float32)
        self.frames = torch.from_numpy(compact_counts(frames))
        self.targets = labels[idx].tolist()
        self.indices = idx
        self.train = train
        self.time_steps = time_steps
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


__all__ = ["DigitsDVS"]
