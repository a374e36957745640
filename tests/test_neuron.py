"""The multi-step LIF neuron against hand-computed values, the analytic surrogate, and SpikingJelly."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FIXTURES, require
from spikingformer.kernels import available_backends
from spikingformer.neuron import LIFParams, MultiStepLIF, lif_membrane_reference, lif_reference, multistep_lif

# Triton runs on CUDA tensors (tests/test_kernels.py runs it on the CPU under Triton's interpreter)
FAST = [b for b in available_backends() if b != "triton"]
BACKENDS = ["reference", *FAST]


def hand_lif(xs, tau, v_th, v_reset=0.0):
    """The paper's equations for one neuron, in plain Python floats."""
    v, spikes, hs = v_reset, [], []
    for x in xs:
        h = v + (x - (v - v_reset)) / tau
        s = 1.0 if h - v_th >= 0 else 0.0
        v = h * (1 - s) + v_reset * s
        spikes.append(s)
        hs.append(h)
    return spikes, hs


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_sequence(backend):
    # tau=2: H0 = 2.0/2 = 1.0 exactly at threshold -> spike, reset to 0; H1 = 0.25; H2 = 0.125 + 0.75 = 0.875;
    # H3 = 0.4375 + 1.5 = 1.9375 -> spike; H4 = 0 + (-1)/2 = -0.5.
    xs = [2.0, 0.5, 1.5, 3.0, -1.0]
    expected_spikes = [1.0, 0.0, 0.0, 1.0, 0.0]
    expected_h = [1.0, 0.25, 0.875, 1.9375, -0.5]
    assert hand_lif(xs, 2.0, 1.0) == (expected_spikes, expected_h)
    x = torch.tensor(xs).view(5, 1)
    assert multistep_lif(x, LIFParams(tau=2.0), backend).view(-1).tolist() == expected_spikes
    h, v = lif_membrane_reference(x, LIFParams(tau=2.0))
    assert h.view(-1).tolist() == expected_h
    assert v.view(-1).tolist() == [0.0, 0.25, 0.875, 0.0, -0.5]


@pytest.mark.parametrize("tau,v_th,v_reset", [(1.5, 1.0, 0.0), (2.0, 0.5, 0.0), (2.0, 1.0, -0.2)])
def test_random_sequences_match_equations(tau, v_th, v_reset):
    torch.manual_seed(0)
    x = torch.randn(7, 20) * 2
    p = LIFParams(tau=tau, v_threshold=v_th, v_reset=v_reset)
    spikes = lif_reference(x, p)
    for j in range(20):
        expected, _ = hand_lif(x[:, j].double().tolist(), tau, v_th, v_reset)
        # float32 vs float64 can only disagree within rounding of the threshold; inputs are far from it
        assert spikes[:, j].tolist() == expected


def test_surrogate_gradient_is_analytic_sigmoid_derivative():
    # one step: dS/dX = sg'(H - V_th) * dH/dX = alpha*sig*(1-sig) / tau with H = X / tau
    x = torch.tensor([[0.3, 1.7, 2.0, -4.0]], requires_grad=True)
    for backend in BACKENDS:
        x.grad = None
        multistep_lif(x, LIFParams(tau=2.0, alpha=4.0), backend).sum().backward()
        expected = []
        for xv in x.detach().view(-1).tolist():
            sig = 1 / (1 + math.exp(-4.0 * (xv / 2.0 - 1.0)))
            expected.append(4.0 * sig * (1 - sig) / 2.0)
        assert torch.allclose(x.grad.view(-1), torch.tensor(expected), atol=1e-7), backend


def test_gradient_through_time_detach_reset():
    # two steps, no spike at t=0 (x0=0.5 -> H0=0.25), only d S1 / d x0 examined:
    # H1 = H0/2 + x1/2 -> dS1/dx0 = sg'(H1 - 1) * 1/2 * 1/2 (dV0/dH0 = 1 - S0 = 1)
    x = torch.tensor([[0.5], [1.2]], requires_grad=True)
    s = lif_reference(x, LIFParams(tau=2.0))
    s[1].sum().backward()
    h1 = 0.25 / 2 + 1.2 / 2
    sig = 1 / (1 + math.exp(-4 * (h1 - 1)))
    assert x.grad[0].item() == pytest.approx(4 * sig * (1 - sig) / 4, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_keep_dtype_and_binary_spikes(backend, dtype):
    x = (torch.randn(4, 3, 8) * 2).to(dtype).requires_grad_()
    s = multistep_lif(x, LIFParams(), backend)
    assert s.dtype == dtype and set(s.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(s, lif_reference(x.detach(), LIFParams()))
    s.sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("detach_reset", [True, False])
def test_fast_path_equals_reference(backend, detach_reset):
    torch.manual_seed(1)
    p = LIFParams(tau=1.5, v_threshold=0.5, detach_reset=detach_reset)
    x = (torch.randn(6, 5, 9) * 1.5).requires_grad_()
    g = torch.randn(6, 5, 9)
    ref = lif_reference(x, p)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    out = multistep_lif(x, p, backend)
    (gx,) = torch.autograd.grad(out, x, g)
    assert torch.equal(out, ref)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=0)


def test_spikingjelly_golden_outputs():
    cases = torch.load(require(FIXTURES / "lif_spikingjelly.pt"), weights_only=False)["cases"]
    assert len(cases) == 4
    for name, case in cases.items():
        tau, v_th, detach = name.split("_")
        p = LIFParams(tau=float(tau[3:]), v_threshold=float(v_th[3:]), detach_reset=detach == "detach1")
        for backend in BACKENDS:
            x = case["x"].clone().requires_grad_()
            s = multistep_lif(x, p, backend)
            s.backward(case["grad_out"])
            assert torch.equal(s, case["spikes"]), (name, backend)
            torch.testing.assert_close(x.grad, case["grad_in"], atol=1e-6, rtol=0)


def test_stateless_module_and_bad_inputs():
    lif = MultiStepLIF()
    x = torch.full((3, 2), 1.5)
    first = lif(x)
    assert torch.equal(lif(x), first)  # no membrane carried over between calls
    assert first[:, 0].tolist() == [0.0, 1.0, 0.0]  # H: 0.75, 1.125 (fire), 0.75
    with pytest.raises(ValueError, match="time-first"):
        lif(torch.ones(5))
    with pytest.raises(TypeError, match="floating-point"):
        lif(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tau must be > 1"):
        MultiStepLIF(tau=1.0)
    with pytest.raises(ValueError, match="unknown LIF backend"):
        MultiStepLIF(backend="cupy")(x)
