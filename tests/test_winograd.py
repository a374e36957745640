"""The ``winograd`` route: 3x3 convolutions by Winograd's F(2x2, 3x3), against independent expectations.

* The transforms by hand (a one-tile map, where ``B^T d B`` and ``A^T M A`` are small sums).
* The plain-PyTorch twin against the definition of the convolution in float64 (exact to float64's
  rounding: the algorithm is an identity), odd sizes and both layouts.
* The C++ transforms against the twin bit for bit, the batch in pieces included.
* float32 rounding: within a few times the direct convolution's error against float64.
* Gradients: the input's (F(2x2, 3x3) of the flipped weight), the weight's and bias's against the
  float64 convolution's.
* Where the route runs (ConvBN's dense maps, ``spike_conv``'s fallbacks and operators) and where it
  does not (narrow layers, autocast, NCHW maps, non-finite weights, hooks, the route off).
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
    """The route on, with a least channel count of 64 whatever this CPU's ISA."""
    monkeypatch.setattr(routes, "_winograd_min_channels", 64)
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
def test_cpp_transforms_equal_the_twin_bit_for_bit(shape, cout, piece_bytes, bias, monkeypatch):
    monkeypatch.setattr(wk, "PIECE_BYTES", piece_bytes)
    x, w = _maps(shape), _weight(cout, shape[1])
    b = torch.randn(cout, generator=torch.Generator().manual_seed(3)) if bias else None
    y = wk.winograd_conv2d(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
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


def test_other_dtypes_take_pytorchs_convolution():
    x, w = _maps((2, 4, 5, 5), dtype=torch.float64), _weight(3, 4, dtype=torch.float64)
    assert wk.winograd_conv2d(x, w) is None
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
    with torch.autocast("cpu", torch.bfloat16):
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
def test_spike_conv_inference_limit_is_lower_beside_winograd(on_here, monkeypatch):
    """In inference, maps firing between SPIKE_CONV_INFER_BESIDE_WINOGRAD and spike_conv's own limit
    go to F(2x2, 3x3) where winograd takes the layer (measured faster there), else to the sums."""
    from spikingformer.kernels import spike_conv as sc
    from spikingformer.layers import spike_conv

    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = (torch.rand(4, 64, 8, 8, generator=torch.Generator().manual_seed(3)) < 0.25).float()
    x = x.contiguous(memory_format=torch.channels_last)
    w = conv.weight.detach()
    monkeypatch.setattr(spike_conv, "_limits", lambda maps: {"min_channels": 64, "train": 0.3, "infer": 0.3,
                                                             "weight_grad": 0.45})
    monkeypatch.setattr(routes, "_spike_conv_infer_beside_winograd", 0.2)
    with torch.inference_mode():
        assert torch.equal(spike_conv.convolve(conv, x), wk.winograd_reference(x, w))
        with routes.configured("-winograd"):  # the direct convolution beside it: the old limit, the sums
            assert torch.equal(spike_conv.convolve(conv, x), sc.accumulate_conv_reference(x, w))
        monkeypatch.setattr(routes, "_spike_conv_infer_beside_winograd", None)  # an ISA without that limit
        assert torch.equal(spike_conv.convolve(conv, x), sc.accumulate_conv_reference(x, w))


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
