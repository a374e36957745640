"""The LIF neuron as a PyTorch operator: ``torch.library.opcheck``, ``torch.compile`` and ``torch.export``.

``spikingformer::lif`` (:mod:`spikingformer.kernels.ops`) is checked by ``opcheck`` (schema, fake
tensors, autograd registration, AOT dispatch); a zoo model compiles with ``fullgraph=True`` (no
graph break), forward and backward, and equals eager; the inference graph exports.

Comparisons: the ``aot_eager`` backend runs the very ATen kernels eager runs, so its results are
compared exactly; Inductor generates its own code (other rounding), so that comparison runs the
model in float64, where no pre-threshold value can round differently in float32 except by a
1e-9-probability accident.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_gradients_close

import spikingformer.layers as layers
from spikingformer.kernels.ops import lif as lif_operator
from spikingformer.kernels.ops import lif_backward_op
from spikingformer.models.zoo import create_model
from spikingformer.neuron import LIFParams, lif_reference

OPCHECK_PARAMS = [(2.0, 1.0, 0.0, 4.0, True), (1.5, 0.5, -0.1, 2.0, False)]


def _current(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.5 + 0.8).to(dtype)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (1, 1), (6, 2, 3, 300)], ids=lambda s: "x".join(map(str, s)))
def test_opcheck_lif(shape, dtype, requires_grad):
    for params in OPCHECK_PARAMS:
        x = _current(shape, dtype).requires_grad_(requires_grad)
        torch.library.opcheck(lif_operator, (x, *params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_lif_backward(dtype):
    for params in OPCHECK_PARAMS:
        x = _current((4, 2, 9), dtype)
        g = _current((4, 2, 9), dtype, seed=1)
        torch.library.opcheck(lif_backward_op, (x, g, *params))


def test_operator_equals_reference_non_contiguous():
    """The operator on a transposed view: output contiguous (as its fake says), values the reference's."""
    p = LIFParams(tau=1.5, detach_reset=False)
    x = _current((5, 8, 4), torch.float32).permute(2, 0, 1).requires_grad_(True)
    s = lif_operator(x, p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)
    assert s.is_contiguous()
    xr = x.detach().clone().requires_grad_(True)
    ref = lif_reference(xr, p)
    assert torch.equal(s, ref)
    g = torch.randn(s.shape)
    torch.testing.assert_close(torch.autograd.grad(s, x, g)[0], torch.autograd.grad(ref, xr, g)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("detach_reset", [True, False])
def test_eager_neuron_skips_the_dispatcher_with_the_operators_results(detach_reset):
    """In eager a CPU neuron runs the operator's own functions as a plain autograd Function (the
    dispatcher's per-call cost skipped): the operator's spikes and gradient bit for bit; under
    ``torch.profiler`` it calls the operator, so that profiles name it."""
    from spikingformer.kernels import cpu_backend
    from spikingformer.neuron import MultiStepLIF

    if not cpu_backend.is_available():
        pytest.skip("the CPU kernel library did not build: the operator runs the torch loop")
    neuron = MultiStepLIF(tau=1.5, detach_reset=detach_reset, backend="cpu")
    p = neuron.params
    x = _current((6, 3, 40), torch.float32).requires_grad_(True)
    g = _current((6, 3, 40), torch.float32, seed=2)
    eager = neuron(x)
    assert type(eager.grad_fn).__name__ == "_EagerLIFBackward"
    xo = x.detach().clone().requires_grad_(True)
    operator = lif_operator(xo, p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)
    assert "spikingformer_lif" in type(operator.grad_fn).__name__
    assert torch.equal(eager, operator)
    assert torch.equal(torch.autograd.grad(eager, x, g)[0], torch.autograd.grad(operator, xo, g)[0])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert "spikingformer_lif" in type(neuron(x).grad_fn).__name__
    assert any(e.name == "spikingformer::lif" for e in prof.events())
    with warnings.catch_warnings():  # torch.jit.trace is deprecated, not gone: a tracer sees the operator
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(neuron, x.detach())
    assert "spikingformer::lif" in str(traced.graph)
    assert torch.equal(traced(x.detach() + 0.5), lif_operator(x.detach() + 0.5, p.tau, p.v_threshold, p.v_reset,
                                                                  p.alpha, p.detach_reset))
    # a second differentiation is refused as the operator refuses it, not passed over as a constant
    for spikes, inputs in ((neuron(x), x), (lif_operator(xo, p.tau, p.v_threshold, p.v_reset, p.alpha,
                                                        p.detach_reset), xo)):
        (first,) = torch.autograd.grad(spikes, inputs, g, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            first.sum().backward()


def _digits_model(dtype=torch.float32):
    torch.manual_seed(0)
    # embed 256: its pointwise layers are large enough for the token_linear route
    return create_model("spikingformer_digits", embed_dim=256, num_heads=8).to(dtype)


def _images(dtype=torch.float32):
    return torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)).to(dtype)


def _train_step(model, x, run=None):
    """One forward+backward of ``run`` (default: ``model``); logits and ``model``'s gradients."""
    model.zero_grad(set_to_none=True)
    out = (model if run is None else run)(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_equals_eager(backend: str, dtype: torch.dtype, exact: bool) -> None:
    torch._dynamo.reset()
    model = _digits_model(dtype)
    x = _images(dtype)
    compare = (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=0)) if exact else \
        (lambda a, b: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9))

    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    with torch.no_grad():
        compare(compiled(x), model(x))

    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_eager, grads_eager = _train_step(model, x)
    model.load_state_dict(state)  # the same BN running statistics for the compiled step
    out_comp, grads_comp = _train_step(model, x, torch.compile(model, fullgraph=True, backend=backend))
    compare(out_comp, out_eager)
    assert grads_comp.keys() == grads_eager.keys() and grads_eager
    names = list(grads_eager)
    if exact:  # eager's fused BN backward sums in another order than the module calls the compiled step takes
        assert_gradients_close([grads_comp[n] for n in names], [grads_eager[n] for n in names])
    else:
        for name in names:
            torch.testing.assert_close(grads_comp[name], grads_eager[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
def test_compile_fullgraph_aot_eager_equals_eager(monkeypatch):
    """Dynamo + AOTAutograd (fake tensors, the registered autograd) trace the whole model, eval and
    train, with every speed route on but ``token_linear``: in-place inference BN and (threshold
    lowered to reach it) the tokenizer's memory-lean recompute, which steps aside under compile.
    (``token_linear`` computes eager's products with oneDNN and leaves compiled graphs PyTorch's,
    which round otherwise: tests/test_products.py compares those to rounding; ``winograd`` likewise
    steps aside under compile, where the compiler picks the convolution: tests/test_winograd.py.)"""
    monkeypatch.setattr(layers.routes, "RECOMPUTE_MIN_ELEMENTS", 0)
    with layers.routes.configured("all,-token_linear,-winograd"):
        _compiled_equals_eager("aot_eager", torch.float32, exact=True)


@pytest.mark.slow
def test_compile_under_bf16_autocast_equals_eager():
    """Under CPU bf16 autocast the fused routes read and write bf16 maps; compiled (``aot_eager``) with
    them in the graph, a training step's logits and gradients equal eager's bit for bit. (``winograd``
    off on both sides: it steps aside under compile, where the compiler picks the convolution.)"""
    torch._dynamo.reset()
    model = _digits_model()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for backend in (None, "aot_eager"):
        model.load_state_dict(state)
        run = torch.compile(model, fullgraph=True, backend=backend) if backend else model
        with torch.autocast("cpu", dtype=torch.bfloat16), layers.routes.configured("-winograd"):
            results.append(_train_step(model, x, run))
    (out0, grads0), (out1, grads1) = results
    assert out0.dtype == torch.bfloat16 and torch.equal(out0, out1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[k], grads1[k]) for k in grads0)


@pytest.mark.slow
def test_compile_fullgraph_inductor_equals_eager(monkeypatch, tmp_path):
    """The default compiler (Inductor, generated C++) on the same model, in float64.

    Compiled into a cache of its own: Inductor's on-disk cache does not tell ``ATEN_CPU_CAPABILITY``
    settings apart, and code cached under AVX-512 gave wrong logits when reused under
    ``ATEN_CPU_CAPABILITY=avx2`` (the CI's second, AVX2-capped run)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _compiled_equals_eager("inductor", torch.float64, exact=False)


def test_export_inference_graph():
    """Exported under ``no_grad`` (docs/recipes.md), the graph holds the inference operators (the
    neuron, BN -> SN in one pass, the spike linear and convolution) and computes what eager does."""
    model = _digits_model().eval()
    x = _images()
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        wanted = {f"spikingformer.{name}.default" for name in ("lif", "bn_lif_pool", "spike_linear", "spike_conv")}
        assert wanted <= targets, sorted(targets)
        torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


class _CompiledCalled(Exception):
    pass


def test_train_compile_option(monkeypatch, tmp_path):
    """``spikingformer train --compile`` hands the model to ``torch.compile`` and trains through what
    it returns (that a compiled model computes what eager does is the tests above). The stand-in
    compiler's module stops the run at the first training forward."""
    from spikingformer.cli import main

    compiled = []

    class Stop(torch.nn.Module):
        def forward(self, *args):
            raise _CompiledCalled

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return Stop()

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = ["train", "--output", str(tmp_path), "--name", "run", "--model-args", "{embed_dim: 32, num_heads: 2}",
            "--batch-size", "64", "--amp", "off", "--tensorboard", "false", "--epochs", "1", "--warmup-epochs", "0", "--compile"]
    with pytest.raises(_CompiledCalled):
        main(args)
    assert [type(m).__name__ for m in compiled] == ["SpikingTransformer"]
