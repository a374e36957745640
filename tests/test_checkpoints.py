"""Checkpoint files: every format read once into one view, the training-state schema, safe reading with
one-line errors, fused checkpoints that eval can use, and the safetensors export read back by
create_model, timm and eval."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import timm
import torch

import spikingformer as sf
from spikingformer import checkpoints
from spikingformer.cli import main
from spikingformer.config import TrainConfig
from spikingformer.deploy.fuse import fuse_model
from spikingformer.models import model_config, model_from_checkpoint

SMALL = {"embed_dim": 16, "num_heads": 2, "time_steps": 2}


def training_checkpoint(path, **overrides):
    """A training checkpoint as ``spikingformer train`` writes it, of a small digits model."""
    torch.manual_seed(0)
    model = sf.create_model("spikingformer_digits", **{**SMALL, **overrides}).eval()
    cfg = TrainConfig()
    cfg.model.model_args = dict(SMALL, **overrides)
    state = {"format": checkpoints.FORMAT, "version": 1, "model": model.state_dict(), "model_name": "spikingformer_digits",
             "model_config": model.config.to_dict(), "epoch": 0, "metrics": {"epoch": 0}, "best": {"top1": 0.0, "epoch": 0},
             "train_config": cfg.to_dict()}
    checkpoints.save_atomic(state, path)
    return model


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_missing_checkpoint_or_a_folder_is_one_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "gone.pt")]) == 2
    assert one_line_error(capsys) == f"spikingformer eval: error: checkpoint not found: {tmp_path / 'gone.pt'}"
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2  # a run folder given for its best.pt
    assert one_line_error(capsys) == f"spikingformer eval: error: {tmp_path} is a folder, not a checkpoint file"
    torch.save({}, tmp_path / "best.pt")
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert one_line_error(capsys) == f"spikingformer eval: error: {tmp_path} is a folder, not a checkpoint file; pass {tmp_path / 'best.pt'}"


def test_random_bytes_and_pickled_objects_are_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    assert main(["eval", "--checkpoint", str(junk), "--model", "spikingformer_digits", "--dataset", "digits"]) == 2
    err = one_line_error(capsys)
    assert f"cannot read checkpoint {junk}: it is not a PyTorch checkpoint, or it is damaged or truncated" in err
    assert "weights_only" not in err  # PyTorch's advice to unpickle anything is not relayed
    truncated = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    with pytest.raises(checkpoints.CheckpointError, match="damaged or truncated"):
        checkpoints.load_checkpoint(truncated)
    objects = tmp_path / "objects.pt"
    torch.save({"model": {"w": torch.ones(2)}, "hook": pickle.Pickler}, objects)
    with pytest.raises(checkpoints.CheckpointError, match=r"holds pickled Python objects besides tensors and plain data "
                       r"\(pickle.Pickler\); they are never loaded"):
        checkpoints.load_checkpoint(objects)


def test_corrupt_safetensors_is_one_line(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(256))
    assert main(["eval", "--checkpoint", str(path), "--model", "spikingformer_digits", "--dataset", "digits"]) == 2
    assert f"cannot read {path}: not a valid safetensors file (" in one_line_error(capsys)


def test_weights_not_matching_the_recorded_config_are_one_line(tmp_path, capsys):
    path = tmp_path / "best.pt"
    training_checkpoint(path)
    state = checkpoints.load_checkpoint(path)
    state["model_config"] = model_config("spikingformer_digits", embed_dim=32, num_heads=2).to_dict()
    checkpoints.save_atomic(state, path)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = one_line_error(capsys)
    assert f"{path}: its weights do not match the model it records (shape (file vs model): " in err
    assert "(2, 1, 3, 3) vs (4, 1, 3, 3)" in err  # the first tokenizer conv: embed_dim / 8 channels


def test_timm_checkpoint_path_holding_a_list_is_one_line(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2), 3], path)
    for create in (sf.create_model, timm.create_model):
        with pytest.raises(ValueError, match=f"^{path}: no state dict found in checkpoint") as err:
            create("spikingformer_digits", checkpoint_path=str(path))
        assert "\n" not in str(err.value)


def test_fuse_keeps_the_data_record_and_writes_beside_its_source(tmp_path, capsys):
    run = tmp_path / "run"
    model = training_checkpoint(run / "best.pt")
    before = (run / "best.pt").read_bytes()
    assert main(["fuse", "--checkpoint", str(run / "best.pt"), "--output", str(run / "best.pt")]) == 2
    assert "is the checkpoint being fused; writing there would drop the optimizer state" in one_line_error(capsys)
    assert (run / "best.pt").read_bytes() == before
    assert main(["fuse", "--checkpoint", str(run / "best.pt")]) == 0
    assert f"wrote {run / 'best-fused.pt'}" in capsys.readouterr().out
    fused = checkpoints.load_checkpoint(run / "best-fused.pt")
    assert fused["train_config"]["data"]["dataset"] == "digits"
    assert main(["eval", "--checkpoint", str(run / "best-fused.pt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("spikingformer_digits on digits (360 images): top-1 ")
    # the fused model scores what the unfused one does, within a few flipped decisions
    from spikingformer.engine import evaluate_checkpoint

    plain = evaluate_checkpoint(run / "best.pt", device="cpu")
    again = evaluate_checkpoint(run / "best-fused.pt", device="cpu")
    assert abs(plain["top1"] - again["top1"]) <= 3 * 100 / 360
    assert model.config == model_from_checkpoint(run / "best-fused.pt").config
    # a fused checkpoint has nothing left to fold: said, and no second copy written
    capsys.readouterr()
    assert main(["fuse", "--checkpoint", str(run / "best-fused.pt")]) == 2
    assert one_line_error(capsys) == (f"spikingformer fuse: error: {run / 'best-fused.pt'} is already fused (it has no "
                                      "BatchNorm left to fold); use it as it is")
    assert not (run / "best-fused-fused.pt").exists()


def test_export_safetensors_reads_back_to_the_same_logits(tmp_path, capsys):
    from safetensors import safe_open

    model = training_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--output", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "spikingformer-safetensors" and meta["model_name"] == "spikingformer_digits"
    assert '"embed_dim": 16' in meta["model_config"] and meta["fused"] == "false"
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        for loaded in (
            sf.create_model("spikingformer_digits", checkpoint_path=str(out), **SMALL),
            timm.create_model("spikingformer_digits", checkpoint_path=str(out), **SMALL),
            model_from_checkpoint(out),
        ):
            assert torch.equal(loaded.eval()(x), expected)
    # a model built with another configuration is refused, naming the differing fields
    with pytest.raises(ValueError, match=r"holds a model with another configuration \(embed_dim: 16 in the file, 64 here"):
        timm.create_model("spikingformer_digits", checkpoint_path=str(out))
    # eval finds the data set in the metadata, and scores what the .pt scores
    assert main(["eval", "--checkpoint", str(out), "--device", "cpu"]) == 0
    from_export = capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu"]) == 0
    assert from_export == capsys.readouterr().out
    # a fused export rebuilds fused; the default name is beside the source
    assert main(["fuse", "--checkpoint", str(tmp_path / "best.pt")]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "best-fused.pt")]) == 0
    fused = model_from_checkpoint(tmp_path / "best-fused.safetensors")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with pytest.raises(ValueError, match="holds a fused model"):
        sf.create_model("spikingformer_digits", checkpoint_path=str(tmp_path / "best-fused.safetensors"), **SMALL)
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--output", str(tmp_path / "m.pt")]) == 2


def test_every_format_reads_into_one_view(tmp_path):
    """read() dispatches each format once: what it describes, its weights, and the training state."""
    model = sf.create_model("spikingformer_digits", **SMALL).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 1, 16, 16)).sum().backward()
    optimizer.step()
    cfg = TrainConfig()
    state = checkpoints.TrainingState(epoch=3, metrics={"epoch": 3, "test_top1": 50.0}, best={"top1": 60.0, "top5": 90.0, "epoch": 2},
                                      optimizer=optimizer.state_dict(), scheduler={"last_epoch": 4}, scaler={}, rng={"torch": torch.get_rng_state()})
    written = checkpoints.training_checkpoint(model, "spikingformer_digits", cfg.to_dict(), state)
    # the on-disk layout of a training checkpoint (docs/architecture.md, Checkpoints)
    assert sorted(written) == sorted(["format", "version", "model", "model_name", "model_config", "train_config", "optimizer",
                                      "scheduler", "scaler", "epoch", "metrics", "best", "rng"])
    assert written["format"] == "spikingformer-checkpoint" and written["epoch"] == 3 and written["best"]["epoch"] == 2
    checkpoints.save_atomic(written, tmp_path / "last.pt")
    checkpoints.save_fused(fuse_model(model), tmp_path / "fused.pt", "spikingformer_digits", cfg.to_dict())
    checkpoints.export_safetensors(model, tmp_path / "model.safetensors", "spikingformer_digits")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "timm.pth.tar")

    last = checkpoints.read(tmp_path / "last.pt")
    assert (last.kind, last.describes_model, last.fused, last.model_name) == (checkpoints.FORMAT, True, False, "spikingformer_digits")
    assert last.recorded_data["dataset"] == "digits" and last.model_config["embed_dim"] == 16
    assert (last.training.epoch, last.training.best, last.training.scheduler) == (3, state.best, {"last_epoch": 4})
    momentum = last.training.optimizer["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, optimizer.state_dict()["state"][0]["momentum_buffer"])
    fused = checkpoints.read(tmp_path / "fused.pt")
    assert (fused.kind, fused.fused, fused.training, fused.recorded_data["dataset"]) == (checkpoints.FUSED_FORMAT, True, None, "digits")
    export = checkpoints.read(tmp_path / "model.safetensors")
    assert (export.kind, export.fused, export.model_name, export.recorded_data) == (checkpoints.EXPORT_FORMAT, False,
                                                                                   "spikingformer_digits", None)
    timm_file = checkpoints.read(tmp_path / "timm.pth.tar")
    assert (timm_file.kind, timm_file.describes_model, timm_file.model_name) == (checkpoints.WEIGHTS, False, None)
    for ckpt in (last, export, timm_file):  # the same weights in every container (the DDP prefix stripped)
        assert ckpt.state_dict.keys() == model.state_dict().keys()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in ckpt.state_dict.items())


def test_a_checkpoint_of_a_later_format_version_asks_for_an_upgrade(tmp_path, capsys):
    # a file written by a later release may change the layout: refused in one line, not misread
    model = sf.create_model("spikingformer_digits", **SMALL)
    state = checkpoints.TrainingState(epoch=0, metrics={}, best={"top1": -1.0, "epoch": -1}, optimizer={}, scheduler={},
                                      scaler={}, rng={})
    written = checkpoints.training_checkpoint(model, "spikingformer_digits", TrainConfig().to_dict(), state)
    assert written["version"] == checkpoints.VERSION == 1
    checkpoints.save_atomic({**written, "version": 2}, tmp_path / "later.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "later.pt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"spikingformer eval: error: {tmp_path / 'later.pt'} was written by a later spikingformer (spikingformer-checkpoint "
        "version 2; this release reads version 1): upgrade spikingformer to read it")
    checkpoints.export_safetensors(model, tmp_path / "m.safetensors", "spikingformer_digits")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert metadata["version"] == "1" and checkpoints.read(tmp_path / "m.safetensors").kind == checkpoints.EXPORT_FORMAT
    save_file(tensors, str(tmp_path / "later.safetensors"), metadata={**metadata, "version": "2"})
    with pytest.raises(checkpoints.CheckpointError, match="was written by a later spikingformer .spikingformer-safetensors version 2"):
        checkpoints.read(tmp_path / "later.safetensors")


def test_each_command_reads_its_checkpoint_once(tmp_path, monkeypatch, capsys):
    training_checkpoint(tmp_path / "best.pt")
    reads = []
    real = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: reads.append(str(path)) or real(path))
    source = str(tmp_path / "best.pt")
    commands = [["eval", "--checkpoint", source, "--device", "cpu"], ["fuse", "--checkpoint", source],
                ["export", "--checkpoint", source],
                ["energy", "--checkpoint", source, "--dataset", "random", "--batches", "1", "--batch-size", "1"]]
    for argv in commands:
        reads.clear()
        assert main(argv) == 0, capsys.readouterr().err
        assert reads == [source], argv


def test_bare_state_dict_of_another_size_is_one_line(tmp_path, capsys):
    """A state dict that does not fit the named model is one line naming the tensors, not torch's error list."""
    path = tmp_path / "weights.pt"
    torch.save(sf.create_model("spikingformer_digits", **SMALL).state_dict(), path)
    with pytest.raises(checkpoints.CheckpointError) as err:
        sf.create_model("spikingformer_digits", checkpoint_path=str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: its weights do not match this model (shape (file vs model): ")
    assert "tokenizer.stages.0.conv.weight (2, 1, 3, 3) vs (8, 1, 3, 3)" in message and "\n" not in message
    assert main(["eval", "--checkpoint", str(path), "--model", "spikingformer_digits", "--dataset", "digits"]) == 2
    assert "its weights do not match this model" in one_line_error(capsys)


def _digits_scores(model: torch.nn.Module) -> tuple[float, float]:
    """Top-1 (%) and mean cross-entropy of ``model`` on the digits test split, computed here in one batch."""
    from spikingformer.config import DataSection
    from spikingformer.data import build_dataset

    data = build_dataset(DataSection(dataset="digits"), model.config.img_size, train=False)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    with torch.no_grad():
        logits = model.eval()(x.to(next(model.parameters()).dtype)).double()
    return 100 * float((logits.argmax(1) == y).double().mean()), float(torch.nn.functional.cross_entropy(logits, y))


def _eval_scores(capsys, *argv: str) -> tuple[float, float]:
    assert main(["eval", *argv, "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    return float(line.split("top-1 ")[1].split("%")[0]), float(line.split("loss ")[1].split()[0])


def test_eval_at_other_time_steps_evaluates_the_model_at_them(tmp_path, capsys):
    # `--time-steps` was read for event frames only: a static model kept its own T, silently
    from spikingformer.analysis.inputs import calibrate_batchnorm, dataset_batches
    from spikingformer.config import DataSection

    model = training_checkpoint(tmp_path / "best.pt")
    calibrate_batchnorm(model, dataset_batches(model.config, DataSection(dataset="digits"), 2, 64))  # so that it fires
    state = checkpoints.load_checkpoint(tmp_path / "best.pt")
    checkpoints.save_atomic({**state, "model": model.state_dict()}, tmp_path / "best.pt")
    expected = {}
    for steps in (1, 2, 8):  # the checkpoint's own T is 2
        at_steps = sf.create_model("spikingformer_digits", **{**SMALL, "time_steps": steps})
        at_steps.load_state_dict(model.state_dict())
        expected[steps] = _digits_scores(at_steps.double())
    for steps in (1, 8):
        top1, loss = _eval_scores(capsys, "--checkpoint", str(tmp_path / "best.pt"), "--time-steps", str(steps))
        assert abs(top1 - expected[steps][0]) <= 2 * 100 / 360 and loss == pytest.approx(expected[steps][1], abs=1e-3)
    assert abs(expected[1][1] - expected[2][1]) > 3e-3  # T changes what the model computes: ignoring it fails above
    # a sweep over T, each result kept as JSON
    out = tmp_path / "sweep" / "T8.json"
    out.parent.mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--time-steps", "8", "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")
    record = json.loads(out.read_text())
    assert (record["time_steps"], record["samples"], record["checkpoint"], record["dataset"]) == (8, 360, str(tmp_path / "best.pt"), "digits")
    assert record["loss"] == pytest.approx(expected[8][1], abs=1e-3) and set(record) >= {"top1", "top5", "firing_rate", "model"}
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--time-steps", "2", "--model-args", "{time_steps: 3}"]) == 2
    assert "--time-steps 2 and --model-args time_steps 3 differ" in one_line_error(capsys)


def test_eval_takes_model_args_for_weights_of_a_size_outside_the_zoo(tmp_path, capsys):
    torch.manual_seed(3)
    model = sf.create_model("spikingformer_digits", embed_dim=32)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pth.tar")  # no model description
    argv = ["--checkpoint", str(tmp_path / "plain.pth.tar"), "--model", "spikingformer_digits", "--dataset", "digits"]
    assert main(["eval", *argv]) == 2
    assert "do not match this model" in one_line_error(capsys)
    top1, loss = _eval_scores(capsys, *argv, "--model-args", "{embed_dim: 32}")
    expected_top1, expected_loss = _digits_scores(model.double())
    assert abs(top1 - expected_top1) <= 2 * 100 / 360 and loss == pytest.approx(expected_loss, abs=0.01)
    # export takes them too: the weights and the size they were built for, described in the file
    out = tmp_path / "plain.safetensors"
    assert main(["export", *argv[:4], "--output", str(out), "--model-args", "{embed_dim: 32}"]) == 0
    assert model_from_checkpoint(out).config.embed_dim == 32


def test_eval_reads_with_the_workers_asked_for_else_the_training_runs(tmp_path, capsys, monkeypatch):
    from spikingformer.engine import evaluation

    training_checkpoint(tmp_path / "best.pt")
    state = checkpoints.load_checkpoint(tmp_path / "best.pt")
    state["train_config"]["data"]["workers"] = 2  # as the training run recorded it
    checkpoints.save_atomic(state, tmp_path / "best.pt")
    results = {}
    for argv in ([], ["--workers", "0"]):
        out = tmp_path / f"eval{len(argv)}.json"
        assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu", "--output", str(out), *argv]) == 0
        results[len(argv)] = json.loads(out.read_text())
    assert results[0] == results[2]  # two workers and none score alike
    asked = []
    real = evaluation.make_loader
    monkeypatch.setattr(evaluation, "make_loader", lambda *a: asked.append(a[4]) or real(*a))
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu"]) == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "best.pt"), "--device", "cpu", "--workers", "1"]) == 0
    assert asked == [2, 1]


def test_onnx_export_without_its_packages_and_bad_export_options_say_what_to_do(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err.strip() == (
        "spikingformer export: error: ONNX export needs the onnxscript package: pip install 'spikingformer[onnx]' "
        "(onnx, onnxscript and onnxruntime, which checks the file)")
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "m.pb")]) == 2
    assert "must end in .safetensors (weights) or .onnx (the model's graph)" in capsys.readouterr().err
    argv = ["export", "--checkpoint", str(tmp_path / "missing.pt"), "--output", str(tmp_path / "m.safetensors")]
    assert main([*argv, "--time-steps", "2"]) == 2
    assert "--time-steps sets the T an .onnx graph unrolls; the weights do not depend on it" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_onnx_file_given_as_a_checkpoint_says_what_it_is(tmp_path, capsys):
    # eval runs an exported graph; the commands that need weights say so, not "damaged, download again"
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    for command in (["energy"], ["fuse"], ["export"], ["audit"]):
        assert main([*command, "--checkpoint", str(tmp_path / "m.onnx")]) == 2
        assert one_line_error(capsys).endswith(
            f"{tmp_path / 'm.onnx'} is an ONNX graph (spikingformer export), not a checkpoint: `spikingformer eval` runs "
            "it on ONNX Runtime; the other commands and create_model need the checkpoint it was exported from")
    with pytest.raises(checkpoints.CheckpointError, match="is an ONNX graph"):
        sf.create_model("spikingformer_digits", checkpoint_path=str(tmp_path / "m.onnx"))
