"""The ``fused_spike_pool`` route: the tokenizer's BN -> SN -> max-pool as one pass of the C++ kernel
each way (``csrc/lif_pool_cpu.cpp``, its windows in ``csrc/pool_windows_cpu.cpp``; in training,
BN's batch statistics and its own backward are PyTorch's), against the module calls it replaces.

The twin is plain PyTorch: ``nn.functional.batch_norm`` with running statistics, the LIF reference
loop (``lif_reference``, itself held to the paper's equations in tests/test_neuron.py) and
``nn.functional.max_pool2d``, on the same channels-last maps. Spikes, pooled spikes and gradients
must equal it bit for bit. The BN's arithmetic is PyTorch's only where its CPU kernel is the x86
FMA build (capability AVX2 / AVX512), so there the inference spikes are compared exactly; any other
build is held to the rounding-proof comparison (a spike may differ only where the float64
membrane lies within rounding of the threshold).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_gradients_close, batch_norm_eps_error, saved_bytes
from torch import nn

from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import ops
from spikingformer.layers import ConvBN, bn_spike, routes
from spikingformer.models.zoo import create_model
from spikingformer.neuron import LIFParams, MultiStepLIF, lif_membrane_reference, lif_reference

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"the CPU kernel library did not build: {cpu.build_error()}")

PARAMS = [LIFParams(), LIFParams(tau=1.5, v_threshold=0.5, detach_reset=False), LIFParams(v_reset=-0.1)]
# 67 x 24 and 131 x 16 are wider than the forward's pieces of a row (4 KB of input per step, csrc/lif_pool_cpu.cpp's
# piece_cols): 67 x 24 is two pieces in float32 (the second of odd width), 131 x 16 three (two in bfloat16);
# 32 and 64 channels run the kernels' loops built for those widths (channels_as_constant in csrc/bn_cpu.cpp)
SHAPES = [(4, 2, 12, 12, 16), (3, 2, 7, 9, 5), (1, 1, 1, 1, 3), (5, 3, 16, 17, 33), (2, 1, 40, 6, 8),
          (2, 1, 5, 67, 24), (2, 2, 3, 131, 16), (3, 2, 6, 9, 32), (2, 1, 5, 70, 64)]


def _maps(shape, seed=0) -> torch.Tensor:
    """Channels-last maps ``(T, B, H, W, C)``: currents that make a mix of spikes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.7


def _pool_plain(spikes: torch.Tensor) -> torch.Tensor:
    """MaxPool2d(3, 2, 1) of ``(T, B, H, W, C)`` by ``nn.functional.max_pool2d`` on the NCHW view."""
    t, b = spikes.shape[:2]
    y = nn.functional.max_pool2d(spikes.permute(0, 1, 4, 2, 3).flatten(0, 1), 3, 2, 1)
    return y.view(t, b, *y.shape[1:]).permute(0, 1, 3, 4, 2)


def _bn_plain(y: torch.Tensor, bn: tuple) -> torch.Tensor:
    mean, var, weight, bias, eps = bn
    t, b = y.shape[:2]
    z = nn.functional.batch_norm(y.permute(0, 1, 4, 2, 3).flatten(0, 1), mean, var, weight, bias, False, 0.0, eps)
    return z.view(t, b, *z.shape[1:]).permute(0, 1, 3, 4, 2)


def _bn(channels: int, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(channels, generator=g) * 0.3, torch.rand(channels, generator=g) + 0.3,
            torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g) * 0.3, 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"tau{p.tau}_vth{p.v_threshold}_vr{p.v_reset}")
@pytest.mark.parametrize("pool", [True, False])
def test_forward_equals_the_module_calls(shape, p, pool):
    x = _maps(shape)
    spikes = lif_reference(x, p)
    expected = _pool_plain(spikes) if pool else spikes
    got = cpu.lif_pool_forward(x, p, pool)
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert expected.sum() > 0 and (expected == 0).any()


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", PARAMS, ids=lambda p: f"tau{p.tau}_vth{p.v_threshold}_vr{p.v_reset}")
def test_backward_equals_max_pool_and_lif_gradients(shape, p):
    """Gradients of max-pool(SN(z)): each window's to its first maximum, summed in PyTorch's order,
    then the LIF backward, bit for bit against autograd through the fused LIF kernel and max_pool2d."""
    z = _maps(shape).requires_grad_()
    out = _pool_plain(MultiStepLIF(p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)(z))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    assert torch.equal(cpu.lif_pool_backward(z.detach(), grad, p), z.grad)
    # the LIF reference's autograd (the ground truth, with the exact sigmoid) agrees to rounding
    zr = z.detach().clone().requires_grad_()
    _pool_plain(lif_reference(zr, p)).backward(grad)
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", [True, False])
def test_forward_special_values_equal_the_module_calls(dtype, pool):
    """Infinities, NaNs, signed zeros and charges exactly at the threshold in the maps: the kernel's
    (pooled) spikes equal the module calls' (an infinite charge fires once, then the reference's NaN
    membrane never fires again)."""
    p = LIFParams()
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([inf, -inf, nan, -0.0, 0.0, 2.0, 5.0, -2.0])
    g = torch.Generator().manual_seed(5)
    x = values[torch.randint(0, len(values), (4, 2, 9, 11, 32), generator=g)].to(dtype)
    expected = lif_reference(x, p)
    expected = _pool_plain(expected) if pool else expected
    got = cpu.lif_pool_forward(x, p, pool)
    assert got.dtype == dtype and torch.equal(got, expected)
    assert expected.sum() > 0 and (expected == 0).any()


def _bn_by_hand(x, mean, invstd, weight, bias, rounding):
    """BN's output in float32 with one rounding per multiply-add (float64 products, exact, rounded
    once) or two."""
    scale = invstd * weight
    if rounding == "unfused":
        return x.float() * scale + (bias - mean * scale)
    shift = (bias.double() - mean.double() * scale.double()).float()
    return (x.double() * scale.double() + shift.double()).float()


@pytest.mark.parametrize("rounding", ["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels", [32, 48, 20])
def test_the_kernels_batch_norm_rounds_as_the_kernel_it_reproduces(monkeypatch, rounding, dtype, channels):
    """The forward's BatchNorm in both roundings of PyTorch's CPU kernels, whichever runs here: once
    per multiply-add (its FMA builds) or twice (its DEFAULT kernel). The spikes equal those of BN's
    output formed by hand in that rounding, stored in the maps' dtype, through the reference neuron,
    pooled or not. The threshold lies between the two roundings of one output at the first step
    (there the charge is half the output, exactly), so that the other rounding fires otherwise
    (float32 maps; bfloat16's rounding to storage leaves such an output at times only).
    Channel counts of whole 16-lane vectors (an AVX-512 build's own path) and not."""
    monkeypatch.setattr(cpu, "bn_rounding", lambda: rounding)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 2, 9, 11, channels, generator=g) * 2 + 0.4).to(dtype)
    mean, var = torch.randn(channels, generator=g) * 0.3, torch.rand(channels, generator=g) + 0.5
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g) * 0.3
    invstd = cpu.bn_invstd(var, 1e-5, batch=False)
    ys = {r: _bn_by_hand(x, mean, invstd, weight, bias, r).to(dtype) for r in ("fused", "unfused")}
    first = ys["fused"][0] != ys["unfused"][0]  # outputs at the first step that the two roundings give apart
    apart = float(torch.maximum(ys["fused"][0], ys["unfused"][0])[first][0]) if first.any() else None
    p = LIFParams(v_threshold=apart / 2) if apart is not None else LIFParams()
    spikes = {r: lif_reference(y, p) for r, y in ys.items()}
    # float32 maps keep the roundings apart; bfloat16's storage rounds most differences away
    assert not torch.equal(spikes["fused"], spikes["unfused"]) or dtype == torch.bfloat16
    for pool in (True, False):
        got = cpu.lif_pool_forward(x, p, pool, (mean, var, weight, bias, 1e-5))
        assert got.dtype == dtype and torch.equal(got, _pool_plain(spikes[rounding]) if pool else spikes[rounding])


def test_ties_go_to_the_first_maximum_of_each_window():
    """Hand-made spikes: a window with no spike routes its gradient to its first position, one with
    two spikes to the earlier of them; overlapping windows add up at their shared position."""
    p = LIFParams()
    z = torch.full((1, 1, 3, 3, 1), -5.0)  # never fires
    z[0, 0, 1, 2, 0] = z[0, 0, 2, 1, 0] = 5.0  # fire at (1, 2) and (2, 1)
    # output windows (2 x 2) cover rows/cols {0,1}, {0,1}, {1,2}, ... with padding
    grad = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 1, 2, 2, 1)
    gz = cpu.lif_pool_backward(z, grad, p)
    sg = 4.0 * torch.sigmoid(torch.tensor(4.0 * (2.5 - 1.0))) * (1 - torch.sigmoid(torch.tensor(4.0 * (2.5 - 1.0))))
    sg_quiet = 4.0 * torch.sigmoid(torch.tensor(4.0 * (-2.5 - 1.0))) * (1 - torch.sigmoid(torch.tensor(4.0 * (-2.5 - 1.0))))
    # window (0,0): rows 0-1, cols 0-1: no spike -> (0,0); window (0,1): rows 0-1, cols 1-2: spike (1,2);
    # window (1,0): rows 1-2, cols 0-1: spike (2,1); window (1,1): rows 1-2, cols 1-2: first spike (1,2)
    expected = torch.zeros(3, 3)
    expected[0, 0] = 1.0 * sg_quiet / 2
    expected[1, 2] = (2.0 + 8.0) * sg / 2
    expected[2, 1] = 4.0 * sg / 2
    torch.testing.assert_close(gz[0, 0, :, :, 0], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pool", [True, False])
def test_inference_bn_in_front(shape, pool):
    p = LIFParams()
    y = _maps(shape, seed=5) * 2
    bn = _bn(shape[-1])
    z = _bn_plain(y, bn)
    expected = lif_reference(z, p)
    expected = _pool_plain(expected) if pool else expected
    got = ops.bn_lif_pool(y, *bn[:4], bn[4], p.tau, p.v_threshold, p.v_reset, pool)
    assert got.shape == expected.shape
    if cpu.bn_fuses_multiply_add():  # PyTorch's x86 FMA and AArch64 builds: the same rounding
        assert torch.equal(got, expected)
        return
    # elsewhere: differences only where a float64 membrane lies within rounding of the threshold
    mean, var, weight, bias, eps = (t.double() if torch.is_tensor(t) else t for t in bn)
    h, _ = lif_membrane_reference((y.double() - mean) / torch.sqrt(var + eps) * weight + bias, p)
    near = ((h.double() - p.v_threshold).abs() < 1e-5).any(0, keepdim=True).expand_as(h)
    unpooled = cpu.lif_pool_forward(y, p, False, bn)
    assert torch.equal(unpooled[~near], lif_reference(z, p)[~near])


def test_without_the_library_the_twin_computes_the_same(monkeypatch):
    """The fallback (PyTorch's BN, the torch loop, max_pool2d) against the kernel: the spikes after
    BN with running statistics and with the batch's (training), and the pooled backward."""
    p = LIFParams(tau=1.5)
    x = _maps((3, 2, 9, 8, 6))
    grad = torch.randn(cpu.pooled_shape(x))
    mean, var = torch.batch_norm_update_stats(x.permute(0, 1, 4, 2, 3).flatten(0, 1), None, None, 0.0)
    batch_bn = (mean, var, *_bn(6)[2:])

    def run():
        return (cpu.lif_pool_forward(x, p, True), cpu.lif_pool_backward(x, grad, p),
                cpu.lif_pool_forward(x, p, False, _bn(6)), cpu.lif_pool_forward(x, p, True, batch_bn, batch=True))

    want = run()
    monkeypatch.setattr(cpu, "get_library", lambda: None)
    got = run()
    if cpu.kernel_reproduces_bn():  # else the library's BN steps aside: both are the fallback
        assert 0 < want[3].sum() < want[3].numel()
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)  # autograd's exact sigmoid


@pytest.mark.parametrize("channels", [16, 32, 64])  # 32 and 64: the loops built for those widths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("library", [True, False], ids=["kernel", "fallback"])
def test_bn_backward_is_batch_norms_formulas(dtype, pool, library, channels, monkeypatch):
    """``bn_lif_pool_backward`` (BN's two reductions summed in the kernel's LIF backward pass, BN's
    input gradient in one more) against BatchNorm's backward written out in float64 on the LIF
    gradient ``g`` of BN's output: with ``x_hat = (x - mean) invstd`` over N values per channel,
    ``dx = invstd w (g - sum(g) / N - x_hat sum(g x_hat) / N)``, ``dw = sum(g x_hat)``,
    ``db = sum(g)``; float32 to 1e-5 of the largest value or term, bfloat16 to about its rounding.
    Without the library, the fallback (PyTorch's BN backward) gives the same."""
    p = LIFParams(tau=2.0)
    c = channels
    x = _maps((3, 2, 9, 8, c)).to(dtype)
    grad = torch.randn(cpu.pooled_shape(x) if pool else x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    rows = x.permute(0, 1, 4, 2, 3).flatten(0, 1)
    mean, var = torch.batch_norm_update_stats(rows, torch.zeros(c), torch.ones(c), 0.1)
    invstd = cpu.bn_invstd(var, 1e-5, batch=True)
    weight, bias = _bn(c)[2:4]
    bn = (mean, invstd, weight, bias)
    if not library:
        monkeypatch.setattr(cpu, "get_library", lambda: None)
    g = cpu.lif_pool_backward(x, grad, p, bn, pool).to(dtype).double().reshape(-1, c)  # the LIF gradient, as stored
    assert g.abs().sum() > 0
    gx, gw, gb = cpu.bn_lif_pool_backward(x, grad, p, bn, pool, 1e-5)
    x_hat = (x.double().reshape(-1, c) - mean.double()) * invstd.double()
    want_gb, want_gw = g.sum(0), (g * x_hat).sum(0)
    n = g.shape[0]
    want_gx = invstd.double() * weight.double() * (g - want_gb / n - x_hat * want_gw / n)
    assert gx.dtype == dtype and gx.shape == x.shape and gw.dtype == gb.dtype == torch.float32
    # the kernel sums bfloat16 maps in float32 and float64; PyTorch's mixed-precision kernel (the fallback)
    # is within a bfloat16 rounding
    kernel = library and cpu.kernel_reproduces_bn()  # else the fallback here too
    sum_tol = 1e-5 if kernel or dtype == torch.float32 else 2.0 ** -7
    for got, want in ((gw, want_gw), (gb, want_gb)):
        torch.testing.assert_close(got.double(), want, rtol=0.0, atol=sum_tol * want.abs().max().item())
    terms = (invstd * weight).max().item() * g.abs().max().item()  # the size of dx's terms, before they cancel
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # bfloat16: rounded once (kernel) or on the way (PyTorch)
    torch.testing.assert_close(gx.double().reshape(-1, c), want_gx, rtol=0.0, atol=tol * terms)
    none = cpu.bn_lif_pool_backward(x, grad, p, bn, pool, 1e-5, (False, True, False))
    assert none[0] is None and none[2] is None and torch.equal(none[1], gw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bn_backward_writes_the_input_gradient_over_the_lif_gradient(dtype, monkeypatch):
    """BN's input gradient is formed in place of the kernel's gradient of BN's output (each element
    read before it is written), so the segment's backward holds one map-size buffer, not two: on the
    event model's first stage that is 268 MB less at the training step's peak. The values are the
    out-of-place formula's (the previous test); here, that they land in the kernel's buffer."""
    if not cpu.kernel_reproduces_bn():
        pytest.skip("the kernel library is unavailable or cannot round BN as PyTorch does here (e.g. built "
                    "without FMA): the fallback is PyTorch's BN backward")
    x = _maps((3, 2, 9, 8, 16)).to(dtype)
    grad = torch.randn(cpu.pooled_shape(x), generator=torch.Generator().manual_seed(5)).to(dtype)
    rows = x.permute(0, 1, 4, 2, 3).flatten(0, 1)
    mean, var = torch.batch_norm_update_stats(rows, torch.zeros(16), torch.ones(16), 0.1)
    bn = (mean, cpu.bn_invstd(var, 1e-5, batch=True), *_bn(16)[2:4])
    made = []
    kernel = cpu.kernel_lif_pool_backward
    monkeypatch.setattr(cpu, "kernel_lif_pool_backward", lambda *a: made.append(kernel(*a)) or made[-1])
    gx = cpu.bn_lif_pool_backward(x, grad, LIFParams(), bn, True, 1e-5)[0]
    assert len(made) == 1 and gx.data_ptr() == made[0].data_ptr()
    gz = kernel(cpu.get_library(), x.contiguous(), grad, LIFParams(), bn, True, torch.empty(2, 16, dtype=torch.float64))
    assert not torch.equal(gx, gz)  # overwritten: BN's input gradient is not its output's


@pytest.mark.parametrize("eps", [-1e-3, 0.0])
@pytest.mark.parametrize("spec", ["-fused_spike_pool,-inplace_bn", "+fused_spike_pool,+channels_last",
                                  "-fused_spike_pool,+inplace_bn"])
def test_inference_takes_or_refuses_eps_as_the_module_calls_do(spec, eps):
    """F.batch_norm of PyTorch 2.14 refuses ``eps < 0`` in inference (2.11 also ``eps = 0``, 2.8
    neither); the fused and in-place inference paths call PyTorch's native operators, which check
    nothing, so they ask F.batch_norm: where it refuses, they raise its error; where it takes the
    ``eps``, they give the module calls' spikes."""
    stage = ConvBN(3, 8).eval()
    stage.bn.eps = eps
    y = torch.randn(2, 1, 5, 5, 8).permute(0, 1, 4, 2, 3)
    message = batch_norm_eps_error(eps, training=False)
    if message is not None:
        with routes.configured(spec), torch.no_grad(), pytest.raises(ValueError, match=message):
            bn_spike.bn_spike_pool_plain(stage, MultiStepLIF(), True, y.clone())
        return
    with torch.no_grad():
        want = MultiStepLIF()(stage.bn(y.flatten(0, 1)).unflatten(0, y.shape[:2]))
        want = nn.functional.max_pool2d(want.flatten(0, 1), 3, 2, 1).unflatten(0, y.shape[:2])
    with routes.configured(spec), torch.no_grad():
        assert torch.equal(bn_spike.bn_spike_pool_plain(stage, MultiStepLIF(), True, y.clone()), want)


def test_operators_refuse_inputs_the_kernel_would_read_past():
    """The kernels take their sizes from the maps; statistics, parameters or a gradient of another
    size were read past their end (and 4-D maps failed to unpack). The operators and their fake
    implementations (what ``torch.compile`` traces) now raise a ``ValueError`` naming the problem."""
    p = LIFParams()
    x = _maps((2, 1, 6, 6, 8))
    short = (torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3))
    calls = {
        "channels-last maps": lambda: ops.lif_pool(x[0], p.tau, p.v_threshold, p.v_reset, p.alpha, True),
        "need 8 elements each": lambda: ops.bn_lif_pool(x, *short, 1e-5, p.tau, p.v_threshold, p.v_reset, True),
        "has shape \\(2, 1, 3, 3, 8\\); got \\(2, 1, 2, 2, 8\\)": lambda: ops.lif_pool_backward_op(
            x, torch.randn(2, 1, 2, 2, 8), p.tau, p.v_threshold, p.v_reset, p.alpha, True),
    }
    for message, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(ValueError, match="need 8 elements each"):
        ops.bn_lif_pool(mode.from_tensor(x), *map(mode.from_tensor, short), 1e-5, p.tau, p.v_threshold, p.v_reset, True)


def test_opcheck():
    p = LIFParams()
    x = _maps((3, 2, 6, 5, 4))
    torch.library.opcheck(ops.lif_pool, (x.clone().requires_grad_(), p.tau, p.v_threshold, p.v_reset, p.alpha, True))
    torch.library.opcheck(ops.lif_pool_backward_op, (x, torch.randn(3, 2, 3, 3, 4), p.tau, p.v_threshold,
                                                     p.v_reset, p.alpha, True))
    for pool in (True, False):
        torch.library.opcheck(ops.bn_lif_pool, (x, *_bn(4)[:4], 1e-5, p.tau, p.v_threshold, p.v_reset, pool))


def _run(model, x, spec):
    """Training step (output, gradients, BN running statistics) and inference output under ``spec``."""
    m = copy.deepcopy(model).train()
    with routes.configured(spec):
        out = m(x)
        out.square().sum().backward()
        m.eval()
        with torch.inference_mode():
            inferred = m(x)
    grads = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    return out.detach(), grads, dict(m.named_buffers()), inferred


@pytest.mark.parametrize("name,shape", [
    ("spikingformer_cifar10dvs_2_256", (2, 4, 2, 48, 48)),  # event: a max-pool in front of every stage
    ("spikingformer_cifar10_4_384", (2, 3, 32, 32)),  # static: BN -> SN without pool in front of stages 1-2
])
def test_model_with_and_without_the_route_is_the_same(name, shape, monkeypatch):
    """A zoo model's training step and inference with the route on equal the route off, bit for bit
    (gradients to rounding: :func:`conftest.assert_gradients_close`), and the route does run (its
    operators are called)."""
    torch.manual_seed(0)
    model = create_model(name, depth=1, **({"time_steps": 4} if len(shape) == 5 else {}))
    x = torch.poisson(torch.full(shape, 0.6)) if len(shape) == 5 else torch.randn(shape)
    off = _run(model, x, "-fused_spike_pool,+channels_last")
    calls = []
    for fn in ("lif_pool_forward", "lif_pool_backward", "bn_lif_pool_backward"):
        real = getattr(cpu, fn)

        def spy(*args, _real=real, _n=fn, **kw):
            calls.append((_n, kw.get("bn", args[3] if len(args) > 3 else None) is not None))
            return _real(*args, **kw)

        monkeypatch.setattr(cpu, fn, spy)
    on = _run(model, x, "+fused_spike_pool,+channels_last")
    if cpu.kernel_reproduces_bn():  # both ways with the BN in front
        assert {("bn_lif_pool_backward", True), ("lif_pool_forward", True)} <= set(calls)
    else:  # a build without FMA beside PyTorch's FMA kernels: BN stays PyTorch's, SN -> max-pool fused
        assert {("lif_pool_backward", False), ("lif_pool_forward", False)} == set(calls)
    assert torch.equal(on[0], off[0]) and torch.equal(on[3], off[3])
    assert on[1].keys() == off[1].keys()
    assert_gradients_close([on[1][k] for k in on[1]], [off[1][k] for k in on[1]])
    assert all(torch.equal(on[2][k], off[2][k]) for k in on[2])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_segment_equals_the_module_calls_and_keeps_only_its_input(momentum):
    """BN -> SN -> max-pool in training: output, running statistics and batch count as the module
    calls bit for bit, gradients of input and BN parameters to rounding, over two steps (``momentum=None`` averages by
    the count); autograd keeps BN's input and its batch statistics only."""
    from spikingformer.layers import ConvBN, bn_spike_pool

    torch.manual_seed(0)
    stage = ConvBN(3, 16)
    stage.bn.momentum = momentum
    nn.init.uniform_(stage.bn.weight, 0.5, 1.5)
    nn.init.uniform_(stage.bn.bias, -0.2, 0.4)
    lif = MultiStepLIF(tau=2.0)
    results = []
    for spec in ("-fused_spike_pool", "+fused_spike_pool"):
        s = copy.deepcopy(stage).train()
        row = []
        for step in range(2):
            with routes.configured("+channels_last"):  # the kernel's layout (the route is off on Arm CPUs)
                y0 = stage.convolve(torch.randn(4, 3, 3, 12, 12, generator=torch.Generator().manual_seed(step))).detach()
            y = (y0 * 2).requires_grad_()
            with routes.configured(spec + ",+channels_last"):
                out, saved = saved_bytes(lambda: bn_spike_pool(s, lif, True, y))
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(10 + step)))
            row += [out, y.grad, s.bn.weight.grad.clone(), s.bn.bias.grad.clone(), s.bn.running_mean.clone(),
                    s.bn.running_var.clone(), s.bn.num_batches_tracked.clone()]
        results.append((row, saved, y.numel() * y.element_size()))
    (plain, _, _), (fused, saved, input_bytes) = results
    grads = [i for i in range(len(plain)) if i % 7 in (1, 2, 3)]  # y, BN weight and bias
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(plain, fused)) if i not in grads)
    assert_gradients_close([fused[i] for i in grads], [plain[i] for i in grads])
    assert plain[0].sum() > 0
    if cpu.kernel_reproduces_bn():  # else (a build without FMA beside PyTorch's FMA kernels) it steps aside
        assert saved <= input_bytes + 4 * 16 * 4  # y, and per channel: weight, bias, mean, invstd


def test_neuron_hooks_still_see_the_spikes():
    """A forward hook on a neuron (firing-rate meters) makes the tokenizer take the module calls."""
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10dvs_2_256", depth=1, time_steps=2).eval()
    x = torch.poisson(torch.full((1, 2, 2, 32, 32), 0.6))
    seen = []
    model.tokenizer.lifs[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with routes.configured("+fused_spike_pool,+channels_last"), torch.inference_mode():
        model(x)
    assert seen == [torch.Size([2, 1, 32, 32, 32])]


def test_training_meter_is_attached_only_when_asked():
    """The trainer's firing-rate meter hooks the neurons only between attach() and detach(), so the
    steps it does not log keep the fused route; while attached it measures the spikes."""
    from spikingformer.engine.firing import FiringRateMeter

    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10dvs_2_256", depth=1, time_steps=2).eval()
    x = torch.poisson(torch.full((1, 2, 2, 32, 32), 0.6))
    meter = FiringRateMeter(model)
    lif = model.tokenizer.lifs[0]
    meter.attach()  # twice: still one hook per neuron
    assert len(lif._forward_hooks) == 1
    with torch.inference_mode():
        model(x)
    rate = meter.pop()
    assert 0.0 < rate < 1.0 and meter.counts is None
    meter.detach()
    assert not lif._forward_hooks
    with torch.inference_mode():
        model(x)
    assert meter.counts is None
    meter.close()


# ----------------------------------------------------------------------------- 16-bit maps (autocast)



def _heavy_grad(shape, dtype, seed=3) -> torch.Tensor:
    """Gradients over several orders of magnitude, so that sums rounded after every addition (as
    PyTorch's 16-bit max-pool backward stores them) differ from sums rounded once."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 2)).to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pool", [True, False])
def test_16bit_maps_equal_the_module_calls_in_their_dtype(shape, pool):
    """On bfloat16 maps (BN output under autocast) the kernel's spikes and gradients are those of
    the module calls in that dtype (the LIF operator, then ``max_pool2d``, under autograd), bit for
    bit; the kernel reads and writes the dtype and rounds each max-pool sum to it."""
    dtype = torch.bfloat16
    p = PARAMS[0]
    z = _maps(shape).to(dtype).requires_grad_()
    spikes = MultiStepLIF(p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)(z)
    out = _pool_plain(spikes) if pool else spikes
    grad = _heavy_grad(out.shape, dtype)
    out.backward(grad)
    got = cpu.lif_pool_forward(z.detach(), p, pool)
    assert got.dtype == dtype and torch.equal(got, out)
    gz = cpu.lif_pool_backward(z.detach(), grad, p, None, pool)
    assert gz.dtype == dtype and torch.equal(gz, z.grad)


def test_the_library_refuses_float16_maps():
    """float16 maps, rare on CPUs, are left to the module calls (fewer instantiations to build)."""
    assert not bn_spike._kernel_takes(MultiStepLIF(), _maps((2, 1, 6, 6, 4)).half())
    with pytest.raises(RuntimeError, match="code -3"):
        cpu.kernel_lif_pool_forward(cpu.get_library(), _maps((2, 1, 6, 6, 4)).half(), PARAMS[0], True)


def test_16bit_max_pool_sums_are_rounded_after_every_addition():
    """The comparison above can fail: summing a position's window gradients in float32 and rounding
    once gives other bfloat16 values than PyTorch's (and the kernel's) gradient."""
    p = PARAMS[0]
    shape = (4, 2, 20, 20, 32)
    z = _maps(shape).to(torch.bfloat16)
    grad = _heavy_grad(cpu.pooled_shape(z), torch.bfloat16)
    z32 = z.float().requires_grad_()
    _pool_plain(lif_reference(z32, p)).backward(grad.float())
    zm = z.clone().requires_grad_()
    _pool_plain(MultiStepLIF(p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)(zm)).backward(grad)
    assert torch.equal(cpu.lif_pool_backward(z, grad, p), zm.grad)
    assert not torch.equal(z32.grad.to(torch.bfloat16), zm.grad)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("pool", [True, False])
def test_16bit_maps_with_the_bn_in_front_equal_the_module_calls(shape, pool):
    """PyTorch's mixed-precision BN (bfloat16 maps, float32 statistics) computes in float32 and
    rounds its output to bfloat16; the kernel does the same: inference BN -> SN [-> max-pool] and,
    from a training BN's batch statistics, the gradient, bit for bit against the module calls in
    that dtype (where the kernel reproduces PyTorch's BN rounding: its FMA builds)."""
    if not cpu.kernel_reproduces_bn():
        pytest.skip("this build of the library cannot round BatchNorm as PyTorch's kernel does")
    p, dtype = PARAMS[0], torch.bfloat16
    x, bn = _maps(shape).to(dtype), _bn(shape[-1])
    lif = MultiStepLIF(p.tau, p.v_threshold, p.v_reset, p.alpha, p.detach_reset)
    spikes = lif(_bn_plain(x, bn))
    assert torch.equal(cpu.lif_pool_forward(x, p, pool, bn), _pool_plain(spikes) if pool else spikes)
    # training: BN with batch statistics over the T*B maps, then SN [-> max-pool], under autograd
    maps = x.permute(0, 1, 4, 2, 3).flatten(0, 1)  # NCHW view, channels-last strides
    z, mean, invstd = torch.native_batch_norm(maps, bn[2], bn[3], None, None, True, 0.0, bn[4])
    zl = z.detach().view(x.shape[0], x.shape[1], *z.shape[1:]).permute(0, 1, 3, 4, 2).requires_grad_()
    out = _pool_plain(lif(zl)) if pool else lif(zl)
    grad = _heavy_grad(out.shape, dtype)
    out.backward(grad)
    got = cpu.lif_pool_backward(x, grad, p, (mean, invstd, bn[2], bn[3]), pool)
    assert got.dtype == dtype and torch.equal(got, zl.grad)


@pytest.mark.parametrize("name,shape", [
    ("spikingformer_cifar10dvs_2_256", (2, 4, 2, 48, 48)),
    ("spikingformer_cifar10_4_384", (2, 3, 32, 32)),
])
def test_under_autocast_the_memory_routes_keep_less_and_change_nothing(name, shape):
    """A training step under bf16 autocast with ``fused_spike_pool``, ``fused_bn_spike`` and the
    spike linear's bits equals the module calls bit for bit (output, running statistics; every
    gradient to bfloat16 rounding), autograd keeps less than half as much (less, where the library cannot round BN as
    PyTorch does), and inference after it is equal too."""
    torch.manual_seed(0)
    model = create_model(name, depth=1, embed_dim=64, num_heads=4, **({"time_steps": 4} if len(shape) == 5 else {}))
    x = torch.poisson(torch.full(shape, 0.6)) if len(shape) == 5 else torch.randn(shape)
    results = []
    for spec in ("none,+channels_last", "none,+channels_last,+fused_spike_pool,+fused_bn_spike,+spike_linear"):
        m = copy.deepcopy(model).train()
        with routes.configured(spec), torch.autocast("cpu", dtype=torch.bfloat16):
            out, saved = saved_bytes(lambda: m(x))
        out.float().square().sum().backward()
        m.eval()
        with routes.configured(spec), torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
            inferred = m(x)
        results.append((out, {k: p.grad for k, p in m.named_parameters()}, dict(m.named_buffers()), saved, inferred))
    (out0, g0, b0, saved0, inf0), (out1, g1, b1, saved1, inf1) = results
    assert out1.dtype == torch.bfloat16 and torch.equal(out0, out1) and torch.equal(inf0, inf1)
    assert g0.keys() == g1.keys() and all(torch.equal(b0[k], b1[k]) for k in b0)
    assert_gradients_close([g1[k] for k in g0], [g0[k] for k in g0], rel=1e-2)
    # a build without FMA beside PyTorch's FMA kernels leaves BN -> SN to the module calls: bits only
    assert saved1 < (saved0 / 2 if cpu.kernel_reproduces_bn() else saved0)


def test_the_map_routes_are_still_read_from_routes():
    # their home before layers/bn_spike.py: scripts that call them there keep working
    for name in ("spike_maps", "repeat_steps", "max_pool", "spike_pool", "bn_spike_pool_plain", "bn_spike_pool",
                 "bn_spike_tokens"):
        assert getattr(routes, name) is getattr(bn_spike, name)
    with pytest.raises(AttributeError, match="has no attribute '_kernel_takes'"):
        routes._kernel_takes  # noqa: B018 (a private name is not carried over)
