"""The ``spike_conv`` route: the tokenizer's 3x3 convolutions of spike maps as three int8
convolutions (oneDNN), against independent expectations.

* The weight pieces by hand, and their remainder within the bound the arithmetic promises.
* oneDNN's int8 convolutions against their plain PyTorch twin (each piece's convolution in float64,
  which is exact for spikes, scaled and rounded to float32, pieces added smallest first), bit for bit.
* The route against the float64 convolution of the original weights: within the pieces' remainder
  and three roundings, closer than the float32 convolution itself.
* The accumulation (each window's spikes' weights added, the spike linear's kernel) against its
  twin (the unfolded maps through the spike linear's reference), bit for bit, and the twin against
  the float64 convolution.
* Where the route runs in a tokenizer (inference, float32; wide inputs on a CPU with 8-bit dot
  products, or sparse ones) and where it does not (autocast, dense narrow inputs, hooks,
  non-finite weights); weights changed in place are packed again.
* Training (sparse inputs only): the weight gradient by accumulation against its twin bit for bit
  and float64's gradient, the input gradient PyTorch's bit for bit, the spikes kept as bits, and a
  zoo model's training step against the route off.
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from spikingformer.kernels import spike_conv as sc
from spikingformer.kernels import spike_conv_ops as conv_ops
from spikingformer.kernels.spike_linear import packed_width
from spikingformer.layers import ConvBN, routes
from spikingformer.layers import spike_conv as route
from spikingformer.models.zoo import create_model

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.onednn, "qconv2d_pointwise"),
                                reason="this PyTorch build has no oneDNN int8 convolution")


def _spikes(shape, rate=0.3, seed=0, channels_last=True) -> torch.Tensor:
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _weight(cout, cin, seed=1) -> torch.Tensor:
    return torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(seed)) * (2.0 / (9 * cin)) ** 0.5


def test_pieces_by_hand():
    """One channel with weights 1, -0.5 and 2^-30: the first piece's scale is 1/127 (float32), the
    second takes 1 - 127 s1 and -0.5 + 63.5 s1's rounding, the last what is left."""
    w = torch.tensor([1.0, -0.5, 2.0 ** -30]).view(1, 3, 1, 1).expand(1, 3, 3, 3).contiguous()
    qs, ss = sc.weight_pieces(w)
    assert ss[0].item() == torch.tensor(1.0 / 127).item()
    assert qs[0].view(3, 9)[:, 0].tolist() == [127, -64, 0]  # -0.5 / s1 = -63.5 rounds to even: -64
    total = sum(q.double() * s.double().view(-1, 1, 1, 1) for q, s in zip(qs, ss))
    rest = (w.double() - total).abs().max().item()
    assert rest <= ss[2].item() / 2
    assert rest < 2.0 ** -24  # the largest weight, 1, to half an ulp


@pytest.mark.parametrize("cout,cin", [(16, 8), (64, 128), (7, 3)])
def test_pieces_hold_every_weight_to_half_the_last_scale(cout, cin):
    w = _weight(cout, cin)
    w[0] = 0.0  # a channel of zeros: scale 1, pieces 0
    w[1, 0, 0, 0] = 3e4  # one large weight among small ones
    qs, ss = sc.weight_pieces(w)
    assert all(q.dtype == torch.int8 and int(q.abs().max()) <= 127 for q in qs)
    assert ss[0][0].item() == 1.0 and not any(q[0].any() for q in qs)
    total = sum(q.double() * s.double().view(-1, 1, 1, 1) for q, s in zip(qs, ss))
    rest = (w.double() - total).abs().flatten(1).amax(1)
    assert torch.all(rest <= ss[2].double() / 2)
    assert torch.all(rest <= w.double().abs().flatten(1).amax(1) * 2.0 ** -23)


@pytest.mark.parametrize("shape,cout", [((2, 8, 5, 7), 16), ((4, 128, 16, 16), 256), ((3, 3, 1, 1), 5)], ids=str)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_convolutions_equal_their_twin_bit_for_bit(shape, cout, channels_last, bias):
    x, w = _spikes(shape, channels_last=channels_last), _weight(cout, shape[1])
    b = torch.randn(cout, generator=torch.Generator().manual_seed(2)) if bias else None
    got = sc.spike_conv2d(x, sc.PackedPieces(w), b)
    assert torch.equal(got, sc.spike_conv_reference(x, w, b))


@pytest.mark.parametrize("rate", [0.0, 0.05, 0.4, 1.0])
def test_closer_to_float64_than_the_float32_convolution(rate):
    """Each output differs from the float64 convolution by at most the pieces' remainder summed
    over the window's spikes, plus three float32 roundings."""
    x, w = _spikes((4, 192, 12, 12), rate), _weight(96, 192)
    exact = nn.functional.conv2d(x.double(), w.double(), padding=1)
    got = sc.spike_conv2d(x, sc.PackedPieces(w)).double()
    _, ss = sc.weight_pieces(w)
    bound = 192 * 9 * ss[2].double().view(1, -1, 1, 1) / 2 + 3 * 2.0 ** -24 * exact.abs()
    assert torch.all((got - exact).abs() <= bound + 1e-30)
    dense = nn.functional.conv2d(x, w, padding=1).double()
    assert (got - exact).abs().max() <= max((dense - exact).abs().max(), 1e-30)


@pytest.mark.parametrize("bad", [0.5, -1.0, 256.0, float("nan")])
def test_refuses_what_is_not_spikes(bad):
    x = _spikes((1, 4, 3, 3))
    x[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match="not an integer from 0 to 255"):
        sc.spike_conv2d(x, sc.PackedPieces(_weight(2, 4)))


def _torch_uint8(x):
    """The conversion's twin: PyTorch's cast, or None where it does not give the value back."""
    xq = x.to(torch.uint8)
    return xq if torch.equal(xq.to(x.dtype), x) else None


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
@pytest.mark.parametrize("bad", [None, 0.5, -1.0, -0.0, 256.0, 255.0, 1e10, -1e10, float("nan"), float("inf")])
def test_one_pass_uint8_conversion_equals_its_twin(layout, bad, monkeypatch):
    """``as_uint8`` (the library's one pass where it applies) gives PyTorch's cast and refuses exactly
    what the cast does not give back; without the library (and for other strides) it is the twin."""
    x = _spikes((3, 70, 33, 35), rate=0.4, channels_last=layout == "channels_last")  # > 2^16: several pieces
    if layout == "strided":
        x = x[:, :, :, ::2]
    if bad is not None:
        x[2, 69, 32, 1] = bad
    want = _torch_uint8(x)
    for library in (True, False):
        if not library:
            monkeypatch.setattr(sc.spike_linear, "get_library", lambda: None)
        if want is None:
            with pytest.raises(ValueError, match="not an integer from 0 to 255"):
                sc.as_uint8(x)
        else:
            got = sc.as_uint8(x)
            assert torch.equal(got, want)
            assert got.stride() == x.stride() or layout == "strided"  # the layout kept


def test_small_integers_are_exact_too():
    x = _spikes((1, 4, 3, 3))
    x[0, 1, 2, 0], x[0, 3, 0, 0] = 2.0, 255.0
    w = _weight(2, 4)
    assert torch.equal(sc.spike_conv2d(x, sc.PackedPieces(w)), sc.spike_conv_reference(x, w))


@pytest.fixture
def int8_cpu(monkeypatch):
    """The route as on a CPU with 8-bit dot products (oneDNN's int8 convolution computes the same
    values without them, only slower), its limits 128 channels and a firing rate of 0.1."""
    monkeypatch.setattr(conv_ops, "native_int8", lambda: True)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 128)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.1})


def test_conv_bn_takes_the_int8_pieces(int8_cpu):
    stage = ConvBN(128, 32)
    x = _spikes((6, 128, 6, 6)).view(2, 3, 128, 6, 6)
    want = sc.spike_conv_reference(x.flatten(0, 1), stage.conv.weight).view(2, 3, 32, 6, 6)
    plain = stage.conv(x.flatten(0, 1)).view(2, 3, 32, 6, 6)
    with routes.configured("+spike_conv"):
        with torch.no_grad():
            assert torch.equal(stage.convolve(x, spikes=True), want)
            assert torch.equal(stage.convolve(x), plain)  # not said to be spikes
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert stage.convolve(x, spikes=True).dtype == torch.bfloat16  # autocast's own convolution
            handle = stage.conv.register_forward_hook(lambda *a: None)
            assert torch.equal(stage.convolve(x, spikes=True), plain)  # a hook sees the module call
            handle.remove()
        y = stage.convolve(x, spikes=True)  # training, above the limit: the pieces' forward too
        assert torch.equal(y.detach(), want) and y.requires_grad
    with routes.configured("-spike_conv"), torch.no_grad():
        assert torch.equal(stage.convolve(x, spikes=True), plain)
    narrow = ConvBN(64, 32)
    with routes.configured("+spike_conv"), torch.no_grad():
        y = x[:, :, :64]
        assert torch.equal(narrow.convolve(y, spikes=True), narrow.conv(y.flatten(0, 1)).view(2, 3, 32, 6, 6))


def test_weights_changed_in_place_are_packed_again(int8_cpu):
    stage = ConvBN(128, 8)
    x = _spikes((2, 128, 4, 4)).view(1, 2, 128, 4, 4)
    with routes.configured("+spike_conv"), torch.no_grad():
        first = stage.convolve(x, spikes=True)
        stage.conv.weight.mul_(-2.0)  # what an optimizer step or load_state_dict does: a new version
        assert torch.equal(stage.convolve(x, spikes=True),
                           sc.spike_conv_reference(x.flatten(0, 1), stage.conv.weight).view(first.shape))
        assert torch.equal(stage.convolve(x, spikes=True), -2.0 * first)  # exact: scales by a power of two
        stage.conv.weight[0, 0, 0, 0] = float("nan")
        # the plain convolution, NaN and all (where this PyTorch's own convolution keeps it: on x86, not
        # in PyTorch 2.10's for AArch64, whose products of 0 and NaN gave 0 under QEMU)
        plain = stage.conv(x.flatten(0, 1)).view(first.shape)
        torch.testing.assert_close(stage.convolve(x, spikes=True), plain, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(plain[:, :, 0]).any() or platform.machine() not in ("x86_64", "AMD64")


@pytest.mark.parametrize("int8", [False, True], ids=["accumulation", "int8 pieces"])
def test_a_model_built_under_inference_mode_takes_the_route(int8, monkeypatch):
    """Weights made under ``torch.inference_mode`` are inference tensors, which have no version
    counter: the weight cache compares their values (reading the version raised a RuntimeError)."""
    monkeypatch.setattr(conv_ops, "native_int8", lambda: int8)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.0 if int8 else 1.0,
                                                            "weight_grad": 0.1})
    with torch.inference_mode():
        stage = ConvBN(16, 8)
        x = _spikes((6, 16, 5, 5), 0.3).view(2, 3, 16, 5, 5)
        with routes.configured("+spike_conv"):
            first = stage.convolve(x, spikes=True)
            stage.conv.weight.mul_(-2.0)  # in place, as a load_state_dict there would: no version to say so
            second = stage.convolve(x, spikes=True)
    twin = sc.spike_conv_reference if int8 else sc.accumulate_conv_reference
    assert torch.equal(second, twin(x.flatten(0, 1), stage.conv.weight).view(first.shape))
    assert torch.equal(second, -2.0 * first)


@pytest.mark.parametrize("change", ["fused AdamW step", ".data in place", "NaN through .data"])
def test_weights_changed_without_a_new_version_are_packed_again(int8_cpu, change):
    """PyTorch 2.14.1's fused optimizers (``torch.optim.AdamW(..., fused=True)``) and writes through
    ``.data`` change a weight in place without bumping its version counter. The pieces (and the
    finiteness check) are made again all the same: their cache compares the weight itself. Keyed by
    version alone, the convolution kept the first weights' pieces, and training with a fused
    optimizer on a CPU with AMX went nowhere (the digits quick start at 12.5-80% top-1)."""
    stage = ConvBN(128, 8)
    x = _spikes((2, 128, 4, 4)).view(1, 2, 128, 4, 4)
    weight = stage.conv.weight
    with routes.configured("+spike_conv"):
        with torch.no_grad():
            stage.convolve(x, spikes=True)  # the pieces of the first weights
        version = weight._version
        if change == "fused AdamW step":
            weight.grad = torch.randn_like(weight)
            torch.optim.AdamW([weight], lr=0.1, fused=True).step()
        elif change == ".data in place":
            weight.data.mul_(-2.0)
        else:
            weight.data[0, 0, 0, 0] = float("nan")
        assert weight._version == version  # no new version: the case the cache must see
        with torch.no_grad():
            got = stage.convolve(x, spikes=True)
    plain = stage.conv(x.flatten(0, 1)).view(got.shape)
    if change == "NaN through .data":
        torch.testing.assert_close(got, plain, rtol=0, atol=0, equal_nan=True)
    else:
        assert torch.equal(got, sc.spike_conv_reference(x.flatten(0, 1), weight.detach()).view(got.shape))


def test_a_fused_model_takes_the_route_with_its_bias(int8_cpu, monkeypatch):
    """After ConvBN fusion each convolution has a bias (BN folded in): the route adds it after the
    pieces, as the twin does, and the logits agree with the fused model's float32 convolutions."""
    from spikingformer.deploy.fuse import fuse_model

    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", depth=1)
    for bn in (s.bn for s in model.tokenizer.stages):  # statistics that make the tokenizer fire, and a bias to fold
        bn.running_mean.normal_(0.0, 0.1), bn.running_var.uniform_(0.5, 1.5)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_(1.0, 0.5)
    model = fuse_model(model)
    x = torch.randn(2, 3, 32, 32)
    taken = []
    real = sc.spike_conv2d
    monkeypatch.setattr(sc, "spike_conv2d", lambda x, p, b=None: taken.append((x.clone(), b, real(x, p, b))) or taken[-1][2])
    convs = {s.conv.in_channels: s.conv for s in model.tokenizer.stages[1:]}
    with torch.inference_mode():
        with routes.configured("+spike_conv"):
            on = model(x)
        with routes.configured("-spike_conv"):
            off = model(x)
    assert sorted({inp.shape[1] for inp, _, _ in taken}) == [192, 384]
    for inp, bias, out in taken:
        conv = convs[inp.shape[1]]
        assert bias is conv.bias and torch.equal(out, sc.spike_conv_reference(inp, conv.weight, conv.bias))
        assert inp.any() and not torch.equal(out, sc.spike_conv_reference(inp, conv.weight))  # spikes, and the bias
    torch.testing.assert_close(on, off, rtol=1e-3, atol=0.05)


def test_each_way_where_it_measured_faster(monkeypatch):
    """Above the firing-rate limit, the int8 pieces where the CPU has 8-bit dot products, else the
    float32 convolution; at or below it, the accumulation; inputs narrower than the channel limit
    keep the float32 convolution either way."""
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 128)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.1})
    stage = ConvBN(256, 8)
    dense, sparse = _spikes((2, 256, 4, 4), rate=0.5), _spikes((2, 256, 4, 4), rate=0.05)
    w = stage.conv.weight
    with routes.configured("+spike_conv"), torch.no_grad():
        monkeypatch.setattr(conv_ops, "native_int8", lambda: False)
        assert torch.equal(route.convolve(stage.conv, dense), stage.conv(dense))
        assert torch.equal(route.convolve(stage.conv, sparse), sc.accumulate_conv_reference(sparse, w))
        monkeypatch.setattr(conv_ops, "native_int8", lambda: True)
        assert torch.equal(route.convolve(stage.conv, dense), sc.spike_conv_reference(dense, w))
        assert torch.equal(route.convolve(stage.conv, sparse), sc.accumulate_conv_reference(sparse, w))
        assert not route.takes(stage.conv, sparse[:0])  # no maps: the module call (no first map to look at)
        assert route.convolve(stage.conv, sparse[:0]).shape == (0, 8, 4, 4)
        narrow = ConvBN(64, 8)
        assert not route.takes(narrow.conv, sparse[:, :64])
        assert torch.equal(narrow.convolve(sparse[None, :, :64], spikes=True)[0], narrow.conv(sparse[:, :64]))
    assert {isa for isa, on in routes.MEASURED_FASTER.items() if "spike_conv" in on} == {"avx512", "avx2"}


# ----------------------------------------------------------------------------- accumulation


def test_accumulation_by_hand():
    """One 2x2 map of 2 channels, spikes at (0, 0) channel 1 and (1, 1) channel 0: output (0, 0)
    sees the first at its centre tap (4) and the second at tap 8; the bias comes first."""
    x = torch.zeros(1, 2, 2, 2)
    x[0, 1, 0, 0] = x[0, 0, 1, 1] = 1.0
    w = torch.arange(2 * 2 * 9, dtype=torch.float32).view(2, 2, 3, 3)  # w[o, c, i, j]
    b = torch.tensor([0.5, -0.5])
    want = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1).float()
    assert want[0, :, 0, 0].tolist() == [0.5 + w[0, 1, 1, 1].item() + w[0, 0, 2, 2].item(),
                                        -0.5 + w[1, 1, 1, 1].item() + w[1, 0, 2, 2].item()]
    assert torch.equal(sc.accumulate_conv_reference(x, w, b), want)
    assert torch.equal(sc.accumulate_conv2d(x, w, b, 1.0), want)
    assert sc.window_weight(w)[0, 4 * 2 + 1] == w[0, 1, 1, 1]  # column (3 i + j) C + c


@pytest.mark.parametrize("shape,cout", [((2, 8, 5, 7), 16), ((3, 5, 1, 1), 4), ((2, 96, 9, 6), 70), ((1, 3, 2, 9), 65)],
                         ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.08, 1.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [True, False])
def test_accumulation_equals_its_twin_bit_for_bit(shape, cout, rate, bias, channels_last, monkeypatch):
    monkeypatch.setattr(sc, "ROWS_PER_PASS", 7)  # several passes of window lists
    x, w = _spikes(shape, rate, channels_last=channels_last), _weight(cout, shape[1])
    b = torch.randn(cout, generator=torch.Generator().manual_seed(2)) if bias else None
    got = sc.accumulate_conv2d(x, w, b, 1.0)
    want = sc.accumulate_conv_reference(x, w, b)
    assert torch.equal(got, want)
    exact = nn.functional.conv2d(x.double(), w.double(), b.double() if bias else None, padding=1)
    torch.testing.assert_close(want.double(), exact, rtol=1e-5, atol=1e-5)


def test_accumulation_declines_and_refuses():
    x, w = _spikes((2, 8, 4, 4), 0.3), _weight(4, 8)
    assert sc.accumulate_conv2d(x, w, None, 0.1) is None  # denser than the limit: nothing computed
    x[0, 1, 2, 3] = 0.5
    with pytest.raises(ValueError, match="other than 0 and 1"):
        sc.accumulate_conv2d(x, w, None, 1.0)
    assert sc.accumulate_conv2d(_spikes((1, 7282, 1, 1), 0.0), _weight(1, 7282), None, 1.0) is None  # 9 C > 2^16


def test_conv_bn_accumulates_sparse_inputs(monkeypatch):
    monkeypatch.setattr(conv_ops, "native_int8", lambda: False)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.1})
    stage = ConvBN(16, 8)
    sparse, dense = _spikes((6, 16, 5, 5), 0.05).view(2, 3, 16, 5, 5), _spikes((6, 16, 5, 5), 0.5).view(2, 3, 16, 5, 5)
    with routes.configured("+spike_conv"), torch.no_grad():
        assert torch.equal(stage.convolve(sparse, spikes=True),
                           sc.accumulate_conv_reference(sparse.flatten(0, 1), stage.conv.weight).view(2, 3, 8, 5, 5))
        assert torch.equal(stage.convolve(dense, spikes=True), stage.conv(dense.flatten(0, 1)).view(2, 3, 8, 5, 5))
        stage.conv.weight[0, 0, 0, 0] = float("inf")
        assert torch.isnan(stage.convolve(sparse, spikes=True)).any()  # the plain convolution: inf * 0
    with routes.configured("+spike_conv"):  # training too
        plain = stage.conv(sparse.flatten(0, 1)).view(2, 3, 8, 5, 5)
        torch.testing.assert_close(stage.convolve(sparse, spikes=True), plain, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("shape,cout", [((2, 8, 5, 7), 16), ((3, 70, 6, 4), 130), ((1, 3, 2, 9), 65)], ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.08, 1.0])
@pytest.mark.parametrize("channels_last", [True, False])
def test_weight_gradient_by_accumulation_equals_its_twin_bit_for_bit(shape, cout, rate, channels_last, monkeypatch):
    """From the forward's packed bits, over several passes of window lists, equal to the twin (the
    output gradient's rows summed at every window's spikes, in order) and to float64's gradient to
    rounding."""
    monkeypatch.setattr(sc, "ROWS_PER_PASS", 7)
    x, w = _spikes(shape, rate, channels_last=channels_last), _weight(cout, shape[1])
    n, c, h, wd = shape
    packed = torch.empty(n * h * wd, packed_width(c), dtype=torch.int64)
    assert torch.equal(sc.accumulate_conv2d(x, w, None, 1.0, packed), sc.accumulate_conv_reference(x, w))
    g = torch.randn(n, cout, h, wd, generator=torch.Generator().manual_seed(3))
    got = sc.accumulate_conv_weight_grad(packed, x.shape, g)
    assert got.shape == w.shape and got.is_contiguous()
    assert torch.equal(got, sc.accumulate_conv_weight_grad_reference(x, g))
    exact = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1], False,
                                                [0, 0], 1, [False, True, False])[1]
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def _train_stage(stage, x, grad, spec):
    """Output and (input, weight, bias) gradients of ``stage.convolve(x, spikes=True)`` under routes ``spec``."""
    x = x.detach().requires_grad_()
    stage.zero_grad()
    with routes.configured(spec):
        y = stage.convolve(x, spikes=True)
    y.backward(grad)
    bias = stage.conv.bias.grad if stage.conv.bias is not None else None
    return y.detach(), x.grad, stage.conv.weight.grad.clone(), bias


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["+channels_last", "-channels_last"])
def test_training_accumulates_sparse_inputs_and_keeps_bits(bias, layout, monkeypatch):
    """In training, sparse spike maps are summed as in inference; backward gives PyTorch's input
    gradient bit for bit, the weight gradient of the accumulation's twin, and the bias gradient; autograd
    keeps the spikes as bits (no float32 map of the input)."""
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.0, "weight_grad": 0.1})
    stage = ConvBN(24, 8)
    if bias:
        stage.conv.bias = nn.Parameter(torch.randn(8))
    x = _spikes((6, 24, 5, 5), 0.05, channels_last=layout == "+channels_last").view(2, 3, 24, 5, 5)
    g = torch.randn(2, 3, 8, 5, 5, generator=torch.Generator().manual_seed(4))
    y, gx, gw, gb = _train_stage(stage, x, g, f"+spike_conv,{layout}")
    py, pgx, pgw, pgb = _train_stage(stage, x, g, f"-spike_conv,{layout}")
    maps, w = x.flatten(0, 1), stage.conv.weight
    assert torch.equal(y.flatten(0, 1), sc.accumulate_conv_reference(maps, w, stage.conv.bias))
    assert torch.equal(gx, pgx)
    assert torch.equal(gw, sc.accumulate_conv_weight_grad_reference(maps, g.flatten(0, 1)))
    torch.testing.assert_close(gw, pgw, rtol=1e-5, atol=1e-5)
    assert (gb is None) == (not bias) and (gb is None or torch.allclose(gb, pgb, rtol=1e-6, atol=1e-5))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            routes.configured("+spike_conv"):
        stage.convolve(x.detach().requires_grad_(), spikes=True)
    assert [t.dtype for t in saved] == [torch.int64, torch.float32] and saved[1] is stage.conv.weight


def test_training_form_refuses_second_order_gradients(monkeypatch):
    """It keeps bits, not the input, so it cannot give a second-order gradient: a backward that builds
    a graph raises and names the way out, instead of leaving out the weight's dependence."""
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    stage = ConvBN(16, 8)
    x = _spikes((6, 16, 5, 5), 0.05).view(2, 3, 16, 5, 5).requires_grad_()
    with routes.configured("+spike_conv"):
        y = stage.convolve(x, spikes=True)
        with pytest.raises(RuntimeError, match="SPIKINGFORMER_ROUTES=-spike_conv"):
            torch.autograd.grad(y.sum(), x, create_graph=True)
        with routes.configured("-spike_conv"):
            torch.autograd.grad(stage.convolve(x, spikes=True).square().sum(), x, create_graph=True)  # route off: fine


@pytest.mark.parametrize("layout", ["+channels_last", "-channels_last"])
def test_training_above_the_limit_after_a_sparse_sample(layout, monkeypatch):
    """The sampled maps sparse (every second of 16: ``sampled_rate``), the whole denser than the limit,
    on a CPU without 8-bit matrix tiles: the float32 convolution, its gradients those of autograd's bit
    for bit (the weight's from the unpacked bits)."""
    monkeypatch.setattr(conv_ops, "native_int8", lambda: False)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.1})
    stage = ConvBN(16, 8)
    sparse, dense = _spikes((8, 16, 6, 6), 0.02), _spikes((8, 16, 6, 6), 0.6, seed=1)
    x = torch.stack([sparse, dense], 1).contiguous().view(4, 4, 16, 6, 6)  # maps 0, 2, 4, ... sparse
    if layout == "+channels_last":  # (else NCHW, as .contiguous() made it)
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    assert conv_ops.sampled_rate(x.flatten(0, 1)) <= 0.1 < float(x.mean())
    taken = []
    real = conv_ops.convolve_train
    monkeypatch.setattr(conv_ops, "convolve_train", lambda *a: taken.append(1) or real(*a))
    g = torch.randn(4, 4, 8, 6, 6, generator=torch.Generator().manual_seed(5))
    on, off = _train_stage(stage, x, g, f"+spike_conv,{layout}"), _train_stage(stage, x, g, f"-spike_conv,{layout}")
    assert taken and all(torch.equal(a, b) for a, b in zip(on[:3], off[:3]))


def test_the_rate_that_decides_samples_every_time_step(monkeypatch):
    """The maps are time-major (``T B`` flattened) and a neuron's first step fires least (every membrane
    at rest): the CIFAR model's tokenizer maps fired at 0.000-0.002 at t = 0 and 0.05-0.26 in all. A
    silent first map among dense ones leaves the convolution to the module call at once, instead of
    listing every spike before declining (the rate was the first map's until 2026-12-06)."""
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.1})
    monkeypatch.setattr(conv_ops, "native_int8", lambda: False)
    monkeypatch.setattr(conv_ops, "convolve_train", lambda *a: pytest.fail("the dense maps went to the operator"))
    monkeypatch.setattr(conv_ops, "convolve", lambda *a: pytest.fail("the dense maps went to the operator"))
    x = _spikes((8, 16, 6, 6), 0.3)
    x[0] = 0  # t = 0 of the first image
    maps = x.view(4, 2, 16, 6, 6)
    assert conv_ops.sampled_rate(x) == pytest.approx(float(x.mean()))  # 8 maps: every one sampled
    many = torch.cat([x] * 4)  # 32 maps: every fourth sampled, the first of them silent
    assert conv_ops.sampled_rate(many) == pytest.approx(float(many[::4].mean()))
    stage = ConvBN(16, 8)
    with routes.configured("+spike_conv"):
        stage.convolve(maps.detach().requires_grad_(), spikes=True)
        with torch.no_grad():
            stage.convolve(maps, spikes=True)


@pytest.mark.parametrize("layout", ["+channels_last", "-channels_last"])
def test_training_between_the_limits_sums_only_the_weight_gradient(layout, monkeypatch):
    """Maps firing above the forward's limit and at most at the weight gradient's, on a CPU without
    8-bit matrix tiles: the float32 convolution and PyTorch's input gradient (the module call's, bit
    for bit), the weight gradient by accumulation (its twin's, bit for bit; autograd's to rounding),
    and autograd keeps bits."""
    monkeypatch.setattr(conv_ops, "native_int8", lambda: False)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.5})
    stage = ConvBN(16, 8)
    x = _spikes((6, 16, 6, 6), 0.3, channels_last=layout == "+channels_last").view(2, 3, 16, 6, 6)
    summed, grads = [], []
    real, real_grad = sc.accumulate_conv2d, sc.accumulate_conv_weight_grad
    monkeypatch.setattr(sc, "accumulate_conv2d", lambda *a: summed.append(1) or real(*a))
    monkeypatch.setattr(sc, "accumulate_conv_weight_grad", lambda *a: grads.append(real_grad(*a)) or grads[-1])
    g = torch.randn(2, 3, 8, 6, 6, generator=torch.Generator().manual_seed(6))
    y, gx, gw, _ = _train_stage(stage, x, g, f"+spike_conv,{layout}")
    py, pgx, pgw, _ = _train_stage(stage, x, g, f"-spike_conv,{layout}")
    assert not summed and torch.equal(y, py) and torch.equal(gx, pgx)
    assert len(grads) == 1 and grads[0] is not None  # the weight gradient was summed
    assert torch.equal(gw, sc.accumulate_conv_weight_grad_reference(x.flatten(0, 1), g.flatten(0, 1)))
    torch.testing.assert_close(gw, pgw, rtol=1e-5, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            routes.configured("+spike_conv"):
        stage.convolve(x.detach().requires_grad_(), spikes=True)
    assert [t.dtype for t in saved] == [torch.int64, torch.float32]


@pytest.mark.parametrize("layout", ["+channels_last", "-channels_last"])
@pytest.mark.parametrize("rate", [0.3, 0.6])
def test_training_on_an_int8_cpu_takes_the_pieces_above_the_limits(layout, rate, monkeypatch):
    """On a CPU with 8-bit matrix tiles, maps firing above the forward's limit: the forward by the
    int8 pieces (their twin's output bit for bit), at any rate, also above the weight gradient's
    limit, where the module call took them before; PyTorch's input gradient and, above the weight
    gradient's limit, its weight gradient from the unpacked bits (both the module call's bit for
    bit); autograd keeps bits. An optimizer step (a new version of the weight) cuts new pieces."""
    monkeypatch.setattr(conv_ops, "native_int8", lambda: True)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.4})
    stage = ConvBN(16, 8)
    x = _spikes((6, 16, 6, 6), rate, channels_last=layout == "+channels_last").view(2, 3, 16, 6, 6)
    g = torch.randn(2, 3, 8, 6, 6, generator=torch.Generator().manual_seed(8))
    y, gx, gw, _ = _train_stage(stage, x, g, f"+spike_conv,{layout}")
    py, pgx, pgw, _ = _train_stage(stage, x, g, f"-spike_conv,{layout}")
    maps, w = x.flatten(0, 1), stage.conv.weight
    assert torch.equal(y.flatten(0, 1), sc.spike_conv_reference(maps, w))
    torch.testing.assert_close(y, py, rtol=1e-5, atol=1e-5)  # the float32 convolution to rounding
    assert torch.equal(gx, pgx)
    if rate > 0.4:
        assert torch.equal(gw, pgw)
    else:  # summed at the weight gradient's limit
        assert torch.equal(gw, sc.accumulate_conv_weight_grad_reference(maps, g.flatten(0, 1)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            routes.configured("+spike_conv"):
        stage.convolve(x.detach().requires_grad_(), spikes=True)
    assert [t.dtype for t in saved] == [torch.int64, torch.float32]
    with torch.no_grad():
        stage.conv.weight.mul_(0.5)  # an optimizer step's in-place update
    y2 = _train_stage(stage, x, g, f"+spike_conv,{layout}")[0]
    assert torch.equal(y2.flatten(0, 1), sc.spike_conv_reference(maps, stage.conv.weight))


def test_training_without_the_kernel_library_is_the_module_call(monkeypatch):
    """Where the kernels cannot be built (and the CPU has no 8-bit matrix tiles), the training form
    keeps its bits by PyTorch's packing and gives the module call's output and gradients bit for bit
    (the float32 convolution throughout)."""
    monkeypatch.setattr(conv_ops, "native_int8", lambda: False)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.5, "infer": 0.5, "weight_grad": 0.5})
    monkeypatch.setattr(sc.spike_linear, "get_library", lambda: None)
    stage = ConvBN(16, 8)
    x = _spikes((6, 16, 6, 6), 0.2).view(2, 3, 16, 6, 6)
    g = torch.randn(2, 3, 8, 6, 6, generator=torch.Generator().manual_seed(7))
    on, off = _train_stage(stage, x, g, "+spike_conv"), _train_stage(stage, x, g, "-spike_conv")
    assert all(torch.equal(a, b) for a, b in zip(on[:3], off[:3]))


def test_zoo_model_trains_with_the_route_to_rounding(monkeypatch):
    """A training step of a zoo model: the tokenizer's wide convolutions of spikes summed, each equal
    to its twin on the input it got; loss and gradients agree with the route off to rounding (spikes
    may flip where a membrane lies within rounding of a threshold)."""
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 1.0, "infer": 1.0, "weight_grad": 1.0})
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", depth=1).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    seen = []
    real = sc.accumulate_conv2d
    monkeypatch.setattr(sc, "accumulate_conv2d", lambda x, w, b, d, p=None: seen.append((x.detach().clone(), w))
                        or real(x, w, b, d, p))

    def step(spec):
        model.zero_grad()
        with routes.configured(spec):
            loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_on, grads_on = step("+spike_conv")
    assert sorted(inp.shape[1] for inp, _ in seen) == [96, 192, 384]  # the wide ones (>= 64 channels)
    for inp, w in seen:
        assert torch.equal(real(inp[:2], w, None, 1.0), sc.accumulate_conv_reference(inp[:2], w.detach()))
    loss_off, grads_off = step("-spike_conv")
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-3, atol=1e-3)
    assert grads_on.keys() == grads_off.keys()
    # a linear's bias ahead of a BatchNorm has no gradient in exact arithmetic (BN takes the batch mean
    # away): its values (1e-7 to 1e-6 here) are rounding noise, which the two routes' float32 sums in
    # another order change (they did on AArch64), so each gradient's scale is at least 1e-3 of the largest
    # (4e-4 here; every other gradient's maximum is above 3e-3, so their bound is as before)
    largest = max(float(g.abs().max()) for g in grads_off.values())
    for name in grads_on:
        scale = max(float(grads_off[name].abs().max()), 1e-3 * largest)
        assert float((grads_on[name] - grads_off[name]).abs().max()) <= 0.05 * scale, name


@pytest.mark.parametrize("name,shape", [
    ("spikingformer_cifar10_4_384", (2, 3, 32, 32)),
    ("spikformer_cifar10_4_384", (2, 3, 32, 32)),
    ("spikingformer_cifar10dvs_2_256", (2, 4, 2, 64, 64)),
])
@pytest.mark.parametrize("limit", [0.05, 1.0])
def test_zoo_model_with_and_without_the_route_agrees_to_rounding(name, shape, limit, int8_cpu, monkeypatch):
    """Inference of a zoo model: exactly the tokenizer's convolutions of spikes with at least 128
    input channels take the route, each one way, equal to that way's twin on the input it got (the
    accumulation where the input fires at most at the limit, else the int8 pieces); with the route off,
    spikes differ only where a membrane lies within float32 rounding of a threshold (a bounded
    count), and the logits agree to rounding."""
    from spikingformer.neuron import MultiStepLIF

    # 1.0: every wide one summed (the limit beside winograd lifted too)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": limit, "infer": limit, "weight_grad": limit})
    monkeypatch.setattr(routes, "_spike_conv_beside_winograd", {})
    torch.manual_seed(0)
    model = create_model(name, depth=1, **({"time_steps": 4} if len(shape) == 5 else {})).eval()
    for bn in (s.bn for s in model.tokenizer.stages):  # statistics that make the tokenizer fire
        bn.running_mean.normal_(0.0, 0.1), bn.running_var.uniform_(0.5, 1.5), bn.bias.data.normal_(1.0, 0.5)
    x = torch.poisson(torch.full(shape, 0.6)) if len(shape) == 5 else torch.randn(shape)
    taken, summed = [], []
    real, real_sum = sc.spike_conv2d, sc.accumulate_conv2d
    # (outputs copied: BatchNorm overwrites them in inference, route inplace_bn)
    monkeypatch.setattr(sc, "spike_conv2d", lambda x, p, b=None: taken.append((x.clone(), real(x, p, b).clone()))
                        or taken[-1][1].clone())

    def summing(x, w, b, d):
        y = real_sum(x, w, b, d)
        summed.append((x.clone(), w, y if y is None else y.clone()))
        return y

    monkeypatch.setattr(sc, "accumulate_conv2d", summing)
    weights = {s.conv.in_channels: s.conv.weight for s in model.tokenizer.stages[1:]}

    def run(spec):
        seen = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
                 for m in model.modules() if isinstance(m, MultiStepLIF)]
        try:
            with torch.inference_mode(), routes.configured(spec):
                return seen, model(x)
        finally:
            for h in hooks:
                h.remove()

    on_spikes, on = run("+spike_conv")
    wide = sorted(c for c in weights if c >= 128)
    summed_ok = [inp.shape[1] for inp, _, out in summed if out is not None]
    assert sorted([inp.shape[1] for inp, _ in taken] + summed_ok) == wide != []  # each wide one, one way
    assert (taken == []) == (limit == 1.0)  # some fire above 0.05
    for inp, out in taken:
        assert float(inp.mean()) > limit and torch.equal(out, sc.spike_conv_reference(inp, weights[inp.shape[1]]))
    for inp, w, out in summed:  # the twin on two maps (each map's windows are its own)
        assert out is None or torch.equal(out[:2], sc.accumulate_conv_reference(inp[:2], w.detach()))
    off_spikes, off = run("-spike_conv")
    flips = sum(int((a != b).sum()) for a, b in zip(on_spikes, off_spikes))
    total = sum(a.numel() for a in on_spikes)
    assert flips <= max(3, total // 10000), f"{flips} of {total} spikes differ"
    torch.testing.assert_close(on, off, rtol=1e-3, atol=1e-3 if flips == 0 else 0.05)


def test_opcheck_operators():
    """The route's operators pass ``opcheck`` (schema, fake tensors with the real outputs' layouts,
    AOT dispatch): inference and training forms on sparse and dense maps, in both layouts, with and
    without bias, and the training backward. (Their autograd is ``convolve_train``'s, which the
    tests above hold to autograd's.)"""
    w = _weight(8, 16)
    for rate in (0.05, 0.5):
        for channels_last in (True, False):
            x = _spikes((3, 16, 5, 4), rate, channels_last=channels_last)
            for bias in (None, torch.randn(8)):
                torch.library.opcheck(conv_ops.spike_conv, (x, w, bias, 0.1))
                torch.library.opcheck(conv_ops.spike_conv_train, (x, w, bias, 0.1, 0.3))
            _, packed = conv_ops.spike_conv_train(x, w, None, 0.1, 0.3)
            grad = torch.randn(3, 8, 5, 4)
            for needs in ([True, True, True], [False, True, False]):
                torch.library.opcheck(conv_ops.spike_conv_train_backward,
                                      (packed, grad, w, list(x.shape), channels_last, 0.3, needs))


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.6])
def test_compiled_training_keeps_the_operator_and_equals_eager(rate, monkeypatch):
    """Under ``torch.compile(fullgraph=True)`` (``aot_eager``: eager's kernels) a stage's convolution of
    spikes takes the training operator (the traced graph holds it; the firing rate, which the
    compiler cannot read ahead, is counted inside) at every rate: below the forward's limit, between
    it and the weight gradient's, and above both, where eager takes the module call. Output and
    gradients equal eager's bit for bit, and so does a second step after the weights changed."""
    from torch._dynamo import lookup_backend

    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.5})
    traced = []

    def recording(gm, example_inputs):
        traced.extend(str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                      for n in m.graph.nodes if n.op == "call_function")  # subgraphs: autograd.Function's
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    stage = ConvBN(16, 8)
    compiled = torch.compile(lambda x: stage.convolve(x, spikes=True), fullgraph=True, backend=recording)
    for step in range(2):
        x = _spikes((6, 16, 6, 6), rate, seed=step).view(2, 3, 16, 6, 6)
        g = torch.randn(2, 3, 8, 6, 6, generator=torch.Generator().manual_seed(5 + step))
        results = []
        for run in (lambda x: stage.convolve(x, spikes=True), compiled):
            xi = x.detach().requires_grad_()
            stage.zero_grad()
            with routes.configured("+spike_conv,+channels_last"):
                y = run(xi)
            y.backward(g)
            results.append((y.detach(), xi.grad, stage.conv.weight.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*results))
        with torch.no_grad():
            stage.conv.weight.mul_(0.5)
    assert "spikingformer.spike_conv_train.default" in traced
