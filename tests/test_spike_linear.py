"""The ``spike_linear`` route: token linears on spikes as accumulations of weight columns
(``csrc/spike_linear_cpu.cpp``), against independent expectations.

* The kernels against their plain PyTorch twins, bit for bit: the forward against
  :func:`kernels.spike_linear.spike_linear_reference` (the bias, then one weight column per input column in
  ascending order, float32 additions), the weight gradient against
  :func:`kernels.spike_linear.spike_linear_weight_grad_reference` (the output gradient's rows, ascending).
* The twins against a hand-computed product and the float64 products (``x W^T + b``, ``g^T x``).
* Where the input is not spikes, or too dense, the kernels decline and the results are the dense
  products exactly; the gradients agree with ``F.linear``'s backward.
* In a zoo model, route on against off: the logits agree to float32 rounding and only a bounded
  number of spikes (membranes within rounding of a threshold) differ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikingformer.kernels import cpu_backend as cpu
from spikingformer.kernels import spike_linear as sl
from spikingformer.kernels import ops
from spikingformer.layers import TokenLinear, routes
from spikingformer.models.zoo import create_model
from spikingformer.neuron import MultiStepLIF

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"the CPU kernel library did not build: {cpu.build_error()}")

# (rows, in, out): tails of every kind: fewer rows than a thread block, columns not a multiple of
# 64 (the kernel's tile) or of a vector, one column, one row
SHAPES = [(100, 37, 70), (4096, 384, 384), (257, 384, 1536), (64, 1536, 64), (1, 5, 1), (130, 64, 129), (3, 1, 17)]


def _spikes(m: int, k: int, rate: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(m, k, generator=g) < rate).float()


def _layer(k: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g), torch.randn(n, generator=g)


def test_reference_is_the_product_by_hand():
    x = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([0.5, -1.0])
    expected = torch.tensor([[4.5, 9.0], [0.5, -1.0], [6.5, 14.0]])
    assert torch.equal(sl.spike_linear_reference(x, w, b), expected)
    assert torch.equal(sl.spike_linear_reference(x, w, None), expected - b)
    lib = cpu.get_library()
    assert torch.equal(sl.kernel_spike_linear_forward(lib, x, w, b, 1.0), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_its_twin_bit_for_bit(shape, rate, bias):
    m, k, n = shape
    x = _spikes(m, k, rate)
    w, b = _layer(k, n)
    b = b if bias else None
    y = sl.kernel_spike_linear_forward(cpu.get_library(), x, w, b, 1.0)
    twin = sl.spike_linear_reference(x, w, b)
    assert torch.equal(y, twin)
    # and the twin is the product: float64's, to the rounding of k float32 additions
    exact = nn.functional.linear(x.double(), w.double(), b.double() if b is not None else None)
    assert torch.allclose(twin.double(), exact, rtol=0, atol=1e-5 * (k + 1) * 4)


@pytest.mark.parametrize("shape", SHAPES + [(1100, 40, 64), (1537, 3, 200)], ids=str)  # several 512-row chunks
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 1.0])
def test_weight_gradient_kernel_equals_its_twin_bit_for_bit(shape, rate):
    m, k, n = shape
    x = _spikes(m, k, rate)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    gw = sl.kernel_spike_linear_weight_grad(cpu.get_library(), x, g, 1.0)
    twin = sl.spike_linear_weight_grad_reference(x, g)
    assert gw.shape == (n, k) and gw.is_contiguous() and torch.equal(gw, twin)
    assert torch.allclose(twin.double(), g.double().t() @ x.double(), rtol=0, atol=1e-5 * (m + 1) * 4)


def test_weight_gradient_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    g = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [100.0, 200.0, 300.0]])
    expected = torch.tensor([[11.0, 10.0], [22.0, 20.0], [33.0, 30.0]])  # (out, in): sum of g's rows at each input's spikes
    assert torch.equal(sl.spike_linear_weight_grad_reference(x, g), expected)
    assert torch.equal(sl.kernel_spike_linear_weight_grad(cpu.get_library(), x, g, 1.0), expected)


def test_kernel_uses_every_thread_count_alike():
    x, (w, b) = _spikes(1000, 200, 0.2), _layer(200, 96)
    lib = cpu.get_library()
    threads = torch.get_num_threads()
    g = torch.randn(1000, 96)
    try:
        torch.set_num_threads(1)
        one = sl.kernel_spike_linear_forward(lib, x, w, b, 1.0), sl.kernel_spike_linear_weight_grad(lib, x, g, 1.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], sl.kernel_spike_linear_forward(lib, x, w, b, 1.0))
    assert torch.equal(one[1], sl.kernel_spike_linear_weight_grad(lib, x, g, 1.0))


@pytest.mark.parametrize("case", ["not spikes", "too dense", "float64", "one value 2", "nan"])
def test_declines_and_falls_back_to_the_dense_product(case):
    x, (w, b) = _spikes(50, 40, 0.5), _layer(40, 30)
    if case == "not spikes":
        x = torch.rand(50, 40)
    elif case == "one value 2":
        x[7, 3] = 2.0
    elif case == "nan":
        x[0, 0] = float("nan")
    elif case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    lib = cpu.get_library()
    limit = 0.4 if case == "too dense" else 1.0
    g = torch.randn(50, 30, dtype=x.dtype)
    if x.dtype == torch.float32:
        assert sl.kernel_spike_linear_forward(lib, x, w, b, limit) is None
        assert sl.kernel_spike_linear_weight_grad(lib, x, g, limit) is None
    y, _ = sl.spike_linear_forward(x, w, b, limit)
    torch.testing.assert_close(y, nn.functional.linear(x, w, b), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sl.spike_linear_weight_grad(x, g, limit), g.t() @ x, rtol=0, atol=0, equal_nan=True)


def test_declines_more_columns_than_its_indices_hold():
    x = torch.zeros(1, 65537)
    x[0, -1] = 1.0
    w = torch.randn(2, 65537)
    assert sl.kernel_spike_linear_forward(cpu.get_library(), x, w, None, 1.0) is None
    assert torch.equal(sl.spike_linear_forward(x, w, None, 1.0)[0], nn.functional.linear(x, w))


def test_without_the_library_it_is_the_dense_product(monkeypatch):
    monkeypatch.setattr(cpu, "get_library", lambda: None)
    x, (w, b) = _spikes(20, 8, 0.3), _layer(8, 5)
    assert torch.equal(ops.spike_linear(x, w, b, 1.0)[0], nn.functional.linear(x, w, b))
    g = torch.randn(20, 5)
    assert torch.equal(ops.spike_linear_weight_grad(x, g, 1.0), g.t() @ x)


def test_opcheck():
    x, (w, b) = _spikes(70, 24, 0.2), _layer(24, 9)
    torch.library.opcheck(ops.spike_linear, (x.clone().requires_grad_(), w.clone().requires_grad_(),
                                             b.clone().requires_grad_(), 0.5))
    torch.library.opcheck(ops.spike_linear, (x, w, None, 0.5))
    torch.library.opcheck(ops.spike_linear_weight_grad, (x, torch.randn(70, 9), 0.5))
    torch.library.opcheck(ops.spike_linear, (x.clone().requires_grad_(), w.clone().requires_grad_(), None, 0.5, True))
    packed = sl.pack_spikes_reference(x)
    torch.library.opcheck(ops.spike_linear_weight_grad_packed, (packed, 24, torch.randn(70, 9), 0.5))


# ----------------------------------------------------------------------------- packed spikes


def test_packed_bits_by_hand():
    """Bit j of word w of a row is column 64 w + j; unpacking gives the spikes back."""
    x = torch.zeros(3, 70)
    x[0, [0, 2]] = 1.0  # word 0 = 0b101
    x[1, [63, 64, 69]] = 1.0  # word 0 = 2^63 (the sign bit), word 1 = 0b100001
    packed = sl.pack_spikes_reference(x)
    assert packed.tolist() == [[5, 0], [-(2 ** 63), 33], [0, 0]]
    assert torch.equal(sl.unpack_spikes_reference(packed, 70), x)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 1.0])
def test_kernel_packs_as_its_twin_and_the_packed_gradient_is_the_same(shape, rate):
    """The forward's gather writes the twin's bits, also where the rate is above the limit (the
    forward then declines); unpacking and the weight gradient from the bits equal the float input's."""
    m, k, n = shape
    x, (w, _) = _spikes(m, k, rate), _layer(k, n)
    lib = cpu.get_library()
    packed = torch.full((m, sl.packed_width(k)), 7, dtype=torch.int64)
    y = sl.kernel_spike_linear_forward(lib, x, w, None, 0.5, packed)
    assert (y is None) == (rate > 0.5)
    assert torch.equal(packed, sl.pack_spikes_reference(x))
    assert torch.equal(sl.unpack_spikes(packed, k), x)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    want = sl.kernel_spike_linear_weight_grad(lib, x, g, 1.0)
    assert torch.equal(sl.kernel_spike_linear_weight_grad_packed(lib, packed, k, g, 1.0), want)
    assert torch.equal(sl.spike_linear_weight_grad_packed(packed, k, g, 0.5), sl.spike_linear_weight_grad(x, g, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_pack_kernel_writes_the_twins_bits_in_every_dtype(shape, dtype):
    """``sf_spike_pack`` (the dense path's packer, 16-bit inputs under autocast included) writes
    :func:`sl.pack_spikes_reference`'s bits, ``-0.0`` counts as no spike, and ``sf_spike_unpack``
    gives the spikes back in the dtype asked for."""
    m, k, _ = shape
    x = _spikes(m, k, 0.3, seed=3).to(dtype)
    x[0, 0] = -0.0
    packed = sl.pack_spikes(x)
    assert torch.equal(packed, sl.pack_spikes_reference(x.float()))
    back = sl.unpack_spikes(packed, k, dtype)
    assert back.dtype == dtype and torch.equal(back, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_lists_every_rows_spike_columns_in_every_dtype(shape, rate, dtype):
    """``sf_spike_gather`` (the 16-bit inputs compared as bits, the lists written 32 columns at a time
    where the CPU compresses vectors) lists each row's spike columns in ascending order, as
    ``nonzero`` finds them, with ``-0.0`` no spike; a row of all ones fills its whole list."""
    m, k, _ = shape
    x = _spikes(m, k, rate, seed=4).to(dtype)
    x[0, 0] = -0.0
    xk, idx, cnt, count = sl._gather_spikes(cpu.get_library(), x)
    assert count == int((x != 0).sum())
    lists = idx.view(m, k).to(torch.int64) & 0xFFFF  # (indices are uint16 in int16 storage)
    for r in range(m):
        want = torch.nonzero(x[r] != 0).flatten()
        assert int(cnt[r]) == len(want) and torch.equal(lists[r, :len(want)], want), f"row {r}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan")])
def test_pack_kernel_refuses_what_is_not_spikes(dtype, bad):
    x = _spikes(130, 70, 0.3).to(dtype)
    x[129, 69] = bad
    with pytest.raises(ValueError, match="other than 0 and 1"):
        sl.pack_spikes(x)


@pytest.mark.parametrize("library", [True, False])
def test_packing_refuses_what_is_not_spikes(monkeypatch, library):
    if not library:
        monkeypatch.setattr(cpu, "get_library", lambda: None)
    x, (w, b) = _spikes(30, 20, 0.2), _layer(20, 6)
    x[4, 5] = 0.5
    with pytest.raises(ValueError, match="other than 0 and 1"):
        ops.spike_linear(x, w, b, 1.0, True)
    assert torch.equal(ops.spike_linear(x, w, b, 1.0, False)[0], nn.functional.linear(x, w, b))


@pytest.mark.parametrize("rate,limit", [(0.15, 0.5), (0.6, 0.5)], ids=["accumulated", "dense"])
@pytest.mark.parametrize("library", [True, False])
def test_packed_input_gives_the_same_gradients_and_keeps_bits(monkeypatch, rate, limit, library):
    """With ``pack`` autograd keeps 1 bit per input element instead of 32; output and every
    gradient equal the unpacked op's bit for bit (sparse kernel or, above the limit, dense)."""
    from conftest import saved_bytes

    if not library:
        monkeypatch.setattr(cpu, "get_library", lambda: None)
    x, (w, b) = _spikes(256, 130, rate), _layer(130, 40)
    g = torch.randn(256, 40)
    results = []
    for pack in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        (y, packed), saved = saved_bytes(lambda: ops.spike_linear(*leaves, limit, pack))
        y.backward(g)
        results.append((y, *(t.grad for t in leaves), saved))
    (y0, *g0, saved0), (y1, *g1, saved1) = results
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert saved0 - saved1 == x.numel() * 4 - 256 * sl.packed_width(130) * 8


@pytest.mark.parametrize("bias", [True, False])
def test_gradients_agree_with_the_dense_products(bias):
    x, (w, b) = _spikes(300, 48, 0.15), _layer(48, 80)
    b = b if bias else None
    g = torch.randn(300, 80)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ops.spike_linear(leaves[0], leaves[1], leaves[2] if bias else None, 1.0)[0].backward(g)
    dense = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    nn.functional.linear(*dense, *([] if bias else [None])).backward(g)
    for got, want in zip(leaves, dense):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=1e-5)


@pytest.fixture
def any_size(monkeypatch):
    """The route for layers of every size (the tests' layers are below its measured minimum)."""
    monkeypatch.setattr(routes, "_spike_min_work", {"train": 0, "infer": 0})


def test_token_linear_takes_the_route_only_for_float32_cpu_outside_autocast(monkeypatch, any_size):
    """(Under bf16 autocast where the route has a bf16 limit: tests/test_spike_linear_bf16.py.)"""
    monkeypatch.setattr(routes, "_spike_max_density_bf16", None)
    layer = TokenLinear(32, 48)
    x = _spikes(4 * 2 * 9, 32, 0.2).view(4, 2, 9, 32)
    calls = []
    real = sl.kernel_spike_linear_forward
    monkeypatch.setattr(sl, "kernel_spike_linear_forward", lambda *a: calls.append(1) or real(*a))
    with routes.configured("+spike_linear"):
        y = layer(x)
        assert calls and y.shape == (4, 2, 9, 48)
        torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        layer.double()(x.double())
        assert not calls
    with routes.configured("-spike_linear"):
        layer.float()(x)
        assert not calls


@pytest.mark.parametrize("isa", sorted(routes.SPIKE_LINEAR_MIN_WORK))
def test_small_layers_keep_the_dense_product(monkeypatch, isa):
    """Below the measured minimum work (rows x in x out, per ISA and pass) the layer is F.linear (the
    route on, as on the x86 CPUs it was measured on; an Arm CPU has it off by default)."""
    limits = routes.SPIKE_LINEAR_MIN_WORK[isa]
    monkeypatch.setattr(routes, "_spike_min_work", limits)
    calls = []
    real = ops.spike_linear
    monkeypatch.setattr(ops, "spike_linear", lambda *a: calls.append(1) or real(*a))
    layer = TokenLinear(64, 64)
    for rows, grad, taken in [(limits["infer"] // 4096 - 1, False, False), (limits["infer"] // 4096, False, True),
                              (limits["train"] // 4096 - 1, True, False), (limits["train"] // 4096, True, True)]:
        calls.clear()
        x = _spikes(rows, 64, 0.1).requires_grad_(grad)
        with torch.set_grad_enabled(grad), routes.configured("+spike_linear"):
            y = layer(x)
        assert bool(calls) == taken, (rows, grad)
        torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-5)


def _spikes_and_logits(model: nn.Module, x: torch.Tensor, spec: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
               for m in model.modules() if isinstance(m, MultiStepLIF)]
    try:
        with routes.configured(spec), torch.inference_mode():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("name,shape", [
    ("spikingformer_cifar10_4_384", (2, 3, 32, 32)),
    ("spikingformer_cifar10dvs_2_256", (2, 4, 2, 48, 48)),
])
def test_model_with_and_without_the_route_agrees_to_rounding(name, shape, monkeypatch, any_size):
    """A zoo model's inference with the route on and off: the route runs on the blocks' linears;
    spikes differ only where a membrane lies within float32 rounding of a threshold (a bounded
    count), and the logits agree to rounding."""
    torch.manual_seed(0)
    model = create_model(name, depth=2, **({"time_steps": 4} if len(shape) == 5 else {})).eval()
    x = torch.poisson(torch.full(shape, 0.6)) if len(shape) == 5 else torch.randn(shape)
    taken = []
    real = sl.kernel_spike_linear_forward
    monkeypatch.setattr(sl, "kernel_spike_linear_forward", lambda *a: taken.append(real(*a) is not None) or real(*a))
    on_spikes, on_logits = _spikes_and_logits(model, x, "+spike_linear")
    assert sum(taken) >= 6  # at least one block's six linears summed spikes
    off_spikes, off_logits = _spikes_and_logits(model, x, "-spike_linear")
    flips = sum(int((a != b).sum()) for a, b in zip(on_spikes, off_spikes))
    total = sum(a.numel() for a in on_spikes)
    assert flips <= max(3, total // 10000), f"{flips} of {total} spikes differ"
    torch.testing.assert_close(on_logits, off_logits, rtol=1e-3, atol=1e-3 if flips == 0 else 0.05)


@pytest.mark.parametrize("name,packed", [
    ("spikingformer_cifar10_4_384", [True] * 6),  # every linear reads a neuron's spikes
    ("spikformer_cifar10_4_384", [False, False, False, True, False, True]),  # q, k, v, fc1 read the stream
])
def test_blocks_pack_their_neurons_spikes(monkeypatch, any_size, name, packed):
    """In training the blocks pass a neuron's output to the spike linear with ``pack``, so autograd
    keeps bits: output and every gradient equal the unpacked run's bit for bit, with less kept."""
    import copy

    from conftest import saved_bytes

    from spikingformer.layers import blocks

    torch.manual_seed(0)
    model = create_model(name, depth=1, embed_dim=64, num_heads=4).train()
    x = torch.randn(2, 3, 32, 32)
    packs = []
    real = ops.spike_linear
    monkeypatch.setattr(ops, "spike_linear", lambda *a: packs.append(a[4]) or real(*a))
    results = []
    for fires in (lambda neuron: False, blocks.fires):
        monkeypatch.setattr(blocks, "fires", fires)
        packs.clear()
        m = copy.deepcopy(model)
        with routes.configured("+spike_linear,-spike_conv"):  # (the tokenizer's convolutions see `fires` too)
            out, saved = saved_bytes(lambda: m(x))
            out.square().sum().backward()
        results.append((out, {k: p.grad for k, p in m.named_parameters()}, saved))
    assert packs == packed  # q, k, v, proj, fc1, fc2
    (out0, g0, saved0), (out1, g1, saved1) = results
    assert torch.equal(out0, out1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert saved1 < saved0


@pytest.mark.parametrize("spec,autocast", [("none", False), ("+spike_linear", False), ("+token_linear,-spike_linear", False),
                                           ("+spike_linear", True)])
def test_a_misfitting_input_raises_what_f_linear_raises(spec, autocast):
    """Tokens of the wrong width raise ``F.linear``'s error on every route. The spike kernels sized
    their work by the input, so a narrower one summed the first weight columns and returned wrong
    numbers without a word, and the oneDNN route raised a convolution's error; the operator also
    refuses rows or a bias that do not fit its weight."""
    layer = TokenLinear(512, 1024)
    x = _spikes(512, 256, 0.1).view(8, 64, 256)
    expected = "mat1 and mat2 shapes cannot be multiplied \\(512x256 and 512x1024\\)"
    with routes.configured(spec), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(RuntimeError, match=expected if not autocast else "mat1 and mat2 shapes cannot be multiplied"):
            layer(x, spikes=True)
    with pytest.raises(RuntimeError, match="bias of shape \\(3,\\)"):
        ops.spike_linear(_spikes(4, 512, 0.1), layer.weight, torch.zeros(3), 0.25)
    with pytest.raises(RuntimeError, match=expected):
        ops.spike_linear(_spikes(512, 256, 0.1), layer.weight, layer.bias, 0.25)


def test_weight_gradients_refuse_shapes_the_kernels_would_read_past():
    """The weight-gradient operators take M and K from the spikes; an output gradient of other rows,
    or packed bits of another width, were read past their end. They raise what ``grad^T x`` raises
    (rows) or a ``ValueError`` naming the packed shape, in eager and fake (traced) calls."""
    x = _spikes(64, 256, 0.1)
    short = torch.randn(32, 100)
    rows = "mat1 and mat2 shapes cannot be multiplied \\(100x32 and 64x256\\)"
    for call in (lambda t, g: ops.spike_linear_weight_grad(t, g, 0.25),
                 lambda t, g: ops.spike_linear_weight_grad_packed(sl.pack_spikes(t), t.shape[1], g, 0.25)):
        with pytest.raises(RuntimeError, match=rows):
            call(x, short)
    with pytest.raises(ValueError, match="are \\(64, 64\\) int64; got \\(64, 4\\)"):
        ops.spike_linear_weight_grad_packed(sl.pack_spikes(x), 4096, torch.randn(64, 100), 0.25)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(RuntimeError, match=rows):
        ops.spike_linear_weight_grad(mode.from_tensor(x), mode.from_tensor(short), 0.25)
