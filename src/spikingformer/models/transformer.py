"""The spiking vision transformer shared by Spikingformer and its baseline Spikformer.

``SpikingTransformer(ModelConfig(arch="spikingformer", ...))`` is the paper's model;
``arch="spikformer"`` is the baseline. They share every module and differ only in the residual
style (:class:`spikingformer.layers.ResidualStyle`).

Input convention (the API edge):

* static images ``(B, C, H, W)``: repeated over ``config.time_steps`` inside the model (direct
  encoding);
* event frames ``(B, T, C, H, W)`` (batch first, as DataLoaders give them): T comes from the data.

Output: logits ``(B, num_classes)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from spikingformer.layers import (
    HEAD_KINDS,
    ClassificationHead,
    ResidualStyle,
    SpikingTokenizer,
    SpikingTransformerBlock,
    lif_factory,
)

ARCHS = {"spikingformer": ResidualStyle.SPIKE_DRIVEN, "spikformer": ResidualStyle.SPIKFORMER}


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
        from spikingformer.models.official import register_official_key_hook

        register_official_key_hook(self)

    def _init_weights(self) -> None:
        """As the authors: trunc-normal(0.02) for Linear layers of the original code, PyTorch defaults elsewhere."""
        linears = [self.head.fc]
        if self.config.trunc_normal_pointwise:
            linears += [m for m in self.blocks.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        c = self.config
        if x.dim() not in (4, 5):
            raise ValueError(
                f"expected static images (B, C, H, W) or event frames (B, T, C, H, W), got shape {tuple(x.shape)}"
            )
        channels, h, w = x.shape[-3:]
        if channels != c.in_channels:
            raise ValueError(f"model expects {c.in_channels} input channels, got {channels} (input shape {tuple(x.shape)})")
        if h % c.downsample or w % c.downsample:
            raise ValueError(
                f"input size {h}x{w} must be divisible by the tokenizer stride {c.downsample}; pad or resize the input"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input (see module docstring) -> tokens after the last block, ``(T, B, N, D)``."""
        self._check_input(x)
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
