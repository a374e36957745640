"""``spikingformer energy`` on trained models: --compare-checkpoint, labels, image counts,
--model-args, and the authors' checkpoints of every zoo size.

Expectations are independent of the command: the digits test split has 1797 - 1437 = 360 images;
the authors' golden fixtures give the logits their own code computed; energies are checked
against a direct recording of the same weights on the same inputs.
"""

from __future__ import annotations

import json

import pytest
import torch

import spikingformer as sf
from conftest import FIXTURES, require
from spikingformer.analysis.audit import record_activity
from spikingformer.analysis.commands import load_model
from spikingformer.analysis.energy import energy_from_record
from spikingformer.analysis.inputs import calibrate_batchnorm, dataset_batches, random_batches
from spikingformer.config import DataSection
from test_authors_keys import FIXTURE_MODELS, authors_keys, random_state_dict

DIGITS_TEST_IMAGES = 1797 - 1437  # scikit-learn's 1,797 digits minus the 1,437 training images


def _run(argv: list[str]) -> int:
    from spikingformer.cli import main

    return main(argv)


def _native_checkpoint(path, name: str, seed: int) -> torch.nn.Module:
    """A checkpoint in this project's format of a zoo model with seeded weights and BN statistics
    set on random inputs, recording the digits data set as its training data."""
    torch.manual_seed(seed)
    model = sf.create_model(name)
    calibrate_batchnorm(model, random_batches(model.config, 2, 16, seed=seed))
    torch.save({"format": "spikingformer-checkpoint", "version": 1, "model": model.state_dict(), "model_name": name,
                "model_config": model.config.to_dict(), "train_config": {"data": {"dataset": "digits"}}}, path)
    return model.eval()


def _energy_mj(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    return energy_from_record(record_activity(model, batches)).energy_mj


@pytest.mark.slow
def test_compare_checkpoint_uses_its_weights_on_the_whole_test_split(tmp_path, capsys):
    a, b = tmp_path / "spikingformer.pt", tmp_path / "spikformer.pt"
    model_a, model_b = _native_checkpoint(a, "spikingformer_digits", 1), _native_checkpoint(b, "spikformer_digits", 2)
    out = tmp_path / "out"
    assert _run(["energy", "--checkpoint", str(a), "--compare-checkpoint", str(b), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"inputs: {DIGITS_TEST_IMAGES} images: the whole digits test split" in text
    assert "spikingformer_digits (trained) / spikformer_digits (trained)" in text
    assert "warning" not in text
    result = json.loads((out / "comparison.json").read_text())
    assert result["images"] == DIGITS_TEST_IMAGES and result["trained"] == [True, True]
    assert result["sources"] == [f"trained weights from {a}", f"trained weights from {b}"]
    # the same numbers as recording each checkpoint's weights directly on all 360 test images
    batches = dataset_batches(model_a.config, DataSection(dataset="digits"), None, 16)  # the command's batches
    assert batches.images == sum(x.shape[0] for x in batches) == DIGITS_TEST_IMAGES
    expected = [_energy_mj(model_a, batches), _energy_mj(model_b, batches)]
    got = [t["energy_mj"] for t in result["totals"]]
    assert got == pytest.approx(expected, rel=1e-9)
    # an untrained Spikformer (BN calibrated on the inputs) fires differently: another number, and a warning
    assert _run(["energy", "--checkpoint", str(a), "--compare", "--batches", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "inputs: 32 images: the first 2 batch(es) of 16 of the digits test split" in text
    assert "spikingformer_digits (trained) / spikformer_digits (untrained)" in text
    assert "warning: spikformer_digits untrained" in text
    result = json.loads((out / "comparison.json").read_text())
    assert result["trained"] == [True, False] and result["images"] == 32
    assert result["sources"][1] == "untrained: random weights (seed 0), BatchNorm calibrated on 32 images"
    assert result["totals"][1]["energy_mj"] != pytest.approx(_energy_mj(model_b, batches.first(2)), rel=1e-3)


def test_compare_needs_a_counterpart_or_a_checkpoint(tmp_path, capsys):
    a = tmp_path / "a.pt"
    _native_checkpoint(a, "spikingformer_digits", 0)
    assert _run(["energy", "--checkpoint", str(a), "--compare-checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_model_args_parse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(["energy", "--model", "spikingformer_digits", "--model-args", "[1, 2]"])
    assert exit_.value.code == 2
    assert "expected a YAML mapping" in capsys.readouterr().err
    assert _run(["energy", "--model", "spikingformer_digits", "--model-args", "{embed_dims: 64}", "--dataset", "random"]) == 2
    assert "unknown model option(s) embed_dims" in capsys.readouterr().err


def _fixture_model_args(config: dict) -> str:
    return (f"{{embed_dim: {config['embed_dims']}, num_heads: {config['num_heads']}, depth: {config['depths']}, "
            f"img_size: {config['img_size_h']}, num_classes: {config['num_classes']}, time_steps: {config.get('T', 4)}}}")


@pytest.mark.parametrize("fixture_name", sorted(FIXTURE_MODELS))
def test_model_args_load_authors_checkpoints_outside_the_zoo(fixture_name, tmp_path, capsys):
    path = require(FIXTURES / f"{fixture_name}.pt")
    fixture = torch.load(path, weights_only=False)
    zoo_name, model_args = FIXTURE_MODELS[fixture_name], _fixture_model_args(fixture["config"])
    common = ["energy", "--model", zoo_name, "--checkpoint", str(path), "--dataset", "random", "--batches", "1",
              "--batch-size", "1"]
    assert _run(common) == 2  # the tiny model is no zoo size
    assert "shape mismatch" in capsys.readouterr().err
    assert _run([*common, "--model-args", model_args]) == 0
    assert f"{zoo_name}, trained weights from {path}; inputs: 1 images" in capsys.readouterr().out
    # the weights the command analyses reproduce the authors' own logits
    import yaml

    model = load_model(zoo_name, str(path), model_args=yaml.safe_load(model_args)).model
    with torch.no_grad():
        torch.testing.assert_close(model(fixture["input"]), fixture["logits"], atol=1e-4, rtol=0)


# (authors' naming scheme, input channels, classes) per zoo family; REFERENCE.md s.4
_SCHEMES = {
    ("spikingformer", "cifar"): "sf_cifar", ("spikingformer", "imagenet"): "sf_imagenet",
    ("spikingformer", "event"): "sf_imagenet", ("spikformer", "cifar"): "kf_cifar",
    ("spikformer", "imagenet"): "kf_imagenet", ("spikformer", "event"): "kf_dvs",
}
# every size of the zoo with the authors' weights (CIFAR-100 models are the CIFAR-10 sizes with another head)
AUTHORS_ZOO = [
    pytest.param(n, marks=[pytest.mark.slow] if sf.models.ZOO[n]["family"] == "imagenet" else [])
    for n in sf.list_models()
    if (sf.models.ZOO[n]["arch"], sf.models.ZOO[n]["family"]) in _SCHEMES
    and "cifar100" not in n and not n.endswith(("_digits_dvs", "_nmnist"))  # the last two: this project's sizes
]


@pytest.mark.parametrize("name", AUTHORS_ZOO)
def test_energy_on_authors_checkpoints_of_every_zoo_size(name, tmp_path, capsys):
    cfg = sf.models.ZOO[name]
    keys = authors_keys(_SCHEMES[cfg["arch"], cfg["family"]], cfg["depth"], cfg["embed_dim"], cfg["in_channels"],
                         cfg["num_classes"])
    state = random_state_dict(keys)
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}  # variances > 0
    path = tmp_path / "checkpoint-best.pth.tar"
    torch.save({"epoch": 1, "state_dict": state}, path)
    # the weights fit the zoo size as it is; a smaller input keeps the forward pass cheap
    small = "{time_steps: 2}" if cfg["family"] == "cifar" else "{img_size: 32, time_steps: 2}"
    argv = ["energy", "--model", name, "--checkpoint", str(path), "--model-args", small, "--dataset", "random",
            "--batches", "1", "--batch-size", "1", "--output", str(tmp_path)]
    assert _run(argv) == 0, capsys.readouterr().err
    assert f"{name}, trained weights from {path}; inputs: 1 images" in capsys.readouterr().out
    report = json.loads((tmp_path / "energy.json").read_text())
    assert report["model_name"] == name and report["images"] == 1
    # every tokenizer conv, q/k/v/proj, MLP layer of every block and the head is in the table
    assert len(report["rows"]) == 5 + cfg["depth"] * 7 + 1


def test_one_image_batches_of_static_models():
    """A batch of one image (a trailing test batch, or --batch-size 1) runs, and gives the logits of
    the same image inside a larger batch (float64, so no spike flips through rounding)."""
    torch.manual_seed(0)
    model = sf.create_model("spikingformer_digits").eval().double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-12)


def test_the_energy_line_after_training_names_the_images_its_rates_come_from(tmp_path, capsys):
    # training ends with the energy of two test batches (not the whole split): the line says how many images
    from spikingformer.config import load_config
    from spikingformer.engine.commands import _print_energy

    model = _native_checkpoint(tmp_path / "c.pt", "spikingformer_digits", 3)
    cfg = load_config("digits", {"eval_batch_size": 100})
    _print_energy(str(tmp_path / "c.pt"), cfg)
    line = capsys.readouterr().out.strip()
    batches = dataset_batches(model.config, cfg.data, 2, 100)
    assert batches.images == 200
    report = energy_from_record(record_activity(model, batches))
    assert line == (f"theoretical energy per image: {report.energy_mj:.3g} mJ  ({report.mac_g * 1e3:.3g} M MACs, "
                    f"{report.ac_g * 1e3:.3g} M ACs; Eq. 19-20 with firing rates measured on 200 test images)")
