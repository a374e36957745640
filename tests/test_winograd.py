"""The ``winograd`` route: 3x3 convolutions by Winograd's F(2x2, 3x3), against independent expectations.

* The transforms by hand (a one-tile map, where ``B^T d B`` and ``A^T M A`` are small sums).
* The plain-PyTorch twin against the definition of the convolution in float64 (exact to float64's
  rounding: the algorithm is an identity), odd sizes and both layouts.
* The C++ transforms against the twin bit for bit, the batch in pieces included.
* float32 and bf16 rounding: within a few times the direct convolution's error against float64;
  tiles of bf16 spikes transform exactly.
* Under CPU bf16 autocast: autocast's casts by F(2x2, 3x3) in bf16, gradients reaching the float32
  parameters.
* Gradients: the input's (F(2x2, 3x3) of the flipped weight), the weight's (the output gradient's
  tiles by hand, the twin against the float64 convolution's, the C++ transforms against the twin
  bit for bit) and the bias's against the float64 convolution's.
* Where the route runs (ConvBN's dense maps, ``spike_conv``'s fallbacks and operators, in bf16 too) and
  where it does not (narrow layers, float16 autocast, bf16 without its limit, NCHW maps, non-finite
  weights, hooks, the route off).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikingformer.kernels import cpu_backend
from spikingformer.kernels import spike_conv_ops as conv_ops
from spikingformer.kernels import winograd as wk
from spikingformer.layers import ConvBN, routes
from spikingformer.layers import winograd as route

needs_library = pytest.mark.skipif(not cpu_backend.is_available(), reason="the C++ kernel library cannot be built here")


def _maps(shape, seed=0, channels_last=True, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _weight(cout, cin, seed=1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cout, cin, 3, 3, generator=g, dtype=dtype) * (2.0 / (9 * cin)) ** 0.5


def _relative(a: torch.Tensor, exact: torch.Tensor) -> float:
    return ((a.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.fixture
def on_here(monkeypatch):
    """The route on, with a least channel count of 64 whatever this CPU's ISA (under bf16 autocast too), and
    spike_conv's limits beside it none (the test that tests them sets them)."""
    monkeypatch.setattr(routes, "_winograd_min_channels", 64)
    monkeypatch.setattr(routes, "_winograd_min_channels_bf16", 64)
    monkeypatch.setattr(routes, "_spike_conv_beside_winograd", {})
    with routes.configured("+winograd"):
        yield


def test_transforms_by_hand():
    """A 2x2 map is one tile (padded to 4x4): V = B^T d B, the products with U, and A^T M A give the
    four outputs; with the kernel all ones each output is the sum of its 3x3 window (here: all four
    pixels)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64).view(1, 1, 2, 2)
    v = wk.input_transform(x).view(4, 4)
    d = F.pad(x, (1, 1, 1, 1)).view(4, 4)
    bt = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=torch.float64)
    assert torch.equal(v, bt @ d @ bt.T)
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    assert torch.equal(wk.winograd_reference(x, w).view(4), torch.full((4,), 10.0, dtype=torch.float64))
    u = wk.weight_transform(w).reshape(4, 4)
    g = torch.tensor(wk._G, dtype=torch.float64)
    assert torch.equal(u, g @ torch.ones(3, 3, dtype=torch.float64) @ g.T)


@pytest.mark.parametrize("shape,cout", [((2, 3, 5, 7), 4), ((1, 8, 1, 1), 3), ((3, 16, 6, 9), 24)], ids=str)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_twin_is_the_convolution_in_float64(shape, cout, channels_last, bias):
    x, w = _maps(shape, channels_last=channels_last, dtype=torch.float64), _weight(cout, shape[1], dtype=torch.float64)
    b = torch.randn(cout, dtype=torch.float64) if bias else None
    y = wk.winograd_reference(x, w, b)
    exact = F.conv2d(x, w, b, padding=1)
    assert y.shape == exact.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert _relative(y, exact) < 1e-14


@needs_library
@pytest.mark.parametrize("shape,cout", [((2, 5, 7, 9), 6), ((2, 70, 8, 8), 33), ((5, 64, 6, 5), 130),
                                        ((3, 2, 1, 1), 1)], ids=str)
@pytest.mark.parametrize("piece_bytes", [1 << 26, 1 << 12], ids=["whole batch", "pieces"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_transforms_equal_the_twin_bit_for_bit(shape, cout, piece_bytes, bias, dtype, monkeypatch):
    monkeypatch.setattr(wk, "PIECE_BYTES", piece_bytes)
    x, w = _maps(shape).to(dtype), _weight(cout, shape[1]).to(dtype)
    b = torch.randn(cout, generator=torch.Generator().manual_seed(3)).to(dtype) if bias else None
    y = wk.winograd_conv2d(x, w, b)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, wk.winograd_reference(x, w, b))
    assert torch.equal(wk.winograd_conv2d(x.contiguous(), w, b), y)  # NCHW maps: copied, the same values


@needs_library
@pytest.mark.parametrize("shape,cout", [((4, 64, 16, 16), 128), ((2, 256, 8, 8), 256), ((3, 96, 9, 11), 48)], ids=str)
def test_float32_rounding_stays_near_the_direct_convolutions(shape, cout):
    """Against the float64 convolution: the transforms' additions cost a few roundings, so the error
    stays within a small multiple of oneDNN's direct convolution's (and below 2e-6 of the largest)."""
    x, w = _maps(shape, seed=5), _weight(cout, shape[1], seed=6)
    exact = F.conv2d(x.double(), w.double(), padding=1)
    mine, direct = _relative(wk.winograd_conv2d(x, w), exact), _relative(F.conv2d(x, w, padding=1), exact)
    assert mine < max(4 * direct, 1e-6) and mine < 2e-6


@needs_library
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [True, False])
def test_gradients_equal_the_float64_convolutions(bias, channels_last):
    x = _maps((3, 64, 10, 7), seed=7, channels_last=channels_last).requires_grad_()
    w = _weight(80, 64, seed=8).requires_grad_()
    b = torch.randn(80, generator=torch.Generator().manual_seed(9)).requires_grad_() if bias else None
    y = wk.conv2d(x, w, b)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(10))
    y.backward(gy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if bias else None
    F.conv2d(xd, wd, bd, padding=1).backward(gy.double())
    assert _relative(y, F.conv2d(xd, wd, bd, padding=1).detach()) < 2e-6
    for mine, exact in [(x.grad, xd.grad), (w.grad, wd.grad)] + ([(b.grad, bd.grad)] if bias else []):
        assert mine.shape == exact.shape and _relative(mine, exact) < 2e-6
    assert torch.equal(wk.input_grad(gy, w.detach()), wk.winograd_reference(
        gy.contiguous(memory_format=torch.channels_last), w.detach().flip(2, 3).transpose(0, 1)))


@needs_library
@pytest.mark.parametrize("spikes", [False, True], ids=["dense maps", "spikes"])
def test_bf16_rounding_stays_near_the_direct_convolutions(spikes):
    """In bf16 the tiles, the weight's transform and the products' sums are each rounded to bf16 (the
    direct convolution rounds only its outputs): against the float64 convolution of the same bf16
    values the error stays within a few times the direct one's, below 2^-7 of the largest output.
    Tiles of spikes are small integers: their transform is exact."""
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(4, 128, 16, 16, generator=g) < 0.4).float() if spikes else torch.randn(4, 128, 16, 16, generator=g)
    x = x.contiguous(memory_format=torch.channels_last).bfloat16()
    w = _weight(256, 128, seed=12).bfloat16()
    exact = F.conv2d(x.double(), w.double(), padding=1)
    mine, direct = _relative(wk.winograd_conv2d(x, w), exact), _relative(F.conv2d(x, w, padding=1), exact)
    assert mine < 4 * direct and mine < 2 ** -7
    if spikes:
        assert torch.equal(wk.input_transform(x).double(), wk.input_transform(x.double()))


def test_gradient_tiles_by_hand():
    """A 2x2 output gradient is one tile: its tiles are A dY A^T, A the output transform's (4 x 2)."""
    gy = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64)
    a = torch.tensor([[1, 0], [1, 1], [1, -1], [0, -1]], dtype=torch.float64)
    assert torch.equal(wk.grad_tiles(gy.view(1, 1, 2, 2)).view(4, 4), a @ gy @ a.T)
    odd = wk.grad_tiles(gy[:1].view(1, 1, 1, 2)).view(4, 4)  # one row: the tile's second row of outputs is zero
    assert torch.equal(odd, a @ torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64) @ a.T)


@pytest.mark.parametrize("shape,cout", [((2, 3, 5, 7), 4), ((1, 8, 1, 1), 3), ((3, 16, 6, 9), 24)], ids=str)
def test_weight_grad_twin_is_the_convolutions_in_float64(shape, cout):
    x = _maps(shape, seed=15, dtype=torch.float64)
    gy = _maps((shape[0], cout) + shape[2:], seed=16, dtype=torch.float64)
    exact = torch.ops.aten.convolution_backward(gy, x, _weight(cout, shape[1], dtype=torch.float64), None, [1, 1],
                                                [1, 1], [1, 1], False, [0, 0], 1, (False, True, False))[1]
    assert _relative(wk.weight_grad_reference(x, gy), exact) < 1e-14


@needs_library
@pytest.mark.parametrize("shape,cout", [((2, 5, 7, 9), 6), ((2, 70, 8, 8), 33), ((5, 64, 6, 5), 130)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_weight_grad_equals_the_twin(shape, cout, dtype, monkeypatch):
    """In one piece the same bits as the twin; in pieces (their products summed in float32) as near the
    float64 gradient as the direct one's, or a few times it."""
    x = _maps(shape, seed=17).to(dtype)
    gy = _maps((shape[0], cout) + shape[2:], seed=18).to(dtype)
    mine = wk.winograd_weight_grad(x, gy)
    assert mine.dtype == dtype and torch.equal(mine, wk.weight_grad_reference(x, gy))
    assert torch.equal(wk.winograd_weight_grad(x.contiguous(), gy.contiguous()), mine)  # NCHW: copied
    monkeypatch.setattr(wk, "PIECE_BYTES", 1 << 12)
    w = _weight(cout, shape[1]).to(dtype)
    exact, direct = (torch.ops.aten.convolution_backward(gy.to(t), x.to(t), w.to(t), None, [1, 1], [1, 1], [1, 1], False,
                                                         [0, 0], 1, (False, True, False))[1]
                     for t in (torch.float64, dtype))
    assert _relative(wk.winograd_weight_grad(x, gy), exact) < max(4 * _relative(direct, exact), 2e-6 if dtype == torch.float32 else 2 ** -7)
    assert wk.winograd_weight_grad(x.double(), gy.double()) is None


def test_other_dtypes_take_pytorchs_convolution():
    x, w = _maps((2, 4, 5, 5), dtype=torch.float64), _weight(3, 4, dtype=torch.float64)
    assert wk.winograd_conv2d(x, w) is None
    assert wk.winograd_conv2d(x.float(), w.bfloat16()) is None  # mixed dtypes
    assert torch.equal(wk.conv2d(x, w), F.conv2d(x, w, padding=1))


@needs_library
def test_conv_bn_takes_the_route_on_dense_maps(on_here):
    layer = ConvBN(64, 96).eval()
    maps = _maps((6, 64, 9, 9))
    x = maps.view(2, 3, 64, 9, 9)  # (T, B, C, H, W), each map channels-last
    with torch.inference_mode():
        y = layer.convolve(x)
    assert torch.equal(y.flatten(0, 1), wk.winograd_reference(maps, layer.conv.weight.detach()))
    with routes.configured("-winograd"), torch.inference_mode():
        assert _relative(layer.convolve(x).flatten(0, 1), F.conv2d(maps.double(), layer.conv.weight.double(), padding=1)) < 2e-6


@needs_library
def test_where_the_route_declines(on_here, monkeypatch):
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = _maps((2, 64, 6, 6))
    assert route.takes(conv, x)
    assert not route.takes(nn.Conv2d(48, 64, 3, padding=1, bias=False), _maps((2, 48, 6, 6)))  # narrow input
    assert not route.takes(nn.Conv2d(64, 32, 3, padding=1, bias=False), x)  # narrow output
    assert not route.takes(conv, x.contiguous())  # NCHW maps
    assert not route.takes(nn.Conv2d(64, 64, 3, padding=1, stride=2), x)  # not the tokenizer's
    assert not route.takes(conv, x.double())  # float64 maps
    with torch.autocast("cpu", torch.float16):
        assert not route.takes(conv, x)
    with torch.autocast("cpu", torch.bfloat16):
        assert route.takes(conv, x) and route.takes(conv, x.bfloat16())
        assert not route.takes(nn.Conv2d(48, 64, 3, padding=1, bias=False), _maps((2, 48, 6, 6)))
        monkeypatch.setattr(routes, "_winograd_min_channels_bf16", None)  # no bf16 limit here (AMX tiles, no native bf16)
        assert not route.takes(conv, x)
    with routes.configured("-winograd"):
        assert not route.takes(conv, x)
    handle = conv.register_forward_hook(lambda *a: None)
    assert not route.takes(conv, x)
    handle.remove()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    assert not route.takes(conv, x)
    monkeypatch.setattr(routes, "_winograd_min_channels", None)  # an ISA not measured
    assert not route.takes(nn.Conv2d(64, 64, 3, padding=1, bias=False), x)


@needs_library
def test_spike_conv_above_its_limit_and_its_operators_take_the_route(on_here, monkeypatch):
    """Spike maps above spike_conv's limits go to the route (the module call's place); in training
    between the limits the operator's dense forward and input gradient run by F(2x2, 3x3)."""
    from spikingformer.layers import spike_conv

    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = (torch.rand(4, 64, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.6).float()
    x = x.contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach()
    with torch.inference_mode():
        assert torch.equal(spike_conv.convolve(conv, x), wk.winograd_reference(x, w))
    limits = {"min_channels": 64, "train": 0.1, "infer": 0.1, "weight_grad": 0.9}
    monkeypatch.setattr(spike_conv, "_limits", lambda maps: limits)
    xg = x.clone().requires_grad_()
    y = spike_conv.convolve(conv, xg)
    assert torch.equal(y.detach(), wk.winograd_reference(x, w))
    gy = _maps(y.shape, seed=4)
    y.backward(gy)
    assert torch.equal(xg.grad, wk.input_grad(gy, w))
    exact = F.conv2d(x.double(), w.double(), padding=1)
    assert _relative(y.detach(), exact) < 2e-6
    with routes.configured("-winograd"):  # the operator's own dense convolution again
        xg2 = x.clone().requires_grad_()
        y2 = spike_conv.convolve(conv, xg2)
        y2.backward(gy)
    assert torch.equal(y2.detach(), F.conv2d(x, w, padding=1))
    assert _relative(xg.grad, xg2.grad.double()) < 2e-6


@needs_library
def test_bf16_autocast_convolves_autocasts_casts(on_here):
    """Under CPU bf16 autocast the route convolves what autocast would hand the convolution (the maps,
    weight and bias in bf16) by F(2x2, 3x3) in bf16; the gradients reach the float32 maps and
    parameters through autocast's casts, near those of autocast's direct convolution."""
    conv = nn.Conv2d(64, 96, 3, padding=1)
    x = _maps((3, 64, 10, 7), seed=13).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = route.convolve(conv, x)
        direct = conv(x)
    w, b = conv.weight.detach().bfloat16(), conv.bias.detach().bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y.detach(), wk.winograd_reference(x.detach().bfloat16(), w, b))
    gy = _maps(y.shape, seed=14).bfloat16()
    y.backward(gy)
    grads = [x.grad, conv.weight.grad, conv.bias.grad]
    assert all(g.dtype == torch.float32 for g in grads)
    assert torch.equal(x.grad, wk.input_grad(gy, w).float())
    x.grad = None
    conv.zero_grad()
    direct.backward(gy)
    for mine, theirs in zip(grads, [x.grad, conv.weight.grad, conv.bias.grad]):
        assert _relative(mine, theirs.double()) < 2 ** -6


@needs_library
def test_a_bf16_training_step_strays_from_float32_no_more_than_autocasts_own(on_here):
    """A bf16 training step of a zoo model with the route (every tokenizer convolution from 64
    channels by F(2x2, 3x3) in bf16: forward, input and weight gradients): spikes flip wherever a
    membrane lies within bf16 rounding of the threshold, in either computation, so its gradients
    are compared with the float32 step's as autocast's direct convolutions' are: no further off."""
    from spikingformer.models import create_model

    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", depth=1).train()
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([1, 7, 3, 2])
    calls = []
    real = wk.winograd_weight_grad

    def step(spec, bf16):
        model.zero_grad()
        with routes.configured(spec + ",-spike_conv"), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    exact = step("-winograd", False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wk, "winograd_weight_grad", lambda *a: calls.append(a[0].dtype) or real(*a))
        mine = step("+winograd", True)
    assert calls and set(calls) == {torch.bfloat16}  # the stages from 96 channels (48 -> 96 declines)
    autocast = step("-winograd", True)
    assert (mine - exact).norm() <= 1.25 * (autocast - exact).norm()


@needs_library
def test_spike_conv_operators_take_the_route_in_bf16(on_here, monkeypatch):
    """Under bf16 autocast, spike maps that spike_conv leaves dense go to the route in bf16, and its
    training operator's dense forward and input gradient run by F(2x2, 3x3) in bf16."""
    from spikingformer.layers import spike_conv

    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = (torch.rand(4, 64, 8, 8, generator=torch.Generator().manual_seed(5)) < 0.6).float()
    x = x.contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach().bfloat16()
    with torch.autocast("cpu", torch.bfloat16), torch.inference_mode():
        assert torch.equal(spike_conv.convolve(conv, x), wk.winograd_reference(x.bfloat16(), w))
    monkeypatch.setattr(spike_conv, "_limits", lambda maps: {"min_channels": 64, "train": 0.1, "infer": 0.1,
                                                             "weight_grad": 0.9})
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = spike_conv.convolve(conv, xg)
    assert torch.equal(y.detach(), wk.winograd_reference(x.bfloat16(), w))
    gy = _maps(y.shape, seed=6).bfloat16()
    y.backward(gy)
    assert torch.equal(xg.grad, wk.input_grad(gy, w).float())


@needs_library
def test_spike_conv_backward_above_its_limit_takes_winograds_weight_gradient():
    """Where the operator's backward does not sum the weight gradient (above its limit), it runs by
    F(2x2, 3x3) from the unpacked spikes where ``winograd``, else PyTorch's."""
    x = (torch.rand(2, 64, 6, 6, generator=torch.Generator().manual_seed(7)) < 0.5).float()
    x = x.contiguous(memory_format=torch.channels_last)
    w, g = _weight(32, 64), _maps((2, 32, 6, 6), seed=8)
    _, packed = conv_ops.spike_conv_train(x, w, None, -1.0, -1.0, -1.0, True)
    for winograd in (True, False):
        gw = conv_ops.spike_conv_train_backward(packed, g, w, list(x.shape), True, -1.0, [False, True, False], winograd)[1]
        exact = torch.ops.aten.convolution_backward(g.double(), x.double(), w.double(), None, [1, 1], [1, 1], [1, 1],
                                                    False, [0, 0], 1, (False, True, False))[1]
        assert _relative(gw, exact) < 2e-6
        if winograd:
            assert torch.equal(gw, wk.winograd_weight_grad(x, g))


@needs_library
def test_spike_conv_limits_are_lower_beside_winograd(on_here, monkeypatch):
    """Maps firing between SPIKE_CONV_BESIDE_WINOGRAD's limits and spike_conv's own go to F(2x2, 3x3)
    where winograd takes the layer (measured faster there), else to the sums: in inference the
    accumulation, in training the operator (the forward dense, the weight gradient summed)."""
    from spikingformer.kernels import spike_conv as sc
    from spikingformer.layers import spike_conv

    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = (torch.rand(4, 64, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.25).float()
    x = x.contiguous(memory_format=torch.channels_last)
    w, g = conv.weight.detach(), _maps((4, 64, 8, 8), seed=5)
    monkeypatch.setattr(spike_conv, "_limits", lambda maps: {"min_channels": 64, "train": 0.2, "infer": 0.3,
                                                             "weight_grad": 0.45})

    def train():  # the output and the weight gradient, autograd's last node
        conv.weight.grad = None
        y = spike_conv.convolve(conv, x)
        y.backward(g)
        return y.detach(), conv.weight.grad, type(y.grad_fn).__name__

    for beside in ({"infer": 0.2, "weight_grad": 0.2}, {}):  # an ISA with limits beside it, one without
        monkeypatch.setattr(routes, "_spike_conv_beside_winograd", beside)
        with torch.inference_mode():
            y = spike_conv.convolve(conv, x)
        y_train, gw, node = train()
        if beside:  # winograd's convolution and its autograd node
            assert torch.equal(y, wk.winograd_reference(x, w)) and torch.equal(y_train, y)
            assert node == "_WinogradBackward" and torch.equal(gw, wk.winograd_weight_grad(x, g))
        else:  # the sums (the training forward above its limit: dense, by F(2x2, 3x3))
            assert torch.equal(y, sc.accumulate_conv_reference(x, w))
            assert node != "_WinogradBackward" and torch.equal(y_train, wk.winograd_reference(x, w))
            assert torch.equal(gw, sc.accumulate_conv_weight_grad_reference(x, g).to(gw.dtype))
        with routes.configured("-winograd"):  # the direct convolution beside them: the old limits, the sums
            with torch.inference_mode():
                assert torch.equal(spike_conv.convolve(conv, x), sc.accumulate_conv_reference(x, w))
            y_train, gw, node = train()
            assert node != "_WinogradBackward" and torch.equal(y_train, F.conv2d(x, w, padding=1))


@needs_library
def test_a_traced_graph_keeps_the_convolution(on_here):
    """``torch.jit.trace`` cannot see the C++ transforms, so the route declines under it: the traced
    graph convolves new inputs correctly."""
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)

        def forward(self, x):
            return route.convolve(self.conv, x)

    layer = Layer()
    with torch.no_grad():
        traced = torch.jit.trace(layer, _maps((2, 64, 6, 6), seed=1))
        x = _maps((2, 64, 6, 6), seed=2)
        assert _relative(traced(x), F.conv2d(x.double(), layer.conv.weight.double(), padding=1)) < 2e-6


def test_opcheck_operators_with_the_route():
    x = (torch.rand(2, 64, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    x = x.contiguous(memory_format=torch.channels_last)
    w = _weight(64, 64)
    torch.library.opcheck(conv_ops.spike_conv, (x, w, None, 0.1, -1.0, True))
    torch.library.opcheck(conv_ops.spike_conv_train, (x, w, None, 0.1, 0.9, -1.0, True))
