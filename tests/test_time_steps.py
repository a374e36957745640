"""One number of time steps per run: ``time_steps`` (``--time-steps``) sets the model's T and the
frames of event data; checkpoints that recorded the former ``data.frames`` still evaluate."""

from __future__ import annotations

import pytest
import torch

import spikingformer as sf
from spikingformer import checkpoints
from spikingformer.config import ConfigError, TrainConfig, load_config
from spikingformer.engine import evaluation
from spikingformer.engine.trainer import build_model

TINY = {"embed_dim": 16, "num_heads": 2}


def test_time_steps_sets_the_model_and_defaults_to_it():
    digits = load_config("digits")  # static images, no time_steps in the recipe: the model's (zoo) value
    assert digits.data.time_steps == 4 and digits.model.model_args == {}
    two = load_config("digits", {"time_steps": 2})
    assert two.model.model_args == {"time_steps": 2} and build_model(two, 10).config.time_steps == 2
    dvs = load_config("digits_dvs")  # the recipe's 8 equals the zoo model's: nothing to override
    assert dvs.data.time_steps == 8 and dvs.model.model_args == {}
    four = load_config("digits_dvs", {"time_steps": 4})
    assert four.data.time_steps == 4 and build_model(four, 10).config.time_steps == 4
    via_model = load_config("digits", {"model_args": "{time_steps: 3}"})
    assert via_model.data.time_steps == 3
    same = load_config("digits", {"time_steps": 3, "model_args": "{time_steps: 3}"})
    assert same.model.model_args == {"time_steps": 3}


def test_two_different_time_steps_are_refused():
    with pytest.raises(ConfigError, match="time_steps is 2 but model_args sets time_steps 3; set the number of time "
                                          "steps once, with --time-steps"):
        load_config("digits", {"time_steps": 2, "model_args": "{time_steps: 3}"})


def _old_event_checkpoint(path, frames: int) -> None:
    """A checkpoint as this project wrote it before the rename: ``train_config.data.frames``, and a
    model whose own time_steps (8) differs from the frames it was trained on."""
    torch.manual_seed(0)
    model = sf.create_model("spikingformer_digits_dvs", **TINY).eval()
    cfg = TrainConfig()
    cfg.model.model, cfg.model.model_args = "spikingformer_digits_dvs", dict(TINY)
    recorded = cfg.to_dict()
    del recorded["data"]["time_steps"]
    recorded["data"].update(dataset="digits_dvs", frames=frames)
    torch.save({"format": checkpoints.FORMAT, "version": 1, "model": model.state_dict(), "model_name": "spikingformer_digits_dvs",
                "model_config": model.config.to_dict(), "train_config": recorded}, path)


def test_old_checkpoint_with_frames_evaluates_on_its_frames(tmp_path, monkeypatch, capsys):
    path = tmp_path / "old.pt"
    _old_event_checkpoint(path, frames=3)
    seen = []
    build = evaluation.build_dataset

    def recording(data, img_size, train):
        seen.append(data.time_steps)
        return build(data, img_size, train)

    monkeypatch.setattr(evaluation, "build_dataset", recording)
    result = evaluation.evaluate_checkpoint(path, device="cpu", batch_size=128)
    assert seen == [3] and result["dataset"] == "digits_dvs" and result["samples"] == 360  # 1797 - 1437 test digits
    from spikingformer.cli import main

    assert main(["eval", "--checkpoint", str(path), "--device", "cpu", "--batch-size", "128", "--frames", "2"]) == 0
    assert seen[-1] == 2 and "spikingformer_digits_dvs on digits_dvs (360 images)" in capsys.readouterr().out
    assert main(["energy", "--checkpoint", str(path), "--batches", "1"]) == 0  # reads the same recorded data section
    assert "inputs: 16 images: the first 1 batch(es) of 16 of the digits_dvs test split" in capsys.readouterr().out


def test_authors_style_checkpoint_without_data_uses_the_models_time_steps(tmp_path, monkeypatch):
    model = sf.create_model("spikingformer_digits_dvs", **TINY).eval()
    path = tmp_path / "plain.pt"
    torch.save({"format": checkpoints.FORMAT, "version": 1, "model": model.state_dict(), "model_name": "spikingformer_digits_dvs",
                "model_config": model.config.to_dict()}, path)
    seen = []
    build = evaluation.build_dataset
    monkeypatch.setattr(evaluation, "build_dataset", lambda d, s, train: seen.append(d.time_steps) or build(d, s, train))
    evaluation.evaluate_checkpoint(path, dataset="digits_dvs", device="cpu", batch_size=128)
    assert seen == [model.config.time_steps] == [8]
