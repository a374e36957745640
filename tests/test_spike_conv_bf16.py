"""The ``spike_conv`` route under CPU bf16 autocast: the weights of each window's spikes summed in
float32 from autocast's bf16 weights, each sum rounded once to bf16.

* The accumulation in bf16 against its twin bit for bit: the float32 twin of
  ``tests/test_spike_conv.py`` on the widened operands, rounded once to bf16, and a sum by hand that
  rounding after each addition would change.
* Against autocast's dense bf16 convolution (float32 sums too, in another order): at most one bf16
  step apart, in few outputs.
* Where the route takes bf16 maps (its bf16 limits: vector units, not AMX tiles; not float16, not
  narrow layers) and what a stage gives there: the forward of the twin, PyTorch's bf16 input
  gradient bit for bit, the weight gradient summed in float32 and rounded once; a zoo model's
  training step against the route off; compiled as eager.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import spike_conv as sc
from spikingformer.kernels import spike_conv_ops as conv_ops
from spikingformer.layers import ConvBN, routes
from spikingformer.models.zoo import create_model

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"the CPU kernel library did not build: {cpu.build_error()}")

BF16 = torch.bfloat16
ANY_RATE = {"min_channels": 16, "train": 1.0, "infer": 1.0, "weight_grad": 1.0}


def _spikes(shape, rate, seed=0, dtype=torch.float32) -> torch.Tensor:
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).to(dtype)
    return x.contiguous(memory_format=torch.channels_last)


def _weight(cout, cin, seed=1) -> torch.Tensor:
    return torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(seed)) * (2.0 / (9 * cin)) ** 0.5


def _steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b (same-signed finite values: their bit patterns' distance)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@pytest.mark.parametrize("shape", [(2, 16, 5, 7, 8), (3, 64, 6, 6, 130), (1, 200, 3, 3, 1)], ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
def test_bf16_accumulation_is_the_float32_twin_rounded_once(shape, rate):
    n, cin, h, w, cout = shape
    x = _spikes((n, cin, h, w), rate, dtype=BF16)
    weight, bias = _weight(cout, cin).to(BF16), torch.randn(cout).to(BF16)
    for b in (bias, None):
        y = sc.accumulate_conv2d(x, weight, b, 1.0)
        twin = sc.accumulate_conv_reference(x.float(), weight.float(), b.float() if b is not None else None)
        assert y.dtype == BF16 and torch.equal(y, twin.to(BF16))


def test_a_bf16_window_sum_is_rounded_once_by_hand():
    """bf16 has 8 significant bits: 1 + 2^-8 + 2^-8 is 1 + 2^-7 exactly in float32, a bf16 number;
    rounding after each addition (1 + 2^-8 -> 1, a tie to even) would give 1. One input channel, the
    centre pixel's window holding three spikes of weights 1, 2^-8, 2^-8."""
    x = torch.zeros(1, 1, 3, 3, dtype=BF16)
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = x[0, 0, 0, 2] = 1
    weight = torch.zeros(1, 1, 3, 3, dtype=BF16)
    weight[0, 0, 0] = torch.tensor([1.0, 2.0 ** -8, 2.0 ** -8])
    y = sc.accumulate_conv2d(x, weight, None, 1.0)
    assert y[0, 0, 1, 1].item() == 1 + 2.0 ** -7


def test_bf16_accumulation_is_autocasts_convolution_to_one_rounding():
    x = _spikes((4, 128, 8, 8), 0.1, dtype=BF16)
    weight = _weight(256, 128).to(BF16)
    y = sc.accumulate_conv2d(x, weight, None, 1.0)
    dense = nn.functional.conv2d(x, weight, padding=1)
    apart = _steps_apart(y, dense)
    assert int(apart.max()) <= 1 and float((apart > 0).float().mean()) < 0.01


def _train_stage(stage, x, grad, spec, dtype=BF16):
    """Output and (input, weight) gradients of ``stage.convolve(x, spikes=True)`` under routes ``spec``
    and CPU autocast to ``dtype``."""
    x = x.detach().requires_grad_()
    stage.zero_grad()
    with routes.configured(spec), torch.autocast("cpu", dtype=dtype):
        y = stage.convolve(x, spikes=True)
    y.backward(grad)
    return y.detach(), x.grad, stage.conv.weight.grad.clone()


@pytest.fixture
def summed(monkeypatch):
    """The route's bf16 limits lifted (as where it has them, at any rate, from 16 channels), and a
    record of the maps and weights the accumulation was given."""
    monkeypatch.setattr(routes, "_spike_conv_bf16", ANY_RATE)
    seen = []
    real = sc.accumulate_conv2d
    monkeypatch.setattr(sc, "accumulate_conv2d", lambda x, w, b, d, p=None: seen.append((x.detach().clone(), w.detach()))
                        or real(x, w, b, d, p))
    return seen


@pytest.mark.parametrize("layout", ["+channels_last", "-channels_last"])
def test_a_stage_under_bf16_autocast_sums_its_spikes(layout, summed):
    """Inference and training of a tokenizer stage's convolution under bf16 autocast, its input float32
    spikes (as the neuron gives them outside the fused kernels): the bf16 twin's output of autocast's
    casts; backward gives PyTorch's bf16 input gradient bit for bit (the module call's), and the
    weight gradient summed in float32 and rounded once to bf16."""
    stage = ConvBN(32, 24)
    x = _spikes((6, 32, 5, 5), 0.1).view(2, 3, 32, 5, 5)
    if layout == "-channels_last":
        x = x.contiguous()
    wb = stage.conv.weight.detach().to(BF16)
    twin = sc.accumulate_conv_reference(x.flatten(0, 1), wb.float()).to(BF16).view(2, 3, 24, 5, 5)
    with routes.configured(f"+spike_conv,{layout}"), torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        assert torch.equal(stage.convolve(x, spikes=True), twin)
    assert len(summed) == 1 and summed[0][0].dtype == BF16 and torch.equal(summed[0][1], wb)
    g = torch.randn(2, 3, 24, 5, 5, generator=torch.Generator().manual_seed(5)).to(BF16)
    y, gx, gw = _train_stage(stage, x, g, f"+spike_conv,{layout}")
    py, pgx, pgw = _train_stage(stage, x, g, f"-spike_conv,{layout}")
    assert len(summed) == 2 and torch.equal(y, twin) and torch.equal(gx, pgx) and gx.dtype == torch.float32
    want = sc.accumulate_conv_weight_grad_reference(x.flatten(0, 1), g.flatten(0, 1).float()).to(BF16).float()
    assert torch.equal(gw, want)
    # ours one rounding from float64's; autograd's (the dense convolution's backward in bf16) as close,
    # or up to 4 bf16 steps off where oneDNN, capped at AVX2, emulates bf16
    exact = torch.ops.aten.convolution_backward(g.flatten(0, 1).double(), x.flatten(0, 1).double(),
                                                wb.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                [False, True, False])[1]
    ours, theirs = (float((v.double() - exact).abs().max()) / float(exact.abs().max()) for v in (gw, pgw))
    assert ours <= 2.0 ** -8 and theirs <= 2.0 ** -6


def test_between_the_limits_a_stage_sums_only_its_weight_gradient(monkeypatch):
    """Maps firing above the bf16 forward's limit and at most at the weight gradient's: autocast's bf16
    convolution (the module call's output bit for bit) and the weight gradient summed."""
    monkeypatch.setattr(routes, "_spike_conv_bf16", dict(ANY_RATE, train=0.05, infer=0.05, weight_grad=0.5))
    monkeypatch.setattr(sc, "accumulate_conv2d", lambda *a: pytest.fail("the forward was summed"))
    stage = ConvBN(32, 24)
    x = _spikes((6, 32, 5, 5), 0.3).view(2, 3, 32, 5, 5)
    g = torch.randn(2, 3, 24, 5, 5, generator=torch.Generator().manual_seed(6)).to(BF16)
    y, gx, gw = _train_stage(stage, x, g, "+spike_conv")
    py, pgx, _ = _train_stage(stage, x, g, "-spike_conv")
    assert torch.equal(y, py) and torch.equal(gx, pgx)
    want = sc.accumulate_conv_weight_grad_reference(x.flatten(0, 1), g.flatten(0, 1).float()).to(BF16).float()
    assert torch.equal(gw, want)


def test_where_the_route_leaves_autocasts_convolution(summed, monkeypatch):
    """Not under float16 autocast, not for fewer input channels than the bf16 limit's, not above its
    rates, and nowhere without bf16 limits (a CPU whose bf16 runs on AMX tiles or is not native)."""
    stage = ConvBN(32, 24)
    x = _spikes((6, 32, 5, 5), 0.1).view(2, 3, 32, 5, 5)
    g = torch.randn(2, 3, 24, 5, 5, generator=torch.Generator().manual_seed(7))
    plain = _train_stage(stage, x, g.half(), "-spike_conv", torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(_train_stage(stage, x, g.half(), "+spike_conv", torch.float16), plain))
    for limits in (dict(ANY_RATE, min_channels=64), dict(ANY_RATE, train=0.05, infer=0.05, weight_grad=0.05), None):
        monkeypatch.setattr(routes, "_spike_conv_bf16", limits)
        plain = _train_stage(stage, x, g.to(BF16), "-spike_conv")
        on = _train_stage(stage, x, g.to(BF16), "+spike_conv")
        assert all(torch.equal(a, b) for a, b in zip(on, plain))
    assert not summed


def test_the_route_has_bf16_limits_only_where_bf16_runs_on_vector_units():
    from spikingformer.cpu_features import bf16_matrix_tiles, native_bf16

    vector_units = native_bf16() and not bf16_matrix_tiles()
    assert (routes._spike_conv_bf16 is not None) == (vector_units and routes.cpu_isa() in routes.SPIKE_CONV_BF16)


def test_zoo_model_trains_under_bf16_autocast_with_the_route_to_rounding(summed):
    """A bf16 training step of a zoo model: the tokenizer's convolutions of spikes summed, each equal
    to its twin on the input it got; loss and gradients agree with the route off to bf16 rounding
    (spikes may flip where a membrane lies within rounding of a threshold)."""
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", depth=1).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])

    def step(spec):
        model.zero_grad()
        with routes.configured(spec), torch.autocast("cpu", dtype=BF16):
            loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_on, grads_on = step("+spike_conv,-winograd")  # (winograd rounds otherwise: off in both)
    assert sorted(inp.shape[1] for inp, _ in summed) == [48, 96, 192, 384]  # every stage after the first
    for inp, w in list(summed):  # (a corner of each map: the twin's column loop kept short)
        corner = inp[:1, :, :6, :6]
        assert torch.equal(sc.accumulate_conv2d(corner, w, None, 1.0),
                           sc.accumulate_conv_reference(corner.float(), w.float()).to(BF16))
    loss_off, grads_off = step("-spike_conv,-winograd")
    torch.testing.assert_close(loss_on, loss_off, rtol=2e-2, atol=2e-2)
    assert grads_on.keys() == grads_off.keys()
    largest = max(float(g.abs().max()) for g in grads_off.values())
    for name in grads_on:  # (see tests/test_spike_conv.py's float32 twin of this test for the scale's floor)
        scale = max(float(grads_off[name].abs().max()), 1e-3 * largest)
        assert float((grads_on[name] - grads_off[name]).abs().max()) <= 0.1 * scale, name


def test_the_operators_keep_bf16_under_torch_compiles_fake_tensors():
    """The operators' fake implementations give the bf16 outputs the eager operators give."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, weight = _spikes((2, 16, 4, 4), 0.1, dtype=BF16), _weight(8, 16).to(BF16)
    y, packed = conv_ops.spike_conv_train(x, weight, None, 1.0, 1.0)
    g = torch.ones_like(y)
    grads = conv_ops.spike_conv_train_backward(packed, g, weight, list(x.shape), True, 1.0, [True, True, False])
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(weight)
        fy, fpacked = conv_ops.spike_conv_train(fx, fw, None, 1.0, 1.0)
        fgrads = conv_ops.spike_conv_train_backward(fpacked, mode.from_tensor(g), fw, list(x.shape), True, 1.0,
                                                    [True, True, False])
    assert (fy.dtype, fy.shape, fy.stride()) == (y.dtype, y.shape, y.stride())
    for f, e in zip(fgrads[:2], grads[:2]):
        assert (f.dtype, f.shape, f.stride()) == (e.dtype, e.shape, e.stride()) == (BF16, e.shape, e.stride())


def test_compiled_under_bf16_autocast_equals_eager(summed):
    """``torch.compile(fullgraph=True)`` (``aot_eager``: eager's kernels) of a stage's convolution under
    bf16 autocast: the training operator in the graph on autocast's bf16 casts, output and gradients
    equal to eager's bit for bit."""
    torch._dynamo.reset()
    stage = ConvBN(32, 24)
    x = _spikes((6, 32, 5, 5), 0.1).view(2, 3, 32, 5, 5)
    g = torch.randn(2, 3, 24, 5, 5, generator=torch.Generator().manual_seed(8)).to(BF16)

    def run(fn):
        xi = x.detach().requires_grad_()
        stage.zero_grad()
        with routes.configured("+spike_conv"), torch.autocast("cpu", dtype=BF16):
            y = fn(xi)
        y.backward(g)
        return y.detach(), xi.grad, stage.conv.weight.grad.clone()

    eager = run(lambda xi: stage.convolve(xi, spikes=True))
    compiled = run(torch.compile(lambda xi: stage.convolve(xi, spikes=True), fullgraph=True, backend="aot_eager"))
    assert len(summed) == 2  # summed in both runs (the compiled one through the operator in its graph)
    assert eager[0].dtype == BF16 and all(torch.equal(a, b) for a, b in zip(eager, compiled))


def test_a_non_finite_weight_leaves_autocasts_convolution(summed):
    """A NaN in the weight (its bf16 cast checked at each call): autocast's convolution, NaN and all,
    in inference and training, never the sums."""
    stage = ConvBN(32, 24)
    with torch.no_grad():
        stage.conv.weight[0, 0, 0, 0] = float("nan")
    x = _spikes((6, 32, 5, 5), 0.1).view(2, 3, 32, 5, 5)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        with routes.configured("+spike_conv"):
            on = stage.convolve(x, spikes=True)
        with routes.configured("-spike_conv"):
            off = stage.convolve(x, spikes=True)
    torch.testing.assert_close(on, off, rtol=0, atol=0, equal_nan=True)
    g = torch.ones(2, 3, 24, 5, 5, dtype=BF16)
    y, _, _ = _train_stage(stage, x, g, "+spike_conv")
    torch.testing.assert_close(y, off, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(off).any() and not summed
