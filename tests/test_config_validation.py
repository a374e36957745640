"""Every bad setting fails at start, in one line, before any data is read."""

from __future__ import annotations

import pytest

from spikingformer.cli import main
from spikingformer.config import FIELD_SECTION, ConfigError, TrainConfig, load_config, recipe_names
from spikingformer.config_rules import RULES
from spikingformer.engine import trainer


@pytest.fixture
def no_data(monkeypatch):
    """Reading data fails the test: validation must come first."""

    def read(*args, **kwargs):
        raise AssertionError("data was read before the configuration was validated")

    monkeypatch.setattr(trainer, "build_dataset", read)


BAD_FLAGS = [
    (["--eval-interval", "0"], "config key 'eval_interval' must be >= 1; got 0"),
    (["--epochs", "-3"], "config key 'epochs' must be >= 1; got -3"),
    (["--epochs", "true"], "config key 'epochs' expects int, got True"),
    (["--model-args", "{time_steps: four}"], "config key 'model_args.time_steps' expects int, got 'four'"),
    (["--model-args", "{time_steps: 0}"], "time_steps must be >= 1, got 0"),
    (["--model-args", "{embed_dim: 30}"], "model_args: embed_dim 30 is not divisible by num_heads 4"),
    (["--model-args", "{depht: 2}"], "unknown model_args key 'depht'; valid keys: arch, img_size"),
    (["--model-args", "[1, 2]"], "config key 'model_args' expects dict, got [1, 2]"),
    (["--lr", ".nan"], "config key 'lr' must be > 0; got nan"),
    (["--hflip", "1.5"], "config key 'hflip' must be in [0, 1]; got 1.5"),
    (["--smoothing", "1"], "config key 'smoothing' must be in [0, 1); got 1.0"),
    (["--scale", "[0.9, 0.1]"], "config key 'scale' must be two positive numbers [low, high] with low <= high"),
    (["--amp", "fp8"], "config key 'amp' must be one of auto, off, bf16, fp16; got 'fp8'"),
    (["--split-by", "count"], "config key 'split_by' must be one of number, time; got 'count'"),
    (["--batch-size", "0"], "config key 'batch_size' must be >= 1; got 0"),
    (["--workers", "-1"], "config key 'workers' must be >= 0; got -1"),
    (["--device", "gpu"], "config key 'device' must be auto, cpu, mps, cuda or cuda:N; got 'gpu'"),
    (["--dataset", "cifar11"], "unknown dataset 'cifar11'; did you mean 'cifar10' or 'cifar100'"),
    (["--dataset", "tonic:"], "unknown dataset 'tonic:'; valid datasets (or tonic:<Name> for tonic.datasets.<Name>): cifar10"),
    (["--dataset", "tonic:NMNIST"], "dataset 'tonic:NMNIST' is read from disk: pass its folder with --data-dir"),
    (["--dataset", "nmnist"], "dataset 'nmnist' is read from disk: pass its folder with --data-dir"),
    # a data set the model cannot take (the default recipe's model is the digits', 1-channel, 16x16): before
    # reading 50,000 images, not at the first batch
    (["--dataset", "cifar10", "--data-dir", "cifar"],
     "--dataset cifar10 gives 3-channel images, but the model spikingformer_digits takes 1-channel inputs; train with the "
     "data set's recipe, --config cifar10, or name a model for it with --model (`spikingformer models` lists them)"),
    (["--dataset", "digits_dvs"], "--dataset digits_dvs gives 2-channel event frames (ON and OFF polarities), but the model "
                                  "spikingformer_digits takes 1-channel inputs; train with the data set's recipe, --config digits_dvs"),
    (["--config", "cifar100", "--dataset", "digits"], "--dataset digits gives 1-channel images, but the model "
                                                      "spikingformer_cifar100_4_384 takes 3-channel inputs"),
    (["--dataset", "tonic:NMNIST", "--data-dir", "t"], "--dataset tonic:NMNIST gives 2-channel event frames (ON and OFF "
                                                       "polarities), but the model spikingformer_digits takes 1-channel "
                                                       "inputs; name a model for it with --model"),
    (["--dataset", "nmnist", "--data-dir", "n", "--model", "spikingformer_digits_dvs"],
     "--dataset nmnist gives 34x34 frames, larger than the 32x32 input of the model spikingformer_digits_dvs; train with "
     "the data set's recipe, --config nmnist, or set the model's input side: --model-args '{img_size: 48}'"),
    (["--mixup", "0.8", "--batch-size", "5"], "--batch-size 5 is odd, and mixup and CutMix pair a batch's images: pass "
                                              "an even --batch-size, or --mixup 0 --cutmix 0"),
    (["--opt", "adamz"], "unknown optimizer 'adamz'"),
    (["--sched", "cosin"], "config key 'sched' must be one of cosine, tanh"),
    (["--sched", "plateau"], "config key 'sched' must be one of cosine, tanh, step, multistep, poly, constant, wsd, rsqrt; got 'plateau'"),
    (["--sched", "rsqrt", "--warmup-epochs", "0"], "--sched rsqrt decays as 1 / sqrt(epoch / --warmup-epochs) after its warm-up"),
    (["--decay-milestones", "[30, 10]"], "config key 'decay_milestones' must be a rising list of positive whole epochs; got [30, 10]"),
    (["--decay-rate", "0"], "config key 'decay_rate' must be in (0, 1]; got 0.0"),
    (["--decay-epochs", "-1"], "config key 'decay_epochs' must be > 0; got -1.0"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_before_any_data(flags, message, no_data, tmp_path, capsys):
    assert main(["train", "--output", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not any(tmp_path.iterdir())  # nothing created either


BAD_RECIPES = {
    "list_section": ("data:\n  - batch_size\n", "config section 'data' must be a mapping of key: value lines, got a list"),
    "python_tag": ("run:\n  seed: !!python/object/apply:os.system ['touch pwned']\n",
                   "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system' "
                   "at line 2, column 9; only plain YAML is read (no !!python tags)"),
    "bool_epochs": ("schedule:\n  epochs: true\n", "config key 'epochs' expects int, got True"),
    "zero_interval": ("run:\n  eval_interval: 0\n", "config key 'eval_interval' must be >= 1; got 0"),
    "list_name": ("run:\n  name: [a, b]\n", "config key 'name' expects str or NoneType, got ['a', 'b']"),
    "syntax": ("run: [\n", "cannot parse config"),
    "misspelt_key": ("schedule:\n  epoch: 3\n", "unknown config key 'epoch' in section 'schedule'; did you mean 'epochs'? "
                     "valid keys: sched, epochs,"),
    "key_in_another_section": ("schedule:\n  lr: 0.001\n", "unknown config key 'lr' in section 'schedule'; 'lr' is a key of "
                               "section 'optim' (in a recipe: indented under 'optim:'); valid keys: sched,"),
    "flat_key": ("lr: 0.001\n", "unknown config section 'lr'; 'lr' is a key of section 'optim' (in a recipe: indented "
                 "under 'optim:'); valid sections: model, data, optim"),
    "misspelt_section": ("optimizer:\n  lr: 0.001\n", "unknown config section 'optimizer'; did you mean 'optim'? valid sections:"),
}


@pytest.mark.parametrize("name", sorted(BAD_RECIPES))
def test_bad_recipe_file_is_one_line(name, no_data, tmp_path, capsys):
    text, message = BAD_RECIPES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, key, value, message", [
    ("schedule", "epochs", 0, "config key 'epochs' must be >= 1; got 0"),
    ("run", "eval_interval", True, "config key 'eval_interval' expects int, got True"),
])
def test_train_validates_configs_built_in_code(no_data, section, key, value, message):
    cfg = TrainConfig()
    setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=message):
        trainer.train(cfg)


def test_every_field_has_a_rule():
    assert set(RULES) == set(FIELD_SECTION)


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_bundled_recipe_passes(recipe):
    load_config(recipe)  # validates


def test_model_args_are_converted_to_the_model_config_types():
    cfg = load_config("digits", {"model_args": "{time_steps: '2', mlp_ratio: 2}"})
    assert cfg.model.model_args == {"time_steps": 2, "mlp_ratio": 2.0}  # converted to ModelConfig's types


def test_former_name_frames_still_loads(tmp_path):
    """Recipes written before ``data.frames`` became ``data.time_steps`` load unchanged."""
    old = tmp_path / "old_dvs.yaml"
    old.write_text("model:\n  model: spikingformer_digits_dvs\ndata:\n  dataset: digits_dvs\n  frames: 4\n")
    cfg = load_config(str(old))
    assert cfg.data.time_steps == 4 and not hasattr(cfg.data, "frames")
    assert load_config("digits_dvs", {"frames": 6}).data.time_steps == 6  # the flat name, as --frames gives it
    # a static-image run's config.yaml recorded frames: 16 without effect: it stays without effect
    static = tmp_path / "old_digits_run.yaml"
    static.write_text("model:\n  model: spikingformer_digits\ndata:\n  dataset: digits\n  frames: 16\n")
    cfg = load_config(str(static))
    assert cfg.data.time_steps == 4 and cfg.model.model_args == {}  # the digits model's own T
    assert load_config(str(static), {"time_steps": 2}).model.model_args == {"time_steps": 2}
    assert load_config("digits", {"frames": 16}).data.time_steps == 4
    both = tmp_path / "both.yaml"
    both.write_text("data:\n  frames: 4\n  time_steps: 4\n")
    with pytest.raises(ConfigError, match="sets 'time_steps' twice, also under its former name 'frames'; keep 'time_steps' only"):
        load_config(str(both))


def test_frames_flag_is_read_as_time_steps_and_synonyms_are_suggested(capsys):
    from spikingformer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--frames", "4"]).time_steps == "4"
    assert parser.parse_args(["train", "--time-steps", "4"]).time_steps == "4"
    assert parser.parse_args(["eval", "--checkpoint", "c.pt", "--frames", "4"]).time_steps == 4
    for flag in ("--num-frames", "--timesteps"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["train", flag, "4"])
        assert "did you mean --time-steps?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--config", "digits_dvs", "--help"])
    shown = capsys.readouterr().out
    assert "--time-steps TIME_STEPS" in shown and "[digits_dvs recipe: 8]" in shown and "--frames" not in shown


@pytest.mark.parametrize("recipe", recipe_names())
def test_no_bundled_recipe_sets_what_its_data_set_does_not_read(recipe):
    from spikingformer.data import model_mismatch, unread_settings
    from spikingformer.models import model_config

    cfg = load_config(recipe)
    assert unread_settings(cfg.data) is None
    m = model_config(cfg.model.model, **cfg.model.model_args)
    assert model_mismatch(cfg.data.dataset, cfg.model.model, m.in_channels, m.img_size) is None  # and its model takes its data


@pytest.mark.parametrize("recipe, overrides, said", [
    ("digits_dvs", {"aa": "rand-m9-n1-mstd0.4-inc1", "reprob": 0.25, "cache_dir": "/tmp/x"},
     "digits_dvs does not read --aa, --reprob (for cifar10, cifar100, imagenet) or --cache-dir (for nmnist, "
     "cifar10_dvs, dvs128_gesture); they have no effect in this run"),
    ("cifar10", {"augment": True},
     "cifar10 does not read --augment (for digits, digits_dvs, nmnist, cifar10_dvs, dvs128_gesture, tonic:<Name>); "
     "it has no effect in this run"),
    ("cifar10", {"dataset": "digits"},  # the CIFAR recipe's image transform, for the digits
     "digits does not read --aa, --reprob, --mean, --std (for cifar10, cifar100, imagenet); they "
     "have no effect in this run"),
    ("nmnist", {"split_by": "time", "cache_dir": "/tmp/x", "hflip": 0.0},
     "nmnist does not read --hflip (for cifar10, cifar100, imagenet); it has no effect in this run"),
])
def test_settings_a_data_set_does_not_read_are_named(recipe, overrides, said):
    # valid settings that cannot do what they say in this run: one warning line (the run goes on)
    from spikingformer.data import unread_settings

    assert unread_settings(load_config(recipe, overrides).data) == "spikingformer: " + said


def test_validate_and_rules_are_still_read_from_config():
    # their home before config_rules.py: scripts that import them from there keep working
    import spikingformer.config as config
    import spikingformer.config_rules as config_rules

    assert config.validate is config_rules.validate and config.RULES is config_rules.RULES
    with pytest.raises(AttributeError, match="has no attribute 'validat'"):
        config.validat  # noqa: B018
