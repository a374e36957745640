"""The authors' Spikingformer, layer for layer, as the baseline of the model benchmark.

The performance issue compares this project's model with "the same architecture built with
SpikingJelly's neurons, the way the authors' code does it". This module rebuilds the authors'
``vit_snn`` (SF ``cifar10/model.py``, ``cifar10-dvs/model.py``, ``imagenet/model.py``; see
the authors' code) with their module names, tensor layouts and operation order:

* static images are repeated T times *before* the first convolution (``x.unsqueeze(0).repeat``);
* every convolution and BatchNorm runs on ``(T*B, C, H, W)`` / ``(T*B, C, N)`` in NCHW;
* the pointwise layers are ``Conv1d`` (attention) and ``Conv2d`` (MLP) with kernel size 1;
* attention is ``(q @ k^T) @ v * 0.125`` (CIFAR, event) or ``q @ (k^T @ v) * 0.125`` (ImageNet);
* the neurons are SpikingJelly ``MultiStepLIFNode`` objects that keep their membrane, so the
  caller runs ``functional.reset_net`` after every batch (``torch`` backend on the CPU: the
  authors' ``cupy`` backend needs a GPU).

Its state dict has the authors' exact key names, including the unused ``norm1``/``norm2``
LayerNorms, so the golden fixtures of the authors' code load into it unchanged, and
``tests/test_authors_model.py`` checks that it reproduces their logits. It is a benchmark baseline, not a
second implementation of the model: use :func:`spikingformer.create_model` for real work.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# (tau, v_threshold) -> a multi-step neuron module taking (T, ...) tensors
NeuronFactory = Callable[[float, float], nn.Module]

# family -> (name of the stem conv/bn, name pattern of stage i's layers, max-pool name pattern,
#            number of max-pools, attention order)
_FAMILIES = {
    "cifar": ("block0", "block{i}", "block{i}_mp", 2, "qk_first"),
    "imagenet": ("proj", "proj{i}", "maxpool{i}", 4, "kv_first"),
    "event": ("proj", "proj{i}", "maxpool{i}", 4, "qk_first"),
}


def spikingjelly_neuron(tau: float, v_threshold: float, backend: str = "torch", node: str | None = None) -> nn.Module:
    """``MultiStepLIFNode(tau, v_threshold, detach_reset=True)`` as the authors' models build it
    (``backend="cupy"`` on a GPU, as they run it; ``"torch"`` on the CPU), or the installed
    SpikingJelly's class ``node`` (see ``sj_neurons.lif_nodes``)."""
    from sj_neurons import SpikingJellyLIF

    return SpikingJellyLIF(tau=tau, v_threshold=v_threshold, detach_reset=True, backend=backend, node=node)


class AuthorsMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, neuron: NeuronFactory, tau: float) -> None:
        super().__init__()
        self.mlp1_lif = neuron(tau, 1.0)
        self.mlp1_conv = nn.Conv2d(dim, hidden, kernel_size=1)
        self.mlp1_bn = nn.BatchNorm2d(hidden)
        self.mlp2_lif = neuron(tau, 1.0)
        self.mlp2_conv = nn.Conv2d(hidden, dim, kernel_size=1)
        self.mlp2_bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c, h, w = x.shape
        x = self.mlp1_bn(self.mlp1_conv(self.mlp1_lif(x).flatten(0, 1)))
        x = x.reshape(t, b, -1, h, w)
        return self.mlp2_bn(self.mlp2_conv(self.mlp2_lif(x).flatten(0, 1))).reshape(t, b, c, h, w)


class AuthorsSSA(nn.Module):
    def __init__(self, dim: int, num_heads: int, neuron: NeuronFactory, tau: float, order: str) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.order = order
        self.proj_lif = neuron(tau, 1.0)
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_conv", nn.Conv1d(dim, dim, kernel_size=1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", neuron(tau, 1.0))
        self.attn_lif = neuron(tau, 0.5)
        self.proj_conv = nn.Conv1d(dim, dim, kernel_size=1)
        self.proj_bn = nn.BatchNorm1d(dim)

    def _project(self, name: str, x: torch.Tensor, t: int, b: int) -> torch.Tensor:
        """``{name}_conv -> {name}_bn -> {name}_lif``, then heads: ``(T, B, h, N, d)``."""
        c, n = x.shape[1:]
        y = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(x)).reshape(t, b, c, n)
        y = getattr(self, f"{name}_lif")(y)
        return y.transpose(-1, -2).reshape(t, b, n, self.num_heads, c // self.num_heads).permute(0, 1, 3, 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b, c, h, w = x.shape
        x = self.proj_lif(x).flatten(3)
        x_for_qkv = x.flatten(0, 1)
        q, k, v = (self._project(name, x_for_qkv, t, b) for name in ("q", "k", "v"))
        if self.order == "qk_first":
            x = (q @ k.transpose(-2, -1)) @ v * 0.125
        else:
            x = q @ (k.transpose(-2, -1) @ v) * 0.125
        x = self.attn_lif(x.transpose(3, 4).reshape(t, b, c, h * w))
        return self.proj_bn(self.proj_conv(x.flatten(0, 1))).reshape(t, b, c, h, w)


class AuthorsBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, neuron: NeuronFactory, tau: float, order: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # constructed but never called, as in the authors' code
        self.attn = AuthorsSSA(dim, num_heads, neuron, tau, order)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = AuthorsMLP(dim, 4 * dim, neuron, tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class AuthorsTokenizer(nn.Module):
    def __init__(self, family: str, in_channels: int, dim: int, neuron: NeuronFactory, tau: float) -> None:
        super().__init__()
        stem, stage, pool, self.num_pools, _ = _FAMILIES[family]
        channels = [in_channels, dim // 8, dim // 4, dim // 2, dim, dim]
        self.names = []
        setattr(self, f"{stem}_conv", nn.Conv2d(channels[0], channels[1], 3, 1, 1, bias=False))
        setattr(self, f"{stem}_bn", nn.BatchNorm2d(channels[1]))
        for i in range(1, 5):
            name = stage.format(i=i)
            pool_name = pool.format(i=i) if i > 4 - self.num_pools else None
            setattr(self, f"{name}_lif", neuron(tau, 1.0))
            if pool_name:
                setattr(self, pool_name, nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            setattr(self, f"{name}_conv", nn.Conv2d(channels[i], channels[i + 1], 3, 1, 1, bias=False))
            setattr(self, f"{name}_bn", nn.BatchNorm2d(channels[i + 1]))
            self.names.append((name, pool_name))
        self.stem = stem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, b = x.shape[:2]
        x = getattr(self, f"{self.stem}_bn")(getattr(self, f"{self.stem}_conv")(x.flatten(0, 1)))
        x = x.reshape(t, b, *x.shape[1:])
        for name, pool_name in self.names:
            x = getattr(self, f"{name}_lif")(x).flatten(0, 1)
            if pool_name:
                x = getattr(self, pool_name)(x)
            x = getattr(self, f"{name}_bn")(getattr(self, f"{name}_conv")(x))
            x = x.reshape(t, b, *x.shape[1:])
        return x


class AuthorsSpikingformer(nn.Module):
    """The authors' ``vit_snn`` (state-dict keys ``patch_embed.*``, ``block.i.*``, ``head.*``).

    ``family`` is ``"cifar"`` (x4 tokenizer, ``block{k}`` names), ``"imagenet"`` or ``"event"``
    (x16, ``proj{k}`` names). Static families take ``(B, C, H, W)`` images and repeat them
    ``time_steps`` times; the event family takes ``(B, T, C, H, W)`` frames.
    """

    def __init__(
        self,
        family: str,
        embed_dim: int,
        num_heads: int,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        time_steps: int = 4,
        tau: float = 2.0,
        neuron: NeuronFactory = spikingjelly_neuron,
    ) -> None:
        super().__init__()
        if family not in _FAMILIES:
            raise ValueError(f"unknown family {family!r}; valid: {', '.join(_FAMILIES)}")
        self.family = family
        self.time_steps = time_steps
        order = _FAMILIES[family][4]
        self.patch_embed = AuthorsTokenizer(family, in_channels, embed_dim, neuron, tau)
        self.block = nn.ModuleList(AuthorsBlock(embed_dim, num_heads, neuron, tau, order) for _ in range(depth))
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "event":
            x = x.permute(1, 0, 2, 3, 4)
        else:
            x = x.unsqueeze(0).repeat(self.time_steps, 1, 1, 1, 1)
        x = self.patch_embed(x)
        for blk in self.block:
            x = blk(x)
        return self.head(x.flatten(3).mean(3).mean(0))


def from_zoo_config(config, neuron: NeuronFactory = spikingjelly_neuron) -> AuthorsSpikingformer:
    """The authors' model with the architecture of one of our zoo's Spikingformer configurations."""
    if config.arch != "spikingformer" or config.family not in _FAMILIES:
        raise ValueError(f"the authors' baseline exists for Spikingformer of the families {', '.join(_FAMILIES)}, "
                         f"not {config.arch} / {config.family}")
    return AuthorsSpikingformer(
        config.family, config.embed_dim, config.num_heads, config.depth, config.num_classes,
        in_channels=config.in_channels, time_steps=config.time_steps, tau=config.tau, neuron=neuron,
    )
