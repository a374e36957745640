"""The spike attention kernel (``spikingformer::spike_attention``, route ``fused_attention``) against
its plain PyTorch twin, float64 arithmetic and the plain path of the blocks.

For spikes every sum is an integer, exact in float32 in any order: the kernel's values must be the
batched products' bit for bit, in bf16 too, where each product's float32 sums are rounded once
(values above 256 round there; the all-ones case makes them). Real-valued inputs differ from the
products by summation order only: compared to float64 with a tolerance.
"""

from __future__ import annotations

import pytest
import torch

from spikingformer.kernels import attention, cpu_backend
from spikingformer.layers import routes, spike_attention
from spikingformer.models.zoo import create_model

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="the native kernel library cannot be built here")


def _rows(r, n, c, dtype, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(r, n, c, generator=g) < density).to(dtype) for _ in range(3)]


def _float64(q, k, v, heads, scale):
    return attention.attention_reference(q.double(), k.double(), v.double(), heads, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", attention.HEAD_DIMS)
@pytest.mark.parametrize("r,n,heads", [(6, 37, 3), (1, 70, 1), (2, 1, 2)])  # a token tail, one head in all, one token
def test_kernel_equals_the_products_for_spikes(dtype, d, r, n, heads):
    q, k, v = _rows(r, n, heads * d, dtype)
    y = attention.spike_attention(q, k, v, heads, 0.125)
    assert y.dtype == dtype and y.shape == q.shape
    assert torch.equal(y, attention.attention_reference(q, k, v, heads, 0.125))
    if dtype == torch.float32:  # sums below 256 here: exact, so float64's values
        assert torch.equal(y.double(), _float64(q, k, v, heads, 0.125))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sums_above_256_round_as_the_products(dtype):
    """All ones over 301 tokens: K^T V is 301 (in bf16 rounded to 300), Q K^T V 32 times that, and a
    scale that is not a power of two (a rounding of its own)."""
    q, k, v = (torch.ones(2, 301, 64, dtype=dtype) for _ in range(3))
    y = attention.spike_attention(q, k, v, 2, 0.3)
    assert torch.equal(y, attention.attention_reference(q, k, v, 2, 0.3))
    in_float32 = attention.spike_attention(q.float(), k.float(), v.float(), 2, 0.3)
    assert torch.equal(in_float32, torch.full_like(in_float32, 301 * 32 * torch.tensor(0.3).item()))
    if dtype == torch.bfloat16:  # rounded between the products, not only at the end
        assert torch.equal(y.float(), torch.full_like(in_float32, 2880.0)) and not torch.equal(y, in_float32.to(dtype))


def test_real_values_are_the_products_but_for_summation_order():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 50, 96, generator=g) for _ in range(3))
    y = attention.spike_attention(q, k, v, 3, 0.125)
    torch.testing.assert_close(y.double(), _float64(q, k, v, 3, 0.125), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d,dtype", [(8, torch.float32), (24, torch.float32), (16, torch.float64), (16, torch.float16)],
                         ids=str)
def test_other_head_dims_and_dtypes_take_the_twin(d, dtype):
    q, k, v = _rows(3, 20, 2 * d, dtype)
    assert not attention.kernel_takes(q, 2)
    assert torch.equal(attention.spike_attention(q, k, v, 2, 0.125), attention.attention_reference(q, k, v, 2, 0.125))


def test_without_the_library_the_twin(monkeypatch):
    q, k, v = _rows(3, 20, 32, torch.float32)
    called = []
    monkeypatch.setattr(cpu_backend, "get_library", lambda: called.append(1))
    assert torch.equal(attention.spike_attention(q, k, v, 2, 0.125), attention.attention_reference(q, k, v, 2, 0.125))
    assert called


def test_bad_inputs_name_the_problem():
    q, k, v = _rows(2, 10, 32, torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        attention.spike_attention(q, k[:, :5], v, 2, 0.125)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        attention.spike_attention(q, k, v, 3, 0.125)
    with pytest.raises(ValueError, match="share a dtype"):
        attention.spike_attention(q, k.bfloat16(), v, 2, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    q, k, v = _rows(3, 40, 64, dtype)
    torch.library.opcheck(attention.spike_attention, (q, k, v, 4, 0.125))


def _heads(x, h):
    t, b, n, c = x.shape
    return x.view(t, b, n, h, c // h).transpose(2, 3)


def _attend(spec, q, k, v, h, autocast=False):
    with routes.configured(spec), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return spike_attention(_heads(q, h), _heads(k, h), _heads(v, h), 0.125)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["float32", "bfloat16", "float32-autocast"])
def test_the_route_computes_the_plain_path_as_a_view_of_rows(dtype, autocast):
    q, k, v = (x.view(4, 2, 50, 64) for x in _rows(8, 50, 64, dtype))
    with torch.no_grad():
        plain = _attend("-fused_attention", q, k, v, 4, autocast)
        fused = _attend("+fused_attention,+attention_order", q, k, v, 4, autocast)
    assert fused.dtype == plain.dtype == (torch.bfloat16 if autocast else dtype)
    assert torch.equal(fused, plain)
    assert fused.transpose(2, 3).is_contiguous()  # the block's hand-over to its rows is a view


def test_the_route_steps_aside_for_mixed_dtypes_and_float64():
    q, k, v = (x.view(4, 2, 50, 64) for x in _rows(8, 50, 64, torch.float32))
    called = []
    with routes.configured("+fused_attention,+attention_order"):
        original = attention.spike_attention
        try:
            attention.spike_attention = lambda *a: called.append(1) or original(*a)
            with pytest.raises(RuntimeError):  # the product's own dtype error, as with the route off
                spike_attention(_heads(q, 4), _heads(k.bfloat16(), 4), _heads(v, 4), 0.125)
            assert not called
            with torch.autocast("cpu", torch.bfloat16):  # autocast leaves float64 to the product
                out = spike_attention(*(_heads(x.double(), 4) for x in (q, k, v)), 0.125)
            assert not called and out.dtype == torch.float64
            spike_attention(_heads(q, 4), _heads(k, 4), _heads(v, 4), 0.125)
            assert called
        finally:
            attention.spike_attention = original


def _integer_grad(shape, seed=5):
    return torch.randint(-3, 4, shape, generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", attention.HEAD_DIMS)
def test_backward_kernel_equals_its_twin_for_integer_gradients(dtype, d):
    """Spikes and an integer upstream gradient times a power-of-two scale: every float32 sum of the
    backward is exact, so the kernel and the batched products agree bit for bit (in bf16 too, each
    rounding the same exact sum once)."""
    q, k, v = _rows(3, 37, 2 * d, dtype)
    g = _integer_grad(q.shape).to(dtype)
    got = attention.spike_attention_backward(q, k, v, g, 2, 0.125)
    want = attention.attention_backward_reference(q, k, v, g, 2, 0.125)
    assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(got, want))
    if dtype == torch.float32:
        ref64 = attention.attention_backward_reference(q.double(), k.double(), v.double(), g.double(), 2, 0.125)
        assert all(torch.equal(a.double(), b) for a, b in zip(got, ref64))


def test_backward_kernel_with_real_gradients_is_the_twin_but_for_summation_order():
    q, k, v = _rows(4, 50, 96, torch.float32)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    got = attention.spike_attention_backward(q, k, v, g, 3, 0.3)
    ref64 = attention.attention_backward_reference(q.double(), k.double(), v.double(), g.double(), 3, 0.3)
    for a, b in zip(got, ref64):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_with_autograd(dtype):
    q, k, v = (x.requires_grad_() for x in _rows(3, 40, 64, dtype))
    torch.library.opcheck(attention.spike_attention, (q, k, v, 4, 0.125))
    g = _integer_grad(q.shape).to(dtype)
    torch.library.opcheck(attention.spike_attention_backward, (q.detach(), k.detach(), v.detach(), g, 4, 0.125))


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "float32-autocast"])
def test_the_route_in_training_gives_the_products_gradients(autocast):
    """Through the block's function with autograd, route on and off: the same output and, for an
    integer upstream gradient, the same gradients bit for bit (float32 inputs; under bf16 autocast
    the gradients come back through autocast's casts)."""
    rows = [x.view(4, 2, 50, 64) for x in _rows(8, 50, 64, torch.float32)]
    g = _integer_grad((4, 2, 50, 64))
    results = []
    for spec in ("-fused_attention", "+fused_attention,+attention_order"):
        leaves = [x.clone().requires_grad_() for x in rows]
        out = _attend(spec, *leaves, 4, autocast).transpose(2, 3).flatten(3)
        out.backward(g.to(out.dtype))
        results.append((out, [x.grad for x in leaves]))
    (out0, grads0), (out1, grads1) = results
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert all(x.abs().sum() > 0 for x in grads1)


def test_an_event_model_gives_the_same_logits_with_the_route():
    torch.manual_seed(0)
    model = create_model("spikingformer_digits_dvs", img_size=64).eval()  # 64 tokens of 4 heads of 16 channels
    x = (torch.rand(2, model.config.time_steps, 2, 64, 64) < 0.2).float()
    assert (model.config.num_tokens, model.config.embed_dim, model.blocks[0].attn.num_heads) == (64, 64, 4)
    with torch.no_grad():
        with routes.configured("-fused_attention"):
            plain = model(x)
        with routes.configured("+fused_attention,+attention_order"):
            fused = model(x)
            exported = torch.export.export(model, (x,))
    assert torch.equal(fused, plain)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "spikingformer.spike_attention.default" in targets
    assert torch.equal(exported.module()(x), plain)


@pytest.mark.slow
def test_compiled_model_keeps_the_operators_and_equals_eager():
    """Dynamo and AOTAutograd (the operators' fakes, the registered autograd) trace the whole model in
    inference and the attention forward and backward in training; the graphs call the operators."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("spikingformer_digits_dvs", img_size=64).eval()
    x = (torch.rand(2, model.config.time_steps, 2, 64, 64) < 0.2).float()
    targets = set()

    def keep_targets(gm, example_inputs):
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep_targets, bw_compiler=keep_targets)
    with routes.configured("+fused_attention,+attention_order"):
        with torch.no_grad():
            eager = model(x)
            compiled = torch.compile(model, fullgraph=True, backend=backend)(x)
        assert "spikingformer.spike_attention.default" in targets
        assert torch.equal(compiled, eager)

        rows = [x.view(4, 2, 50, 64) for x in _rows(8, 50, 64, torch.float32)]
        g = _integer_grad((4, 2, 50, 64))
        grads = []
        for fn in (lambda *a: _attend("+fused_attention", *a, 4),
                   torch.compile(lambda *a: _attend("+fused_attention", *a, 4), fullgraph=True, backend=backend)):
            leaves = [r.clone().requires_grad_() for r in rows]
            fn(*leaves).transpose(2, 3).flatten(3).backward(g)
            grads.append([r.grad for r in leaves])
        assert "spikingformer.spike_attention_backward.default" in targets
        assert all(torch.equal(a, b) for a, b in zip(*grads))
