"""The training run's optimizer: timm's by name, fused where PyTorch has a fused kernel for it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingformer.engine.optimizer import build_optimizer, fused_option


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


@pytest.mark.parametrize("opt", ["adamw", "adam", "sgd", "momentum", "lookahead_adamw"])
def test_fused_where_pytorch_has_the_kernel_and_it_steps_as_the_plain_loop(opt):
    model = _model()
    twin_model = _model()
    built = build_optimizer(model, opt=opt, lr=0.01, weight_decay=0.05, eps=1e-8, momentum=0.9)
    inner = getattr(built, "_base_optimizer", built)  # timm's Lookahead wraps the fused one
    assert all(g["fused"] is True for g in inner.param_groups)
    # timm's groups: no weight decay on biases and norms, decay on the weights
    assert sorted(g["weight_decay"] for g in inner.param_groups) == [0.0, 0.05]
    # the plain twin: the same class, groups and hyperparameters, PyTorch's per-parameter loop
    index = {id(p): i for i, p in enumerate(model.parameters())}
    twin_params = list(twin_model.parameters())
    twin = type(inner)([{**{k: v for k, v in g.items() if k not in ("fused", "foreach", "params")},
                         "params": [twin_params[index[id(p)]] for p in g["params"]]} for g in inner.param_groups],
                       foreach=False)
    x = torch.randn(5, 6)
    for _ in range(4):
        for m, o in ((model, inner), (twin_model, twin)):
            o.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            o.step()
    for (name, p), q in zip(model.named_parameters(), twin_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), _model().parameters()))  # it stepped


def test_no_fused_kernel_keeps_timms_optimizer():
    model = _model()
    built = build_optimizer(model, opt="lamb", lr=0.01, weight_decay=0.05, eps=1e-8, momentum=0.9)
    assert type(built).__name__ == "Lamb" and "fused" not in built.defaults
    assert fused_option("lamb", list(model.parameters())) == {}


def test_fused_only_for_float_parameters_on_supported_devices():
    params = [torch.zeros(3, requires_grad=True)]
    assert fused_option("AdamW", params) == {"fused": True}
    assert fused_option("adamw", [torch.zeros(3, device="meta", requires_grad=True)]) == {}
    assert fused_option("adamw", []) == {}
