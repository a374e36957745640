"""Spike audit, FLOPs/SOPs/energy, ConvBN fusion, accumulate-only inference and their CLI.

Expectations are independent of the code under test: hand-computed operation counts, the authors'
logged energy totals (REFERENCE.md s.6), dense PyTorch results, and hand counts of border taps.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from conftest import active_model as _active
from conftest import write_cifar_folders
from spikingformer import checkpoints, create_model
from spikingformer.analysis.audit import non_spike_layers, record_activity, silent_layers
from spikingformer.analysis.energy import E_AC_PJ, E_MAC_PJ, energy_from_rates, energy_from_record
from spikingformer.analysis.geometry import layer_specs
from spikingformer.analysis.inputs import calibrate_batchnorm, random_batches
from spikingformer.analysis.paper_rates import PAPER_LOGS, paper_rates, paper_sops
from spikingformer.checkpoints import save_fused
from spikingformer.deploy.accumulate import (
    AccumulateModel,
    accumulate_attention,
    accumulate_conv2d,
    accumulate_linear,
)
from spikingformer.deploy.fuse import fuse_model, is_fused
from spikingformer.models import ModelConfig, SpikingTransformer, model_config, model_from_checkpoint

# A depth-1 model small enough to count by hand: 8x8 grey input, D=16, 2 heads, T=2, 2 max-pools.
TINY = dict(arch="spikingformer", img_size=8, in_channels=1, num_classes=3, embed_dim=16, depth=1,
            num_heads=2, time_steps=2, downsample=4)
# Hand counts per image (all T=2 steps). Tokenizer channels 1->2->4->8->16->16 at 8x8, 8x8, 8x8, 4x4, 2x2.
TINY_FLOPS = {
    "tokenizer.stages.0.conv": 9 * 1 * 2 * (2 * 64),  # 2304, the encoding conv, counted for both steps
    "tokenizer.stages.1.conv": 9 * 2 * 4 * (2 * 64),  # 9216
    "tokenizer.stages.2.conv": 9 * 4 * 8 * (2 * 64),  # 36864
    "tokenizer.stages.3.conv": 9 * 8 * 16 * (2 * 16),  # 36864
    "tokenizer.stages.4.conv": 9 * 16 * 16 * (2 * 4),  # 18432
    # 4 tokens x 2 steps = 8 rows
    "blocks.0.attn.q.linear": 16 * 16 * 8,  # 2048 (no bias)
    "blocks.0.attn.k.linear": 2048,
    "blocks.0.attn.v.linear": 2048,
    "blocks.0.attn.proj.linear": 2048 + 16 * 8,  # 2176
    "blocks.0.mlp.fc1.linear": 16 * 64 * 8 + 64 * 8,  # 8704
    "blocks.0.mlp.fc2.linear": 64 * 16 * 8 + 16 * 8,  # 8320
    "head.fc": 16 * 3 + 3,  # 51 (avgpool_fc: one row per image)
}


@pytest.fixture(scope="module")
def digits_pair():
    return _active("spikingformer_digits"), _active("spikformer_digits")


# ----------------------------------------------------------------------------------------------
# FLOPs and SOPs by hand


@pytest.mark.parametrize("backend", ["auto", "triton"])  # a GPU-trained config counts on any machine
def test_flops_of_tiny_config_match_hand_counts(backend):
    specs = {s.name: s for s in layer_specs(ModelConfig(**TINY, lif_backend=backend))}
    assert {n: s.flops for n, s in specs.items()} == TINY_FLOPS
    assert specs["tokenizer.stages.0.conv"].repeats_counted == 2


def test_flops_recorded_by_hooks_match_hand_counts():
    torch.manual_seed(0)
    model = SpikingTransformer(ModelConfig(**TINY))
    record = record_activity(model, [torch.randn(3, 1, 8, 8)])
    report = energy_from_record(record)
    assert {r.name: r.flops for r in report.rows if r.op != "attention"} == TINY_FLOPS
    # the model computes the stem once per image: 9*1*2*64 MACs
    assert report.stem_computed_macs == 9 * 2 * 64


def test_sops_and_energy_of_tiny_config_with_known_rates():
    rates = {n: 0.25 for n in TINY_FLOPS if n not in ("tokenizer.stages.0.conv", "head.fc")}
    rates.update({"blocks.0.attn.q_lif": 0.5, "blocks.0.attn.k_lif": 0.25, "blocks.0.attn.v_lif": 0.125})
    report = energy_from_rates(ModelConfig(**TINY), rates)
    acs_layers = 0.25 * (9216 + 36864 + 36864 + 18432 + 3 * 2048 + 2176 + 8704 + 8320)  # 30264
    ssa = 2 * 2 * 4 * 8**2 * (min(0.25, 0.125) + 0.5)  # T*h*N*d^2*(min(fr_k, fr_v) + fr_q) = 640
    macs = 2304 + 51
    assert report.row("blocks.0.attn").ops == ssa
    assert report.conv_ac_ops == acs_layers
    assert report.ac_ops == acs_layers + ssa
    assert report.mac_ops == macs
    assert report.energy_pj == pytest.approx(E_MAC_PJ * macs + E_AC_PJ * (acs_layers + ssa))
    # the event-driven estimate leaves out the authors' bias term
    assert report.row("blocks.0.mlp.fc1.linear").estimate == 0.25 * 16 * 64 * 8


def test_integer_inputs_two_treatments():
    rates = {n: 0.25 for n in TINY_FLOPS if n not in ("tokenizer.stages.0.conv", "head.fc")}
    rates.update({"blocks.0.attn.q_lif": 0.5, "blocks.0.attn.k_lif": 0.25, "blocks.0.attn.v_lif": 0.125})
    from spikingformer.analysis.energy import InputActivity

    rates["blocks.0.mlp.fc1.linear"] = InputActivity("integer", 1.5)  # mean count 1.5
    cfg = ModelConfig(**TINY)
    ac = energy_from_rates(cfg, rates, integer_inputs="ac_count").row("blocks.0.mlp.fc1.linear")
    mac = energy_from_rates(cfg, rates, integer_inputs="mac").row("blocks.0.mlp.fc1.linear")
    assert (ac.counted_as, ac.ops) == ("AC", 8704 * 1.5)
    assert (mac.counted_as, mac.ops) == ("MAC", 8704)


@pytest.mark.parametrize("overrides", [{}, {"head": "sn_fc_avgpool"}, {"family": "event"}])
def test_rates_path_agrees_with_recording(overrides):
    """The same model's recorded rates, given to the config path, give the recording's table."""
    from spikingformer.analysis.audit import documented_non_spike_layers
    from spikingformer.analysis.energy import InputActivity

    cfg = ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = SpikingTransformer(cfg)
    batches = random_batches(cfg, 1, 3, seed=1)
    record = record_activity(calibrate_batchnorm(model, batches), batches)
    rates = {n: InputActivity(s.value_kind, s.mean) for n, s in record.layers.items() if s.value_kind != "real"}
    recorded, given = energy_from_record(record), energy_from_rates(cfg, rates)
    assert [(r.name, r.flops, r.input_kind, r.counted_as) for r in given.rows] == \
        [(r.name, r.flops, r.input_kind, r.counted_as) for r in recorded.rows]
    assert [r.ops for r in given.rows] == pytest.approx([r.ops for r in recorded.rows], rel=1e-12)
    event = cfg.family == "event"
    # the stem runs per frame on events (counted as computed), once per image on static inputs (counted T times)
    assert given.stem_computed_macs == recorded.stem_computed_macs == 2304 / (1 if event else 2)
    assert given.notes == recorded.notes and len(given.notes) == (0 if event else 1)
    # the model declares the head's FC real-valued only for heads without SN
    sn_head = cfg.head.startswith("sn_")
    assert documented_non_spike_layers(record) == {"tokenizer.stages.0.conv"} | (set() if sn_head else {"head.fc"})
    assert recorded.row("head.fc").counted_as == ("AC" if sn_head else "MAC")


def test_paper_log_needs_the_logged_model():
    import dataclasses

    wrong = dataclasses.replace(PAPER_LOGS["spikingformer_8_512"], model_name="spikingformer_cifar10_4_384")  # 4 blocks, not 8
    with pytest.raises(ValueError, match="do not match the columns"):
        paper_rates(wrong)


def test_toy_linear_sops_and_measured_additions():
    layer = nn.Linear(4, 3)
    x = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 0]])  # 2 images, 3 spikes of 8 inputs
    report = energy_from_record(record_activity(layer, [x]))
    row = report.row("")
    assert row.flops == 4 * 3 + 3 and row.rate == 3 / 8
    assert row.ops == 15 * 3 / 8
    y, adds = accumulate_linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-6)
    assert adds == 3 * 3 and adds / 2 == row.estimate


# ----------------------------------------------------------------------------------------------
# The authors' logged totals (REFERENCE.md s.6)


@pytest.mark.parametrize("name", sorted(PAPER_LOGS))
def test_paper_energy_totals_reproduced(name):
    log = PAPER_LOGS[name]
    report = energy_from_rates(model_config(name), paper_rates(log), ssa_heads=log.ssa_heads)
    assert report.mac_g == pytest.approx(log.mac_g, rel=1e-9)
    assert report.ac_g == pytest.approx(log.ac_g, rel=1e-5)
    assert report.conv_ac_ops / 1e9 == pytest.approx(log.conv_ac_g, rel=1e-5)
    assert report.ssa_ac_ops / 1e9 == pytest.approx(log.ssa_ac_g, rel=1e-4)
    assert report.energy_mj == pytest.approx(log.energy_mj, rel=1e-5)
    for layer, sops in paper_sops(log).items():
        assert report.row(layer).ops == pytest.approx(sops, rel=1e-3), layer


def test_paper_8_768_with_the_models_eight_heads():
    log = PAPER_LOGS["spikingformer_8_768"]
    report = energy_from_rates(model_config("spikingformer_8_768"), paper_rates(log))  # 8 heads
    assert report.ssa_ac_ops / 1e9 == pytest.approx(log.ssa_ac_g_model_heads, rel=1e-4)
    assert report.ac_g == pytest.approx(log.ac_g_model_heads, rel=1e-5)
    assert report.energy_mj == pytest.approx(log.energy_mj_model_heads, rel=1e-5)


def test_missing_rate_is_a_clear_error():
    with pytest.raises(ValueError, match=r"13 layer\(s\): tokenizer.stages.1.conv"):
        energy_from_rates(ModelConfig(**TINY), {})


# ----------------------------------------------------------------------------------------------
# Spike audit


def test_strict_audit_spikingformer_passes_spikformer_fails(digits_pair):
    (sf, sf_x), (kf, kf_x) = digits_pair
    sf_rec = record_activity(sf, sf_x)
    assert non_spike_layers(sf_rec) == []
    assert silent_layers(sf_rec) == []  # every checked layer really saw spikes
    assert set(non_spike_layers(sf_rec, include_documented=True)) == {"tokenizer.stages.0.conv", "head.fc"}
    for s in sf_rec.layers.values():
        if s.binary:
            assert 0 < s.firing_rate < 1 and s.value_counts.keys() == {0.0, 1.0}

    kf_rec = record_activity(kf, kf_x)
    expected = {f"blocks.0.attn.{o}.linear" for o in "qkv"} | {"blocks.0.mlp.fc1.linear"}
    assert set(non_spike_layers(kf_rec)) == expected
    q_in = kf_rec.layers["blocks.0.attn.q.linear"]
    assert q_in.integer and q_in.maximum >= 2 and set(q_in.value_counts) <= {0.0, 1.0, 2.0}


def _bar_pixels(path, color: str) -> int:
    """Pixels of the PNG at ``path`` drawn in ``color`` (a bar colour)."""
    import matplotlib.image
    import numpy as np
    from matplotlib.colors import to_rgb

    image = matplotlib.image.imread(path)[..., :3]
    return int((np.abs(image - np.array(to_rgb(color))) < 0.01).all(-1).sum())


def test_block_inputs_and_plots(digits_pair, tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb

    from spikingformer.analysis.audit import block_inputs
    from spikingformer.analysis.plots import (
        block_inputs_figure,
        energy_breakdown_figure,
        firing_rates_figure,
        plot_block_inputs,
        plot_energy_breakdown,
        plot_firing_rates,
    )

    (sf, x), _ = digits_pair
    record = record_activity(sf, x)
    report = energy_from_record(record)
    (b,) = block_inputs(record)
    assert b.layer == "blocks.0.attn.q.linear" and b.binary and b.firing_rate == record.layers[b.layer].mean
    # the figures draw the recorded numbers: one histogram bar per value, one bar per layer and per row
    q_in = record.layers["blocks.0.attn.q.linear"]
    ones = q_in.nonzero
    fig = block_inputs_figure(record)
    (ax,) = [a for a in fig.axes if a.patches]
    assert [p.get_height() for p in ax.patches] == [q_in.numel - ones, ones]
    assert f"fr: {ones / q_in.numel:.4f}" in ax.get_title()
    fig = firing_rates_figure(record)
    rates = [0.0 if s.firing_rate is None else s.firing_rate for s in record.layers.values()]  # all 0/1 or real
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx(rates, rel=1e-12)
    assert sum(r > 0 for r in rates) == len(rates) - 2  # only the image conv and the head read real values
    fig = energy_breakdown_figure(report)
    bars = fig.axes[0].patches
    assert [p.get_width() for p in bars] == pytest.approx([r.energy_pj * 1e-6 for r in report.rows], rel=1e-12)
    red = [r.name for r, p in zip(report.rows, bars) if p.get_facecolor()[:3] == to_rgb("tab:red")]
    assert red == ["tokenizer.stages.0.conv", "head.fc"]
    plt.close("all")
    # the PNGs hold those bars: a readable image of the figure's size with pixels of each bar colour
    paths = (plot_block_inputs(record, tmp_path / "a.png"), plot_firing_rates(record, tmp_path / "b.png"),
             plot_energy_breakdown(report, tmp_path / "c.png"))
    for path in paths:
        height, width, _ = matplotlib.image.imread(path).shape
        assert height >= 250 and width >= 300, path
        assert _bar_pixels(path, "tab:blue") > 1000, path  # bars, not just a legend patch
    assert _bar_pixels(paths[2], "tab:red") > 1000  # the two MAC rows (a legend patch has about 150)


# ----------------------------------------------------------------------------------------------
# ConvBN fusion


def test_fusion_matches_unfused_and_round_trips(digits_pair, tmp_path):
    (model, batches), _ = digits_pair
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():  # non-trivial BN statistics and affine parameters
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_var.mul_(1.3)
                m.bias.add_(0.05)
    fused = fuse_model(model)
    assert is_fused(fused) and not is_fused(model)
    assert all(m.bias is not None for m in fused.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    # compared in float64: folding changes the rounding, and a float32 spike could flip on some CPUs
    model64, x64 = copy.deepcopy(model).double(), batches[0].double()
    with torch.no_grad():
        dense, folded = model64(x64), fuse_model(model64)(x64)
    torch.testing.assert_close(folded, dense, rtol=0, atol=1e-9)
    path = save_fused(fused, tmp_path / "fused.pth", "spikingformer_digits")
    reloaded = model_from_checkpoint(path)
    with torch.no_grad():  # the same float32 computation before and after the round trip
        assert torch.equal(reloaded(batches[0]), fused(batches[0]))


# ----------------------------------------------------------------------------------------------
# Accumulate-only inference


def test_accumulate_conv2d_border_hand_count():
    weight = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    bias = torch.randn(2, dtype=torch.float64)
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = x[0, 0, 1, 1] = 1  # corner (4 taps), edge (6), centre (9)
    y, adds = accumulate_conv2d(x, weight, bias)
    torch.testing.assert_close(y, nn.functional.conv2d(x, weight, bias, padding=1))
    assert adds == (4 + 6 + 9) * 2  # measured; Eq. 18 would say 3 spikes x 9 taps x 2 = 54


def test_accumulate_conv2d_strided_matches_dense():
    torch.manual_seed(0)
    x = (torch.rand(2, 3, 7, 6) < 0.3).double()
    w, b = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y, _ = accumulate_conv2d(x, w, b, stride=(2, 2), padding=(1, 1))
    torch.testing.assert_close(y, nn.functional.conv2d(x, w, b, stride=2, padding=1))


@pytest.mark.parametrize("sparser", ["k", "v"])
def test_accumulate_attention_matches_dense_and_counts(sparser):
    torch.manual_seed(0)
    shape = (2, 3, 2, 5, 4)  # T, B, h, N, d
    rates = {"q": 0.4, "k": 0.2 if sparser == "k" else 0.5, "v": 0.5 if sparser == "k" else 0.2}
    q, k, v = ((torch.rand(shape) < rates[o]).double() for o in "qkv")
    y, adds = accumulate_attention(q, k, v)
    torch.testing.assert_close(y, q @ k.transpose(-2, -1) @ v)
    d = shape[-1]
    nnz = {o: int(t.count_nonzero()) for o, t in zip("qkv", (q, k, v))}
    assert adds == (min(nnz["k"], nnz["v"]) + nnz["q"]) * d


def test_accumulate_model_logits_and_measured_counts(digits_pair):
    (model, batches), _ = digits_pair
    model64, x64 = copy.deepcopy(model).double(), [x.double() for x in batches]
    acc = AccumulateModel(model64)
    with torch.no_grad():
        torch.testing.assert_close(acc(x64[0]), model64(x64[0]), rtol=0, atol=1e-4)
    report = energy_from_record(record_activity(model64, x64)).attach_measured(acc.counts)
    for r in report.rows:
        if r.counted_as == "MAC":
            continue
        assert r.measured_additions > 0, r.name
        if r.op in ("linear", "attention"):
            assert r.measured_additions == pytest.approx(r.estimate, rel=1e-12), r.name
        else:  # padded 3x3: border taps are not performed
            assert r.measured_additions < r.estimate, r.name
    stem = report.row("tokenizer.stages.0.conv")
    assert stem.measured_macs == stem.flops / model.config.time_steps  # computed once, counted T times
    assert acc.counts.layers["head.fc"].multiplies > 0  # the avgpool_fc head reads real values


# ----------------------------------------------------------------------------------------------
# Command line


def _run(argv: list[str]) -> int:
    from spikingformer.cli import main

    return main(argv)


def test_a_full_disk_under_the_analysis_outputs_is_one_line(tmp_path, capsys, full_disk):
    # audit's and energy's JSON and plots are written as checkpoints are (atomically, one line on a full disk)
    full_disk(100)
    for command in ("audit", "energy"):
        argv = [command, "--model", "spikingformer_digits", "--dataset", "random", "--batches", "1", "--batch-size", "2"]
        assert _run([*argv, "--output", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"spikingformer {command}: error: no space left on device while writing "
                       f"{tmp_path / command / (command + '.json')}; the previous file there (if any) is intact: free "
                       "some space and run the command again (training: add --resume auto)")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_cli_audit_strict(tmp_path, capsys):
    common = ["--dataset", "random", "--batches", "1", "--batch-size", "4"]
    assert _run(["audit", "--model", "spikingformer_digits", "--strict", "--output", str(tmp_path), *common]) == 0
    assert (tmp_path / "audit.json").is_file() and (tmp_path / "block_inputs.png").is_file()
    assert "strict audit: PASS" in capsys.readouterr().out
    assert _run(["audit", "--model", "spikformer_digits", "--strict", *common]) == 1
    err = capsys.readouterr().err
    assert all(f"blocks.0.attn.{o}.linear" in err for o in "qkv") and "blocks.0.mlp.fc1.linear" in err


def test_cli_energy_measured_and_compare(tmp_path, capsys):
    argv = ["energy", "--model", "spikingformer_digits", "--dataset", "random", "--batches", "1", "--batch-size", "4",
            "--measured", "--compare", "--output", str(tmp_path)]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "measured" in out and "energy ratio spikingformer_digits (untrained) / spikformer_digits (untrained)" in out
    assert "inputs: 4 images: synthetic (--dataset random, seed 0)" in out
    assert (tmp_path / "energy.json").is_file() and (tmp_path / "comparison.json").is_file()
    assert _run(["energy", "--paper-log", "spikingformer_8_512"]) == 0
    assert "7.4635" in capsys.readouterr().out
    assert _run(["energy", "--dataset", "random"]) == 2  # no model: a clear error, exit 2
    assert "--model" in capsys.readouterr().err


def test_cli_fuse(tmp_path, digits_pair):
    (model, batches), _ = digits_pair
    ckpt = tmp_path / "model.pth"
    torch.save({"format": "spikingformer-checkpoint", "version": 1, "model": model.state_dict(),
                "model_name": "spikingformer_digits", "model_config": model.config.to_dict()}, ckpt)
    out = tmp_path / "fused.pth"
    assert _run(["fuse", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    fused = model_from_checkpoint(out)  # the API's fusion, weight for weight (its numerics: test_fusion_matches_unfused...)
    expected = fuse_model(model).state_dict()
    assert fused.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in fused.state_dict().items())
    assert _run(["audit", "--checkpoint", str(out), "--dataset", "random", "--batches", "1", "--batch-size", "2"]) == 0
    assert _run(["fuse", "--checkpoint", str(tmp_path / "missing.pth"), "--output", str(out)]) == 2


@pytest.mark.parametrize("saved", ["fuse", "export"])
def test_fused_and_exported_files_analyse_their_training_data_as_eval_does(tmp_path, capsys, saved):
    # a file that records its training data set (not the digits) is analysed on it without --dataset
    write_cifar_folders(tmp_path / "cifar", per_class=1)
    model = create_model("spikingformer_cifar10_4_256", embed_dim=16, depth=1, num_heads=2, time_steps=1)
    config = {"data": {"dataset": "cifar10", "data_dir": str(tmp_path / "cifar")}}
    if saved == "fuse":
        path = save_fused(fuse_model(model), tmp_path / "m.pt", "spikingformer_cifar10_4_256", config)
    else:
        path = checkpoints.export_safetensors(model, tmp_path / "m.safetensors", "spikingformer_cifar10_4_256", config)
    capsys.readouterr()
    assert _run(["energy", "--checkpoint", str(path), "--output", str(tmp_path / "e")]) == 0, capsys.readouterr().err
    assert "inputs: 10 images: the whole cifar10 test split" in capsys.readouterr().out


def test_test_batches_are_read_one_at_a_time_on_every_pass():
    # the analysis commands pass over their inputs two or three times; a whole split (ImageNet's: 30 GB)
    # is never held: each pass reads the files again, and a batch is freed when the next one comes
    import gc
    import weakref

    from spikingformer.analysis.inputs import InputBatches

    reads: list[int] = []

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int):
            reads.append(i)
            return torch.full((1, 8, 8), float(i)), 0

    batches = InputBatches(Images(), 16, None, "x")
    assert (len(batches), batches.images, len(batches.first(2)), batches.first(2).images) == (3, 40, 2, 32)
    assert len(InputBatches(Images(), 16, 9)) == 3 and len(batches.first(9)) == 3
    held = []
    for x in batches:
        held.append(weakref.ref(x))
        del x
        gc.collect()
        assert sum(ref() is not None for ref in held) <= 1
    assert reads == list(range(40))
    assert [x[:, 0, 0, 0].tolist() for x in batches.first(2)] == [list(range(16)), list(range(16, 32))]
    assert reads == list(range(40)) + list(range(32))
    with pytest.raises(ValueError, match="the x split gave no samples"):
        InputBatches(torch.utils.data.TensorDataset(torch.zeros(0)), 4, None, "x")


class _Pids(torch.utils.data.Dataset):
    """Image i: the value i, and the process that read it."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        import os

        return torch.tensor([[[float(i), float(os.getpid())]]]), 0


def test_test_batches_are_read_by_the_workers_asked_for_in_order():
    import os

    from spikingformer.analysis.inputs import InputBatches

    for workers, main_process in ((0, True), (2, False)):
        batches = InputBatches(_Pids(), 4, None, "x", workers)
        for _ in range(2):  # every pass (calibration, recording, the accumulate-only run) reads again
            got = list(batches)
            assert [x[:, 0, 0, 0].tolist() for x in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
            pids = {int(p) for x in got for p in x[:, 0, 0, 1].tolist()}
            assert (pids == {os.getpid()}) == main_process, (workers, pids)
        assert [x[:, 0, 0, 0].tolist() for x in batches.first(1)] == [[0, 1, 2, 3]]


def test_more_workers_than_cpus_read_the_test_batches_with_one_per_cpu(monkeypatch):
    from spikingformer.analysis.inputs import InputBatches
    from spikingformer.data import workers

    monkeypatch.setattr(workers, "usable_cpus", lambda: 1)
    with pytest.warns(UserWarning, match="--workers 3 exceeds the 1 CPU"):
        assert [x.shape[0] for x in InputBatches(_Pids(), 4, 2, "x", 3)] == [4, 4]


def test_cli_energy_reads_the_data_set_with_workers_and_counts_alike(tmp_path, capsys):
    argv = ["energy", "--model", "spikingformer_digits", "--batches", "2", "--batch-size", "8", "--output"]
    assert _run([*argv, str(tmp_path / "w0"), "--workers", "0"]) == 0
    assert _run([*argv, str(tmp_path / "w2"), "--workers", "2"]) == 0
    assert "inputs: 16 images: the first 2 batch(es) of 8 of the digits test split" in capsys.readouterr().out
    read = [json.loads((tmp_path / w / "energy.json").read_text()) for w in ("w0", "w2")]
    assert read[0] == read[1] and read[0]["images"] == 16


def test_recording_leaves_every_modules_training_flag_as_it_was():
    # a training model with a frozen (eval-mode) BatchNorm keeps it frozen after an audit's recording
    torch.manual_seed(0)
    model = SpikingTransformer(ModelConfig(**TINY)).train()
    model.tokenizer.stages[0].bn.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    record_activity(model, [torch.randn(3, 1, 8, 8)])
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not model.tokenizer.stages[0].bn.training
