"""Smoke tests of the benchmark scripts in ``benchmarks/`` and the allocator set-up (tiny sizes; no timing assertions)."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import pytest

import bench_lif
import bench_model
import bench_scaling
import memory_floor
import study_limits
import study_routes
from conftest import BENCHMARKS
from spikingformer import allocator


def _has_spikingjelly() -> bool:
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _has_spikingjelly(), reason="the model benchmark compares against spikingjelly")
def test_bench_model_quick_prints_ratios_and_the_valid_limit(capsys):
    bench_model.main(["--quick", "--steps", "2", "--warmup", "0", "--models", "cifar", "--dtypes", "fp32",
                      "--allocators", "as is", "--limit-reps", "1"])
    out = capsys.readouterr().out
    assert "Command: `" in out and "--models cifar" in out
    assert "torch " in out and "spikingjelly " in out and "CPU:" in out
    assert "ISA of the dense arithmetic: " in out and "theoretical FMA peak" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| spikingformer_cifar10_4_384, B=2 |")]
    assert [(r[2].strip(), r[4].strip().split(",")[0].split(" ")[0]) for r in rows] == [
        ("train", "ours"), ("train", "authors"), ("infer", "ours"), ("infer", "authors")]
    # the valid limit: the step's dense ops were recorded in both passes, and give an efficiency
    totals = [line.split("|") for line in out.splitlines() if "**all " in line]
    assert [t[2].strip() for t in totals] == ["train", "infer"]
    assert all(int(t[4].split()[1]) > 0 and float(t[5]) > 0 for t in totals)
    targets = [line.split("|") for line in out.splitlines() if line.startswith("| spikingformer_cifar10_4_384 | ")
               and line.count("x |") >= 3]
    assert [t[2].strip() for t in targets] == ["train", "infer"]
    assert all(t[5].strip().endswith("x") and t[-2].count("/") == 3 and t[-2].count(",") == 1 for t in targets)
    # the dense-model limit: one row per pass, an efficiency against it
    lifted = [line.split("|") for line in out.splitlines() if line.startswith("| spikingformer_cifar10_4_384 | ")
              and line.count("|") == 9]
    assert [t[2].strip() for t in lifted] == ["train", "infer"]
    assert all(float(t[4]) > 0 and float(t[5]) > 0 for t in lifted)
    # efficiency as the best round's limit over the median step, and paired: each replay round against the
    # step timed just before it (limit-reps 1: one pair, so its range is the one value)
    for cell in [t[-2] for t in lifted + totals] + [c for t in targets for c in t[-7:-5]]:
        best, paired, lowest, highest = re.fullmatch(
            r" (\d+\.\d)% \(paired (\d+\.\d)%, (\d+)%-(\d+)%\) ", cell).groups()
        assert float(best) > 0 and lowest == highest and abs(float(paired) - int(lowest)) <= 0.55
    # columns 4 and 5 are GFLOP (dense model, our step): in training our step does no more dense arithmetic
    # than the dense model (the spike routes do less); in inference it may, where spike_conv's int8 pieces
    # run (each counts as a whole convolution: three for the one they replace)
    assert float(lifted[0][4]) >= float(lifted[0][5])


def test_study_limits_times_both_values_and_names_the_layers_they_move(capsys):
    """Both values of the limit in one process, step by step: a row with both times and the ratio;
    with the limit 1 against 0 every token linear that fires at all moves."""
    study_limits.main(["--limit", "spike_linear", "--values", "1", "0", "--quick", "--processes", "1", "--steps", "2",
                       "--warmup", "0", "--models", "cifar", "--modes", "infer", "--dtypes", "fp32"])
    out = capsys.readouterr().out
    row = next(line.split("|") for line in out.splitlines() if line.startswith("| cifar | infer | fp32 |"))
    first, second, ratio = (float(row[i].split()[0]) for i in (4, 5, 6))
    assert first > 0 and second > 0 and ratio > 0
    moved = next(line for line in out.splitlines() if line.startswith("- cifar infer fp32: "))
    assert "blocks.0.attn.q.linear" in moved and "blocks.0.mlp.fc2.linear" in moved and ", 1.0 / 0.0" in moved
    with pytest.raises(SystemExit):
        study_limits.main(["--limit", "spike_linear", "--values", "1", "none"])


@pytest.mark.skipif(not _has_spikingjelly(), reason="the model benchmark compares against spikingjelly")
def test_benchmark_models_have_the_batchs_statistics_and_fire_in_inference(tmp_path):
    """The calibration worker saves BatchNorm running statistics that are the timed batch's (not
    PyTorch's initial 0 / 1), every build loads the same ones, and with them our model's neurons
    fire in an inference batch, where with the initial statistics they hardly fire (spike maps of
    zeros would make inference look cheap)."""
    import torch

    from spikingformer.neuron import MultiStepLIF

    job = dict(name=bench_model.MODELS["cifar"][0], batch=2, overrides=bench_model.QUICK["cifar"], threads=1,
               path=str(tmp_path / "stats.pt"))
    rate = bench_model._calibrate_worker(job)["firing_rate"]
    saved = torch.load(job["path"])
    assert saved and all(k.endswith(("running_mean", "running_var")) for k in saved)
    assert not any(torch.equal(v, torch.zeros_like(v)) or torch.equal(v, torch.ones_like(v)) for v in saved.values())
    ours, x, _ = bench_model.build(dict(job, build="ours", bn_stats=job["path"]))
    authors = bench_model.build(dict(job, build="authors", authors_neuron="ours", bn_stats=job["path"]))[0]
    in_process = bench_model.build(dict(job, build="authors", authors_neuron="ours"))[0]  # calibrates itself
    assert all(torch.equal(authors.state_dict()[k], v) and torch.equal(in_process.state_dict()[k], v)
               for k, v in saved.items())
    ours_stats = sorted(float(v.sum()) for k, v in ours.state_dict().items() if k.endswith("running_var"))
    assert ours_stats == sorted(float(v.sum()) for k, v in saved.items() if k.endswith("running_var"))
    assert rate > 0.01
    for m in ours.modules():  # PyTorch's initial statistics: the neurons stay (almost) silent
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    spikes = []
    for m in ours.modules():
        if isinstance(m, MultiStepLIF):
            m.register_forward_hook(lambda m, i, o: spikes.append((int(o.count_nonzero()), o.numel())))
    with torch.inference_mode():
        ours.eval()(x)
    assert sum(n for n, _ in spikes) / sum(t for _, t in spikes) < rate / 3


def test_dense_ops_are_the_steps_flops_in_training_and_inference():
    """The recorded convolutions and products carry exactly the FLOPs ``FlopCounterMode`` counts over
    the same step, forward and backward, and under ``inference_mode`` (where composite ops such as
    ``conv2d`` reach a dispatch mode undecomposed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import dense_limit
    from spikingformer.layers import routes
    from spikingformer.models.zoo import create_model

    model = create_model("spikingformer_cifar10_4_384", **{k: v for k, v in bench_model.QUICK["cifar"].items()
                                                            if k != "batch"})
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))

    def train():
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def infer():
        with torch.inference_mode():
            model.eval()(x)

    # (spike_conv and winograd off: FlopCounterMode's module hooks turn the routes aside, and the
    # recorder would see their ways instead of the convolution; test_dense_limits_record_the_spike_convolutions;
    # token_linear and fused_attention off: FlopCounterMode counts neither oneDNN's matmul nor our
    # attention operator, see the tests below)
    for step in (train, infer):
        with routes.configured("-spike_conv,-winograd,-token_linear,-fused_attention"):
            ops = dense_limit.dense_ops(step)
            counter = FlopCounterMode(display=False)
            with counter:
                step()
        assert counter.get_total_flops() > 0
        assert sum(o["flops"] * o["count"] for o in ops) == counter.get_total_flops()
        names = {o["name"].rsplit(".", 1)[0] for o in ops}
        assert "aten.convolution" in names and ("aten.convolution_backward" in names) == (step is train)


def test_dense_model_limit_counts_direct_convolutions_where_winograd_runs(monkeypatch):
    """With the ``winograd`` route on, the step's own dense ops are its 16 products per tile (``bmm``)
    where the dense model's are the direct convolutions (36 per tile): its limit has more FLOPs,
    by the convolutions' FLOPs times (1 - 16/36) at most (the tiles' padding adds products)."""
    import torch

    import dense_limit
    from spikingformer.layers import routes
    from spikingformer.models.zoo import create_model

    monkeypatch.setattr(routes, "_winograd_min_channels", 1)  # every ConvBN past the stem, on any ISA
    model = create_model("spikingformer_cifar10_4_384", **{k: v for k, v in bench_model.QUICK["cifar"].items()
                                                            if k != "batch"})
    x = torch.randn(2, 3, 32, 32)

    def infer():
        with torch.inference_mode():
            model.eval()(x)

    with routes.configured("+winograd,-spike_conv,-batch_pieces"):
        own, dense = dense_limit.dense_ops(infer), dense_limit.dense_model_ops(infer)
    flops = {}
    for name, ops in (("own", own), ("dense", dense)):
        for o in ops:
            key = (name, o["name"].rsplit(".", 1)[0])
            flops[key] = flops.get(key, 0) + o["flops"] * o["count"]
    assert flops.get(("own", "aten.bmm"), 0) > 0 and ("dense", "aten.bmm") not in flops
    saved = flops[("dense", "aten.convolution")] - flops.get(("own", "aten.convolution"), 0)
    assert 0 < flops[("own", "aten.bmm")] < saved


def test_dense_ops_run_our_operators_with_the_kernel_of_the_tensors_device():
    """The recorder runs our operators (to see the dense products inside them) with the kernel
    registered for their tensors' device: on CUDA the Triton kernel, never the CPU kernel the operator
    was defined with (that one, handed GPU pointers, crashed the GPU check's model benchmark); with no
    Python kernel for the device (meta: the fake) the operator is dispatched as it is."""
    import torch
    from torch._library.custom_ops import OPDEFS

    import dense_limit
    from spikingformer.kernels import ops
    from spikingformer.kernels.params import LIFParams

    lif = torch.ops.spikingformer.lif.default
    kernels = OPDEFS["spikingformer::lif"]._backend_fns
    assert dense_limit._custom_op_function(lif, "cpu") is kernels["cpu"]
    assert dense_limit._custom_op_function(lif, "cuda") is kernels["cuda"] is not kernels["cpu"]
    assert dense_limit._custom_op_function(torch.ops.spikingformer.spike_linear.default, "cuda") is None
    assert dense_limit._custom_op_function(torch.ops.aten.mm.default, "cpu") is None

    x, w = torch.ones(4, 8, 16, device="meta"), torch.ones(16, 24, device="meta")
    recorded = dense_limit.dense_ops(lambda: ops.lif_op(x @ w, LIFParams()))
    assert [(o["name"], o["count"], o["flops"]) for o in recorded] == [("aten.mm.default", 1, 2 * 32 * 16 * 24)]


def test_dense_ops_count_the_onednn_products(monkeypatch):
    """The token_linear route's oneDNN products (forward and input gradient) are recorded with the
    FLOPs of the products they replace: the same total as the step with the route off."""
    import torch

    import dense_limit
    from spikingformer.layers import routes
    from spikingformer.layers.token_linear import TokenLinear

    if not dense_limit.EXTRA_FLOPS.get(torch.ops.mkldnn._linear_pointwise):
        pytest.skip("this PyTorch has no oneDNN matmul")
    monkeypatch.setattr(routes, "ONEDNN_MIN_WEIGHTS", 0)
    layer = TokenLinear(48, 80)
    x = torch.randn(3, 50, 48, requires_grad=True)

    def step():
        layer(x).sum().backward()

    totals = {}
    for spec in ("+token_linear,-spike_linear", "-token_linear,-spike_linear"):
        with routes.configured(spec):
            ops = dense_limit.dense_ops(step)
        totals[spec] = sum(o["flops"] * o["count"] for o in ops)
        names = {o["name"].rsplit(".", 1)[0] for o in ops}
        assert ("mkldnn._linear_pointwise" in names) == spec.startswith("+")
    assert totals["+token_linear,-spike_linear"] == totals["-token_linear,-spike_linear"] == 3 * 2 * 150 * 48 * 80


def test_dense_ops_count_the_attention_kernels_products():
    """The fused_attention route's operators are recorded as dense ops with the FLOPs of the batched
    products they replace, forward and backward (the same totals as with the route off), and replay
    on fresh tensors."""
    import torch

    import dense_limit
    from spikingformer.layers import routes, spike_attention

    rows = [(torch.rand(4, 2, 50, 64) < 0.3).float() for _ in range(3)]

    def infer():
        with torch.no_grad():
            spike_attention(*(x.view(4, 2, 50, 4, 16).transpose(2, 3) for x in rows), 0.125)

    def train():
        leaves = [x.clone().requires_grad_() for x in rows]
        spike_attention(*(x.view(4, 2, 50, 4, 16).transpose(2, 3) for x in leaves), 0.125).sum().backward()

    head_product = 2 * (4 * 2 * 4) * 50 * 16 * 16  # FLOPs of one product over every head: 50 x 16 by 16 x 16
    for step, products in ((infer, 2), (train, 6)):
        totals = {}
        for spec in ("+fused_attention,+attention_order", "-fused_attention,+attention_order"):
            with routes.configured(spec):
                ops = dense_limit.dense_ops(step)
            totals[spec] = sum(o["flops"] * o["count"] for o in ops)
            names = {o["name"].split(".")[1] for o in ops}
            wanted = {"spike_attention"} | ({"spike_attention_backward"} if step is train else set())
            assert (names >= wanted) == spec.startswith("+"), names
        assert list(totals.values()) == [products * head_product] * 2
    with routes.configured("+fused_attention,+attention_order"):
        timed = dense_limit.replay(dense_limit.dense_ops(train), reps=1)
    assert len(timed) == 2 and all(o["seconds"] > 0 for o in timed)


def test_dense_model_limit_counts_the_token_linears_as_dense_products(monkeypatch):
    """The dense-model limit records the step with the token linears as dense products: its FLOPs are
    our step's own dense FLOPs plus, for every token linear the spike linear took, 2 x rows x in x
    out, once in inference and twice in training (forward and weight gradient; the input gradient
    is a dense product on both routes). Dense products our operators run inside (the spike linear
    under autocast) are recorded too, and ops both limits record are timed once for both."""
    import torch

    import dense_limit
    from spikingformer.kernels import cpu_backend, ops
    from spikingformer.layers import routes
    from spikingformer.layers.token_linear import TokenLinear
    from spikingformer.models.zoo import create_model

    if cpu_backend.get_library() is None:
        pytest.skip("the spike linear needs the CPU kernel library (no C++ compiler here)")
    monkeypatch.setattr(routes, "_spike_min_work", {"train": 0, "infer": 0})  # every layer, however small
    monkeypatch.setattr(routes, "_spike_max_density", 1.0)  # at any firing rate
    torch.manual_seed(0)
    model = create_model("spikingformer_cifar10_4_384", **{k: v for k, v in bench_model.QUICK["cifar"].items()
                                                            if k != "batch"})
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    products = []
    for m in model.modules():
        if isinstance(m, TokenLinear):
            m.register_forward_hook(lambda m, i, o: products.append(2 * i[0].numel() * m.out_features))

    def train():
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def infer():
        with torch.inference_mode():
            model.eval()(x)

    for step, passes in ((train, 2), (infer, 1)):
        with routes.configured("+spike_linear,-spike_conv,-winograd"):  # (the convolutions the same in both limits)
            products.clear()
            own = sum(o["flops"] * o["count"] for o in dense_limit.dense_ops(step))
            linears = sum(products)
            dense = sum(o["flops"] * o["count"] for o in dense_limit.dense_model_ops(step))
        assert linears > 0 and dense == own + passes * linears
    # under bf16 autocast where the route sums bf16 spikes, as in float32
    monkeypatch.setattr(routes, "_spike_max_density_bf16", 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16), routes.configured("+spike_linear,-spike_conv,-winograd"):
        products.clear()
        own = sum(o["flops"] * o["count"] for o in dense_limit.dense_ops(train))
        linears = sum(products)
        assert linears > 0 and sum(o["flops"] * o["count"] for o in dense_limit.dense_model_ops(train)) == own + 2 * linears
    # where it has no bf16 limit, the spike linear's operator computes the dense products itself (keeping
    # the spikes as bits): the recorder sees them inside it, so both limits count the same arithmetic
    monkeypatch.setattr(routes, "_spike_max_density_bf16", None)
    with torch.autocast("cpu", dtype=torch.bfloat16), routes.configured("+spike_linear,-winograd"):
        calls = []
        kernels = ops.spike_linear._backend_fns  # the recorder runs the CPU kernel itself, so count its calls
        real = kernels["cpu"]
        monkeypatch.setitem(kernels, "cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
        own = sum(o["flops"] * o["count"] for o in dense_limit.dense_ops(train))
        assert calls  # the operator ran
        assert own == sum(o["flops"] * o["count"] for o in dense_limit.dense_model_ops(train))
        # one replay for both limits: the same ops give the same limit, not two timings of them
        limits = dense_limit.measure_with_dense_model(train, reps=1)
        assert limits[0]["flops"] == own and limits[0]["seconds"] == limits[1]["seconds"] > 0


def test_dense_limits_record_the_spike_convolutions(monkeypatch):
    """With ``spike_conv`` on, the step's own limit records its int8 convolutions (three pieces per
    convolution, each 2 x output elements x window FLOPs) instead of the float32 convolution, and
    replays them with their packed weights; the dense model's limit turns the route off and records
    the float32 convolution again: three times fewer FLOPs than the pieces."""
    import torch

    import dense_limit
    from spikingformer.layers import ConvBN, routes
    from spikingformer.kernels import spike_conv_ops

    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        pytest.skip("this PyTorch build has no oneDNN int8 convolution")
    monkeypatch.setattr(spike_conv_ops, "native_int8", lambda: True)
    monkeypatch.setattr(routes, "_spike_conv_min_channels", 16)
    # maps firing at about 0.3 above the accumulation's inference limit on every ISA (AVX2's is 0.30)
    monkeypatch.setattr(routes, "_spike_conv_max_density", {"train": 0.1, "infer": 0.1, "weight_grad": 0.1})
    stage = ConvBN(16, 8).eval()
    x = (torch.rand(1, 2, 16, 6, 6) < 0.3).float()

    def infer():
        with torch.inference_mode():
            stage.convolve(x, spikes=True)

    flops = 2 * 2 * 8 * 6 * 6 * 16 * 9
    with routes.configured("+spike_conv"):
        own = dense_limit.dense_ops(infer)
        dense = dense_limit.dense_model_ops(infer)
        limits = dense_limit.measure_with_dense_model(infer, reps=1)
    assert [o["name"] for o in own] == ["onednn.qconv2d_pointwise.default"] * 3
    assert [o["flops"] for o in own] == [flops] * 3
    assert [(o["name"], o["flops"]) for o in dense] == [("aten.convolution.default", flops)]
    assert limits[0]["flops"] == 3 * flops and limits[1]["flops"] == flops
    assert limits[0]["seconds"] > 0 and limits[1]["seconds"] > 0


def test_dense_op_replay_keeps_shapes_strides_and_dtype():
    import torch

    import dense_limit

    gen = torch.Generator().manual_seed(0)
    channels_last = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    expanded = torch.randn(7, dtype=torch.bfloat16).expand(3, 7)
    for t in (channels_last, expanded, torch.randn(4, 6).t()):
        rebuilt = dense_limit._build(dense_limit._spec(t), "cpu", gen)
        assert (rebuilt.shape, rebuilt.stride(), rebuilt.dtype) == (t.shape, t.stride(), t.dtype)
    args = dense_limit._build(dense_limit._spec([channels_last, [1, 2], None, False]), "cpu", gen)
    assert args[1:] == [[1, 2], None, False]


def test_dense_op_replay_times_every_op_once_per_round():
    """The replay calls the ops in rounds (a warm-up round, then one call of each op per round), so a
    slow spell of the machine cannot fall on every timed call of one op, and each op's time is its
    best over the rounds, never more than one call's."""
    import torch

    import dense_limit

    order, spans = [], {"a": [0.02, 0.2, 0.005], "b": [0.04, 0.01, 0.2]}

    def op(name):
        def call(x, y):
            assert x.shape == (3, 2) and y == 7
            calls = order.count(name)  # the first call is the warm-up
            time.sleep(spans[name][calls - 1] if calls else 0.0)
            order.append(name)
        return call

    spec = dict(args=dense_limit._spec([torch.zeros(3, 2), 7]), kwargs=dense_limit._spec([]))
    timed = dense_limit.replay([dict(spec, op=op("a")), dict(spec, op=op("b"))], reps=3,
                               before_round=lambda warm_up: order.append("warm-up step" if warm_up else "step"))
    # the step runs before each timed round, and once before the warm-up (its own warm-up)
    assert order == ["warm-up step", "a", "b"] + ["step", "a", "b"] * 3
    assert 0.005 <= timed[0]["seconds"] < 0.02 and 0.01 <= timed[1]["seconds"] < 0.04
    for o, name in zip(timed, "ab"):  # each round's own time, the best of which is the op's time
        assert len(o["round_seconds"]) == 3 and min(o["round_seconds"]) == o["seconds"]
        assert all(s <= t for s, t in zip(spans[name], o["round_seconds"]))
        assert max(range(3), key=o["round_seconds"].__getitem__) == max(range(3), key=spans[name].__getitem__)
    # a round's limit: every op at its time in that round, times its calls per step
    total = dense_limit.summary([dict(timed[0], flops=1, count=2, name="a"),
                                 dict(timed[1], flops=1, count=1, name="b")])
    assert total["round_seconds"] == pytest.approx(
        [2 * a + b for a, b in zip(timed[0]["round_seconds"], timed[1]["round_seconds"])])
    assert total["seconds"] == pytest.approx(2 * timed[0]["seconds"] + timed[1]["seconds"])


def test_paired_efficiency_divides_each_round_by_the_step_before_it():
    """Each replay round's limit over the step timed just before that round, for every round of every
    run, sorted; the report's figure is their median, shown beside the best round over the median step."""
    import model_report

    runs = [dict(paired_times=[2.0, 4.0], paired_cpu_times=[4.0, 4.0],
                 limit=dict(round_seconds=[1.0, 1.6], round_cpu_seconds=[2.0, 1.0]),
                 dense_model_limit=dict(round_seconds=[3.0, 2.0], round_cpu_seconds=[1.0, 1.0])),
            dict(paired_times=[1.0], paired_cpu_times=[1.0], limit=dict(round_seconds=[0.9], round_cpu_seconds=[0.9]),
                 dense_model_limit=dict(round_seconds=[0.7], round_cpu_seconds=[0.7]))]
    assert bench_model._paired_efficiency(runs, cpu=False) == dict(limit=[0.4, 0.5, 0.9],
                                                                   dense_model_limit=[0.5, 0.7, 1.5])
    assert bench_model._paired_efficiency(runs, cpu=True) == dict(limit=[0.25, 0.5, 0.9],
                                                                  dense_model_limit=[0.25, 0.25, 0.7])
    ours = dict(median=2.0, paired=dict(limit=[0.4, 0.5, 0.9]))
    assert model_report._efficiency(dict(seconds=1.2), ours, "limit") == (0.5, "60.0% (paired 50.0%, 40%-90%)")
    assert model_report._efficiency(dict(seconds=1.2), dict(median=2.0), "limit") == (0.6, "60.0%")
    assert model_report._efficiency(None, ours, "limit")[1] == "n/a"


def test_memory_floor_counts_every_neurons_input_map():
    """The neuron maps of the quick CIFAR model (embed 64, depth 1, T = 2, batch 2, 32x32 images), by
    hand: the tokenizer's four SNs see its stages' BN outputs (8, 16 and 32 channels at 32x32, then
    64 at 16x16 after the first max-pool), a Spikingformer block's seven the tokens (T B N D = 2 x 2 x
    64 x 64; the MLP's hidden SN 4 D); 4 bytes each in float32, 2 under bf16 autocast, whichever
    routes are on (the probe takes the module calls)."""
    model, x, _ = bench_model.build(dict(name="spikingformer_cifar10_4_384", batch=2, build="ours",
                                         overrides=bench_model.QUICK["cifar"]))
    tb, tokens = 2 * 2, 2 * 2 * 64 * 64
    expected = [tb * 8 * 32 * 32, tb * 16 * 32 * 32, tb * 32 * 32 * 32, tb * 64 * 16 * 16] + [tokens] * 6 + [4 * tokens]
    assert memory_floor.neuron_maps(model, x, "fp32") == [(n, 4) for n in expected]
    assert memory_floor.neuron_maps(model, x, "bf16") == [(n, 2) for n in expected]
    assert model.training  # the probe leaves the mode as it found it


def test_memory_floor_passes_and_verdict_by_hand():
    """The floor's passes: inference reads each map once; training reads it in the forward and writes
    its gradient in the backward, and AdamW reads and writes the parameters and both moments (float32).
    The verdict: a step takes at least its own dense limit plus the floor, and 90% of the dense model's
    limit allows it limit / 0.9."""
    maps = [(10, 4), (5, 2)]
    assert memory_floor.traffic(maps, 3, "infer") == dict(read=[40, 10], write=[], copy=[])
    train = memory_floor.traffic(maps, 3, "train")
    assert train == dict(read=[40, 10], write=[40, 10], copy=[36])
    times = {"read": {40: 1.0, 10: 0.25}, "write": {40: 1.5, 10: 0.75}, "copy": {36: 3.0}}
    assert memory_floor.floor_seconds(train, times) == pytest.approx(1.0 + 0.25 + 1.5 + 0.75 + 3.0)
    fits = memory_floor.verdict(own_limit=0.5, dense_model_limit=0.9, floor=0.4)
    assert fits["reachable"] and fits["allowed"] == pytest.approx(1.0) and fits["best_efficiency"] == pytest.approx(1.0)
    short = memory_floor.verdict(own_limit=0.5, dense_model_limit=0.9, floor=0.6)
    assert not short["reachable"] and short["best_efficiency"] == pytest.approx(0.9 / 1.1)


def test_memory_floor_pass_times_are_per_size_and_positive():
    times = memory_floor.pass_times({4096, 1 << 20}, reps=2)
    assert set(times) == {"read", "write", "copy"} and all(set(t) == {4096, 1 << 20} for t in times.values())
    assert all(v > 0 for t in times.values() for v in t.values())


@pytest.mark.slow
def test_memory_floor_quick_runs_as_a_script():
    """``python benchmarks/memory_floor.py --quick``: per pass a row with our step, both limits, the
    neuron maps' traffic, the floor and the verdict."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "memory_floor.py"), "--quick", "--models", "event",
                           "--dtypes", "fp32", "--steps", "1", "--warmup", "0", "--limit-reps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- CPU: " in proc.stdout, proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| spikingformer_cifar10dvs")]
    assert [r[2].strip() for r in rows] == ["train", "infer"], proc.stdout
    for r in rows:
        assert r[7].strip().startswith("11: ") and r[7].count(" / ") == 2, proc.stdout
        assert r[11].strip() in ("yes", "**no**"), proc.stdout
        step, dense, own, floor, least = (float(r[i]) for i in (4, 5, 6, 8, 9))
        assert step > 0 and dense >= 0 and floor >= 0 and least == pytest.approx(own + floor, abs=1.01)


def test_clock_probe_measures_a_plausible_clock():
    """The FMA peak's clock: a dependent chain of additions runs one per cycle, so the probe's rate
    is the core's clock: between 0.5 and 7 GHz on any x86-64 CPU made (a folded or skipped chain
    would give far more, a mistimed one far less). The chain's sum is checked inside the probe."""
    import clock_probe

    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert clock_probe.measured_ghz() is None
        return
    ghz = clock_probe.measured_ghz(iterations=1 << 20, runs=3)
    if ghz is None:
        pytest.skip("no C compiler here")
    assert 0.5 < ghz < 7.0, ghz


def test_isa_and_fma_peak():
    import dense_limit

    avx512 = ["fma", "avx2", "avx512f"]
    assert dense_limit.isa(avx512, {}) == "AVX-512"
    assert dense_limit.isa(avx512, {"ONEDNN_MAX_CPU_ISA": "avx2"}) == "AVX2"
    assert dense_limit.isa(["fma", "avx2"], {}) == "AVX2"
    assert dense_limit.isa(["fma", "avx2"], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}) == "AVX2"  # a cap never raises
    assert dense_limit.isa(["sse4_2"], {}) == "SSE"
    # 2 cores x 2.3 GHz x (2 FMA units x 16 fp32 lanes x 2 FLOPs) = 294.4 GFLOP/s; AVX2 has 8 lanes
    intel = dict(model="Intel(R) Xeon(R) Processor", family="family 6, model 143", flags=avx512)
    zen5 = dict(model="AMD EPYC", family="family 26, model 2", flags=avx512)
    zen4 = dict(model="AMD EPYC", family="family 25, model 17", flags=avx512)
    for info in (intel, zen5):
        assert dense_limit.fma_peak(2, "AVX-512", 2.3, info=info)["flops"] == pytest.approx(294.4e9)
        assert dense_limit.fma_peak(2, "AVX-512", 2.3, bf16=True, info=info)["flops"] == pytest.approx(588.8e9)
    assert dense_limit.fma_peak(2, "AVX2", 2.3, info=intel)["flops"] == pytest.approx(147.2e9)
    # Zen 4 runs a 512-bit FMA as two 256-bit halves: AVX2's rate
    peak = dense_limit.fma_peak(2, "AVX-512", 2.3, info=zen4)
    assert peak["flops"] == pytest.approx(147.2e9) and "Zen 4" in peak["note"]
    assert dense_limit.fma_peak(2, "AVX-512", 2.3, bf16=True, info=zen4)["flops"] == pytest.approx(294.4e9)
    assert not dense_limit.halves_avx512(dict(zen4, flags=["fma", "avx2"]))  # a Zen 3 of family 25
    # bf16 on AMX tiles: 2 cores x 2.3 GHz x 1024 (16 x 16 x 32 products, 2 FLOPs each, per 16 cycles)
    amx = dict(intel, flags=avx512 + ["avx512_bf16", "amx_tile", "amx_bf16"])
    peak = dense_limit.fma_peak(2, "AVX-512", 2.3, bf16=True, info=amx, env={})
    assert peak["flops"] == pytest.approx(2 * 2.3e9 * 16 * 16 * 32 * 2 / 16) and "AMX" in peak["note"]
    assert dense_limit.fma_peak(2, "AVX-512", 2.3, info=amx, env={})["flops"] == pytest.approx(294.4e9)  # fp32: vectors
    for cap in ("AVX512_CORE_BF16", "avx512_core", "AVX2"):  # oneDNN capped below its tiles: the vector units' rate
        isa = dense_limit.isa(amx["flags"], {"ONEDNN_MAX_CPU_ISA": cap})
        flops = dense_limit.fma_peak(2, isa, 2.3, bf16=True, info=amx, env={"ONEDNN_MAX_CPU_ISA": cap})["flops"]
        assert flops == pytest.approx(588.8e9 if isa == "AVX-512" else 294.4e9), cap


@pytest.mark.skipif(not _has_spikingjelly(), reason="compares SpikingJelly's neurons")
def test_every_spikingjelly_lif_node_computes_our_neuron():
    """Each SpikingJelly class the benchmark may pick fires exactly as our reference neuron and passes
    its gradient (SpikingJelly computes in float32: no charge of this input lies within 1e-4 of the
    threshold, so no spike depends on a CPU's rounding; gradients to float32 rounding)."""
    import torch

    import sj_neurons
    from spikingformer.neuron import LIFParams, lif_membrane_reference, lif_reference

    x = (torch.randn(4, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5 + 0.8)
    p = LIFParams(tau=2.0, v_threshold=1.0, detach_reset=True)
    assert (lif_membrane_reference(x, p)[0] - p.v_threshold).abs().min() > 1e-4
    xr = x.clone().requires_grad_(True)
    ref = lif_reference(xr, p)
    (g_ref,) = torch.autograd.grad(ref.sum(), xr)
    for node in sj_neurons.lif_nodes():
        xs = x.clone().requires_grad_(True)
        spikes = sj_neurons.spikingjelly_function(node=node, tau=2.0, v_threshold=1.0, alpha=4.0)(xs)
        (g,) = torch.autograd.grad(spikes.sum(), xs)
        assert torch.equal(spikes, ref), node
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="has no multi-step LIF node"):
        sj_neurons.SpikingJellyLIF(node="NoSuchNode")


@pytest.mark.slow
def test_bench_scaling_quick_runs(capsys):
    bench_scaling.main(["--quick", "--steps", "2", "--warmup", "0", "--plot-dir", ""])
    out = capsys.readouterr().out
    assert "| T | 2 |" in out and "| batch | 2 |" in out and "| resolution | 64 |" in out


def test_bench_bn_segment_quick_runs_as_a_script():
    """``python benchmarks/bench_bn_segment.py --quick`` in a clean process (it installs our
    allocator): one row per case and dtype (float32, bfloat16), with both ways' times and their ratio."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_bn_segment.py"), "--quick", "--reps", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| small")]
    assert len(rows) == 4 and all(line.endswith("x |") and line.count("|") == 6 for line in rows), proc.stdout
    assert sorted(line.split("|")[2].strip() for line in rows) == ["bf16", "bf16", "fp32", "fp32"]


@pytest.mark.parametrize("train", [[], ["--train"], ["--train", "--winograd"]])
def test_bench_spike_conv_quick_runs_as_a_script(train):
    """``python benchmarks/bench_spike_conv.py --quick``: one row with the four ways' times (float32,
    int8, sum, Winograd), four ratios and four errors against float64; with ``--train``, forward and backward four ways (float32,
    summed throughout, only the weight gradient summed, the dense forward), three ratios, two
    weight-gradient errors (with ``--winograd`` too, the route's dense convolutions by F(2x2, 3x3))."""
    import torch

    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        pytest.skip("this PyTorch build has no oneDNN int8 convolution")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_spike_conv.py"), "--quick", "--reps", "1",
                           "--threads", "1"] + train, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| small")]
    bars, ratios = (12, 3) if train else (15, 4)
    assert len(rows) == 1 and rows[0].count("|") == bars and rows[0].count("x |") == ratios, proc.stdout
    assert float(rows[0].split("|")[-2]) < 1e-4  # the route's error against float64 (weights ~ 0.5)


def test_bench_spike_conv_winograd_goes_with_train_alone():
    """``--winograd`` outside ``--train`` is a usage error naming the pairing (inference has its column)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_spike_conv.py"), "--quick", "--winograd"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--winograd goes with --train alone" in proc.stderr, proc.stderr


@pytest.mark.parametrize("train", [False, True])
def test_bench_spike_conv_bf16_quick_runs_as_a_script(train):
    """``python benchmarks/bench_spike_conv.py --bf16 --quick``: under bf16 autocast, one row with
    autocast's convolution and the route's sums (with ``--train`` also only the weight gradient
    summed) and their ratios; on a CPU without native bf16, one line saying the rows were skipped."""
    from spikingformer.cpu_features import native_bf16

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_spike_conv.py"), "--bf16", "--quick", "--reps", "1",
                           "--threads", "1"] + (["--train"] if train else []), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| small")]
    if not native_bf16():
        assert not rows and "bf16 rows skipped" in proc.stdout, proc.stdout
        return
    ratios = 2 if train else 1
    assert len(rows) == 1 and len(rows[0]) == 5 + 2 * ratios, proc.stdout
    assert all(float(v.strip().rstrip("x")) > 0 for v in rows[0][3:-1]), proc.stdout


def test_bench_spike_conv_whole_quick_runs_as_a_script():
    """``python benchmarks/bench_spike_conv.py --whole --quick``: per model, the inference batch's
    times both ways, their ratio, and that both classify alike (True for these spike maps: the int8
    pieces are closer to float64 than float32's own sum, far from flipping an arg-max of 10)."""
    import torch

    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        pytest.skip("this PyTorch build has no oneDNN int8 convolution")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_spike_conv.py"), "--whole", "--quick", "--reps", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| cifar", "| event"))]
    assert len(rows) == 2 and all(r.count("|") == 6 and r.count("x |") == 1 for r in rows), proc.stdout
    assert all(r.endswith("| True |") for r in rows), proc.stdout


def test_bench_spike_conv_whole_training_quick_runs_as_a_script():
    """``python benchmarks/bench_spike_conv.py --whole --train --quick``: the limits it compares, and per
    model the training step's times three ways (the route, the int8 pieces off, float32 above the
    training limit) and the two ratios."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_spike_conv.py"), "--whole", "--train", "--quick",
                           "--reps", "1", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'weight_grad':" in proc.stdout, proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith(("| cifar", "| event"))]
    assert len(rows) == 2 and all(len(r) == 8 and all(float(v) > 0 for v in r[2:7]) for r in rows), proc.stdout


def test_study_routes_quick_runs_as_a_script():
    """``python benchmarks/study_routes.py --quick``: a row per route case with both times and the
    on / off ratio, and the machine lines that name the routes' ISA key."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "study_routes.py"), "--quick", "--models", "cifar",
                           "--reps", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "routes' ISA key:" in proc.stdout, proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| ") and " cifar " in line]
    assert {r[1].strip() for r in rows} >= {"spike_linear", "channels_last", "fused_spike_pool", "attention_order"}
    assert all(float(r[7]) > 0 for r in rows), proc.stdout
    verdicts = [line.split("|") for line in proc.stdout.split("| route | on now |")[-1].splitlines()[2:]
                if line.startswith("| ")]
    assert {v[1].strip() for v in verdicts} >= {"spike_linear", "winograd", "token_linear"}, proc.stdout
    assert "--quick: tiny models; no value is drawn" in proc.stdout


def test_study_routes_suggests_routes_from_whole_models_only():
    """The study's closing suggestion: per route, the geometric mean of on / off over its whole-model
    rows (other cases ignored); a route off that ran more than 3% faster on is added, a route on that
    ran more than 3% slower removed, one kept on for memory or work never changed."""
    rows = [("winograd", "whole model, batch 16", 0.90), ("winograd", "whole model, batch 8", 1.00),
            ("winograd", "tokenizer, 16 images x T=4", 2.0),  # not a whole model: ignored
            ("token_linear", "whole model, batch 16", 1.10), ("token_linear", "whole model, batch 8", 1.02),
            ("spike_conv", "whole model, batch 16", 0.98),  # within the margin
            ("recompute", "whole model, batch 16", 1.50),  # kept on whatever its time
            ("channels_last", "tokenizer, 16 images x T=4", 0.5)]  # no whole-model row: no verdict
    verdicts = {r: (round(m, 4), c) for r, m, c in study_routes.suggestion(
        rows, on_now=frozenset({"token_linear", "spike_conv", "recompute"}), kept=frozenset({"recompute"}))}
    assert verdicts == {"winograd": (round(math.sqrt(0.9), 4), "+winograd"),
                        "token_linear": (round(math.sqrt(1.10 * 1.02), 4), "-token_linear"),
                        "spike_conv": (0.98, ""), "recompute": (1.5, "")}
    # the same ratios the other side of the default: no change
    same = study_routes.suggestion(rows, on_now=frozenset({"winograd"}), kept=frozenset())
    assert {r: c for r, _, c in same} == {"winograd": "", "token_linear": "", "spike_conv": "", "recompute": ""}


def test_study_routes_bf16_runs_only_where_bf16_is_native():
    """``study_routes.py --bf16`` times the cases under bf16 autocast where the CPU has bf16 natively,
    and refuses with the reason where it does not (oneDNN capped at AVX2 here: bf16 emulated)."""
    from spikingformer.cpu_features import native_bf16

    args = [sys.executable, str(BENCHMARKS / "study_routes.py"), "--quick", "--models", "cifar", "--reps", "1",
            "--routes", "spike_linear", "--bf16", "--rates", "0.25"]
    capped = subprocess.run(args, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert capped.returncode == 2 and "no native bf16" in capped.stderr, capped.stderr[-2000:]
    if not native_bf16():
        pytest.skip("this CPU has no native bf16")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every case under CPU bf16 autocast" in proc.stdout, proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| spike_linear | cifar")]
    assert len(rows) >= 4 and all(float(r[7]) > 0 for r in rows), proc.stdout
    rated = [r[3] for r in rows if "firing rate" in r[3]]  # the linear cases, at the rate asked for
    assert rated and all(c.strip().endswith("firing rate 0.25") for c in rated), proc.stdout


def test_bench_products_runs_as_a_script():
    """``python benchmarks/bench_products.py``: both libraries' rates and their ratio for every zoo
    shape and product, the route's token_linear shapes included."""
    if not torch_has_onednn():
        pytest.skip("this PyTorch has no oneDNN")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_products.py"), "--threads", "1", "--reps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 18 and {r[4].strip() for r in rows} == {"forward", "input gradient", "weight gradient"}
    assert all(float(r[5]) > 0 and float(r[6]) > 0 and float(r[7]) > 0 for r in rows), proc.stdout


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_study_winograd_runs_as_a_script(bf16):
    """``python benchmarks/study_winograd.py --quick``: a row per case with the four times, the three
    ratios, both rounding errors (Winograd's at float32's rounding, or bf16's with ``--bf16``) and
    the weight gradient's two times and ratio; ``--bf16`` on a CPU without native bf16: one line."""
    from spikingformer.cpu_features import native_bf16

    proc = subprocess.run([sys.executable, str(BENCHMARKS / "study_winograd.py"), "--quick", "--reps", "1",
                           "--threads", "1"] + (["--bf16"] if bf16 else []), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if bf16 and not native_bf16():
        assert proc.stdout.strip() == "bf16: skipped, this CPU has no native bf16 (AVX512-BF16 or AMX)"
        return
    assert f"dtype: {'bf16' if bf16 else 'float32'}" in proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| quick |")]
    assert len(rows) == 2 and {r[4].strip() for r in rows} == {"NCHW", "channels last"}, proc.stdout
    assert all(float(r[k]) > 0 for r in rows for k in (*range(6, 13), 15, 16, 17)), proc.stdout
    assert all(float(r[14]) < (2 ** -7 if bf16 else 1e-5) for r in rows), proc.stdout


def torch_has_onednn() -> bool:
    import torch

    return torch.backends.mkldnn.is_available()


def test_startup_runs_as_a_script():
    """``python benchmarks/startup.py --repeats 1``: the command's start-up cases, each timed."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "startup.py"), "--repeats", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| spikingformer")]
    assert len(rows) >= 3 and all(float(r.split("|")[-2]) > 0 for r in rows), proc.stdout


@pytest.mark.slow
def test_bench_compile_runs_as_a_script(tmp_path):
    """``python benchmarks/bench_compile.py`` on the smallest zoo model's inference batch: its
    machine lines and one row with both builds' times, their ratio and the first call's seconds."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))  # see test_compile.py
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_compile.py"), "--models", "spikingformer_digits",
                           "--modes", "infer", "--steps", "2", "--warmup", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- CPU: " in proc.stdout, proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| spikingformer_digits")]
    assert len(rows) == 1 and rows[0].count("|") == 9 and "| default |" in rows[0], proc.stdout


@pytest.mark.slow
def test_bench_compilers_quick_runs_as_a_script():
    """``python benchmarks/bench_compilers.py --quick`` with two contenders of one compiler (g++, and
    g++ with a variable set): one row per model, pass and dtype, the second contender's ratio in it."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_compilers.py"), "--quick", "--compilers", "g++",
                           "g++:OMP_WAIT_POLICY=passive", "--steps", "1", "--warmup", "1", "--rounds", "1",
                           "--modes", "train", "infer"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| event |")]
    assert len(rows) == 2 and all(re.search(r"\| \d+ ms \| \d+ ms \(\d+\.\d\dx\) \|$", r) for r in rows), proc.stdout
    assert "`g++:OMP_WAIT_POLICY=passive`: " in proc.stdout and "bench_compilers.py --quick" in proc.stdout


@pytest.mark.slow
def test_bench_kernel_revisions_quick_runs_as_a_script():
    """``python benchmarks/bench_kernel_revisions.py --quick`` (HEAD's kernel sources against the
    working tree's, which builds a second library): one row per case, pass and dtype, each saying
    whether both gave the same results (HEAD and a clean working tree must)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_kernel_revisions.py"), "--quick", "--reps", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "a git checkout is needed" in proc.stderr:
        pytest.skip("not a git checkout: " + proc.stderr.strip()[-300:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| small")]
    # the maps and the token rows: 3 passes x 2 dtypes each; the plain LIF kernel: 2 passes x 2 dtypes
    assert len(rows) == 16 and all(line.count("|") == 8 and line.endswith("x |") for line in rows), proc.stdout
    assert sum(" LIF, " in line for line in rows) == 4, proc.stdout
    assert all(" | yes | " in line for line in rows), proc.stdout


@pytest.mark.slow
def test_bench_lif_quick_runs_as_a_script():
    """``python benchmarks/bench_lif.py`` from a clean process (the folder is not a package)."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_lif.py"), "--quick", "--rounds", "1",
                           "--budget", "0.01", "--max-reps", "3", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# LIF neuron benchmark" in proc.stdout and "| 4 | 1e+05 | fwd |" in proc.stdout
    assert "bench_lif.py --quick" in proc.stdout  # the command is echoed


@pytest.mark.slow
def test_bench_lif_without_spikingjelly_says_so_and_drops_the_column(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "spikingjelly", None)  # as if it were not installed
    bench_lif.main(["--quick", "--rounds", "1", "--budget", "0.01", "--max-reps", "3", "--threads", "1"])
    out = capsys.readouterr().out
    assert "spikingjelly not installed" in out
    assert "SpikingJelly is not installed, so there is no comparison column" in out and "spikingformer[bench]" in out
    assert "x SJ" not in out and "| 4 | 1e+05 | fwd | torch | float32 |" in out


def test_bench_model_without_spikingjelly_is_one_line_and_exit_2(capsys, monkeypatch, tmp_path):
    # the baseline's Python (here this one, in a worker process) cannot import spikingjelly
    (tmp_path / "spikingjelly.py").write_text("raise ImportError('hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(SystemExit) as done:
        bench_model.main(["--quick", "--dtypes", "fp32"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compares against SpikingJelly's neurons" in err[0] and "spikingformer[bench]" in err[0]


@pytest.mark.parametrize("env, disabled", [({"SPIKINGFORMER_ALLOCATOR": "0"}, True), ({"SPIKINGFORMER_ALLOCATOR": "off"}, True),
                                          ({"SPIKINGFORMER_ALLOCATOR": "1"}, False), ({}, False)],
                         ids=["0", "off", "1", "unset"])
def test_allocator_switch(env, disabled):
    assert allocator.allocator_disabled(env) is disabled


def _run(code: str, switch: str = "1", **env_extra) -> str:
    env = dict(os.environ, SPIKINGFORMER_ALLOCATOR=switch, **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="the caching allocator is Linux-only")


@linux_only
@pytest.mark.parametrize("switch", ["1", "0"])
def test_configure_allocator_in_a_fresh_process(switch):
    out = _run("from spikingformer import allocator; print(allocator.configure_allocator()); "
               "print(allocator.allocator_state())", switch)
    if switch == "1":
        assert out.startswith("True") and "spikingformer caching allocator" in out
    else:
        assert out.startswith("False") and "SPIKINGFORMER_ALLOCATOR=0" in out


_FAULTS = """
import resource, torch
from spikingformer import allocator
allocator.configure_allocator()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 * 2**20)
f0 = faults()
for _ in range(4): torch.ones(16 * 2**20)
print((faults() - f0) / 4, allocator.cache_stats()["hits"])
"""


@pytest.mark.slow
@linux_only
def test_caching_allocator_reuses_large_blocks_instead_of_faulting_them_in():
    """A freed 64 MB tensor's block serves the next one (PyTorch's default maps and zeroes it afresh)."""
    ours = _run(_FAULTS, "1").split()
    default = _run(_FAULTS, "0").split()
    pages = 64 * 2**20 / 4096
    assert float(default[-2]) > pages / 2  # glibc: every 64 MB block is page-faulted in again
    assert float(ours[-2]) < pages / 100 and int(ours[-1]) >= 4  # served from the cache, no faults


_SCRATCH = """
import ctypes, resource, torch
from spikingformer import allocator
allocator.configure_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def scratch():
    p = libc.malloc(4 << 20)
    ctypes.memset(p, 1, 4 << 20)
    libc.free(p)
scratch()
f0 = faults()
for _ in range(4): scratch()
print((faults() - f0) / 4)
"""


@linux_only
def test_scratch_from_malloc_stays_in_the_heap_with_the_allocator():
    """Code outside PyTorch's allocator (the fused kernels' per-thread scratch, oneDNN's) takes its
    buffers from malloc: with the allocator installed, a 4 MiB buffer freed and taken again comes
    from glibc's heap, not from a fresh mapping faulted in each time (as with a 1 MiB mmap
    threshold, which faulted four 1 MiB buffers of the event model's stem backward every step)."""
    pages = (4 << 20) / 4096
    assert float(_run(_SCRATCH, "1").split()[-1]) < pages / 100


_SEGMENTS = """
import json, torch
from spikingformer import allocator
allocator.configure_allocator()
MB = 2**20
stats = lambda: dict(allocator.cache_stats())
a = torch.empty(64 * MB, dtype=torch.uint8)
start, base = a.data_ptr(), stats()
del a
parts = [torch.empty(16 * MB, dtype=torch.uint8) for _ in range(4)]
split, offsets = stats(), [p.data_ptr() - start for p in parts]
del parts
b = torch.empty(64 * MB, dtype=torch.uint8)
merged, same = stats(), b.data_ptr() == start
del b
c = torch.empty(128 * MB, dtype=torch.uint8)
print(json.dumps(dict(base=base, split=split, offsets=offsets, merged=merged, same=same, grown=stats())))
"""


@linux_only
def test_caching_allocator_splits_merges_and_gives_back_free_segments():
    """Freed pages of one size serve requests of another: a free 64 MiB block is split for four
    16 MiB tensors (no new mapping), their blocks merge back into one that serves 64 MiB again, and
    a request larger than any free block first unmaps the wholly free segment."""
    import json

    r = json.loads(_run(_SEGMENTS, "1").strip().splitlines()[-1])
    base, split, merged, grown = r["base"], r["split"], r["merged"], r["grown"]
    mib = 2**20
    assert split["maps"] == base["maps"] and split["hits"] == base["hits"] + 4
    assert sorted(r["offsets"]) == [0, 16 * mib, 32 * mib, 48 * mib]
    assert merged["maps"] == base["maps"] and r["same"] and merged["cached"] == base["cached"]
    assert grown["unmaps"] == base["unmaps"] + 1 and grown["maps"] == base["maps"] + 1
    assert grown["mapped"] - base["mapped"] == 64 * mib  # 128 MiB mapped, the free 64 MiB segment given back


_SMALL_BLOCKS = """
import json, torch
from spikingformer import allocator
allocator.configure_allocator()
MB = 2**20
allocator.empty_cache()
base = dict(allocator.cache_stats())
a = torch.empty(4 * MB, dtype=torch.uint8)
first = dict(allocator.cache_stats())
rest = [torch.empty(4 * MB, dtype=torch.uint8) for _ in range(7)]
print(json.dumps(dict(base=base, first=first, full=dict(allocator.cache_stats()),
                      offsets=sorted(t.data_ptr() - a.data_ptr() for t in rest))))
"""


@linux_only
def test_caching_allocator_maps_segments_of_at_least_32_mib_that_small_blocks_share():
    """A 4 MiB request that no free block holds maps a 32 MiB segment, the rest left free; the next
    seven 4 MiB requests are carved from that rest, next to the first, with no new mapping."""
    import json

    r = json.loads(_run(_SMALL_BLOCKS, "1").strip().splitlines()[-1])
    base, first, full = r["base"], r["first"], r["full"]
    mib = 2**20
    assert first["maps"] == base["maps"] + 1 and first["mapped"] - base["mapped"] == 32 * mib
    assert first["cached"] - base["cached"] == 28 * mib
    assert full["maps"] == first["maps"] and full["hits"] == first["hits"] + 7 and full["cached"] == base["cached"]
    assert r["offsets"] == [4 * mib * i for i in range(1, 8)]


_RANDOM_PATTERN = """
import json, random, torch
from spikingformer import allocator
allocator.configure_allocator()
MB = 2**20
random.seed(0)
base = dict(allocator.cache_stats())
live, overlaps, corrupted = {}, 0, 0
for step in range(1500):
    if live and (len(live) >= 40 or random.random() < 0.45):
        key = random.choice(list(live))
        t, value = live.pop(key)
        corrupted += int(not bool((t == value).all()))
    else:
        n = random.choice([1, 2, 3, 5, 8, 13, 21, 34]) * MB + random.randrange(4096)
        t = torch.full((n,), step % 251, dtype=torch.uint8)
        start, end = t.data_ptr(), t.data_ptr() + n
        overlaps += sum(int(start < u.data_ptr() + u.numel() and u.data_ptr() < end) for u, _ in live.values())
        live[step] = (t, step % 251)
corrupted += sum(int(not bool((t == v).all())) for t, v in live.values())
live.clear()
del t
end = dict(allocator.cache_stats())
print(json.dumps(dict(base=base, end=end, overlaps=overlaps, corrupted=corrupted)))
"""


@pytest.mark.slow
@linux_only
def test_caching_allocator_keeps_blocks_apart_under_a_random_pattern():
    """1500 random allocations and frees of 1-34 MiB, up to 40 live (split, merged, unmapped and mapped again): no
    two live tensors overlap, none is overwritten, and when all are freed every block is back in
    the cache (in use again: as before the run)."""
    import json

    r = json.loads(_run(_RANDOM_PATTERN, "1").strip().splitlines()[-1])
    assert r["overlaps"] == 0 and r["corrupted"] == 0
    assert r["end"]["live_blocks"] == r["base"]["live_blocks"]
    assert r["end"]["mapped"] - r["end"]["cached"] == r["base"]["mapped"] - r["base"]["cached"]
    assert r["end"]["hits"] - r["base"]["hits"] > 500  # most requests were served from freed (split or merged) blocks


_TRAIN = """
import torch
from spikingformer import allocator
print("installed", allocator.configure_allocator())
from spikingformer.models.zoo import create_model
torch.manual_seed(0)
model = create_model("spikingformer_digits")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,))
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
data = torch.utils.data.TensorDataset(torch.arange(4))
loader = torch.utils.data.DataLoader(data, batch_size=1, num_workers=2, collate_fn=lambda b: torch.ones(2**19) * b[0][0])
print("workers", sum(float(t[0]) for t in loader))  # 2 MB tensors made in forked workers
print("loss %.10f" % loss.item(), "weight %.10f" % model.head.fc.weight.double().abs().sum().item())
"""


@pytest.mark.slow
@linux_only
def test_training_under_the_caching_allocator_is_unchanged():
    """Same losses and weights as under PyTorch's default allocator; forked DataLoader workers work."""
    ours = _run(_TRAIN, "1").splitlines()
    default = _run(_TRAIN, "0").splitlines()
    assert "installed True" in ours and "installed False" in default
    assert "workers 6.0" in ours
    assert [ln for ln in ours if ln.startswith("loss")] == [ln for ln in default if ln.startswith("loss")]


@linux_only
def test_allocator_build_failure_keeps_the_default_with_a_notice(tmp_path):
    out = _run("import warnings; from spikingformer import allocator; print(allocator.configure_allocator()); "
               "print(allocator.allocator_state())", "1", CXX=str(tmp_path / "no-such-compiler"),
               TORCH_EXTENSIONS_DIR=str(tmp_path))
    assert out.startswith("False")
    assert "did not build" in out and "no-such-compiler" in out and "RuntimeWarning" in out


def test_bench_model_on_cuda_without_a_gpu_says_so(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the benchmark would run")
    with pytest.raises(SystemExit) as done:
        bench_model.main(["--device", "cuda", "--quick"])
    assert done.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err


def _gpu_check(tmp_path, python: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = python
    return subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the check would run")
    done = _gpu_check(tmp_path, sys.executable)
    assert done.returncode == 0 and "no CUDA device visible to torch" in done.stdout


def test_gpu_check_without_torch_says_so_and_fails(tmp_path):
    """A GPU image's ``python`` may not be the one with PyTorch (there, ``python3`` is): the check
    must not report that as a missing GPU."""
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')  # no site-packages: no torch
    bare.chmod(0o755)
    done = _gpu_check(tmp_path, str(bare))
    assert done.returncode == 1 and "cannot import torch" in done.stdout


def test_gpu_check_steps_fit_one_device_command():
    """The device machine runs one command for at most 600 s, a machine's start and the rest of its
    15 minutes beside it: the steps' time limits must add up to at most 570 s (the set-up before
    them took under 15 s on an H200)."""
    pin, check = (BENCHMARKS / "gpu_check.sh").read_text().split("# == the check ==")
    limits = [int(n) for n in re.findall(r'\bstep "[^"]+" (\d+)', check)]
    assert len(limits) == 6 and sum(limits) <= 570
    # --authors-pin: the rest of a session's 15 minutes after the check (a warm machine needs no start)
    limits = [int(n) for n in re.findall(r'\bstep "[^"]+" (\d+)', pin)]
    assert len(limits) == 2 and sum(limits) <= 270


def test_gpu_check_installs_the_carried_wheels_ahead_of_the_installed_packages(tmp_path):
    """A GPU machine without network access gets the peers as wheels in ``.whl/`` beside the checkout
    (``benchmarks/gpu_wheels.sh``): the check installs them first, and they win over any installed
    copy (here a stand-in snnTorch of version 0.0.1)."""
    import zipfile

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the check would go on to run on it")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_check.sh").write_text((BENCHMARKS / "gpu_check.sh").read_text())
    (tmp_path / ".whl").mkdir()
    info = "snntorch-0.0.1.dist-info"
    with zipfile.ZipFile(tmp_path / ".whl" / "snntorch-0.0.1-py3-none-any.whl", "w") as whl:
        whl.writestr("snntorch/__init__.py", '__version__ = "0.0.1"\n')
        whl.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: snntorch\nVersion: 0.0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", f"snntorch/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "installed the carried wheels: snntorch-0.0.1-py3-none-any.whl" in done.stdout
    assert "snntorch 0.0.1" in done.stdout and "no CUDA device visible to torch" in done.stdout


def test_batch_sizes_of_the_model_benchmark():
    """``--batch bench`` times the CPU-sized batches, ``--batch authors`` the authors' training batch on
    one GPU (64 for CIFAR-10, 16 for CIFAR10-DVS), ``--quick`` its tiny one whatever ``--batch``."""
    import argparse

    ap = argparse.ArgumentParser()
    bench_model.add_arguments(ap)
    assert ap.parse_args([]).batch == "bench"
    assert [bench_model.batch_of(k, "bench") for k in ("cifar", "event")] == [16, 8]
    assert [bench_model.batch_of(k, "authors") for k in ("cifar", "event")] == [64, 16]
    assert bench_model.batch_of("cifar", "authors", quick=True) == bench_model.QUICK["cifar"]["batch"]


def test_study_gpu_quick_runs_on_the_cpu(capsys):
    """``benchmarks/study_gpu.py`` (made for a GPU, whose time is scarce) runs through on the CPU with
    tiny models: a host-or-device row per model, pass and contender, and an on/off row per route
    that acts on CUDA tensors, each with a ratio."""
    import study_gpu

    argv = ["--device", "cpu", "--quick", "--reps", "1", "--dtypes", "fp32", "--models", "event", "--batch", "authors"]
    if not _has_spikingjelly():
        argv.append("--no-authors")
    assert study_gpu.main(argv) == 0
    out = capsys.readouterr().out
    assert "- batch: event 2;" in out  # --quick's batch, whatever --batch says
    contenders = 2 if _has_spikingjelly() else 1
    assert len(re.findall(r"^\| event \| (train|infer) \| fp32 \| (ours|authors) \|", out, re.M)) == 2 * contenders
    routes = re.findall(r"^\| (\w+) \| event \| (train|infer) \| fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out, re.M)
    expected = {(r, m) for r, passes in study_gpu.CUDA_ROUTES.items() if r != "stem_once" for m in passes}
    assert set(routes) == expected, out


def test_tf32_is_one_switch_for_every_contender_and_only_on_cuda():
    """A step built for ``tf32`` lets products and convolutions both use TF32 tensor cores, one built
    for ``fp32`` or ``bf16`` neither (PyTorch's own default allows convolutions only, which let the
    authors' Conv1d layers run at TF32 while our nn.Linear ran in full fp32 on the H200); the switch
    is set when the step is built, so the dense limit's replay runs at the same precision. Off CUDA
    the option is refused."""
    import argparse

    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        model, x, y = torch.nn.Linear(4, 3), torch.randn(2, 4), torch.tensor([0, 2])
        for dtype, on in (("tf32", True), ("fp32", False), ("tf32", True), ("bf16", False)):
            bench_model.step_function(model, x, y, "infer", dtype, authors=False)
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (on, on), dtype
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    with pytest.raises(ValueError, match="--device cuda"):
        bench_model.check_dtypes(argparse.Namespace(device="cpu", dtypes=["fp32", "tf32"]))
    cuda = argparse.Namespace(device="cuda", dtypes=["fp32", "tf32"])
    bench_model.check_dtypes(cuda)
    assert cuda.dtypes == ["fp32", "tf32"]


def _checkout_with_gpu_check(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_check.sh").write_text((BENCHMARKS / "gpu_check.sh").read_text())
    (tmp_path / ".whl").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    return lambda *args: subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_check.sh"), *args],
                                        capture_output=True, text=True, env=env, timeout=120)


def test_gpu_check_with_the_authors_pin_unpacks_it_for_that_release_only(tmp_path):
    """``gpu_check.sh --authors-pin`` unpacks ``.whl/authors-pin.tar.xz`` (SpikingJelly 0.0.0.0.12 with
    CuPy, too large to travel as wheels) into a folder of its own, which only the interpreter it
    hands to the benchmarks' SpikingJelly 0.0.0.0.12 workers sees (a stand-in release here); without
    the pack it says how to make it; another argument is refused."""
    import io
    import tarfile

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the check would go on to run on it")
    check = _checkout_with_gpu_check(tmp_path)
    done = check("--authors-pin")
    assert done.returncode == 1 and "bash benchmarks/gpu_wheels.sh --authors-pin" in done.stdout, done.stdout
    with tarfile.open(tmp_path / ".whl" / "authors-pin.tar.xz", "w:xz") as pack:
        source = b'__version__ = "0.0.0.0.12"\n'
        member = tarfile.TarInfo("./spikingjelly/__init__.py")
        member.size = len(source)
        pack.addfile(member, io.BytesIO(source))
    done = check("--authors-pin")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the authors' pin: spikingjelly 0.0.0.0.12, cupy absent (ModuleNotFoundError" in done.stdout, done.stdout
    assert "no CUDA device visible to torch" in done.stdout
    versions = next(line for line in done.stdout.splitlines() if line.startswith("torch "))
    assert "spikingjelly 0.0.0.0.12" not in versions  # the check's own interpreter does not see the pin
    assert check("--pin").returncode == 2


def test_a_baseline_worker_needs_no_training_dependencies():
    """The baselines' workers run in an environment of their own (SpikingJelly 0.0.0.0.12's: PyTorch
    and that release, with this checkout on the path): building a step, precision switches
    included, must not import the training stack (PyYAML, timm)."""
    code = ("import sys\n"
            "class Absent:  # as if not installed\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('yaml', 'timm'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "import torch, bench_model\n"
            "step = bench_model.step_function(torch.nn.Linear(4, 3), torch.randn(2, 4), torch.tensor([0, 2]), "
            "'train', 'fp32', authors=False)\n"
            "step()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCHMARKS), str(BENCHMARKS.parent / "src")]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_bench_onnx_runs_as_a_script():
    """``python benchmarks/bench_onnx.py`` on the digits model: its machine lines and one row with the
    three contenders' times, the ratios to ours and ONNX Runtime's logit difference."""
    pytest.importorskip("onnxruntime", reason="the benchmark runs ONNX Runtime: pip install 'spikingformer[onnx]'")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_onnx.py"), "--models", "spikingformer_digits",
                           "--steps", "1", "--warmup", "0", "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "- CPU: " in proc.stdout and "- onnxruntime " in proc.stdout, proc.stdout
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| spikingformer_digits")]
    assert len(rows) == 1 and len(rows[0]) == 10, proc.stdout
    assert all(float(v) > 0 for v in rows[0][3:6]) and all(float(v.strip().rstrip("x")) > 0 for v in rows[0][6:8])
    assert 0 < float(rows[0][2]) < 1 and math.isfinite(float(rows[0][8])), proc.stdout


@pytest.mark.parametrize("tile", ["F(2x2, 3x3)", "F(3x3, 3x3)", "F(4x4, 3x3)"])
def test_winograd_tiles_of_the_accuracy_study_are_the_convolution(tile):
    """``benchmarks/winograd_tile_accuracy.py``'s Toom-Cook transforms, unrounded (float64): each tile
    size is the 3x3 convolution with padding 1, on maps whose sides are no multiple of the tile."""
    import torch

    import winograd_tile_accuracy as study

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    m, points = study.TILES[tile]
    y = study.tiled_conv(x, w, study.toom_cook(m, points), torch.float64)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=0, atol=1e-10)


def test_winograd_tile_accuracy_runs_as_a_script():
    """``python benchmarks/winograd_tile_accuracy.py --images 1``: a row per layer, map kind and dtype;
    its F(2x2, 3x3) prototype errs as the route does in bf16 (the same roundings), and the larger
    tiles err more than F(2x2, 3x3) in both dtypes."""
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "winograd_tile_accuracy.py"), "--images", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "->" in line]
    assert len(rows) == 12 and {r[2] for r in rows} == {"float32", "bfloat16"}, proc.stdout
    for r in rows:
        direct, f2, f3, f4, route = map(float, r[3:])
        assert 0 < direct and f2 < f3 < f4, r
        if r[2] == "bfloat16":
            assert route == pytest.approx(f2, rel=0.05), r
