"""The ``token_linear`` route: the token linears' float32 CPU products through oneDNN's matmul
(:mod:`spikingformer.kernels.products`) instead of MKL's, against independent expectations.

* The products against float64 ones, to float32 rounding (another summation order than MKL's).
* The route takes what it says (the forward and input gradient of large float32 CPU layers, and the
  dense products inside the spike linear) and nothing else: counted calls, not timings.
* Its default follows the CPU's vendor (MKL's generic code on x86 CPUs that are not Intel's).
* Under ``torch.compile`` the products are PyTorch's (the compiler's CPU backend lowers oneDNN's
  matmul only for constant weights), so compiled models still trace in one graph.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingformer import cpu_features
from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import ops, products
from spikingformer.layers import TokenLinear, routes

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")


def _close_to_float64(got: torch.Tensor, ref64: torch.Tensor, terms: int) -> None:
    """``got`` (float32) within float32 rounding of a sum of ``terms`` products: a few units of the
    largest partial sum's last place, which a wrong term or a missing bias would exceed."""
    scale = (ref64.abs().max().item() if ref64.numel() else 0.0) + 1.0
    torch.testing.assert_close(got.double(), ref64, rtol=0, atol=scale * terms * 2 ** -24)


@pytest.mark.parametrize("m,k,n", [(257, 384, 1536), (64, 1536, 384), (1, 5, 3), (0, 16, 8), (130, 64, 129)])
def test_products_equal_float64_products(m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    grad = torch.randn(m, n, generator=g)
    y = products.linear(x, w, b)
    assert y.shape == (m, n) and y.dtype == torch.float32
    _close_to_float64(y, x.double() @ w.double().t() + b.double(), k)
    _close_to_float64(products.linear(x, w), x.double() @ w.double().t(), k)
    _close_to_float64(products.input_grad(grad, w), grad.double() @ w.double(), n)


def test_trainable_linear_gradients_equal_float64_ones():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(300, 384, generator=g) < 0.3).float().requires_grad_()
    w = torch.randn(512, 384, generator=g).requires_grad_()
    b = torch.randn(512, generator=g).requires_grad_()
    grad = torch.randn(300, 512, generator=g)
    products.linear_trainable(x, w, b).backward(grad)
    g64 = grad.double()
    _close_to_float64(x.grad, g64 @ w.detach().double(), 512)
    _close_to_float64(w.grad, g64.t() @ x.detach().double(), 300)
    _close_to_float64(b.grad, g64.sum(0), 300)
    x.grad = None
    products.linear_trainable(x, w.detach(), None).backward(grad)  # no weight or bias gradient asked
    _close_to_float64(x.grad, g64 @ w.detach().double(), 512)


@pytest.fixture
def counted(monkeypatch):
    """Calls of the two oneDNN products, by name."""
    calls = []
    for name in ("linear", "input_grad"):
        real = getattr(products, name)
        monkeypatch.setattr(products, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


def test_token_linear_takes_large_float32_cpu_layers_only(counted):
    torch.manual_seed(0)
    layer = TokenLinear(384, 512)
    assert layer.weight.numel() >= routes.ONEDNN_MIN_WEIGHTS
    x = torch.randn(2, 3, 40, 384).requires_grad_()  # not spikes: the spike linear would decline anyway
    grad = torch.randn(2, 3, 40, 512)
    with routes.configured("+token_linear,-spike_linear"):
        y = layer(x)
        y.backward(grad)
        assert counted == ["linear", "input_grad"]
        x64, w64 = x.detach().double(), layer.weight.detach().double()
        _close_to_float64(y.detach(), x64 @ w64.t() + layer.bias.detach().double(), 384)
        _close_to_float64(x.grad, grad.double() @ w64, 512)
        counted.clear()
        small = TokenLinear(64, 64)  # below ONEDNN_MIN_WEIGHTS
        small(x.detach()[..., :64])
        layer.double()(x.detach().double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer.float()(x.detach())
        assert counted == []
    with routes.configured("-token_linear,-spike_linear"):
        layer(x.detach())
        assert counted == []


def test_the_spike_linear_takes_its_dense_products_through_onednn(counted):
    """Above its firing-rate limit the spike linear's forward is a dense product, and its input
    gradient always is: with ``onednn`` both are oneDNN's, with the same values to rounding."""
    if not cpu.is_available():
        pytest.skip(f"the CPU kernel library did not build: {cpu.build_error()}")
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(512, 384, generator=g) < 0.5).float().requires_grad_()  # above the 0.25 limit below
    w = torch.randn(256, 384, generator=g).requires_grad_()
    grad = torch.randn(512, 256, generator=g)
    y, _ = ops.spike_linear(x, w, None, 0.25, False, True)
    y.backward(grad)
    assert counted == ["linear", "input_grad"]
    _close_to_float64(y.detach(), x.detach().double() @ w.detach().double().t(), 384)
    _close_to_float64(x.grad, grad.double() @ w.detach().double(), 256)
    counted.clear()
    sparse = (torch.rand(512, 384, generator=g) < 0.05).float().requires_grad_()
    ops.spike_linear(sparse, w, None, 0.25, False, True)[0].backward(grad)  # the forward adds weights
    assert counted == ["input_grad"]
    counted.clear()
    ops.spike_linear(x, w, None, 0.25, False, False)[0].backward(grad)
    assert counted == []


@pytest.mark.parametrize("vendor,on", [("AuthenticAMD", True), ("HygonGenuine", True), ("GenuineIntel", False),
                                       ("", False)])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "other"])
def test_the_default_follows_the_cpu_vendor_and_isa(monkeypatch, vendor, on, isa):
    """token_linear is on where MKL runs its generic code (not Intel's CPUs) with AVX-512 only: on an
    AVX2-only AMD EPYC (Zen 3) MKL's generic code measured as fast as oneDNN or faster. winograd is on
    with AVX2 everywhere and with AVX-512 on those CPUs only (measured on an AMD EPYC Zen 4 alone)."""
    monkeypatch.setattr(cpu_features, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(routes, "cpu_isa", lambda: isa)
    assert cpu_features.mkl_generic() == (on and torch.backends.mkl.is_available()
                                          and cpu_features.platform.machine().lower() in ("x86_64", "amd64"))
    assert ("token_linear" in routes.default_routes()) == (cpu_features.mkl_generic() and isa == "avx512")
    assert ("winograd" in routes.default_routes()) == (isa == "avx2" or (cpu_features.mkl_generic() and isa == "avx512"))


def test_the_vendor_is_read_from_the_system():
    vendor = cpu_features.cpu_vendor()
    assert isinstance(vendor, str)
    if cpu_features.platform.machine().lower() in ("x86_64", "amd64"):
        assert vendor  # every x86 CPU names one


@pytest.mark.parametrize("spike_linear", [False, True])
def test_compiled_token_linears_use_pytorchs_products(counted, monkeypatch, spike_linear):
    """``torch.compile`` traces the route's layers in one graph, with PyTorch's products in it (the
    compiler lowers oneDNN's matmul only for constant weights), forward and backward; also the
    spike linear's backward, which the compiler traces (its forward it calls as it is)."""
    if not cpu.is_available():
        pytest.skip(f"the CPU kernel library did not build: {cpu.build_error()}")
    # the spike linear takes the layer or not whatever this ISA's measured minimum work, and its
    # forward, at a firing rate of 0.5, is the dense product
    work = 0 if spike_linear else 1 << 62
    monkeypatch.setattr(routes, "_spike_min_work", {"train": work, "infer": work})
    monkeypatch.setattr(routes, "_spike_max_density", 0.25)
    torch.manual_seed(0)
    layer = TokenLinear(384, 512)
    x = (torch.rand(2, 3, 40, 384) < 0.5).float()

    def step(x):
        return layer(x, spikes=True).square().sum()

    with routes.configured("+token_linear,+spike_linear"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled(x).backward()
        grads = layer.weight.grad.clone()
        # the traced products are PyTorch's; the spike linear's operator is opaque to the
        # compiler and runs its eager code inside, the oneDNN forward included
        assert counted == (["linear"] if spike_linear else [])
        layer.weight.grad = None
        step(x).backward()
        assert counted  # eager takes the route
    torch.testing.assert_close(grads, layer.weight.grad, rtol=1e-4, atol=1e-3)
