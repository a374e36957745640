"""Model-level efficiency changes give the same outputs and gradients as the straightforward computation.

The Spiking Tokenizer runs its ConvBN stages in the channels-last memory format, applies its
neurons to the ``(T, B, H, W, C)`` permutation of the maps (a free view of channels-last maps), and
encodes static images with one stem convolution per image (``encode_static``). Here the tokenizer
is recomputed the plain way -- contiguous NCHW tensors, neurons on ``(T, B, C, H, W)``, the stem on
the image repeated T times -- and outputs, input gradients, parameter gradients and BatchNorm
running statistics are compared (float64, so no spike can flip on rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import saved_bytes
from torch import nn

from spikingformer.layers import ResidualStyle, SpikingTokenizer, lif_factory, routes
from spikingformer.models.zoo import create_model


@pytest.fixture(autouse=True)
def _every_route_on(monkeypatch):
    """Every route on, whatever this CPU's default (the tests compare them with the plain computation),
    and the memory-lean tokenizer path for the test models' small maps too."""
    from spikingformer.layers import routes

    monkeypatch.setattr(routes, "RECOMPUTE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(routes, "ONEDNN_MIN_WEIGHTS", 1 << 16)
    with routes.configured("all"):
        yield


def _conv_bn_plain(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t, b = x.shape[:2]
    y = stage.bn(stage.conv(x.reshape(t * b, *x.shape[2:]).contiguous()))
    return y.reshape(t, b, *y.shape[1:])


def tokenizer_plain(tok: SpikingTokenizer, x: torch.Tensor) -> torch.Tensor:
    """The tokenizer written out directly on contiguous NCHW tensors: ``(T, B, C, H, W)`` -> ``(T, B, N, D)``."""
    x = _conv_bn_plain(tok.stages[0], x)
    for stage in range(1, 5):
        x = tok.lifs[stage - 1](x.contiguous())
        if tok._pool_before(stage):
            t, b = x.shape[:2]
            x = nn.functional.max_pool2d(x.reshape(t * b, *x.shape[2:]), 3, 2, 1)
            x = x.reshape(t, b, *x.shape[1:])
        if stage < 4:
            x = _conv_bn_plain(tok.stages[stage], x)
    if tok.style is ResidualStyle.SPIKE_DRIVEN:
        x = _conv_bn_plain(tok.stages[4], x)
    else:
        x = x + tok.lifs[4](_conv_bn_plain(tok.stages[4], x).contiguous())
    t, b, d = x.shape[:3]
    return x.reshape(t, b, d, -1).transpose(2, 3).contiguous()


def _make_tokenizer(style: ResidualStyle, in_channels: int, num_pools: int) -> SpikingTokenizer:
    torch.manual_seed(0)
    tok = SpikingTokenizer(in_channels, 32, num_pools, style, lif_factory(tau=2.0))
    for m in tok.modules():  # non-trivial BN affine parameters, so their gradients are tested too
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.4)
    return tok.double().train()


def _compare(tok_a: nn.Module, out_a: torch.Tensor, x_a: torch.Tensor, tok_b: nn.Module, out_b: torch.Tensor,
             x_b: torch.Tensor) -> None:
    assert out_a.shape == out_b.shape
    assert out_a.float().abs().sum() > 0
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out_a)
    out_a.backward(g)
    out_b.backward(g)
    torch.testing.assert_close(x_a.grad, x_b.grad, rtol=1e-9, atol=1e-10)
    grads_a = dict(tok_a.named_parameters())
    for name, p in tok_b.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_a[name].grad, p.grad, rtol=1e-9, atol=1e-10, msg=name)
    buffers_a = dict(tok_a.named_buffers())
    for name, buf in tok_b.named_buffers():
        torch.testing.assert_close(buffers_a[name], buf, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("style", list(ResidualStyle))
@pytest.mark.parametrize("num_pools", [2, 4])
def test_tokenizer_channels_last_equals_plain_nchw(style, num_pools):
    tok = _make_tokenizer(style, 2, num_pools)
    ref = copy.deepcopy(tok)
    x = torch.poisson(torch.full((3, 2, 2, 32, 32), 0.6, dtype=torch.float64))  # (T, B, C, H, W) event counts
    x_a, x_b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = tok(x_a)
    # the layout the change is for: tokens come out contiguous, no copy needed downstream
    assert out.is_contiguous()
    _compare(tok, out, x_a, ref, tokenizer_plain(ref, x_b), x_b)


@pytest.mark.parametrize("style", list(ResidualStyle))
def test_encode_static_equals_plain_repeated_input(style):
    tok = _make_tokenizer(style, 3, 2)
    ref = copy.deepcopy(tok)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64) * 2
    x_a, x_b = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
    out = tok.encode_static(x_a, 4)
    plain = tokenizer_plain(ref, x_b.unsqueeze(0).repeat(4, 1, 1, 1, 1))
    _compare(tok, out, x_a, ref, plain, x_b)


def test_tokenizer_accepts_nchw_and_channels_last_inputs_alike():
    tok = _make_tokenizer(ResidualStyle.SPIKE_DRIVEN, 3, 2).eval()
    x = torch.randn(2, 2, 3, 16, 16, dtype=torch.float64)
    cl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(tok(x), tok(cl), rtol=0, atol=0)
        torch.testing.assert_close(tok(x), tokenizer_plain(tok, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16 autocast"])
@pytest.mark.parametrize("layout", ["channels_last", "-channels_last"])
def test_conv_maps_come_in_the_convolutions_format_and_dtype(layout, autocast):
    """A convolution's input maps: event frames as the model passes them (a (B, T) -> (T, B) view, a
    piece of the batch) come out in the route's format and, under autocast, already in autocast's
    dtype with autocast's rounding (the convolution then casts nothing); maps already so (the spikes
    of the tokenizer's kernels) come out as a view. Either way the convolution's output is the
    module call's on the original maps, bit for bit."""
    from spikingformer.layers.blocks import conv_maps

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    frames = torch.randn(3, 4, 2, 8, 8)  # (B, T, C, H, W)
    x = frames.transpose(0, 1)[:, 1:3]  # (T, B, ...), a piece of the batch: a strided view
    conv = nn.Conv2d(2, 5, 3, padding=1, bias=False)
    with routes.configured(layout), torch.autocast("cpu", torch.bfloat16, enabled=autocast), torch.no_grad():
        maps = conv_maps(x)
        assert maps.shape == (8, 2, 8, 8) and maps.is_contiguous(memory_format=fmt)
        assert maps.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(maps.float(), x.flatten(0, 1).to(maps.dtype).float())
        assert torch.equal(conv(maps), conv(x.flatten(0, 1).contiguous(memory_format=fmt)))
        again = maps.view(4, 2, 2, 8, 8)
        assert conv_maps(again).data_ptr() == maps.data_ptr()  # a view: no copy


@pytest.mark.parametrize("name,shape", [
    ("spikingformer_cifar10_4_256", (2, 3, 32, 32)),
    ("spikformer_cifar10_4_256", (2, 3, 32, 32)),
    ("spikingformer_cifar10dvs_2_256", (1, 2, 2, 64, 64)),
])
def test_whole_model_matches_plain_tokenizer(name, shape):
    """The full model with its tokenizer replaced by the plain computation, in float64: the two routes
    round differently (another convolution layout), and in float32 a membrane within rounding of
    V_th fires in one route only on some CPUs (AVX2), and the flip reaches every logit."""
    torch.manual_seed(1)
    model = create_model(name, depth=1).double().train()
    ref = copy.deepcopy(model)
    x = torch.poisson(torch.full(shape, 0.6, dtype=torch.float64)) if len(shape) == 5 else torch.randn(shape, dtype=torch.float64)

    def plain_features(inp: torch.Tensor) -> torch.Tensor:
        if inp.dim() == 4:
            tokens = tokenizer_plain(ref.tokenizer, inp.unsqueeze(0).repeat(ref.config.time_steps, 1, 1, 1, 1))
        else:
            tokens = tokenizer_plain(ref.tokenizer, inp.transpose(0, 1))
        for block in ref.blocks:
            tokens = block(tokens)
        return tokens

    out = model(x)
    out_ref = ref.head(plain_features(x))
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        if p.grad is None:
            assert ref_params[pname].grad is None, pname
            continue
        torch.testing.assert_close(p.grad, ref_params[pname].grad, rtol=1e-7, atol=1e-9, msg=pname)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_bn_spike_pool_is_bit_identical_and_keeps_less(pool, dtype, monkeypatch):
    """The memory-lean BN -> SN -> max-pool segment equals the plain module calls exactly, in fp32 and
    bf16: output, input / BN-parameter gradients and running statistics; and it keeps only its input."""
    from spikingformer.layers import ConvBN, _bn_spike_pool, bn_spike_pool
    from spikingformer.neuron import MultiStepLIF


    torch.manual_seed(0)
    stage = ConvBN(3, 16)
    nn.init.uniform_(stage.bn.weight, 0.5, 1.5)
    nn.init.uniform_(stage.bn.bias, -0.2, 0.4)
    lif = MultiStepLIF(tau=2.0)
    y0 = (torch.randn(4, 3, 16, 12, 12) * 2).to(dtype)
    grad = torch.randn(4, 3, 16, *((6, 6) if pool else (12, 12))).to(dtype)
    results = []
    for lean in (False, True):
        s = copy.deepcopy(stage).train()
        y = y0.clone().requires_grad_()
        fn = (lambda: bn_spike_pool(s, lif, pool, y)) if lean else (lambda: _bn_spike_pool(s, lif, pool, y))
        out, saved = saved_bytes(fn)
        out.backward(grad)
        results.append((out, y.grad, s.bn.weight.grad, s.bn.bias.grad, s.bn.running_mean, s.bn.running_var, saved))
    plain, lean = results
    for a, b in zip(plain[:6], lean[:6]):
        assert torch.equal(a, b)
    assert plain[0].sum() > 0  # some spikes, so the gradients are not trivially zero
    assert lean[6] == y0.numel() * y0.element_size()  # only the input is kept
    assert plain[6] >= 2 * lean[6]  # plain autograd keeps at least the BN output and the spikes too


def test_token_linear_equals_f_linear():
    """The oneDNN route of TokenLinear (large CPU fp32 layers) computes F.linear's values and gradients."""
    from spikingformer.layers import ONEDNN_MIN_WEIGHTS, TokenLinear

    torch.manual_seed(0)
    layer = TokenLinear(384, 512)
    assert layer.weight.numel() >= ONEDNN_MIN_WEIGHTS
    x = (torch.rand(2, 3, 40, 384) < 0.3).float().requires_grad_()  # spikes, (T, B, N, C)
    grad = torch.randn(2, 3, 40, 512)
    out = layer(x)
    out.backward(grad)
    got = (out.detach(), x.grad, layer.weight.grad, layer.bias.grad)
    x.grad = layer.weight.grad = layer.bias.grad = None
    ref = nn.functional.linear(x, layer.weight, layer.bias)
    ref.backward(grad)
    for a, b in zip(got, (ref.detach(), x.grad, layer.weight.grad, layer.bias.grad)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))  # analysis hooks still fire
    layer(x.detach()[:, :, :7].transpose(2, 3).transpose(2, 3))  # a non-contiguous input
    assert seen == [torch.Size([2, 3, 7, 384])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_bn_overwrites_the_conv_output_with_identical_values(dtype):
    """Without autograd the tokenizer's BN writes into its input (one map fewer); same values."""
    from spikingformer.layers import ConvBN, _bn_spike_pool, _max_pool, _spike_channels_last
    from spikingformer.neuron import MultiStepLIF

    torch.manual_seed(0)
    stage = ConvBN(3, 16)
    stage.bn.running_mean.uniform_(-0.5, 0.5)
    stage.bn.running_var.uniform_(0.5, 2.0)
    nn.init.uniform_(stage.bn.weight, 0.5, 1.5)
    stage.eval()
    lif = MultiStepLIF(tau=2.0)
    with torch.no_grad(), routes.configured("-fused_spike_pool"):  # which would not write the BN output at all
        y = stage.convolve(torch.randn(4, 3, 3, 12, 12) * 3).to(dtype)  # bf16: as under autocast
        bn_out = stage.normalize(y.clone())
        expected = _max_pool(_spike_channels_last(lif, bn_out))
        got = _bn_spike_pool(stage, lif, True, y)
    assert torch.equal(got, expected) and expected.sum() > 0
    assert torch.equal(y, bn_out)  # the conv output now holds the BN output, bit for bit


def test_routes_switch_syntax():
    from spikingformer.layers import routes

    every = frozenset(routes.ROUTES)
    assert routes.parse("-token_linear, -recompute", every) == every - {"token_linear", "recompute"}
    assert routes.parse("none,+recompute,attention_order", every) == {"recompute", "attention_order"}
    assert routes.parse("all", ()) == every and routes.parse("", {"stem_once"}) == {"stem_once"}
    with pytest.raises(ValueError, match="SPIKINGFORMER_ROUTES: unknown route 'token_linaer'"):
        routes.parse("-token_linaer", every)
    start = routes.active()
    with routes.configured("-channels_last"):
        assert routes.active() == start - {"channels_last"} and not routes.enabled("channels_last")
        with routes.configured("none"):
            assert routes.active() == frozenset()
        assert routes.active() == start - {"channels_last"}
    assert routes.active() == start
    with pytest.raises(KeyError):
        routes.enabled("channel_last")


def test_routes_environment_variable_is_read_at_import():
    import os
    import subprocess
    import sys

    env = dict(os.environ, SPIKINGFORMER_ROUTES="none,+stem_once")
    code = "from spikingformer.layers import routes; print(','.join(sorted(routes.active())))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "stem_once"


def test_every_route_off_is_the_plain_module_calls():
    """With every route off, the tokenizer equals the plain computation bit for bit in float32 (the
    same kernels on the same layouts), the token linear is ``F.linear`` and spike attention is
    ``(Q K^T) V * s`` (real-valued operands here, where the two orders round differently)."""
    from spikingformer.layers import TokenLinear, routes, spike_attention

    torch.manual_seed(0)
    tok = _make_tokenizer(ResidualStyle.SEW_ADD, 3, 2).float()
    ref = copy.deepcopy(tok)
    x = torch.randn(3, 2, 3, 16, 16) * 2
    with routes.configured("none"), torch.no_grad():
        assert torch.equal(tok(x), tokenizer_plain(ref, x))
        tok.eval(), ref.eval()
        assert torch.equal(tok(x), tokenizer_plain(ref, x))
        assert torch.equal(tok.encode_static(x[0], 3), tokenizer_plain(ref, x[0].expand(3, *x[0].shape)))
        layer = TokenLinear(384, 512)
        tokens = (torch.rand(2, 3, 40, 384) < 0.3).float()
        assert torch.equal(layer(tokens), nn.functional.linear(tokens, layer.weight, layer.bias))
        q, k, v = (torch.randn(2, 4, 50, 8) for _ in range(3))
        assert torch.equal(spike_attention(q, k, v, 0.125), (q @ k.transpose(-2, -1)) @ v * 0.125)


@pytest.mark.parametrize("aten,onednn,isa", [
    ("AVX512", "", "avx512"), ("AVX512", "AVX512_CORE_BF16", "avx512"), ("AVX512", "avx2", "avx2"),
    ("AVX2", "", "avx2"), ("DEFAULT", "", "other"), ("SVE256", "", "other"),
])
def test_default_routes_follow_the_isa(monkeypatch, aten, onednn, isa):
    """The ISA key reads both caps (ATen's, oneDNN's); an ISA never measured gets no speed route."""
    from spikingformer.layers import routes

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)
    assert routes.cpu_isa() == isa
    monkeypatch.setattr(routes, "mkl_generic", lambda: False)  # an Intel CPU (tests/test_products.py: others)
    assert routes.default_routes() == routes.MEASURED_FASTER.get(isa, frozenset()) | {"recompute", "fused_bn_spike", "batch_pieces", "stem_once"}
    if isa != "other":
        assert {"channels_last", "attention_order"} <= routes.default_routes()
        assert "token_linear" not in routes.default_routes()  # MKL measured as fast or faster there
