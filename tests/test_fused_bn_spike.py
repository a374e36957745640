"""The ``fused_bn_spike`` route and the no-pool backward of the tokenizer kernel it uses: a block's
ConvBN -> SN in training keeps only BN's input and batch statistics, and the kernel computes BN's
output and the membrane again in backward, against the module calls it replaces.

The twins are PyTorch's: ``nn.functional.batch_norm`` in training, the fused LIF kernel's autograd
(itself held to the paper's equations in tests/test_neuron.py) and, for the ground truth of the
gradient, the LIF reference loop. The kernel rounds BN's output as PyTorch's BN kernel in use does
(once per multiply-add in its x86 FMA and AArch64 builds, twice elsewhere: a probe of PyTorch asks
which), so spikes, gradients and running statistics equal the module calls bit for bit; a build
that cannot (no FMA beside FMA kernels) steps aside.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import assert_gradients_close, batch_norm_eps_error, saved_bytes
from torch import nn

from spikingformer.kernels import batch_stats
from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import ops
from spikingformer.layers import ConvBN, TokenConvBN, bn_spike, routes
from spikingformer.models.zoo import create_model
from spikingformer.neuron import LIFParams, MultiStepLIF, lif_reference

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"the CPU kernel library did not build: {cpu.build_error()}")

PARAMS = [LIFParams(), LIFParams(tau=1.5, v_threshold=0.5, detach_reset=False), LIFParams(v_reset=-0.1)]
SHAPES = [(4, 2, 12, 1, 16), (3, 2, 7, 9, 5), (1, 1, 1, 1, 3), (2, 3, 64, 1, 40)]


def _lif(p: LIFParams) -> MultiStepLIF:
    return MultiStepLIF(p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"tau{p.tau}_vth{p.v_threshold}_vr{p.v_reset}")
def test_backward_without_pool_equals_the_lif_gradient(shape, p):
    """The kernel's backward of SN alone (no max-pool) equals autograd through the fused LIF
    kernel bit for bit, and the reference loop's autograd (exact sigmoid) to rounding."""
    z = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.7).requires_grad_()
    out = _lif(p)(z)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    assert 0 < out.sum() < out.numel()
    assert torch.equal(cpu.lif_pool_backward(z.detach(), grad, p, pool=False), z.grad)
    zr = z.detach().clone().requires_grad_()
    lif_reference(zr, p).backward(grad)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)


def _segment(spec: str, layer: TokenConvBN, lif: nn.Module, steps: int = 2):
    """Two training steps of ``lif(layer(x))`` under ``spec``: outputs, input and parameter
    gradients, running statistics and batch count, and the bytes autograd kept for the last."""
    s = copy.deepcopy(layer).train()
    row = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, 10, 24, generator=g).requires_grad_()
        with routes.configured(spec):
            out, saved = saved_bytes(lambda: s.spikes(lif, x))
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + step)))
        row += [out, x.grad, s.linear.weight.grad.clone(), s.bn.weight.grad.clone(), s.bn.bias.grad.clone(),
                s.bn.running_mean.clone(), s.bn.running_var.clone(), s.bn.num_batches_tracked.clone()]
    return row, saved


@pytest.mark.parametrize("momentum", [0.1, None])
def test_token_segment_equals_the_module_calls_and_keeps_less(momentum):
    """ConvBN -> SN on tokens in training: output, running statistics and batch count as the module
    calls bit for bit, gradients (input, linear and BN parameters) to rounding, over two steps (``momentum=None``
    averages by the count); autograd no longer keeps the neuron's input (BN's output)."""
    torch.manual_seed(0)
    layer = TokenConvBN(24, 32, bias=True)
    layer.bn.momentum = momentum
    nn.init.uniform_(layer.bn.weight, 0.5, 1.5)
    nn.init.uniform_(layer.bn.bias, -0.2, 0.4)
    lif = MultiStepLIF(tau=2.0)
    plain, saved_plain = _segment("-fused_bn_spike,-spike_linear,-token_linear", layer, lif)
    fused, saved_fused = _segment("+fused_bn_spike,-spike_linear,-token_linear", layer, lif)
    grads = [i for i in range(len(plain)) if i % 8 in (1, 2, 3, 4)]  # input, linear weight, BN weight and bias
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(plain, fused)) if i not in grads)
    assert_gradients_close([fused[i] for i in grads], [plain[i] for i in grads])
    assert 0 < plain[0].sum() < plain[0].numel()
    if cpu.kernel_reproduces_bn():  # else (a build without FMA beside PyTorch's FMA kernels) it steps aside
        output_bytes = 4 * 3 * 10 * 32 * 4
        assert saved_fused <= saved_plain - output_bytes  # the BN output the neuron kept


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batch_statistics_are_those_of_pytorchs_training_batch_norm(dtype, threads):
    """The route's forward finds the batch statistics with ``batch_stats.batch_norm_update_stats``
    (the library's two passes, which sum the rows in the runs and order of PyTorch's kernel, one run
    per thread, and add the runs in its accumulation type: float64 for float32, float for bfloat16)
    and forms ``1 / sqrt(var + eps)`` as PyTorch's training BN does (in
    float64, then rounded): mean, invstd and running estimates equal ``native_batch_norm``'s bit
    for bit, over 4096 (and 32, 64) channels of varied scale and running estimates, for channels-last maps and
    token rows, on 1-3 threads, with two momentums. Forming invstd in float32 (the inference terms)
    differs in many channels. Where PyTorch's vectorised x86 kernels run, the library's passes are
    taken for both dtypes: float32's with both sums rounding once, bfloat16's (PyTorch's
    mixed-precision kernel) with the squares' sum only. With as many rows as threads or fewer, and
    for one channel of more than one pixel (maps NCHW-contiguous as well), PyTorch's kernel sums
    another way, and the statistics are PyTorch's own."""
    g = torch.Generator().manual_seed(4)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 4096 channels, and 32 and 64 (over more rows), the widths the library's loops are built for
        cases = [(c, rows, momentum) for c, rows in ((4096, 1), (32, 64), (64, 32)) for momentum in (0.1, 1 / 3)]
        for c, rows, momentum in cases:
            scale = torch.rand(c, generator=g) * 3
            x = (torch.randn(6 * rows, c, 3, 5, generator=g) * scale[:, None, None] + 0.3
                 if momentum == 0.1 else torch.randn(40 * rows, c, generator=g) * scale - 0.2)
            x = x.to(dtype).contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.to(dtype)
            running = [torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5]
            running2 = [t.clone() for t in running]
            _, mean, invstd = torch.native_batch_norm(x, None, None, *running, True, momentum, 1e-5)
            mean2, var = batch_stats.batch_norm_update_stats(x, *running2, momentum)
            assert torch.equal(mean2, mean) and all(torch.equal(a, b) for a, b in zip(running, running2))
            assert torch.equal(cpu.bn_invstd(var, 1e-5, batch=True), invstd)
            assert (cpu.bn_invstd(var, 1e-5, batch=False) != invstd).sum() > c // 40
            # PyTorch's own inference terms (asked of its kernel): within 2 ulp of the float64 quotient
            ulps = cpu.bn_invstd(var, 1e-5, batch=False).view(torch.int32) - invstd.view(torch.int32)
            assert ulps.abs().max() <= 2
        # as many rows as threads or fewer: PyTorch's kernel sums each channel in one sum (the library
        # steps aside; its runs of one row each had given other means)
        for rows in range(2, threads + 1):
            for _ in range(20):
                x = (torch.randn(rows, 3, generator=g) * 3 + 1).to(dtype)
                running = [torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5]
                running2 = [t.clone() for t in running]
                want = torch.batch_norm_update_stats(x, *running, 0.1)
                got = batch_stats.batch_norm_update_stats(x, *running2, 0.1)
                assert all(torch.equal(a, b) for a, b in zip((*got, *running2), (*want, *running)))
        # one channel of more than one pixel: channels-last maps that are NCHW-contiguous too, which
        # PyTorch's kernel sums per channel in one sum (the library steps aside)
        for _ in range(5):
            x = (torch.randn(16, 1, 9, 11, generator=g) * 3 + 1).to(dtype).contiguous(memory_format=torch.channels_last)
            running = [torch.randn(1, generator=g), torch.rand(1, generator=g) + 0.5]
            running2 = [t.clone() for t in running]
            want = torch.batch_norm_update_stats(x, *running, 0.1)
            got = batch_stats.batch_norm_update_stats(x, *running2, 0.1)
            assert all(torch.equal(a, b) for a, b in zip((*got, *running2), (*want, *running)))
        # the library's passes sum as PyTorch's x86 kernels do; PyTorch 2.10's AArch64 kernel sums in
        # another order, where the probe leaves the statistics to PyTorch (the equalities above hold either way)
        x86_fma = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        if cpu.kernel_reproduces_bn() and x86_fma:
            assert batch_stats._stats_fma(cpu.get_library(), dtype) == (3 if dtype == torch.float32 else 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("case", ["one value per channel", "eps 0"])
def test_what_training_batch_norm_refuses_the_fused_routes_refuse(case):
    """F.batch_norm refuses, in training, a single value per channel (one token row; one 1x1 map:
    no variance) and, from PyTorch 2.11 on, ``eps <= 0``. The fused routes call PyTorch's native
    operators, which check neither, and went on with NaN running variances; they now raise the same
    ``ValueError`` and leave BatchNorm's buffers as the module calls leave them (the batch counted,
    the running statistics untouched). Where this PyTorch takes ``eps = 0`` (2.8), so do they, with
    the module calls' running statistics."""
    lif = MultiStepLIF()
    one = case == "one value per channel"
    # tokens (T, B, N, C); maps (T, B, H, W, C) in memory, passed as channels-last (T, B, C, H, W)
    token_shape, map_shape = ((1, 1, 1, 8), (1, 1, 1, 1, 8)) if one else ((2, 1, 3, 8), (1, 2, 3, 3, 8))
    tokens, maps = torch.randn(token_shape), torch.randn(map_shape).permute(0, 1, 4, 2, 3)
    layers = [("fused_bn_spike", TokenConvBN(8, 8, bias=False).train(),
               lambda m: m.spikes(lif, tokens.clone().requires_grad_())),
              ("fused_spike_pool", ConvBN(3, 8).train(),
               lambda m: bn_spike.bn_spike_pool(m, lif, True, maps.clone().requires_grad_()))]
    message = "more than 1 value per channel" if one else batch_norm_eps_error(0.0, training=True)
    for route, layer, call in layers:
        if not one:
            layer.bn.eps = 0.0
        buffers = []
        for spec in (f"-{route}", f"+{route},+channels_last"):
            m = copy.deepcopy(layer)
            with routes.configured(spec), \
                    pytest.raises(ValueError, match=message) if message else contextlib.nullcontext():
                call(m)
            buffers.append(dict(m.bn.named_buffers()))
        assert all(torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])
        assert int(buffers[1]["num_batches_tracked"]) == 1
        assert torch.equal(buffers[1]["running_var"], torch.ones(8)) == (message is not None)


def test_neuron_with_hooks_or_no_neuron_takes_the_module_calls(monkeypatch):
    """A hooked neuron (a firing-rate meter must see its spikes) or ``nn.Identity`` (Spikformer's
    blocks end some layers without a neuron) never reaches the kernel."""
    layer = TokenConvBN(8, 8, bias=False).train()
    x = torch.randn(2, 1, 4, 8, requires_grad=True)
    calls = []
    monkeypatch.setattr(cpu, "lif_pool_forward", lambda *a, **k: calls.append(1))
    lif = MultiStepLIF()
    seen = []
    lif.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with routes.configured("+fused_bn_spike"):
        out = layer.spikes(lif, x)
        assert torch.equal(layer.spikes(nn.Identity(), x), layer(x))
    assert seen == [out.shape] and not calls


@pytest.mark.parametrize("name", ["spikingformer_cifar10_4_384", "spikformer_cifar10_4_384"])
def test_model_with_and_without_the_route_is_the_same(name, monkeypatch):
    """A zoo model's training step with the route on equals the route off bit for bit (output,
    every buffer; every gradient to rounding), in both residual styles, and the route does run."""
    torch.manual_seed(0)
    model = create_model(name, depth=2, embed_dim=64, num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    results = []
    calls = []
    for spec in ("-fused_bn_spike", "+fused_bn_spike"):
        if spec[0] == "+":
            real = cpu.bn_lif_pool_backward

            def spy(z, grad, p, bn, pool, *args):
                calls.append((z.shape[3], pool))
                return real(z, grad, p, bn, pool, *args)

            monkeypatch.setattr(cpu, "bn_lif_pool_backward", spy)
        m = copy.deepcopy(model).train()
        with routes.configured(spec):
            out = m(x)
            out.square().sum().backward()
        results.append((out, {k: p.grad for k, p in m.named_parameters()}, dict(m.named_buffers())))
    (out0, g0, b0), (out1, g1, b1) = results
    assert torch.equal(out0, out1)
    assert g0.keys() == g1.keys()
    assert_gradients_close([g1[k] for k in g0], [g0[k] for k in g0])
    assert all(torch.equal(b0[k], b1[k]) for k in b0)
    if cpu.kernel_reproduces_bn():  # else (a build without FMA beside PyTorch's FMA kernels) it steps aside
        assert (1, False) in calls  # tokens: maps of N x 1 pixels, no max-pool



def _eval_layer(eps: float = 1e-5) -> TokenConvBN:
    """A token ConvBN in eval mode with running statistics and affine terms away from the defaults."""
    torch.manual_seed(1)
    layer = TokenConvBN(24, 40, bias=True).eval()
    layer.bn.eps = eps
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-0.5, 0.5)
        layer.bn.running_var.uniform_(0.3, 2.0)
        nn.init.uniform_(layer.bn.weight, 0.5, 1.5)
        nn.init.uniform_(layer.bn.bias, -0.2, 0.6)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_token_segment_is_one_kernel_pass_with_the_module_calls_spikes(dtype, monkeypatch):
    """ConvBN -> SN on tokens in inference (running statistics, under bf16 autocast too): the route
    runs BN and the neuron as one pass of the inference kernel, and its spikes equal the module
    calls' (PyTorch's BatchNorm1d, then the neuron) bit for bit."""
    layer, lif = _eval_layer(), MultiStepLIF(tau=2.0)
    x = torch.randn(4, 3, 10, 24, generator=torch.Generator().manual_seed(2)) * 2
    calls = []
    real = cpu.lif_pool_forward
    monkeypatch.setattr(cpu, "lif_pool_forward", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    spikes = []
    for spec in ("-fused_bn_spike,-spike_linear,-token_linear", "+fused_bn_spike,-spike_linear,-token_linear"):
        with routes.configured(spec), torch.inference_mode(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            spikes.append(layer.spikes(lif, x))
    assert spikes[0].dtype == dtype and 0 < spikes[0].float().mean() < 0.5
    if not cpu.kernel_reproduces_bn():  # a build without FMA beside PyTorch's FMA kernels steps aside
        assert not calls and torch.equal(spikes[0], spikes[1])
        return
    assert calls == [(4, 3, 10, 1, 40)]  # tokens as maps of N x 1 pixels, once
    assert torch.equal(spikes[0], spikes[1])


def test_inference_token_route_refuses_what_the_module_calls_refuse_and_steps_aside_for_hooks(monkeypatch):
    """A negative eps raises F.batch_norm's error with the route on, as the module calls do (or,
    where this PyTorch takes it, gives their spikes); a hooked BatchNorm (a meter must see its
    output), a neuron with hooks or a layer with autograd on takes the module calls."""
    x = torch.randn(2, 2, 5, 24)
    message = batch_norm_eps_error(-1e-5, training=False)
    spikes = []
    for spec in ("-fused_bn_spike", "+fused_bn_spike"):
        with routes.configured(spec), torch.inference_mode(), \
                pytest.raises(ValueError, match=message) if message else contextlib.nullcontext():
            spikes.append(_eval_layer(eps=-1e-5).spikes(MultiStepLIF(), x))
    assert message is not None or torch.equal(spikes[0], spikes[1])
    calls = []
    monkeypatch.setattr(cpu, "lif_pool_forward", lambda *a, **k: calls.append(1))
    hooked_bn, seen = _eval_layer(), []
    hooked_bn.bn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked_lif = MultiStepLIF()
    hooked_lif.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with routes.configured("+fused_bn_spike"):
        with torch.inference_mode():
            hooked_bn.spikes(MultiStepLIF(), x)
            _eval_layer().spikes(hooked_lif, x)
        _eval_layer().spikes(MultiStepLIF(), x.requires_grad_())  # eval BN under autograd: module calls
    assert len(seen) == 2 and not calls


@pytest.mark.parametrize("name", ["spikingformer_cifar10_4_384", "spikformer_cifar10_4_384"])
def test_model_inference_with_and_without_the_route_is_the_same(name, monkeypatch):
    """A zoo model's inference (eval mode, running statistics those of a batch, so that the blocks'
    neurons fire) gives the same logits with the route on and off, bit for bit, in both residual
    styles; the route runs on the blocks' tokens."""
    torch.manual_seed(0)
    model = create_model(name, depth=2, embed_dim=64, num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0  # the running statistics become the batch's
    with torch.no_grad():
        model.train()(x)
    model.eval()
    calls = []
    real = cpu.lif_pool_forward
    monkeypatch.setattr(cpu, "lif_pool_forward", lambda *a, **k: calls.append(a[0].shape[3]) or real(*a, **k))
    logits = []
    for spec in ("-fused_bn_spike", "+fused_bn_spike"):
        with routes.configured(spec), torch.inference_mode():
            logits.append(model(x))
    assert torch.equal(logits[0], logits[1])
    if cpu.kernel_reproduces_bn():
        assert 1 in calls  # tokens: maps of N x 1 pixels


def test_opcheck_training_operators():
    """The training form's operators (``spikingformer::bn_batch_stats``, which updates the running
    estimates, ``bn_lif_pool`` with the batch's statistics, and the backward) pass ``opcheck``:
    schema, fake tensors, AOT dispatch; for maps with and without the max-pool and for token rows. (Their autograd is
    :func:`ops.bn_spike_train`'s, which the tests above and below hold to the module calls.)"""
    p = LIFParams(tau=1.5, detach_reset=False)
    g = torch.Generator().manual_seed(5)
    for shape, pool, tokens in (((3, 2, 6, 5, 4), True, False), ((3, 2, 6, 5, 4), False, False),
                                ((2, 3, 7, 1, 4), False, True)):
        x = torch.randn(shape, generator=g) * 1.5 + 0.5
        weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g) * 0.3
        for momentum in (0.1, None):
            buffers = (torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5, torch.tensor(2))
            torch.library.opcheck(ops.bn_batch_stats, (x, *buffers, momentum, 1e-5, tokens))
        mean, var = x.flatten(0, -2).mean(0), x.flatten(0, -2).var(0, unbiased=False)
        torch.library.opcheck(ops.bn_lif_pool, (x, mean, var, weight, bias, 1e-5, p.tau, p.v_threshold, p.v_reset,
                                                pool, True))
        out = ops.bn_lif_pool(x, mean, var, weight, bias, 1e-5, p.tau, p.v_threshold, p.v_reset, pool, True)
        for needs in ([True, True, True], [False, True, False]):
            torch.library.opcheck(ops.bn_lif_pool_train_backward,
                                  (x, torch.randn(out.shape, generator=g), mean, var, weight, bias, 1e-5, p.tau,
                                   p.v_threshold, p.v_reset, p.alpha, p.detach_reset, pool, needs))


def test_compiled_training_keeps_the_fused_operators_and_equals_eager():
    """Under ``torch.compile(fullgraph=True)`` a training ConvBN -> SN on tokens and a tokenizer
    stage's BN -> SN -> max-pool take the fused operators (the traced graph holds them) and compute
    what eager does with them (``aot_eager``: the same kernels), over two steps with ``momentum=None``
    (the average by the batch count): spikes, every gradient, running statistics and the count bit
    for bit."""
    from torch._dynamo import lookup_backend

    traced = []

    def recording(gm, example_inputs):
        traced.extend(str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                      for n in m.graph.nodes if n.op == "call_function")  # subgraphs: autograd.Function's
        return lookup_backend("aot_eager")(gm, example_inputs)

    lif = MultiStepLIF(tau=2.0)
    tokens, maps = TokenConvBN(24, 32, bias=True), ConvBN(3, 16)
    def stage(m, x):  # x (T, B, C, H, W); the stage's conv output channels-last, as the tokenizer's
        y = m.conv(x.flatten(0, 1).contiguous(memory_format=torch.channels_last)).unflatten(0, x.shape[:2])
        return bn_spike.bn_spike_pool(m, lif, True, y)

    calls = [(tokens, lambda m, x: m.spikes(lif, x), (4, 3, 10, 24)), (maps, stage, (2, 3, 3, 12, 10))]
    for layer, call, shape in calls:
        # (where the route steps aside, the module's own momentum=None cannot compile: a factor from a buffer)
        layer.bn.momentum = None if cpu.kernel_reproduces_bn() else 0.1
        nn.init.uniform_(layer.bn.weight, 0.5, 1.5)
        results = []
        for compiled in (False, True):
            torch._dynamo.reset()
            m = copy.deepcopy(layer).train()
            run = torch.compile(call, fullgraph=True, backend=recording) if compiled else call
            row = []
            for step in range(2):
                x = torch.randn(shape, generator=torch.Generator().manual_seed(step)).requires_grad_()
                with routes.configured("+fused_bn_spike,+fused_spike_pool,+channels_last,-spike_linear"):
                    out = run(m, x)
                out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + step)))
                row += [out, x.grad, *(p.grad.clone() for p in m.parameters()), *(b.clone() for b in m.buffers())]
            results.append(row)
        assert all(torch.equal(a, b) for a, b in zip(*results))
        assert 0 < results[0][0].sum() < results[0][0].numel()
    if cpu.kernel_reproduces_bn():
        assert {"spikingformer.bn_batch_stats.default", "spikingformer.bn_lif_pool.default"} <= set(traced)


def _fake_batch_norms(rounding: str):
    """``F.batch_norm`` (inference) and ``torch.native_batch_norm`` (training) computing
    ``x * scale + shift`` with one rounding per multiply-add (``"fused"``: in float64, then rounded),
    two (``"unfused"``), or the fused result one ulp up where it is positive (``"neither"``)."""
    def apply(x, mean, invstd, weight, bias):
        view = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        scale = (invstd * weight).view(view)
        m, b = mean.view(view), bias.view(view)
        if rounding == "unfused":
            return x * scale + (b - m * scale)
        s = scale.double()
        out = (x.double() * s + (b.double() - m.double() * s).float().double()).float()
        return torch.where(out > 0, torch.nextafter(out, torch.tensor(float("inf"))), out) if rounding == "neither" else out

    def inference(x, mean, var, weight, bias, training, momentum, eps):
        return apply(x, mean, cpu.bn_invstd(var, eps, batch=False), weight, bias)

    def training(x, weight, bias, running_mean, running_var, training, momentum, eps):
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims)
        invstd = cpu.bn_invstd(x.var(dims, unbiased=False), eps, batch=True)
        return apply(x, mean, invstd, weight, bias), mean, invstd

    return inference, training


@pytest.mark.parametrize("rounding", ["fused", "unfused", "neither"])
def test_the_probe_tells_how_pytorchs_batch_norm_rounds(monkeypatch, rounding):
    """bn_rounding classifies a BatchNorm kernel by its outputs: one rounding per multiply-add, two,
    or neither (then no kernel computes BN: it cannot reproduce it)."""
    inference, training = _fake_batch_norms(rounding)
    monkeypatch.setattr(nn.functional, "batch_norm", inference)
    monkeypatch.setattr(torch, "native_batch_norm", training)
    cpu.bn_rounding.cache_clear()
    try:
        assert cpu.bn_rounding() == (None if rounding == "neither" else rounding)
        assert cpu.bn_fuses_multiply_add() == (rounding == "fused")
        if rounding == "neither":
            assert not cpu.kernel_reproduces_bn()
    finally:
        cpu.bn_rounding.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="PyTorch's x86 builds: AVX2 / AVX512 and DEFAULT kernels")
def test_pytorchs_x86_batch_norm_fuses_its_multiply_adds_where_vectorised():
    """PyTorch's AVX2 and AVX512 BatchNorm kernels contract to FMA, its DEFAULT kernel does not (a
    fresh process: ATen's capability is fixed at its first use)."""
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert cpu.bn_rounding() == "fused"
    code = "from spikingformer.kernels import cpu_backend as c; print(c.bn_rounding())"
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "unfused"
