"""Whether a tensor holds only finite values, in one read where it does.

``torch.isfinite(x).all()`` writes a bool per value and reduces them (3.7 ms for an event batch of
8 x 16 x 2 x 128 x 128 values on 2 threads); the sum of the values is NaN or infinite whenever one
of them is (0.12 ms). Only where the sum is not finite are the values looked at one by one, so
finite values whose sum overflows count as finite.
"""

from __future__ import annotations

import torch


def all_finite(x: torch.Tensor) -> bool:
    """No NaN and no infinity in ``x`` (16-bit values summed in float32, which 65504 ones would overflow
    in float16); ``True`` for a tensor that is not floating point."""
    if not x.is_floating_point():
        return True
    return bool(torch.isfinite(x.sum(dtype=torch.float32 if x.element_size() < 4 else None))) or \
        bool(torch.isfinite(x).all())
