"""Named model configurations (the paper's model zoo), their registration with timm, and the
builder of models with weights from checkpoint files.

Names follow ``{arch}_{dataset}_{depth}_{dim}`` (ImageNet models drop the data set, as in the
paper: ``spikingformer_8_512``). ``create_model(name, **overrides)`` builds one; any field of
:class:`~spikingformer.models.transformer.ModelConfig` can be overridden.

Weights come from files read by :mod:`spikingformer.checkpoints`; the key names of the authors'
checkpoints are translated here, openly, by :func:`load_weights`
(:func:`~spikingformer.models.authors.authors_to_native`): the model accepts only its own names.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

from torch import nn

from spikingformer import checkpoints
from spikingformer.deploy.fuse import fuse_structure, is_fused
from spikingformer.models.authors import authors_to_native, is_authors_state_dict
from spikingformer.models.transformer import ModelConfig, SpikingTransformer
from spikingformer.suggest import unknown_name

# Paper parameter counts, millions, for the zoo table and the tests.
PAPER_PARAMS_M = {
    "cifar10_4_256": 4.15,
    "cifar10_2_384": 5.76,
    "cifar10_4_384": 9.32,
    "8_384": 16.81,
    "8_512": 29.68,
    "8_768": 66.34,
    "cifar10dvs_2_256": 2.57,
    "dvs128_2_256": 2.57,
}

_FAMILY = {
    "cifar": dict(family="cifar", img_size=32, in_channels=3, downsample=4, time_steps=4),
    "imagenet": dict(family="imagenet", img_size=224, in_channels=3, downsample=16, time_steps=4, num_classes=1000),
    "event": dict(family="event", img_size=128, in_channels=2, downsample=16, time_steps=16, num_heads=16),
    "digits": dict(family="digits", img_size=16, in_channels=1, downsample=4, time_steps=4, num_classes=10),
}

# Differences of the baseline from Spikingformer in the authors' code.
_SPIKFORMER = {
    "cifar": dict(qkv_bias=True, trunc_normal_pointwise=True),  # Linear q/k/v with bias, ViT init
    "event": dict(tau=2.0, attn_scale=0.25),
}
_SPIKINGFORMER = {"event": dict(tau=1.5)}


def _cifar(arch: str, classes: int, depth: int, dim: int, heads: int) -> dict:
    # The authors' CIFAR-10 4-384 used 12 heads, CIFAR-100 8 (256 is not divisible by 12).
    extra = _SPIKFORMER if arch == "spikformer" else _SPIKINGFORMER
    return dict(_FAMILY["cifar"], **extra.get("cifar", {}), arch=arch, depth=depth, embed_dim=dim,
                num_heads=heads, num_classes=classes)


def _imagenet(arch: str, depth: int, dim: int) -> dict:
    return dict(_FAMILY["imagenet"], arch=arch, depth=depth, embed_dim=dim, num_heads=8)


def _event(arch: str, classes: int, **size) -> dict:
    extra = _SPIKFORMER if arch == "spikformer" else _SPIKINGFORMER
    return dict(_FAMILY["event"], **extra.get("event", {}), arch=arch, num_classes=classes, **size)


def _digits(arch: str) -> dict:
    return dict(_FAMILY["digits"], arch=arch, depth=1, embed_dim=64, num_heads=4)


# Small event models for the offline neuromorphic data: the embedded digits_dvs (32x32) and
# N-MNIST (34x34 zero-padded to 48x48); x8 downsampling keeps 16 and 36 tokens.
_SMALL_EVENT = dict(downsample=8, time_steps=8)

ZOO: dict[str, dict] = {
    # CIFAR-10 / CIFAR-100 (paper Table 2)
    "spikingformer_cifar10_4_256": _cifar("spikingformer", 10, 4, 256, heads=8),
    "spikingformer_cifar10_2_384": _cifar("spikingformer", 10, 2, 384, heads=12),
    "spikingformer_cifar10_4_384": _cifar("spikingformer", 10, 4, 384, heads=12),
    "spikingformer_cifar100_4_256": _cifar("spikingformer", 100, 4, 256, heads=8),
    "spikingformer_cifar100_2_384": _cifar("spikingformer", 100, 2, 384, heads=8),
    "spikingformer_cifar100_4_384": _cifar("spikingformer", 100, 4, 384, heads=8),
    # ImageNet-1k (paper Table 1)
    "spikingformer_8_384": _imagenet("spikingformer", 8, 384),
    "spikingformer_8_512": _imagenet("spikingformer", 8, 512),
    "spikingformer_8_768": _imagenet("spikingformer", 8, 768),
    # CIFAR10-DVS and DVS128 Gesture (paper Table 3)
    "spikingformer_cifar10dvs_2_256": _event("spikingformer", 10, depth=2, embed_dim=256),
    "spikingformer_dvs128_2_256": _event("spikingformer", 11, depth=2, embed_dim=256),
    # this project's offline models
    "spikingformer_digits": _digits("spikingformer"),
    "spikingformer_digits_dvs": _event("spikingformer", 10, **_SMALL_EVENT, img_size=32, depth=1, embed_dim=64, num_heads=4),
    "spikingformer_nmnist": _event("spikingformer", 10, **_SMALL_EVENT, img_size=48, depth=2, embed_dim=128, num_heads=8),
    # the Spikformer baseline at the same sizes
    "spikformer_cifar10_4_256": _cifar("spikformer", 10, 4, 256, heads=8),
    "spikformer_cifar10_2_384": _cifar("spikformer", 10, 2, 384, heads=12),
    "spikformer_cifar10_4_384": _cifar("spikformer", 10, 4, 384, heads=12),
    "spikformer_cifar100_4_256": _cifar("spikformer", 100, 4, 256, heads=8),
    "spikformer_cifar100_2_384": _cifar("spikformer", 100, 2, 384, heads=8),
    "spikformer_cifar100_4_384": _cifar("spikformer", 100, 4, 384, heads=8),
    "spikformer_8_384": _imagenet("spikformer", 8, 384),
    "spikformer_8_512": _imagenet("spikformer", 8, 512),
    "spikformer_8_768": _imagenet("spikformer", 8, 768),
    "spikformer_cifar10dvs_2_256": _event("spikformer", 10, depth=2, embed_dim=256),
    "spikformer_dvs128_2_256": _event("spikformer", 11, depth=2, embed_dim=256),
    "spikformer_digits": _digits("spikformer"),
    "spikformer_digits_dvs": _event("spikformer", 10, **_SMALL_EVENT, img_size=32, depth=1, embed_dim=64, num_heads=4),
    "spikformer_nmnist": _event("spikformer", 10, **_SMALL_EVENT, img_size=48, depth=2, embed_dim=128, num_heads=8),
}


def list_models(pattern: str = "*") -> list[str]:
    """Zoo model names matching a shell-style pattern (``"spikingformer_*"``)."""
    return sorted(n for n in ZOO if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a zoo entry with ``overrides`` applied."""
    if name not in ZOO:
        raise ValueError(unknown_name("model", name, ZOO))
    return ModelConfig.from_dict({**ZOO[name], **overrides})


def create_model(name: str, checkpoint_path: str | None = None, **overrides) -> SpikingTransformer:
    """Build a zoo model (``list_models()``), optionally loading weights from ``checkpoint_path``.

    The checkpoint may be this project's, or one written by the authors' code (any of their
    naming schemes and containers; see :func:`load_weights`).
    """
    model = SpikingTransformer(model_config(name, **overrides))
    if checkpoint_path:
        load_weights(model, checkpoint_path)
    return model


def load_weights(model: nn.Module, checkpoint: str | Path | object) -> nn.Module:
    """Load weights from a checkpoint file, its loaded contents or its :class:`~spikingformer.checkpoints.Checkpoint`.

    The authors' key names are translated (:func:`~spikingformer.models.authors.authors_to_native`);
    a file that records its model (this project's checkpoints and exports) must record the same
    configuration as ``model``: a different one raises ValueError naming the differing fields.
    """
    ckpt = checkpoints.read(checkpoint)
    state_dict = ckpt.state_dict
    if ckpt.describes_model and getattr(model, "config", None) is not None:
        _check_recorded_config(ckpt, model)
    elif not ckpt.describes_model and is_authors_state_dict(state_dict):
        state_dict = authors_to_native(state_dict, model)
    return checkpoints.load_matching(model, state_dict, ckpt)


_RUNTIME_FIELDS = ("lif_backend",)  # choices of how to compute, not part of the weights


def _check_recorded_config(ckpt: checkpoints.Checkpoint, model: nn.Module) -> None:
    recorded, mine = ckpt.model_config, model.config.to_dict()
    diff = {k: (recorded.get(k), v) for k, v in mine.items() if k not in _RUNTIME_FIELDS and recorded.get(k) != v}
    if diff:
        fields = ", ".join(f"{k}: {a!r} in the file, {b!r} here" for k, (a, b) in diff.items())
        raise ValueError(f"{ckpt.where} holds a model with another configuration ({fields}); build it with those values, "
                         "or rebuild it from the file with spikingformer.models.model_from_checkpoint(path)")
    if ckpt.fused and not is_fused(model):
        raise ValueError(f"{ckpt.where} holds a fused model (no BatchNorm); rebuild it with "
                         "spikingformer.models.model_from_checkpoint(path)")


def model_from_checkpoint(checkpoint: str | Path | checkpoints.Checkpoint, model_name: str | None = None,
                          **overrides) -> SpikingTransformer:
    """Rebuild a model with its weights from a checkpoint file (or its :class:`~spikingformer.checkpoints.Checkpoint`,
    when the caller has read it already, so the file is read once).

    This project's checkpoints (training, fused and exported ones) describe their model, so
    ``model_name`` is not needed (if given, it must agree). The authors' checkpoints (or bare
    state dicts) need ``model_name``, a zoo name, plus any ``overrides`` of its config.
    """
    ckpt = checkpoints.read(checkpoint)
    if not ckpt.describes_model:
        if not model_name:
            raise ValueError(f"{ckpt.where} is not a spikingformer checkpoint (it has no model description); name the "
                             "zoo model it belongs to, e.g. --model spikingformer_8_768")
        return load_weights(create_model(model_name, **overrides), ckpt)
    if model_name and ckpt.model_name and model_name != ckpt.model_name:
        raise ValueError(f"checkpoint {ckpt.where} holds a {ckpt.model_name} model, not {model_name}; drop --model or "
                         "pick the matching checkpoint")
    model = SpikingTransformer(ModelConfig.from_dict({**ckpt.model_config, **overrides}))
    if ckpt.fused:
        fuse_structure(model)
    return checkpoints.load_matching(model, ckpt.state_dict, ckpt)


def _timm_entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs) -> SpikingTransformer:
        file = _pretrained_file(kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
        kwargs.pop("cache_dir", None)
        if not pretrained:
            return create_model(name, **kwargs)
        if file is None:
            raise RuntimeError(
                f"no pretrained weights are bundled for {name} (the authors' checkpoints are not "
                "redistributable); train one with `spikingformer train`, then start from its file with "
                f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) (its head "
                "may have another number of classes: num_classes=N starts a fresh one) or load it whole with "
                "checkpoint_path=PATH"
            )
        from spikingformer.models.initial import load_initial_weights

        model = create_model(name, **kwargs)
        load_initial_weights(model, file, what="the pretrained file")
        return model

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {ZOO[name]}"
    return entrypoint


def _pretrained_file(cfg, overlay) -> str | None:
    """The ``file`` of timm's pretrained configuration (``pretrained_cfg_overlay=dict(file=PATH)``, timm's
    way to give local weights, or a ``pretrained_cfg`` dict or ``PretrainedCfg`` holding one)."""
    for source in (overlay, cfg):
        file = source.get("file") if isinstance(source, dict) else getattr(source, "file", None)
        if file:
            return str(file)
    return None


def register_with_timm() -> None:
    """Register every zoo model with timm, so ``timm.create_model(name)`` builds it (and its
    ``checkpoint_path=`` reads files as :func:`create_model` does); once per process."""
    from timm.models import register_model

    route_timm_checkpoints()

    module = sys.modules[__name__]
    if all(hasattr(module, name) for name in ZOO):
        return  # already registered
    for name in ZOO:
        fn = _timm_entrypoint(name)
        setattr(module, name, fn)
        register_model(fn)


def route_timm_checkpoints() -> None:
    """Make ``timm.create_model(name, checkpoint_path=PATH)`` read files for this package's models
    with :func:`load_weights` (safe reading, the authors' names translated, one-line errors,
    recorded-config check); other models keep timm's loader. timm offers no hook for this, so its
    factory's loader is wrapped once."""
    from timm.models import _factory

    original = _factory.load_checkpoint
    if getattr(original, "spikingformer_route", False):
        return

    def load_checkpoint(model, checkpoint_path, *args, **kwargs):
        if isinstance(model, SpikingTransformer) and not args and not kwargs:
            load_weights(model, checkpoint_path)
            return None
        return original(model, checkpoint_path, *args, **kwargs)

    load_checkpoint.spikingformer_route = True
    _factory.load_checkpoint = load_checkpoint
