"""The ``spike_conv`` route: the tokenizer's 3x3 convolutions of spike maps as three int8
convolutions (oneDNN), against independent expectations.

* The weight pieces by hand, and their remainder within the bound the arithmetic promises.
* oneDNN's int8 convolutions against their plain PyTorch twin (each piece's convolution in float64,
  which is exact for spikes, scaled and rounded to float32, pieces added smallest first), bit for bit.
* The route against the float64 convolution of the original weights: within the pieces' remainder
  and three roundings, closer than the float32 convolution itself.
* Where the route runs in a tokenizer (inference, float32, wide inputs, a CPU with 8-bit dot
  products) and where it does not (training, autocast, narrow inputs, hooks, non-finite weights);
  weights changed in place are packed again.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingformer.kernels import spike_conv as sc
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


def test_small_integers_are_exact_too():
    x = _spikes((1, 4, 3, 3))
    x[0, 1, 2, 0], x[0, 3, 0, 0] = 2.0, 255.0
    w = _weight(2, 4)
    assert torch.equal(sc.spike_conv2d(x, sc.PackedPieces(w)), sc.spike_conv_reference(x, w))


@pytest.fixture
def int8_cpu(monkeypatch):
    """The route as on a CPU with 8-bit dot products (oneDNN's int8 convolution computes the same
    values without them, only slower), its channel limit 128."""
    monkeypatch.setattr(route, "native_int8", lambda: True)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 128)


def test_conv_bn_takes_the_route_in_inference_only(int8_cpu):
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
        assert torch.equal(stage.convolve(x, spikes=True), plain)  # training: autograd's convolution
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
        assert torch.isnan(stage.convolve(x, spikes=True)[:, :, 0]).any()  # the plain convolution, NaN and all


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


def test_the_route_follows_the_cpu(monkeypatch):
    """Off by default where the ISA was measured slower or the CPU has no 8-bit dot products."""
    monkeypatch.setattr(route, "native_int8", lambda: False)
    stage = ConvBN(256, 8)
    with routes.configured("+spike_conv"), torch.no_grad():
        assert not route.takes(stage.conv, _spikes((2, 256, 4, 4)))
    assert "spike_conv" in routes.MEASURED_FASTER["avx512"] and "spike_conv" not in routes.MEASURED_FASTER["avx2"]


@pytest.mark.parametrize("name,shape", [
    ("spikingformer_cifar10_4_384", (2, 3, 32, 32)),
    ("spikformer_cifar10_4_384", (2, 3, 32, 32)),
    ("spikingformer_cifar10dvs_2_256", (2, 4, 2, 64, 64)),
])
def test_zoo_model_with_and_without_the_route_agrees_to_rounding(name, shape, int8_cpu, monkeypatch):
    """Inference of a zoo model: exactly the tokenizer's convolutions of spikes with at least 128
    input channels take the route, each equal to the twin on the input it got; with the route off,
    spikes differ only where a membrane lies within float32 rounding of a threshold (a bounded
    count), and the logits agree to rounding."""
    from spikingformer.neuron import MultiStepLIF

    torch.manual_seed(0)
    model = create_model(name, depth=1, **({"time_steps": 4} if len(shape) == 5 else {})).eval()
    x = torch.poisson(torch.full(shape, 0.6)) if len(shape) == 5 else torch.randn(shape)
    taken = []
    real = sc.spike_conv2d
    monkeypatch.setattr(sc, "spike_conv2d", lambda x, p, b=None: taken.append((x.clone(), real(x, p, b))) or taken[-1][1])
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
    assert sorted({inp.shape[1] for inp, _ in taken}) == sorted(c for c in weights if c >= 128) != []
    for inp, out in taken:
        assert torch.equal(out, sc.spike_conv_reference(inp, weights[inp.shape[1]]))
    off_spikes, off = run("-spike_conv")
    flips = sum(int((a != b).sum()) for a, b in zip(on_spikes, off_spikes))
    total = sum(a.numel() for a in on_spikes)
    assert flips <= max(3, total // 10000), f"{flips} of {total} spikes differ"
    torch.testing.assert_close(on, off, rtol=1e-3, atol=1e-3 if flips == 0 else 0.05)
