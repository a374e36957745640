"""The ``spikingformer`` command line: light start-up, truthful help, no abbreviations, near misses."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from importlib import resources

import pytest
import yaml

from spikingformer.cli import build_parser, main
from spikingformer.config import SECTIONS, ConfigError, load_config
from test_checkpoints import training_checkpoint

HEAVY = ("torch", "timm", "torchvision", "matplotlib", "sklearn", "numpy")


def _python(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _imported_by(*args: str) -> tuple[int, set[str], str]:
    """(exit status, top-level modules imported, stderr) of ``python -m spikingformer ARGS``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "spikingformer", *args],
                          capture_output=True, text=True, timeout=300)
    modules = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)$", proc.stderr, re.M)}
    return proc.returncode, modules, proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["eval", "--help"], ["energy", "--help"],
                                  ["info", "--help"], ["train", "--epoch", "1"], ["trian"]])
def test_help_and_argument_errors_import_no_heavy_module(args):
    rc, modules, err = _imported_by(*args)
    assert rc == (0 if "--help" in args else 2), err[-2000:]
    assert modules  # -X importtime did report
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.slow
def test_import_is_light_and_timm_sees_the_zoo_when_imported_after():
    _python("import sys, spikingformer\n"
            f"assert not [m for m in {HEAVY!r} if m in sys.modules]\n"
            "import timm\n"
            "assert type(timm.create_model('spikingformer_digits')).__name__ == 'SpikingTransformer'\n"
            "assert type(spikingformer.create_model('spikformer_digits')).__name__ == 'SpikingTransformer'\n")


@pytest.mark.slow
def test_timm_imported_first_sees_the_zoo_and_registering_again_changes_nothing():
    _python("import warnings; warnings.simplefilter('error')\n"
            "import timm, spikingformer\n"
            "assert 'spikingformer_digits' in timm.list_models('spikingformer_*')\n"
            "spikingformer.register_with_timm()  # a second call changes nothing (timm would warn on re-registering)\n"
            "from spikingformer import create_model, MultiStepLIF\n"
            "assert spikingformer.models.ZOO and MultiStepLIF\n")


def _command(name: str):
    return build_parser().commands.choices[name].ensure_populated()


COMMANDS = sorted(build_parser().commands.choices)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_a_description(name):
    for action in _command(name)._actions:
        text = re.sub(r"\[[^]]*\]", "", action.help or "").strip()  # without "[digits recipe: 20]" / "[lif]" tags
        assert text, f"spikingformer {name} {'/'.join(action.option_strings) or action.dest} has no description"


def _help_lines(capsys, monkeypatch, *args: str) -> dict[str, str]:
    """``{--flag: help text}`` of ``spikingformer ARGS --help``, from the printed help."""
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option
    with pytest.raises(SystemExit) as done:
        main([*args, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "default: None" not in out and "built-in" not in out
    # "  --flag METAVAR   help", or "  --flag METAVAR" with the help on the next line
    entries = re.findall(r"^  (--[\w-]+)(?: \S+)?(?:  +|\n {3,})(\S.*)$", out, re.M)
    return dict(entries)


def _written(value, typ) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(float(value) if typ in ("float", "float | None") else value)


@pytest.mark.parametrize("recipe", ["digits", "cifar10", "nmnist"])
def test_train_help_shows_the_recipes_values(capsys, monkeypatch, recipe):
    lines = _help_lines(capsys, monkeypatch, "train", "--config", recipe)
    # the recipe's YAML file, read here; keys it leaves out keep the field defaults
    text = (resources.files("spikingformer") / "configs" / f"{recipe}.yaml").read_text()
    written = {key: value for section in yaml.safe_load(text).values() for key, value in section.items()}
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            value = written.get(f.name, default)
            flag = "--" + f.name.replace("_", "-")
            assert lines[flag].endswith(f"[{recipe} recipe: {_written(value, f.type)}]"), (flag, lines[flag])
    if recipe == "digits":  # the values the issue found misreported as the built-in 30 and 0.0005
        assert lines["--epochs"].endswith("[digits recipe: 20]") and lines["--lr"].endswith("[digits recipe: 0.003]")


def test_train_help_groups_options_like_timm(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    titles = re.findall(r"^(\S[^:\n]*) options:$", out, re.M)
    assert titles == ["model", "data", "augmentation and regularization", "optimizer", "learning-rate schedule", "run"]
    augmentation = out.split("augmentation and regularization options:")[1].split("optimizer options:")[0]
    for flag in ("--aa", "--reprob", "--hflip", "--mixup", "--cutmix", "--smoothing"):
        assert f"  {flag} " in augmentation


BASE_ARGS = {"eval": ["--checkpoint", "c.pt"], "fuse": ["--checkpoint", "c.pt", "--output", "f.pt"],
             "export": ["--checkpoint", "c.pt"]}


@pytest.mark.parametrize("name", COMMANDS)
def test_no_command_accepts_an_abbreviated_option(capsys, name):
    options = {s for action in _command(name)._actions for s in action.option_strings if s.startswith("--")}
    tried = 0
    for option in sorted(options):
        prefix = option[:-1]
        if len(prefix) < 4 or prefix in options:
            continue
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, *BASE_ARGS.get(name, []), prefix, "1"])
        assert done.value.code == 2
        assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err, (name, prefix)
        tried += 1
    assert tried, f"spikingformer {name} has no long option to abbreviate"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_names_data_and_outputs_as_train_does(name):
    shown = {s for a in _command(name)._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert not shown & {"--data", "--out"}, f"spikingformer {name}: train's names are --dataset and --output"


@pytest.mark.parametrize("command", [["eval", "--checkpoint", "c.pt"], ["audit"], ["energy"]])
def test_the_former_names_data_and_out_still_parse(command):
    parse = build_parser().parse_args
    assert parse([*command, "--data", "random"]) == parse([*command, "--dataset", "random"])
    if command[0] != "eval":
        assert parse([*command, "--out", "d"]) == parse([*command, "--output", "d"])


@pytest.mark.parametrize("name", COMMANDS)
def test_every_whole_number_option_has_a_lower_bound(name):
    # counts, sizes and seeds take at_least(n): "--batch-size 0" is an argument error, not a failure later
    loose = [a.option_strings[0] for a in _command(name)._actions if a.type is int]
    assert not loose, f"spikingformer {name}: {loose} take any int; use spikingformer.cli.at_least"


@pytest.mark.parametrize("args, message", [
    (["eval", "--checkpoint", "c.pt", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got '0'"),
    (["eval", "--checkpoint", "c.pt", "--time-steps", "0"], "argument --time-steps: expected a whole number >= 1, got '0'"),
    (["audit", "--batches", "0"], "argument --batches: expected a whole number >= 1, got '0'"),
    (["audit", "--batch-size", "-2"], "argument --batch-size: expected a whole number >= 1, got '-2'"),
    (["audit", "--max-values", "many"], "argument --max-values: expected a whole number >= 1, got 'many'"),
    (["energy", "--calibrate-bn", "-1"], "argument --calibrate-bn: expected a whole number >= 0, got '-1'"),
    (["energy", "--ssa-heads", "0"], "argument --ssa-heads: expected a whole number >= 1, got '0'"),
    (["energy", "--seed", "1.5"], "argument --seed: expected a whole number >= 0, got '1.5'"),
])
def test_a_count_out_of_range_is_an_argument_error(capsys, args, message):
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"spikingformer {args[0]}: error: {message}"


def test_models_with_a_pattern_that_matches_nothing_says_so(capsys):
    assert main(["models", "spikingformer_cifar10_4_38"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spikingformer models: error: no zoo model matches 'spikingformer_cifar10_4_38'; did you mean "
                          "'spikingformer_cifar10_4_384'")
    assert main(["models", "spikingformer_digits"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("spikingformer_digits ")


def test_models_prints_the_papers_parameter_counts(capsys):
    # counted on PyTorch's meta device (no weights allocated); the paper's Table 1/3 figures, our exact counts
    assert main(["models", "spikingformer_8_768"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["spikingformer_8_768", "66,338,632"]
    assert main(["models", "spikingformer_cifar10_*"]) == 0
    counts = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert counts == {"spikingformer_cifar10_2_384": "5,762,746", "spikingformer_cifar10_4_256": "4,152,106",
                      "spikingformer_cifar10_4_384": "9,320,122"}


def test_a_reader_that_leaves_early_ends_the_command_quietly():
    # `spikingformer models | head -1`: the pipe closes before the command writes; no BrokenPipeError traceback
    proc = subprocess.Popen([sys.executable, "-m", "spikingformer", "models", "spikingformer_digits"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 1 and err == "", err


@pytest.mark.parametrize("rank, said", [(None, True), ("0", True), ("1", False)])
def test_a_configuration_error_under_torchrun_is_said_once(tmp_path, capsys, monkeypatch, rank, said):
    # every process torchrun starts reads the same options and meets the same error: the first one says it
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert main(["train", "--epochs", "0", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("spikingformer train: error: config key 'epochs' must be >= 1; got 0\n" if said else "")


@pytest.mark.parametrize("local_rank, said", [(None, True), ("0", True), ("1", False)])
def test_a_data_set_error_is_said_once_per_machine(tmp_path, capsys, monkeypatch, local_rank, said):
    # the processes of one machine read the same folder: its first one (LOCAL_RANK 0) says what is
    # missing; on another machine of the job, which may lack the files, its own first one. An error
    # one process alone may meet (here: a checkpoint to evaluate not found) is said by each.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "1")  # not the job's first process either
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    argv = ["train", "--config", "cifar10", "--data-dir", str(tmp_path), "--output", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spikingformer train: error: cifar10 not found under {tmp_path}.") if said else err == ""
    training_checkpoint(tmp_path / "digits.pt")  # evaluated on a data set of other images: alike too
    assert main(["eval", "--checkpoint", str(tmp_path / "digits.pt"), "--dataset", "cifar10", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spikingformer eval: error: --dataset cifar10 gives 3-channel images") if said else err == ""
    monkeypatch.setenv("RANK", "0")  # a world of one's sampler takes rank 0 only; LOCAL_RANK decides below
    assert main(["train", "--output", str(tmp_path / "runs"), "--batch-size", "2048"]) == 2  # all the digits and more
    err = capsys.readouterr().err
    assert err == ("spikingformer train: error: batch size 2048 x 1 processes exceeds the 1437 training samples\n"
                   if said else "")
    monkeypatch.setenv("RANK", "1")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")  # the checkpoint to start from, or to resume
    for start in (["--initial-checkpoint", str(tmp_path / "garbage.pt")], ["--resume", str(tmp_path / "garbage.pt")]):
        assert main(["train", "--output", str(tmp_path / "runs"), *start]) == 2
        err = capsys.readouterr().err
        assert err.startswith("spikingformer train: error: ") and "garbage.pt" in err if said else err == ""
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "spikingformer eval: error: checkpoint not found" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_a_data_set_error_under_torchrun_is_one_line(tmp_path):
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "spikingformer", "train", "--config",
                           "cifar10", "--data-dir", str(tmp_path), "--output", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("spikingformer train: error:")]
    assert len(said) == 1 and "cifar10 not found under" in said[0], done.stderr[-3000:]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_a_diverging_run_under_torchrun_stops_every_process_with_one_line(tmp_path):
    # each process learns whether any process's loss failed: all stop at that step, the first says it
    from test_runs import TINY

    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "spikingformer", "train", "--output",
                           str(tmp_path), "--name", "d", *TINY, "--epochs", "4", "--lr", "1e9", "--workers", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    lines = [line.split("\r")[-1] for line in done.stderr.splitlines()]
    said = [line for line in lines if line.startswith("spikingformer train: error:")]
    assert len(said) == 1, done.stderr[-3000:]
    assert re.fullmatch(r"spikingformer train: error: training diverged: the loss became (nan|inf|-inf) on [12] of 2 "
                        r"processes at epoch \d+, step \d+ of \d+ \(learning rate [0-9.e+]+\); lower --lr or clip the "
                        r"gradient norm with --clip-grad \(e\.g\. 1\.0\)", said[0]), said[0]


def test_a_process_whose_own_loss_is_finite_stops_when_another_diverges(monkeypatch):
    import torch

    from spikingformer.engine import trainer
    from spikingformer.engine.distributed import Runtime

    peer = torch.tensor([float("inf"), 1.0], dtype=torch.float64)  # the other process: its loss failed
    monkeypatch.setattr(trainer, "all_reduce_sum", lambda state, runtime: state + peer)
    two = Runtime(torch.device("cpu"), rank=1, world_size=2)
    with pytest.raises(FloatingPointError, match=r"^training diverged: the loss became inf on 1 of 2 processes at step 3;"
                                                 r" lower --lr") as raised:
        trainer.stop_if_diverged(torch.tensor(0.5), two, "at step 3")
    assert raised.value.alike_everywhere
    monkeypatch.setattr(trainer, "all_reduce_sum", lambda state, runtime: state + torch.zeros_like(state))
    trainer.stop_if_diverged(torch.tensor(0.5), two, "at step 3")  # every loss finite: no error


@pytest.mark.parametrize("rank, said", [(None, True), ("0", True), ("1", False)])
def test_ctrl_c_under_torchrun_is_said_once(capsys, monkeypatch, rank, said):
    # the terminal interrupts every torchrun process; the first one speaks for all, each exits 130
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("spikingformer.engine.commands.run_models", interrupted)
    monkeypatch.delenv("RANK", raising=False)
    if rank is not None:
        monkeypatch.setenv("RANK", rank)
    assert main(["models"]) == 130
    assert capsys.readouterr().err == ("spikingformer models: interrupted\n" if said else "")


@pytest.mark.parametrize("args, hint", [
    (["train", "--epoch", "1"], "did you mean --epochs?"),
    (["train", "--learning-rate", "3e-3"], "did you mean --lr?"),
    (["train", "--warmup_lr=1e-4"], "did you mean --warmup-lr?"),
    (["train", "--num-epochs", "2", "--bach-size", "8"], "did you mean --epochs (for --num-epochs), --batch-size (for --bach-size)?"),
    (["eval", "--checkpoint", "c.pt", "--batchsize", "8"], "did you mean --batch-size?"),
    (["trian"], "invalid choice: 'trian'; did you mean 'train'?"),
    (["energy", "--integer-inputs", "acc_count"], "invalid choice: 'acc_count'; did you mean 'ac_count'?"),
])
def test_unknown_options_and_choices_name_the_closest(capsys, args, hint):
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(hint) or hint + " (choose from" in err, err


def test_unknown_recipe_suggests_the_closest_then_lists_all():
    with pytest.raises(ConfigError, match=r"unknown recipe 'digit'; did you mean 'digits' or 'digits_dvs'\? bundled recipes: cifar10, .*nmnist"):
        load_config("digit")


def test_train_with_an_unknown_recipe_is_one_line(capsys):
    assert main(["train", "--config", "cifar", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'cifar10' or 'cifar100'" in err


def test_train_with_an_unknown_model_suggests_the_closest_then_lists_all(capsys, tmp_path):
    assert main(["train", "--model", "spikingformer_digit", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'spikingformer_digit'; did you mean 'spikingformer_digits'" in err
    assert "available models: spikformer_8_384, " in err and "spikingformer_nmnist" in err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_missing_tensorboard_is_said_once(tmp_path, capsys, monkeypatch):
    from spikingformer.engine.trainer import RunLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    log = RunLog(tmp_path, use_tensorboard=True)
    log.write({"epoch": 0, "train_loss": 1.0})
    log.close()
    out = capsys.readouterr().out
    assert out.count("tensorboard is not installed") == 1 and "--tensorboard false" in out
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").exists()


def test_no_tensorboard_asked_says_nothing(tmp_path, capsys, monkeypatch):
    from spikingformer.engine.trainer import RunLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    RunLog(tmp_path, use_tensorboard=False).close()
    assert capsys.readouterr().out == ""


def _info(tmp_path, *args: str, **env: str) -> dict[str, str]:
    """``{label: value}`` of ``spikingformer info ARGS`` in a fresh process with ``env`` added and an
    empty kernel cache under ``tmp_path``."""
    full = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    proc = subprocess.run([sys.executable, "-m", "spikingformer", "info", *args], capture_output=True, text=True,
                          timeout=600, env=full)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(re.match(r"^([^:]+(?:\([^)]*\))?):\s+(.*)$", line).groups() for line in proc.stdout.splitlines())


def test_info_on_an_isa_no_rule_measured_points_to_the_route_study(tmp_path):
    """Where the routes' ISA key has no measured rule (PyTorch's kernels capped to their baseline here,
    as on an Arm CPU), ``info`` says no speed route is on and how to set them by measurement."""
    lines = _info(tmp_path, ATEN_CPU_CAPABILITY="default")
    assert lines["vector ISA"].startswith("other (") and "not measured, so no speed route is on" in lines["vector ISA"]
    assert "benchmarks/study_routes.py" in lines["vector ISA"] and "SPIKINGFORMER_ROUTES" in lines["vector ISA"]
    assert set(lines["routes on"].split(", ")) == {"stem_once", "recompute", "fused_bn_spike", "batch_pieces"}


def test_info_says_what_the_environment_chose(tmp_path):
    """``spikingformer info`` under an AVX2 cap and a route setting: the ISA key, bf16 emulated (so
    ``--amp auto`` stays float32), no int8 tiles, exactly the routes the setting leaves on, and a
    kernel library not built yet (``info`` alone does not build it)."""
    every = {"stem_once", "channels_last", "inplace_bn", "recompute", "fused_spike_pool", "fused_bn_spike",
             "token_linear", "spike_linear", "spike_conv", "attention_order", "fused_attention", "batch_pieces",
             "winograd"}
    lines = _info(tmp_path, SPIKINGFORMER_ROUTES="none,+spike_linear,+attention_order", ONEDNN_MAX_CPU_ISA="AVX2",
                  ATEN_CPU_CAPABILITY="avx2")
    assert lines["vector ISA"].startswith("avx2 (") and "ONEDNN_MAX_CPU_ISA=AVX2" in lines["vector ISA"]
    assert lines["bf16"].startswith("emulated") and "stays float32" in lines["bf16"]
    assert lines["int8 matrix tiles (AMX)"].startswith("no")
    assert lines["routes on"] == "spike_linear, attention_order"
    assert set(lines["routes off"].split(", ")) == every - {"spike_linear", "attention_order"}
    assert lines["SPIKINGFORMER_ROUTES"] == "none,+spike_linear,+attention_order"
    assert "not built yet" in lines["kernel library"]
    assert not list((tmp_path / "ext").glob("spikingformer_lif_cpu_*"))  # (the allocator's library is built)
    assert lines["spikingformer"].startswith(__import__("spikingformer").__version__ + " (torch ")


def test_info_says_whether_onnx_export_can_run(monkeypatch):
    import importlib.util
    from importlib import metadata

    from spikingformer.info import _onnx_line

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(metadata, "version", lambda name: "9.9")

    def without(*missing):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a))

    without()
    assert _onnx_line() == "available (onnx 9.9, onnxscript 9.9, onnxruntime 9.9); the written file is run once on ONNX Runtime to check it"
    without("onnxruntime")
    assert _onnx_line() == "available (onnx 9.9, onnxscript 9.9); onnxruntime missing, so the written file is not run to check it"
    without("onnxscript", "onnxruntime")
    assert _onnx_line() == "not available (onnxscript, onnxruntime missing): pip install 'spikingformer[onnx]'"


def test_info_bf16_line_says_what_the_spike_linear_does_in_bf16():
    from spikingformer.info import _bf16_line

    assert _bf16_line(False, None).startswith("emulated")
    assert "; spike_linear sums bf16 spikes up to a firing rate of 0.15;" in _bf16_line(True, 0.15)
    assert "keeps autocast's bf16 products" in _bf16_line(True, None)
    assert "route is off" in _bf16_line(True, 0.15, spike_linear_on=False)
    assert ("up to a firing rate of 0.15 (0.2 in layers with at least twice as many outputs as inputs);"
            in _bf16_line(True, 0.15, wide_limit=0.2))
    assert _bf16_line(True, 0.15, wide_limit=None) == _bf16_line(True, 0.15)


def test_info_bf16_line_says_what_the_spike_convolution_does_in_bf16():
    from spikingformer.info import _bf16_line

    conv = {"min_channels": 128, "train": 0.1, "infer": 0.12, "weight_grad": 0.1}
    assert _bf16_line(True, 0.15, conv=conv).endswith(
        "; spike_conv sums bf16 spike maps of 128 input channels or more up to 0.12 (training 0.1)")
    assert _bf16_line(True, 0.15).endswith("; spike_conv keeps autocast's bf16 convolutions")
    assert _bf16_line(True, 0.15, conv=conv, spike_conv_on=False).endswith("; the spike_conv route is off")
    assert ("; spike_linear sums bf16 spikes up to a firing rate of 0.15; winograd runs bf16 convolutions of 64 "
            "channels or more by F(2x2, 3x3); spike_conv sums" in _bf16_line(True, 0.15, conv=conv, winograd_channels=64))
    assert "winograd" not in _bf16_line(True, 0.15, conv=conv)


def test_info_bf16_line_names_this_cpus_spike_convolution_limits():
    from spikingformer.info import describe
    from spikingformer.layers import routes

    line = dict(describe())["bf16"]
    conv = routes.bf16_limit(routes.SPIKE_CONV_BF16)
    wino = routes._winograd_min_channels_bf16 if routes.enabled("winograd") else None
    assert (f"winograd runs bf16 convolutions of {wino} channels" in line) == (wino is not None and line.startswith("native"))
    if not line.startswith("native"):
        assert "spike_conv" not in line
    elif not routes.enabled("spike_conv"):
        assert line.endswith("the spike_conv route is off")
    elif conv is None:
        assert line.endswith("spike_conv keeps autocast's bf16 convolutions")
    else:
        assert line.endswith(f"up to {conv['infer']:g} (training {conv['train']:g})")


@pytest.mark.parametrize("rounding,reproduces,ready,expected", [
    ("fused", True, True, "computed in the fused kernels as PyTorch's kernel computes it (one rounding per multiply-add)"),
    ("unfused", True, True, "computed in the fused kernels as PyTorch's kernel computes it (two roundings per"),
    (None, False, True, "left to PyTorch's kernel (a rounding the probe does not recognise), which the fused kernels "
                        "cannot reproduce here"),
    ("fused", False, False, "PyTorch's kernel: one rounding per multiply-add; whether the fused kernels reproduce it")])
def test_info_says_whether_the_fused_kernels_compute_batch_norm(monkeypatch, rounding, reproduces, ready, expected):
    """A CPU whose BatchNorm the probe does not recognise (an AMD EPYC, Zen 5, until the inference terms
    were asked of PyTorch) runs the fused routes with BatchNorm as a separate call: info says so."""
    from spikingformer import info
    from spikingformer.kernels import cpu_backend

    monkeypatch.setattr(cpu_backend, "bn_rounding", lambda: rounding)
    monkeypatch.setattr(cpu_backend, "kernel_reproduces_bn", lambda: reproduces)
    assert info._batch_norm_line(ready).startswith(expected)


@pytest.mark.parametrize("mkl,generic,isa,expected,route", [
    (False, False, "avx512", "not in this PyTorch build", False),
    (True, True, "avx512", "generic code on this CPU, so", True),
    (True, True, "avx2", "generic code on this CPU, but", False),  # measured no faster on an AVX2-only Zen 3
    (True, False, "avx512", "its own code for this CPU", False)])
def test_info_mkl_line_names_the_products_code(monkeypatch, mkl, generic, isa, expected, route):
    """The MKL line of ``info``: a PyTorch without MKL (Arm's builds) is said to have none, not MKL's
    "own code"; with MKL, generic code (non-Intel x86: token_linear, and winograd's AVX-512 rule, on
    with AVX-512 only) or its own."""
    import torch

    from spikingformer import cpu_features, info
    from spikingformer.layers import routes

    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    monkeypatch.setattr(cpu_features, "mkl_generic", lambda: generic)
    monkeypatch.setattr(routes, "cpu_isa", lambda: isa)
    line = info._mkl_line()
    assert line.startswith(expected)
    assert ("is a default route" in line) == route
    # winograd follows the vendor with AVX-512 only (measured on AMD's CPUs): said where MKL is in the build
    assert ("winograd" in line) == (mkl and isa == "avx512"), line
    assert ("nor, with avx512, winograd" in line) == (mkl and not generic and isa == "avx512"), line


@pytest.mark.slow
def test_info_build_builds_the_kernel_library(tmp_path):
    lines = _info(tmp_path, "--build")
    assert "loaded in" in lines["kernel library"], lines
    assert lines["kernel library"].startswith("-march=native, ") and ", OpenMP: loaded in" in lines["kernel library"]
    path = lines["kernel library"].rsplit(" from ", 1)[1]
    assert path.startswith(str(tmp_path / "ext")) and os.path.exists(path)
    assert lines["LIF backends"].endswith("'auto' picks cpu")


def test_progress_bars_redraw_twice_a_second_on_a_terminal_and_once_a_minute_into_a_log(capsys, monkeypatch):
    import io

    from spikingformer.progress import progress

    with progress(range(3), desc="x") as bar:  # pytest's captured stderr: not a terminal
        assert bar.mininterval == 60 and list(bar) == [0, 1, 2]
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress(range(150), desc="epoch 1/1") as bar:
        for _ in bar:
            time.sleep(0.01)  # 1.5 s: three redraws at a terminal's rate
    assert log.getvalue().count("\r") <= 3  # drawn when it starts and cleared when it ends, nothing between
    monkeypatch.setattr(log, "isatty", lambda: True, raising=False)
    with progress(range(3), desc="x") as bar:
        assert bar.mininterval == 0.5


@pytest.mark.parametrize("caller", ["command", "script"])
def test_a_warning_beside_a_progress_bar_stands_on_its_own_line(caller, monkeypatch):
    """Under the command (its one-line format of the package's warnings) and in a script of one's own
    (Python's format): while a bar is drawn, a warning starts a line of its own; the format is
    restored when the outermost bar closes."""
    import io
    import warnings

    from spikingformer.cli import _default_formatwarning, _one_line_warning
    from spikingformer.progress import progress

    # (the command's main() leaves its format in place: the tests that call it in this process set it)
    monkeypatch.setattr(warnings, "formatwarning", _one_line_warning if caller == "command" else _default_formatwarning)
    plain = warnings.formatwarning

    def said() -> str:
        return warnings.formatwarning(UserWarning("spikingformer: x"), UserWarning, "f.py", 3)

    alone = said()
    assert alone == ("spikingformer: x\n" if caller == "command" else "f.py:3: UserWarning: spikingformer: x\n")
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress(range(3), desc="epoch 1/1"):
        assert said() == "\n" + alone  # a log: the bar's line ends first
        monkeypatch.setattr(log, "isatty", lambda: True, raising=False)
        with progress(range(3), desc="test"):
            assert said() == "\r\033[K" + alone  # a terminal: the bar's line is cleared, then redrawn
        assert said() == "\n" + alone
    assert warnings.formatwarning is plain and said() == alone
    with progress(range(3), desc="not drawn", disable=True):
        assert said() == alone
    with pytest.raises(RuntimeError), progress(range(3), desc="epoch 1/1"):
        raise RuntimeError("the block failed")
    assert warnings.formatwarning is plain


def test_a_warning_format_set_beside_a_progress_bar_is_kept(monkeypatch):
    import warnings

    from spikingformer.progress import progress

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)

    def own(message, category, filename, lineno, line=None):
        return f"mine: {message}\n"

    with progress(range(3), desc="epoch 1/1"):
        warnings.formatwarning = own
    assert warnings.formatwarning is own
