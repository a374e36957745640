"""The Spikingformer authors' augmentation of event frames (``cifar10-dvs/train.py`` + ``autoaugment.py``).

Per sample, on a ``(T, 2, H, W)`` tensor, with the same random op applied to all T frames:

1. ``RandomHorizontalFlip(0.5)``;
2. ``SNNAugmentWide``: one op drawn uniformly from Identity, ShearX, TranslateX, TranslateY, Rotate, Cutout,
   with a magnitude drawn from 31 bins and a random sign:

   * ShearX: ``linspace(-0.3, 0.3, 31)`` rad, applied as ``affine(shear=[degrees(m), 0])``;
   * TranslateX / TranslateY: ``linspace(-5, 5, 31)`` px, truncated with ``int()``;
   * Rotate: ``linspace(-30, 30, 31)`` degrees;
   * Cutout: ``RandomErasing(p=1, scale=(0.001, 0.11), ratio=(1, 1), value=0)`` (same square for all T, C).

   Interpolation NEAREST, fill 0. Mixup (the authors' third step) is done by the training loop (timm).

Works on CPU and CUDA tensors, for single samples ``(T, 2, H, W)`` (call it per sample of a batch).
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

OPS: tuple[str, ...] = ("Identity", "ShearX", "TranslateX", "TranslateY", "Rotate", "Cutout")


def _magnitude_bins(num_bins: int) -> dict[str, tuple[torch.Tensor, bool]]:
    return {
        "Identity": (torch.tensor(0.0), False),
        "ShearX": (torch.linspace(-0.3, 0.3, num_bins), True),
        "TranslateX": (torch.linspace(-5.0, 5.0, num_bins), True),
        "TranslateY": (torch.linspace(-5.0, 5.0, num_bins), True),
        "Rotate": (torch.linspace(-30.0, 30.0, num_bins), True),
        "Cutout": (torch.linspace(1.0, 30.0, num_bins), True),  # magnitude unused, as in the authors' code
    }


def _erase_params(h_img: int, w_img: int, scale: tuple[float, float], ratio: tuple[float, float],
                  generator: torch.Generator | None) -> tuple[int, int, int, int] | None:
    """torchvision ``RandomErasing.get_params`` (10 attempts), drawing from ``generator``. None: no erase."""
    area = h_img * w_img
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        erase_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                  generator=generator).item())
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < h_img and w < w_img):
            continue
        i = int(torch.randint(0, h_img - h + 1, (1,), generator=generator).item())
        j = int(torch.randint(0, w_img - w + 1, (1,), generator=generator).item())
        return i, j, h, w
    return None


def apply_op(frames: torch.Tensor, op: str, magnitude: float, generator: torch.Generator | None = None,
             cutout_scale: tuple[float, float] = (0.001, 0.11)) -> torch.Tensor:
    """Apply one named op of :data:`OPS` with a signed magnitude to frames ``(..., H, W)`` (all leading dims alike).

    Returns:
        A new tensor of the same shape and dtype.
    """
    nearest = InterpolationMode.NEAREST
    if op == "Identity":
        return frames
    if op == "ShearX":
        return F.affine(frames, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(magnitude), 0.0],
                        interpolation=nearest, fill=0.0)
    if op == "TranslateX":
        return F.affine(frames, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                        interpolation=nearest, fill=0.0)
    if op == "TranslateY":
        return F.affine(frames, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                        interpolation=nearest, fill=0.0)
    if op == "Rotate":
        return F.rotate(frames, magnitude, interpolation=nearest, fill=0.0)
    if op == "Cutout":
        params = _erase_params(frames.shape[-2], frames.shape[-1], cutout_scale, (1.0, 1.0), generator)
        if params is None:
            return frames
        i, j, h, w = params
        out = frames.clone()
        out[..., i:i + h, j:j + w] = 0
        return out
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


class EventAugment:
    """The authors' DVS augmentation: horizontal flip (p=0.5), then one SNNAugmentWide op (see the module doc).

    Args:
        flip_p: probability of the horizontal flip (0.5 in the authors' code).
        num_magnitude_bins: 31 in the authors' code.
        generator: optional ``torch.Generator`` (CPU) for reproducible draws; default the global torch RNG.

    Call it on one sample, a tensor of shape (T, 2, H, W) (any float dtype, any device); returns a tensor of the
    same shape. The same flip and op apply to all T frames and both polarities.
    """

    def __init__(self, flip_p: float = 0.5, num_magnitude_bins: int = 31,
                 generator: torch.Generator | None = None) -> None:
        self.flip_p = flip_p
        self.num_magnitude_bins = num_magnitude_bins
        self.generator = generator
        self._space = _magnitude_bins(num_magnitude_bins)

    def sample_op(self) -> tuple[str, float]:
        """Draw (op name, signed magnitude) as SNNAugmentWide does."""
        g = self.generator
        op = OPS[int(torch.randint(len(OPS), (1,), generator=g).item())]
        mags, signed = self._space[op]
        mag = float(mags[int(torch.randint(len(mags), (1,), generator=g).item())].item()) if mags.ndim > 0 else 0.0
        if signed and int(torch.randint(2, (1,), generator=g).item()):
            mag = -mag
        return op, mag

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4:
            raise ValueError(f"EventAugment expects one sample of shape (T, 2, H, W), got {tuple(frames.shape)}")
        if torch.rand(1, generator=self.generator).item() < self.flip_p:
            frames = frames.flip(-1)
        op, mag = self.sample_op()
        return apply_op(frames, op, mag, generator=self.generator)

    def __repr__(self) -> str:
        return f"EventAugment(flip_p={self.flip_p}, num_magnitude_bins={self.num_magnitude_bins}, ops={OPS})"


__all__ = ["EventAugment", "apply_op", "OPS"]
