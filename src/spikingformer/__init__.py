"""spikingformer: spike-driven transformers (Spikingformer, Spikformer) in PyTorch.

``import spikingformer`` itself is light: the names below load their modules (and PyTorch) on first
use, which keeps the ``spikingformer`` command's ``--help`` and argument errors fast. The zoo models
are registered with timm as soon as both this package and timm are imported, in either order, so
``timm.create_model(name)`` works for every zoo model after ``import spikingformer``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "spikingformer.models",
    "SpikingTransformer": "spikingformer.models",
    "create_model": "spikingformer.models",
    "list_models": "spikingformer.models",
    "load_weights": "spikingformer.models",
    "register_with_timm": "spikingformer.models",
    "LIFParams": "spikingformer.neuron",
    "MultiStepLIF": "spikingformer.neuron",
    "lif_reference": "spikingformer.neuron",
    "multistep_lif": "spikingformer.neuron",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def _lazy_exports(package: str, exports: dict[str, str]):
    """PEP 562 ``__getattr__`` and ``__dir__`` for a package whose names live in heavier modules.

    ``exports`` maps each public name to the module defining it; submodules are reachable as
    attributes too (``spikingformer.models``), as they would be after an eager import.
    """

    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: once timm has finished importing, import :mod:`spikingformer.models`, which
    registers the zoo with timm (see :func:`spikingformer.models.register_with_timm`)."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)  # one use; also keeps the look-up below from finding this hook
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        importlib.import_module("spikingformer.models")


if "timm" in sys.modules:
    importlib.import_module("spikingformer.models")
elif not any(isinstance(finder, _RegisterWhenTimmLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
