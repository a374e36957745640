"""The ``spike_linear`` route under CPU bf16 autocast: spikes summed in float32 from 16-bit weights
(and output-gradient rows), each sum rounded once to the 16-bit dtype.

* The 16-bit kernels against their plain PyTorch twin bit for bit: the float32 twins of
  ``tests/test_spike_linear.py`` on the widened operands, rounded once to the dtype.
* Against autocast's dense bf16 product (float32 sums too, in another order): at most one rounding
  apart, and both within bf16 rounding of the float64 product.
* Where the route takes bf16 (vector units, not AMX tiles; not float16) and, through ``TokenLinear``
  and a zoo model, what it gives: the dense product's values to bf16 rounding, its gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import ops
from spikingformer.kernels import spike_linear as sl
from spikingformer.layers import TokenLinear, routes
from spikingformer.models.zoo import create_model
from spikingformer.neuron import MultiStepLIF

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"the CPU kernel library did not build: {cpu.build_error()}")

HALF = [torch.bfloat16, torch.float16]
# (rows, in, out): a partial 64-column tile, columns not a multiple of 64, one column, one row
SHAPES = [(100, 37, 70), (257, 384, 1536), (64, 1536, 64), (1, 5, 1), (130, 64, 129)]


def _operands(m: int, k: int, n: int, rate: float, dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(m, k, generator=g) < rate).to(dtype)
    w, b = torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    return x, w, b, torch.randn(m, n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
def test_16bit_kernels_are_the_float32_twin_rounded_once(dtype, shape, rate):
    x, w, b, g = _operands(*shape, rate, dtype)
    lib = cpu.get_library()
    for bias in (b, None):
        y = sl.kernel_spike_linear_forward(lib, x, w, bias, 1.0)
        twin = sl.spike_linear_reference(x.float(), w.float(), bias.float() if bias is not None else None)
        assert y.dtype == dtype and torch.equal(y, twin.to(dtype))
    gw = sl.kernel_spike_linear_weight_grad(lib, x, g, 1.0)
    assert gw.dtype == dtype and torch.equal(gw, sl.spike_linear_weight_grad_reference(x.float(), g.float()).to(dtype))
    packed = sl.pack_spikes(x)
    assert torch.equal(sl.kernel_spike_linear_weight_grad_packed(lib, packed, shape[1], g, 1.0), gw)


def test_a_16bit_sum_is_rounded_once_by_hand():
    """bf16 has 8 significant bits: 1 + 2^-8 + 2^-8 is 1 + 2^-7 exactly in float32, a bf16 number;
    rounding after each addition (1 + 2^-8 -> 1, a tie to even) would give 1."""
    x = torch.ones(1, 3, dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 2.0 ** -8, 2.0 ** -8]], dtype=torch.bfloat16)
    y = sl.kernel_spike_linear_forward(cpu.get_library(), x, w, None, 1.0)
    assert y.item() == 1 + 2.0 ** -7


def test_bf16_sums_agree_with_autocasts_dense_product():
    """Both sum in float32 (another order) and round once: at most one bf16 step apart, rarely, and
    each within bf16 rounding of the float64 product (plus float32 summation error)."""
    x, w, b, _ = _operands(4096, 384, 384, 0.15, torch.bfloat16)
    y = sl.kernel_spike_linear_forward(cpu.get_library(), x, w, b, 1.0)
    dense = nn.functional.linear(x, w, b)
    exact = nn.functional.linear(x.double(), w.double(), b.double())
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # one bf16 ulp at each value
    apart = (y.double() - dense.double()).abs()
    assert (apart <= step * 2).all() and (apart > 0).float().mean() < 0.01
    for got in (y, dense):
        assert ((got.double() - exact).abs() <= step / 2 + 1e-5 * 60).all()


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_16bit_input_that_is_not_spikes_is_declined_or_refused(dtype):
    x, w, b, g = _operands(50, 40, 30, 0.3, dtype)
    x[7, 3] = 0.5
    lib = cpu.get_library()
    assert sl.kernel_spike_linear_forward(lib, x, w, b, 1.0) is None
    assert torch.equal(sl.spike_linear_forward(x, w, b, 1.0)[0], nn.functional.linear(x, w, b))
    assert torch.equal(sl.spike_linear_weight_grad(x, g, 1.0), g.t() @ x)
    with pytest.raises(ValueError, match="neither 0 nor 1|other than 0 and 1"):
        sl.spike_linear_forward(x, w, b, 1.0, pack=True)


def test_mixed_dtypes_and_a_zero_limit_take_the_dense_product():
    x, w, b, g = _operands(64, 40, 30, 0.1, torch.bfloat16)
    with pytest.raises(RuntimeError):  # F.linear's dtype error, not a silent widening
        sl.spike_linear_forward(x, w.float(), b.float(), 1.0)
    assert torch.equal(sl.spike_linear_forward(x, w, b, 0.0)[0], nn.functional.linear(x, w, b))
    assert torch.equal(sl.spike_linear_weight_grad(x, g, 0.0), g.t() @ x)


@pytest.mark.parametrize("native,tiles,isa,expected", [
    (True, False, "avx512", routes.SPIKE_LINEAR_MAX_DENSITY_BF16.get("avx512")),
    (True, True, "avx512", None),  # AMX: not measured against its bf16 products
    (False, False, "avx2", None),  # bf16 emulated
    (True, False, "other", None),
])
def test_the_bf16_limit_holds_only_where_it_was_measured(monkeypatch, native, tiles, isa, expected):
    monkeypatch.setattr(routes, "native_bf16", lambda: native)
    monkeypatch.setattr(routes, "bf16_matrix_tiles", lambda: tiles)
    monkeypatch.setattr(routes, "cpu_isa", lambda: isa)
    assert routes.bf16_limit() == expected


@pytest.fixture
def everywhere(monkeypatch):
    """The route for layers of every size, and in bf16 at every firing rate, on any CPU."""
    monkeypatch.setattr(routes, "_spike_min_work", {"train": 0, "infer": 0})
    monkeypatch.setattr(routes, "_spike_max_density_bf16", 1.0)


def _counting(monkeypatch) -> list[torch.dtype]:
    calls: list[torch.dtype] = []
    real = sl.kernel_spike_linear_forward
    monkeypatch.setattr(sl, "kernel_spike_linear_forward", lambda *a: calls.append(a[1].dtype) or real(*a))
    return calls


def test_token_linear_sums_bf16_spikes_only_where_the_route_has_a_limit(monkeypatch, everywhere):
    layer = TokenLinear(96, 130)
    x = (torch.rand(4, 2, 9, 96, generator=torch.Generator().manual_seed(0)) < 0.1).float()
    calls = _counting(monkeypatch)
    with routes.configured("+spike_linear"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            dense = nn.functional.linear(x, layer.weight, layer.bias)
        assert calls == [torch.bfloat16] and y.dtype == torch.bfloat16
        assert (y.float() - dense.float()).abs().max() <= dense.float().abs().max() * 2 ** -7
        calls.clear()
        with torch.autocast("cpu", dtype=torch.float16):
            layer(x)
        monkeypatch.setattr(routes, "_spike_max_density_bf16", None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), dense)
    with routes.configured("-spike_linear"), torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(routes, "_spike_max_density_bf16", 1.0)
        layer(x)
    assert not calls


def test_wide_layers_sum_bf16_spikes_up_to_their_own_limit(monkeypatch):
    """A layer with at least twice as many outputs as inputs takes the higher bf16 limit (0.20
    measured, against 0.15); square and narrow layers, and CPUs without a bf16 limit, do not."""
    monkeypatch.setattr(routes, "_spike_min_work", {"train": 0, "infer": 0})
    monkeypatch.setattr(routes, "_spike_max_density_bf16", 0.15)
    monkeypatch.setattr(routes, "_spike_max_density_bf16_wide", 0.20)
    assert routes.spike_limit_bf16(100, 200) == 0.20
    assert [routes.spike_limit_bf16(100, out) for out in (199, 100, 25)] == [0.15] * 3
    x = torch.zeros(3, 50, 100)
    x[..., :18] = 1.0  # a firing rate of 0.18: between the two limits
    summed: list[bool] = []  # per call of the kernel: whether it summed the spikes (or declined)
    real = sl.kernel_spike_linear_forward
    monkeypatch.setattr(sl, "kernel_spike_linear_forward", lambda *a: summed.append((y := real(*a)) is not None) or y)
    with routes.configured("+spike_linear"), torch.autocast("cpu", dtype=torch.bfloat16):
        wide, square = TokenLinear(100, 200), TokenLinear(100, 100)
        assert torch.equal(square(x), nn.functional.linear(x, square.weight, square.bias))
        assert summed == [False]
        y, dense = wide(x), nn.functional.linear(x, wide.weight, wide.bias)
        assert summed == [False, True]
        assert (y.float() - dense.float()).abs().max() <= dense.float().abs().max() * 2 ** -7
        monkeypatch.setattr(routes, "_spike_max_density_bf16", None)  # no bf16 limit on this CPU
        assert routes.spike_limit_bf16(100, 200) is None
        assert torch.equal(wide(x), dense) and summed == [False, True]


def _plain_and_ours(fan_out: int, x: torch.Tensor, spikes: bool):
    """A training step under bf16 autocast with ``spike_linear`` on, for ``nn.Linear`` and a
    ``TokenLinear`` with its weights: ``(layer, upstream gradient, results)``, the results
    ``(output, input grad, weight grad, bias grad, bytes autograd kept)`` of each."""
    from conftest import saved_bytes

    torch.manual_seed(0)
    plain, ours = nn.Linear(x.shape[-1], fan_out), TokenLinear(x.shape[-1], fan_out)
    ours.load_state_dict(plain.state_dict())
    g = torch.randn(*x.shape[:-1], fan_out).to(torch.bfloat16)
    results = []
    for layer, call in ((plain, lambda xi: plain(xi)), (ours, lambda xi: ours(xi, spikes=spikes))):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), routes.configured("+spike_linear"):
            y, saved = saved_bytes(lambda: call(xi))
        y.backward(g)
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad, saved))
    return ours, g, results


@pytest.mark.parametrize("spikes", [True, False])
def test_without_a_bf16_limit_a_token_linear_keeps_its_spikes_as_bits(spikes, monkeypatch):
    """Under CPU autocast (bf16), where the route has no bf16 limit (AMX tiles, or not measured),
    the token linears stay autocast's dense bf16 product; where the input is a neuron's spikes,
    autograd keeps them as bits instead of the bf16 copy. Output and every gradient equal plain
    ``nn.Linear`` under autocast bit for bit."""
    monkeypatch.setattr(routes, "_spike_max_density_bf16", None)
    x = (torch.rand(4, 16, 64, 384) < 0.2).to(torch.bfloat16)
    _, _, ((y0, *g0, saved0), (y1, *g1, saved1)) = _plain_and_ours(1536, x, spikes)
    assert y1.dtype == torch.bfloat16 and torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    if spikes:  # the bits (4096 x 6 words) and the bf16 weight instead of the bf16 input and weight
        assert saved0 - saved1 == x.numel() * 2 - 4096 * 6 * 8
    else:
        assert saved1 == saved0


def test_token_linear_training_in_bf16_sums_the_weight_gradient_too(everywhere):
    """Training under autocast with bf16 sums: the output and weight gradient are the float32
    twins rounded once to bf16 (then widened for the float32 weight), the input and bias gradients
    autocast's own, bit for bit; the input is kept as bits, not as its bf16 copy."""
    x = (torch.rand(2, 8, 64, 384) < 0.1).to(torch.bfloat16)
    ours, g, ((y0, gx0, gw0, gb0, saved0), (y1, gx1, gw1, gb1, saved1)) = _plain_and_ours(200, x, True)
    rows, g_rows = x.reshape(-1, 384).float(), g.reshape(-1, 200).float()
    w16, b16 = ours.weight.to(torch.bfloat16).float(), ours.bias.to(torch.bfloat16).float()
    assert torch.equal(y1.reshape(-1, 200), sl.spike_linear_reference(rows, w16, b16).to(torch.bfloat16))
    assert torch.equal(gw1, sl.spike_linear_weight_grad_reference(rows, g_rows).to(torch.bfloat16).float())
    assert torch.equal(gx1, gx0) and torch.equal(gb1, gb0)
    assert (gw1 - gw0).abs().max() <= gw0.abs().max() * 2 ** -7  # the dense product's, to bf16 rounding
    assert saved0 - saved1 == x.numel() * 2 - 1024 * 6 * 8


def test_a_zoo_model_in_bf16_with_and_without_the_sums_agrees_to_rounding(monkeypatch, everywhere):
    """CIFAR Spikingformer, inference under bf16 autocast, route on against off: one bf16 rounding of
    a linear's output can move a membrane across its threshold, so a bounded share of spikes
    differs; the logits agree to bf16 rounding."""
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", depth=2).eval()
    x = torch.randn(4, 3, 32, 32)
    calls = _counting(monkeypatch)
    runs = []
    for spec in ("+spike_linear", "-spike_linear"):
        seen = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().float().clone()))
                 for m in model.modules() if isinstance(m, MultiStepLIF)]
        with routes.configured(spec), torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).float()
        for h in hooks:
            h.remove()
        runs.append((seen, logits))
    assert calls.count(torch.bfloat16) == 12  # two blocks' six linears
    (on, on_logits), (off, off_logits) = runs
    flips = sum(int((a != b).sum()) for a, b in zip(on, off))
    total = sum(a.numel() for a in on)
    assert flips <= total // 1000, f"{flips} of {total} spikes differ"
    torch.testing.assert_close(on_logits, off_logits, rtol=0.05, atol=0.1)


def test_operators_pass_opcheck_in_bf16():
    """``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) on the
    forward (with and without packed bits) and both weight-gradient operators, with bf16 operands
    the kernels sum (a limit of 1.0)."""
    x, w, b, g = _operands(70, 24, 9, 0.3, torch.bfloat16)
    torch.library.opcheck(ops.spike_linear, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                             b.clone().requires_grad_(), 1.0))
    torch.library.opcheck(ops.spike_linear, (x.clone().requires_grad_(), w.clone().requires_grad_(), None, 1.0, True))
    torch.library.opcheck(ops.spike_linear_weight_grad, (x, g, 1.0))
    torch.library.opcheck(ops.spike_linear_weight_grad_packed, (sl.pack_spikes(x), 24, g, 1.0))
    fake = ops._spike_linear_fake(x.to("meta"), w.to("meta"), b.to("meta"), 1.0)[0]
    assert fake.dtype == ops.spike_linear(x, w, b, 1.0)[0].dtype == torch.bfloat16


def test_compiled_token_linear_in_bf16_equals_eager(monkeypatch, everywhere):
    """``torch.compile(fullgraph=True)`` (``aot_eager``) of a ``TokenLinear`` summing bf16 spikes under
    autocast: output and gradients equal eager's bit for bit (the operator stays one call)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TokenLinear(96, 130)
    x = (torch.rand(2, 4, 9, 96) < 0.1).float()
    g = torch.randn(2, 4, 9, 130).to(torch.bfloat16)

    def run(fn):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), routes.configured("+spike_linear"):
            y = fn(x)
        y.backward(g)
        return y, layer.weight.grad.clone(), layer.bias.grad.clone()

    eager = run(lambda t: layer(t, spikes=True))
    calls = _counting(monkeypatch)
    compiled = run(torch.compile(lambda t: layer(t, spikes=True), fullgraph=True, backend="aot_eager"))
    assert torch.bfloat16 in calls  # the compiled graph summed bf16 spikes
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
