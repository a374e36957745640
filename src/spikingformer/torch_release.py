"""The PyTorch releases ``spikingformer`` works with.

The package registers its kernels as PyTorch operators (``torch.library.custom_op``) with
signatures that PyTorch 2.6 and older refuse (``list[bool]`` and postponed annotations), so it
cannot import there. :data:`OLDEST` is the oldest release whose test suite passed
(docs/reliability.md, "PyTorch releases"); ``pyproject.toml`` asks pip for it, and
:func:`check` turns an older PyTorch (installed another way) into one error that names the fix.
"""

from __future__ import annotations

import re

OLDEST = (2, 8)


def check(version: str) -> None:
    """Raise ``ImportError`` naming the fix where ``version`` (``torch.__version__``) is older than
    :data:`OLDEST`; a version string that is not ``major.minor...`` passes (a source build's)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) >= OLDEST:
        return
    oldest = ".".join(map(str, OLDEST))
    raise ImportError(f"spikingformer needs PyTorch {oldest} or newer, found {version}: older releases cannot "
                      f"register its operators. Install a newer one: pip install 'torch>={oldest}' (tested: "
                      "torch==2.14.1 torchvision==0.29.1)")
