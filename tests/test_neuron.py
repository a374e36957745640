"""The multi-step LIF neuron's semantics against independent expectations.

Every expected number here comes from outside the code: worked examples of the paper's equations
(written out step by step in the comments, the results typed in as literals), the surrogate's closed
form, and SpikingJelly's own outputs (the golden fixture in ../shared/fixtures). The equations, with
``V[-1] = V_reset``::

    charge  H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau
    fire    S[t] = Heaviside(H[t] - V_th)                    (H exactly at V_th fires)
    reset   V[t] = H[t] (1 - S[t]) + V_reset S[t]
    surrogate dS/dH = sg(H - V_th),  sg(z) = alpha sig(alpha z) (1 - sig(alpha z)),  alpha = 4

Each check runs on the plain reference and on every fused backend. That the backends equal the
reference on many more inputs (shapes, layouts, dtypes, parameters) is tests/test_kernels.py.
"""

from __future__ import annotations

import re

import pytest
import torch

from conftest import DEVICE, FIXTURES, KERNEL_BACKENDS, skip_unusable
from spikingformer.neuron import LIFParams, MultiStepLIF, lif_membrane_reference, multistep_lif, sigmoid_surrogate_grad

BACKENDS = ["reference", *KERNEL_BACKENDS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LIF_FIXTURE = FIXTURES / "lif_spikingjelly.pt"


def test_surrogate_derivative_values():
    # sg(0) = 4 * 1/2 * 1/2 = 1; sg(+-1/4) = 4 sig(1)(1 - sig(1)) = 4 * 0.7310585786 * 0.2689414214;
    # sg(+-1) = 4 sig(4)(1 - sig(4)) = 4 * 0.9820137900 * 0.0179862100; alpha = 2 at 0: 2 * 1/4
    z = torch.tensor([0.0, 0.25, -0.25, 1.0, -1.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 0.7864477330, 0.7864477330, 0.0706508249, 0.0706508249], dtype=torch.float64)
    torch.testing.assert_close(sigmoid_surrogate_grad(z, 4.0), expected, rtol=0, atol=1e-10)
    assert sigmoid_surrogate_grad(torch.tensor(0.0), 2.0).item() == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_gradient_is_the_surrogate_over_tau(backend):
    # one step from V = 0, tau = 2: H = X / 2, dS/dX = sg(X/2 - 1) / 2 with z = -0.85, -0.15, 0, -3
    skip_unusable(backend)
    x = torch.tensor([[0.3, 1.7, 2.0, -4.0]], device=DEVICE, requires_grad=True)
    s = multistep_lif(x, LIFParams(tau=2.0, alpha=4.0), backend)
    assert s.view(-1).tolist() == [0.0, 0.0, 1.0, 0.0]
    s.sum().backward()
    expected = torch.tensor([0.0625049353, 0.4575684809, 0.5, 1.22882737e-05], dtype=torch.float64)
    torch.testing.assert_close(x.grad.view(-1).cpu().double(), expected, rtol=1e-6, atol=1e-7)


# Worked examples, dL/dS[t] = 1 at every step (``s.sum().backward()``).
#
# A: tau = 2, V_th = 1, V_reset = 0, X = [2, 0.5, 1.5, 3, -1]
#   H0 = 0 + (2 - 0)/2 = 1          -> exactly at threshold: fires, V0 = 0
#   H1 = 0 + (0.5 - 0)/2 = 0.25     -> V1 = 0.25
#   H2 = 0.25 + (1.5 - 0.25)/2 = 0.875
#   H3 = 0.875 + (3 - 0.875)/2 = 1.9375 -> fires, V3 = 0
#   H4 = 0 + (-1 - 0)/2 = -0.5
# B: tau = 4, V_th = 0.5, V_reset = -0.5, X = [2.5, 3, 0, 1]
#   H0 = -0.5 + (2.5 - 0)/4 = 0.125
#   H1 = 0.125 + (3 - 0.625)/4 = 0.71875 -> fires, V1 = V_reset = -0.5
#   H2 = -0.5 + (0 - 0)/4 = -0.5
#   H3 = -0.5 + (1 - 0)/4 = -0.25
# Backward, g[t] = dL/dH[t], z = H - V_th:
#   g[t] = sg(z[t]) + g[t+1] (1 - 1/tau) dV[t]/dH[t],   dL/dX[t] = g[t] / tau
#   dV/dH = 1 - S                                  with detach_reset (the reset's S is a constant)
#   dV/dH = 1 - S + (V_reset - H) sg(z)            without it
# e.g. A, detach: g4 = sg(-1.5) = 0.0098660; g3 = sg(0.9375) (S3 = 1 stops the path) = 0.0897976;
#   g2 = sg(-0.125) + g3/2 = 0.9849137; g1 = sg(-0.75) + g2/2 = 0.6731635; g0 = sg(0) = 1 -> dX0 = 0.5.
EXAMPLES = {
    "A": dict(params=dict(tau=2.0, v_threshold=1.0, v_reset=0.0), x=[2.0, 0.5, 1.5, 3.0, -1.0],
              h=[1.0, 0.25, 0.875, 1.9375, -0.5], v=[0.0, 0.25, 0.875, 0.0, -0.5], spikes=[1.0, 0.0, 0.0, 1.0, 0.0],
              grad={True: [0.5, 0.3365817369, 0.4924568348, 0.0448988208, 0.0049330186],
                    False: [0.3416877978, 0.3166244045, 0.4739538205, 0.0444696902, 0.0049330186]}),
    "B": dict(params=dict(tau=4.0, v_threshold=0.5, v_reset=-0.5), x=[2.5, 3.0, 0.0, 1.0],
              h=[0.125, 0.71875, -0.5, -0.25], v=[0.125, -0.5, -0.5, -0.25], spikes=[0.0, 1.0, 0.0, 0.0],
              grad={True: [0.3048858438, 0.2076525223, 0.0515452010, 0.0451766597],
                    False: [0.2284089063, 0.1685178833, 0.0515452010, 0.0451766597]}),
}


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_worked_example_membrane(example):
    e = EXAMPLES[example]
    h, v = lif_membrane_reference(torch.tensor(e["x"], device=DEVICE).view(-1, 1), LIFParams(**e["params"]))
    assert h.view(-1).tolist() == e["h"]  # every value is a short binary fraction: exact in float32
    assert v.view(-1).tolist() == e["v"]


@pytest.mark.parametrize("detach_reset", [True, False], ids=["detach", "no_detach"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("example", sorted(EXAMPLES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_example_spikes_and_gradient(backend, example, dtype, detach_reset):
    skip_unusable(backend)
    e = EXAMPLES[example]
    x = torch.tensor(e["x"], dtype=dtype, device=DEVICE).view(-1, 1).requires_grad_(True)  # exact in every dtype
    s = multistep_lif(x, LIFParams(**e["params"], detach_reset=detach_reset), backend)
    assert s.dtype == dtype and s.view(-1).tolist() == e["spikes"]
    s.sum().backward()
    assert x.grad.dtype == dtype
    # float16/bfloat16: the float32 gradient rounded to the dtype
    rtol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    expected = torch.tensor(e["grad"][detach_reset], dtype=torch.float64)
    torch.testing.assert_close(x.grad.view(-1).cpu().double(), expected, rtol=rtol, atol=1e-7)


def _fixture_cases() -> list[str]:
    if not LIF_FIXTURE.exists():
        return ["<fixture absent>"]
    return sorted(torch.load(LIF_FIXTURE, weights_only=False)["cases"])


@pytest.mark.parametrize("case", _fixture_cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_spikingjelly_golden_outputs(backend, case):
    """SpikingJelly 0.0.0.0.12's own spikes and input gradients (tau 2 / 1.5, V_th 1 / 0.5, detach_reset on / off)."""
    if not LIF_FIXTURE.exists():
        pytest.skip(f"{LIF_FIXTURE} not found: golden fixtures live in ../shared next to the repository")
    skip_unusable(backend)
    cases = torch.load(LIF_FIXTURE, weights_only=False)["cases"]
    assert len(cases) == 4
    c = cases[case]
    m = re.fullmatch(r"tau([0-9.]+)_vth([0-9.]+)_detach([01])", case)
    assert m, f"unexpected fixture case name {case!r}"
    p = LIFParams(tau=float(m[1]), v_threshold=float(m[2]), detach_reset=m[3] == "1")
    x = c["x"].to(DEVICE).requires_grad_(True)
    s = multistep_lif(x, p, backend)
    assert torch.equal(s.cpu(), c["spikes"])
    (gx,) = torch.autograd.grad(s, x, c["grad_out"].to(DEVICE))
    torch.testing.assert_close(gx.cpu(), c["grad_in"], rtol=1e-6, atol=1e-6)


def test_module_is_stateless():
    # tau = 2, X = 1.5 each step: H0 = 0.75; H1 = 0.75 + (1.5 - 0.75)/2 = 1.125 -> fires; H2 = 0 + 0.75
    lif = MultiStepLIF()
    x = torch.full((3, 2), 1.5, device=DEVICE)
    first = lif(x)
    assert first[:, 0].tolist() == [0.0, 1.0, 0.0]
    assert torch.equal(lif(x), first)  # no membrane carried over between calls


def test_module_holds_its_parameters():
    lif = MultiStepLIF(tau=1.5, v_threshold=0.5, v_reset=-0.1, alpha=2.0, detach_reset=False, backend="torch")
    assert lif.params == LIFParams(1.5, 0.5, -0.1, 2.0, False)
    assert repr(lif) == ("MultiStepLIF(tau=1.5, v_threshold=0.5, v_reset=-0.1, alpha=2.0, detach_reset=False, "
                         "backend='torch')")


@pytest.mark.parametrize("make, error, message", [
    (lambda: MultiStepLIF()(torch.ones(5)), ValueError, "time-first tensor"),
    (lambda: MultiStepLIF()(torch.ones(2, 3, dtype=torch.long)), TypeError, "must be a floating-point tensor"),
    (lambda: MultiStepLIF(backend="cupy")(torch.ones(2, 3)), ValueError, "unknown LIF backend"),
    (lambda: MultiStepLIF(tau=1.0), ValueError, r"tau must be > 1 \(got 1.0\)"),
    (lambda: LIFParams(alpha=0.0), ValueError, r"alpha must be > 0 \(got 0.0\)"),
], ids=["one_dim", "integer_dtype", "unknown_backend", "tau_one", "alpha_zero"])
def test_bad_inputs_and_parameters(make, error, message):
    with pytest.raises(error, match=message):
        make()
