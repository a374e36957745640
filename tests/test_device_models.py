"""Whole zoo models on the test device against the plain computation on the CPU.

``SPIKINGFORMER_TEST_DEVICE`` names the device (``benchmarks/gpu_check.sh`` sets ``cuda``; the
default run uses the CPU). There the model runs as a user runs it: default routes, the device's
neuron kernel (Triton on CUDA). The reference is a copy of the model on the CPU with every route
off (``routes.configured("none")``: the plain module calls). Both run in float64, so that
convolutions, BatchNorm and products agree to about 1e-15, far below any threshold's reach. The
neurons integrate their membranes in float32 on every path (``spikingformer.neuron``), from the
same float64 inputs rounded once, so their spikes agree exactly (the zoo's tau = 2: dividing by
it, as the CPU does, and multiplying by its reciprocal, as CUDA's division does, are the same). A
route or kernel that computed something else on the device would move logits and gradients by far
more than the tolerances below, which allow only the float32 arithmetic of the neurons' backward.
"""

from __future__ import annotations

import copy

import pytest
import torch

import bench_model
from conftest import DEVICE
from spikingformer.layers import routes
from spikingformer.models.zoo import create_model
from spikingformer.neuron import MultiStepLIF

# name, size overrides, an input batch (B first; event frames are (B, T, C, H, W))
CASES = {
    "static": ("spikingformer_cifar10_4_384", dict(depth=1, embed_dim=64, num_heads=4),
               lambda g: torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)),
    "event": ("spikingformer_cifar10dvs_2_256", dict(depth=1, embed_dim=64, num_heads=4, time_steps=3, img_size=32),
              lambda g: torch.poisson(torch.full((2, 3, 2, 32, 32), 0.6, dtype=torch.float64), generator=g)),
}


def _pair(case: str):
    """The model on the CPU (BatchNorm's running statistics those of the batch, so that its neurons
    fire in eval mode too), a copy on the test device, and the batch."""
    name, over, make_input = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, **over).double()
    x = make_input(torch.Generator().manual_seed(1))
    with routes.configured("none"):
        bench_model.calibrate_bn(model, x)
    return model, copy.deepcopy(model).to(DEVICE), x


def _firing_rate(model, run) -> float:
    spikes = [0, 0]

    def count(module, inputs, out):
        spikes[0] += int(out.count_nonzero())
        spikes[1] += out.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, MultiStepLIF)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return spikes[0] / spikes[1]


@pytest.mark.parametrize("case", list(CASES))
def test_inference_on_the_device_equals_the_plain_computation(case):
    ref, dev, x = _pair(case)
    ref.eval(), dev.eval()
    with torch.inference_mode(), routes.configured("none"):
        rate = _firing_rate(ref, lambda: ref(x))
        expected = ref(x)
    with torch.inference_mode():
        got = dev(x.to(DEVICE)).cpu()
    assert 0.01 < rate < 0.9, rate  # the comparison goes through firing neurons
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_training_on_the_device_equals_the_plain_computation(case):
    """One training forward and backward: logits, every parameter's gradient and BatchNorm's running
    statistics after it."""
    ref, dev, x = _pair(case)
    ref.train(), dev.train()
    weights = torch.randn(2, ref.config.num_classes, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with routes.configured("none"):
        expected = ref(x)
        (expected * weights).sum().backward()
    got = dev(x.to(DEVICE))
    (got * weights.to(DEVICE)).sum().backward()
    torch.testing.assert_close(got.detach().cpu(), expected.detach(), rtol=1e-9, atol=1e-9)
    ref_params, dev_params = dict(ref.named_parameters()), dict(dev.named_parameters())
    assert all(p.grad is not None for p in ref_params.values())
    # A bias that a training BatchNorm follows has no gradient in exact arithmetic (the batch mean
    # removes it): what is left is rounding noise, different on every device, so such a gradient
    # must only stay negligible there too. The others agree to the neurons' float32 backward.
    overall = max(float(p.grad.abs().max()) for p in ref_params.values())
    compared = 0
    for name, p in ref_params.items():
        scale, got_scale = float(p.grad.abs().max()), float(dev_params[name].grad.abs().max())
        if scale < 1e-9 * overall:
            assert got_scale < 1e-9 * overall, (name, got_scale, overall)
            continue
        torch.testing.assert_close(dev_params[name].grad.cpu(), p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
        compared += 1
    assert compared > 0.8 * len(ref_params), (compared, len(ref_params))
    for (name, a), (_, b) in zip(ref.named_buffers(), dev.named_buffers()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12, msg=name)
