"""The spiking vision transformer shared by Spikingformer and its baseline Spikformer.

``SpikingTransformer(ModelConfig(arch="spikingformer", ...))`` is the paper's model;
``arch="spikformer"`` is the baseline. They share every module and differ only in the residual
style (:class:`spikingformer.layers.ResidualStyle`).

Input convention (the API edge):

* static images ``(B, C, H, W)``: repeated over ``config.time_steps`` inside the model (direct
  encoding);
* event frames ``(B, T, C, H, W)`` (batch first, as DataLoaders give them): T comes from the data.

``B >= 1``; H and W multiples of ``config.downsample``; a floating-point tensor (another floating
dtype than the weights' is cast to it; integer tensors are refused, since uint8 images need the
training normalisation first). Every violation raises ``ValueError`` naming the expected input.

Non-finite input (NaN, inf) is not detected by ``forward``: a comparison with NaN never fires, so a
NaN image gives the finite logits of an all-zero image. :meth:`SpikingTransformer.check_input`
(and :func:`check_finite`) check it; the training and evaluation loops call it on every batch.

Output: logits ``(B, num_classes)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from spikingformer.kernels.finite import all_finite
from spikingformer.layers import (
    HEAD_KINDS,
    ClassificationHead,
    ResidualStyle,
    SpikingTokenizer,
    SpikingTransformerBlock,
    lif_factory,
)

ARCHS = {"spikingformer": ResidualStyle.SPIKE_DRIVEN, "spikformer": ResidualStyle.SEW_ADD}


class NonFiniteInputError(ValueError):
    """An input tensor holds NaN or infinite values (the message says where)."""


def check_finite(x: torch.Tensor, what: str = "input", names=None) -> None:
    """Raise :class:`NonFiniteInputError` if ``x`` holds a NaN or an infinity.

    One sum over ``x`` where it is finite (:func:`~spikingformer.kernels.finite.all_finite`); only
    when it fails are the offending samples (rows of the first dimension) located for the message,
    which calls ``x`` ``what`` and, given ``names`` (a function of the list of bad rows), names their
    files.
    """
    if all_finite(x):
        return
    bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist() if x.dim() > 1 else []
    files = names(bad[:8]) if (names is not None and bad) else []
    listed = ", ".join(f"{r}: {f}" for r, f in zip(bad, files)) if files else ", ".join(map(str, bad[:8]))
    rows = f" (samples {listed}{' ...' if len(bad) > 8 else ''} of the batch)" if bad else ""
    raise NonFiniteInputError(
        f"{what} holds NaN or infinite values{rows}: the model would give confident logits for it (a NaN "
        f"never makes a neuron fire); fix or drop those samples"
    )


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved inside every checkpoint."""

    arch: str = "spikingformer"  # "spikingformer" or "spikformer"
    img_size: int = 32  # square input side (any multiple of `downsample` works)
    in_channels: int = 3  # 3 for images, 2 for event frames (ON/OFF counts)
    num_classes: int = 10
    embed_dim: int = 384
    depth: int = 4
    num_heads: int = 12
    mlp_ratio: float = 4.0
    time_steps: int = 4  # T for static images; event data brings its own T
    downsample: int = 4  # tokenizer stride: 4 (CIFAR: 2 SPE + 2 SPED) or 16 (ImageNet, events: 4 SPED)
    tau: float = 2.0  # LIF time constant (1.5 in the authors' event models)
    attn_threshold: float = 0.5
    attn_scale: float = 0.125
    qkv_bias: bool = False
    head: str = "avgpool_fc"  # paper Eq. 14-17, see ClassificationHead
    lif_backend: str = "auto"
    trunc_normal_pointwise: bool = False  # Spikformer-CIFAR inits its Linear q/k/v/proj/fc like timm ViTs
    family: str = field(default="cifar")  # "cifar", "imagenet", "event", "digits": documentation and data defaults

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head {self.head!r}; valid heads: {', '.join(HEAD_KINDS)}")
        pools = math.log2(self.downsample) if self.downsample > 0 else -1
        if pools != int(pools) or not 0 <= pools <= 4:
            raise ValueError(f"downsample must be 1, 2, 4, 8 or 16 (one per max-pool), got {self.downsample}")
        if self.img_size % self.downsample:
            raise ValueError(f"img_size {self.img_size} is not divisible by the tokenizer stride {self.downsample}")
        if self.time_steps < 1:
            raise ValueError(f"time_steps must be >= 1, got {self.time_steps}")

    @property
    def num_pools(self) -> int:
        return int(math.log2(self.downsample))

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.downsample) ** 2

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown model option(s) {', '.join(unknown)}; valid options: {', '.join(cls.field_names())}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SpikingTransformer(nn.Module):
    """Spikingformer / Spikformer: Spiking Tokenizer -> L Spiking Transformer Blocks -> head."""

    ENCODING_LAYER = "tokenizer.stages.0.conv"  # reads the image or event counts (paper Eq. 19: FLOP_Conv^1)

    def real_input_layers(self) -> tuple[str, ...]:
        """The synaptic layers that read real values by design, not spikes: the encoding conv, and
        the FC of a head without SN (Eq. 14, 16: it reads the real-valued residual stream)."""
        return (self.ENCODING_LAYER,) + (() if self.config.head.startswith("sn_") else ("head.fc",))

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        style = ARCHS[config.arch]
        lif = lif_factory(config.tau, config.lif_backend)
        self.tokenizer = SpikingTokenizer(config.in_channels, config.embed_dim, config.num_pools, style, lif)
        self.blocks = nn.ModuleList(
            SpikingTransformerBlock(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                style,
                lif,
                config.qkv_bias,
                config.attn_threshold,
                config.attn_scale,
            )
            for _ in range(config.depth)
        )
        self.head = ClassificationHead(config.embed_dim, config.num_classes, config.head, lif)
        self.num_classes = config.num_classes
        self._init_weights()

    def _init_weights(self) -> None:
        """As the authors: trunc-normal(0.02) for Linear layers of the original code, PyTorch defaults elsewhere."""
        linears = [self.head.fc]
        if self.config.trunc_normal_pointwise:
            linears += [m for m in self.blocks.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` checked against the input convention (module docstring), cast to the weights' dtype."""
        c = self.config
        layouts = (f"static images (B, {c.in_channels}, H, W) or event frames (B, T, {c.in_channels}, H, W), "
                   f"H and W multiples of {c.downsample}")
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"expected a tensor of {layouts}, got {type(x).__name__}")
        if x.dim() not in (4, 5):
            hint = "add the batch dimension with x.unsqueeze(0) for a single sample"
            if c.in_channels == 1 and x.dim() == 2:  # one grey image (H, W)
                hint = "add the batch and channel dimensions with x[None, None] for a single grey image"
            elif c.in_channels == 1 and x.dim() == 3 and x.shape[0] != 1:  # most likely grey images (B, H, W)
                hint = f"add the channel dimension with x.unsqueeze(1) for a batch of grey images, or {hint[4:]}"
            raise ValueError(f"expected {layouts}; got shape {tuple(x.shape)} ({hint})")
        if x.shape[0] == 0 or (x.dim() == 5 and x.shape[1] == 0):
            raise ValueError(f"empty input of shape {tuple(x.shape)}: expected {layouts} with B >= 1 (and T >= 1)")
        channels, h, w = x.shape[-3:]
        if channels != c.in_channels:
            kind = "event frames (B, T, C, H, W)" if x.dim() == 5 else "images (B, C, H, W)"
            raise ValueError(f"model expects {c.in_channels} input channels, got {channels} (input shape "
                             f"{tuple(x.shape)} read as {kind}); expected {layouts}")
        if h % c.downsample or w % c.downsample or h == 0 or w == 0:
            raise ValueError(
                f"input size {h}x{w} must be a positive multiple of the tokenizer stride {c.downsample}; pad or "
                f"resize the input"
            )
        dtype = next(self.parameters()).dtype  # the weights' (any layer: deployment may wrap the stem)
        if not x.is_floating_point():
            raise ValueError(
                f"expected a floating-point input ({dtype}, the dtype of the model's weights), got {x.dtype}: "
                f"normalise uint8 images as in training, or convert counts with x.float()"
            )
        return x.to(dtype)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is a valid input: the shape, dtype and batch checks of
        :meth:`forward`, and :func:`check_finite` (:class:`NonFiniteInputError` for NaN or inf
        values, which ``forward`` does not detect)."""
        self._prepare_input(x)
        check_finite(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input (see module docstring) -> tokens after the last block, ``(T, B, N, D)``."""
        x = self._prepare_input(x)
        if x.dim() == 4:
            tokens = self.tokenizer.encode_static(x, self.config.time_steps)
        else:
            tokens = self.tokenizer(x.transpose(0, 1))  # (B, T, ...) -> (T, B, ...)
        for block in self.blocks:
            tokens = block(tokens)
        return tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def extra_repr(self) -> str:
        c = self.config
        return f"arch={c.arch}, {c.depth}-{c.embed_dim}, heads={c.num_heads}, T={c.time_steps}, tokens={c.num_tokens}"
