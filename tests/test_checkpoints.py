"""Checkpoint files: safe reading with one-line errors, fused checkpoints that eval can use, and the
safetensors export read back by create_model, timm and eval."""

from __future__ import annotations

import os
import pickle

import pytest
import timm
import torch

import spikingformer as sf
from spikingformer import checkpoints
from spikingformer.cli import main
from spikingformer.config import TrainConfig
from spikingformer.models import model_config

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


def test_random_bytes_and_pickled_objects_are_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    assert main(["eval", "--checkpoint", str(junk), "--model", "spikingformer_digits", "--data", "digits"]) == 2
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
    assert main(["eval", "--checkpoint", str(path), "--model", "spikingformer_digits", "--data", "digits"]) == 2
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
    assert model.config == sf.checkpoints.model_from_checkpoint(run / "best-fused.pt").config


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
            checkpoints.model_from_checkpoint(out),
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
    fused = checkpoints.model_from_checkpoint(tmp_path / "best-fused.safetensors")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with pytest.raises(ValueError, match="holds a fused model"):
        sf.create_model("spikingformer_digits", checkpoint_path=str(tmp_path / "best-fused.safetensors"), **SMALL)
    assert main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--output", str(tmp_path / "m.pt")]) == 2
