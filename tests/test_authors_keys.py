"""Loading the authors' checkpoints: golden logits, every naming scheme, containers, strict key checks, timm;
the translation of their key names is applied by the builder, never by the model itself."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch

import spikingformer as sf
from conftest import FIXTURES, require
from spikingformer.models import CheckpointKeyError, authors_to_native

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def authors_keys(scheme: str, depth: int, d: int, in_ch: int, classes: int) -> dict[str, tuple]:
    """Key names and shapes of the authors' state dicts, written out from REFERENCE.md s.4."""
    keys: dict[str, tuple] = {}
    chans = [in_ch, d // 8, d // 4, d // 2, d, d]
    if scheme == "sf_cifar":
        tok = [f"block{i}" for i in range(5)]
        tok_conv, tok_bn = [f"{t}_conv" for t in tok], [f"{t}_bn" for t in tok]
    elif scheme == "sf_imagenet":
        tok_conv = ["proj_conv"] + [f"proj{i}_conv" for i in range(1, 5)]
        tok_bn = ["proj_bn"] + [f"proj{i}_bn" for i in range(1, 5)]
    else:  # Spikformer names (also the Spikingformer 8-512 energy-log model)
        tok_conv = ["proj_conv", "proj_conv1", "proj_conv2", "proj_conv3", "rpe_conv"]
        tok_bn = ["proj_bn", "proj_bn1", "proj_bn2", "proj_bn3", "rpe_bn"]
    for i in range(5):
        keys[f"patch_embed.{tok_conv[i]}.weight"] = (chans[i + 1], chans[i], 3, 3)
        for s in BN:
            keys[f"patch_embed.{tok_bn[i]}.{s}"] = () if s == "num_batches_tracked" else (chans[i + 1],)
    for b in range(depth):
        p = f"block.{b}"
        for norm in ("norm1", "norm2"):
            keys[f"{p}.{norm}.weight"] = keys[f"{p}.{norm}.bias"] = (d,)
        linear = scheme == "kf_cifar"
        for n in ("q", "k", "v", "proj"):
            layer = f"{p}.attn.{n}_{'linear' if linear else 'conv'}"
            keys[f"{layer}.weight"] = (d, d) if linear else (d, d, 1)
            if linear or n == "proj":
                keys[f"{layer}.bias"] = (d,)
            for s in BN:
                keys[f"{p}.attn.{n}_bn.{s}"] = () if s == "num_batches_tracked" else (d,)
        for j, (o, i_) in enumerate([(4 * d, d), (d, 4 * d)], start=1):
            if scheme.startswith("sf_"):
                name, bn, tail = f"mlp.mlp{j}_conv", f"mlp.mlp{j}_bn", (1, 1)
            else:
                kind = "linear" if linear else "conv"
                name, bn, tail = f"mlp.fc{j}_{kind}", f"mlp.fc{j}_bn", {"kf_cifar": (), "kf_dvs": (1,)}.get(scheme, (1, 1))
            keys[f"{p}.{name}.weight"] = (o, i_, *tail)
            keys[f"{p}.{name}.bias"] = (o,)
            for s in BN:
                keys[f"{p}.{bn}.{s}"] = () if s == "num_batches_tracked" else (o,)
    keys["head.weight"], keys["head.bias"] = (classes, d), (classes,)
    if scheme == "kf_dvs":
        keys["pos_embed"] = (1, 64, d)
        keys["norm.weight"] = keys["norm.bias"] = (d,)
    return keys


def random_state_dict(keys: dict[str, tuple]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.tensor(3) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g) for k, s in keys.items()}


CASES = [
    # (zoo model, scheme, depth, dim, in_channels, classes, number of the authors' keys from REFERENCE.md)
    ("spikingformer_cifar10_4_384", "sf_cifar", 4, 384, 3, 10, 204),
    ("spikingformer_8_512", "sf_imagenet", 8, 512, 3, 1000, 376),
    ("spikingformer_8_512", "kf_imagenet", 8, 512, 3, 1000, 376),  # 8-512 energy-log naming
    ("spikingformer_cifar10dvs_2_256", "sf_imagenet", 2, 256, 2, 10, 118),
    ("spikformer_cifar10_4_384", "kf_cifar", 4, 384, 3, 10, 216),
    ("spikformer_8_512", "kf_imagenet", 8, 512, 3, 1000, 376),
    ("spikformer_cifar10dvs_2_256", "kf_dvs", 2, 256, 2, 10, 121),
]


@pytest.mark.parametrize("name,scheme,depth,dim,in_ch,classes,n_keys", CASES)
def test_every_naming_scheme_loads_strictly(name, scheme, depth, dim, in_ch, classes, n_keys):
    keys = authors_keys(scheme, depth, dim, in_ch, classes)
    assert len(keys) == n_keys
    state = random_state_dict(keys)
    model = sf.create_model(name)
    sf.load_weights(model, state)
    mine = model.state_dict()
    last = depth - 1
    fc2 = f"block.{last}.mlp.{'mlp2_conv' if scheme.startswith('sf_') else 'fc2_' + ('linear' if scheme == 'kf_cifar' else 'conv')}.weight"
    assert torch.equal(mine[f"blocks.{last}.mlp.fc2.linear.weight"], state[fc2].reshape(dim, 4 * dim))
    q = f"block.0.attn.q_{'linear' if scheme == 'kf_cifar' else 'conv'}.weight"
    assert torch.equal(mine["blocks.0.attn.q.linear.weight"], state[q].reshape(dim, dim))
    stem = {"sf_cifar": "block0_conv"}.get(scheme, "proj_conv")
    assert torch.equal(mine["tokenizer.stages.0.conv.weight"], state[f"patch_embed.{stem}.weight"])
    last_tok = {"sf_cifar": "block4_bn", "sf_imagenet": "proj4_bn"}.get(scheme, "rpe_bn")
    assert torch.equal(mine["tokenizer.stages.4.bn.running_var"], state[f"patch_embed.{last_tok}.running_var"])
    assert torch.equal(mine["head.fc.bias"], state["head.bias"])


def test_missing_unexpected_and_misshapen_keys_are_named():
    keys = authors_keys("sf_cifar", 4, 384, 3, 10)
    model = sf.create_model("spikingformer_cifar10_4_384")
    state = random_state_dict(keys)
    del state["block.2.attn.k_bn.running_mean"]
    state["block.1.attn.qkv_conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        sf.load_weights(model, state)
    msg = str(err.value)
    assert "unexpected keys in checkpoint: block.1.attn.qkv_conv.weight" in msg
    assert "model keys missing from checkpoint: blocks.2.attn.k.bn.running_mean" in msg
    state = random_state_dict(authors_keys("sf_cifar", 4, 256, 3, 10))
    with pytest.raises(CheckpointKeyError, match=r"shape mismatch for patch_embed.block0_conv.weight: checkpoint has \(32, 3, 3, 3\), model expects \(48, 3, 3, 3\)"):
        authors_to_native(state, model)
    # the wrong depth: the checkpoint's extra blocks are named
    state = random_state_dict(authors_keys("sf_imagenet", 8, 512, 3, 1000))
    with pytest.raises(CheckpointKeyError, match="unexpected keys in checkpoint: block.2."):
        sf.load_weights(sf.create_model("spikingformer_8_512", depth=2), state)


FIXTURE_MODELS = {
    "spikingformer_cifar_tiny": "spikingformer_cifar10_4_256",
    "spikingformer_imagenet_tiny": "spikingformer_8_384",
    "spikingformer_dvs_tiny": "spikingformer_cifar10dvs_2_256",
    "spikformer_cifar_tiny": "spikformer_cifar10_4_256",
    "spikformer_imagenet_tiny": "spikformer_8_384",
}


def fixture_model(fixture: dict, zoo_name: str) -> sf.SpikingTransformer:
    c = fixture["config"]
    overrides = dict(
        embed_dim=c["embed_dims"], num_heads=c["num_heads"], depth=c["depths"], img_size=c["img_size_h"],
        num_classes=c["num_classes"], time_steps=c.get("T", 4),
    )
    return sf.create_model(zoo_name, **overrides)


@pytest.mark.parametrize("fixture_name", sorted(FIXTURE_MODELS))
def test_golden_logits_of_the_authors_models(fixture_name):
    fixture = torch.load(require(FIXTURES / f"{fixture_name}.pt"), weights_only=False)
    model = fixture_model(fixture, FIXTURE_MODELS[fixture_name]).eval()
    container = {"model": fixture["state_dict"]} if "dvs" in fixture_name else {"state_dict": fixture["state_dict"]}
    sf.load_weights(model, container)
    with torch.no_grad():  # float64: no membrane lands on the other side of V_th by this CPU's rounding
        logits = model.double()(fixture["input"].double())
    torch.testing.assert_close(logits, fixture["logits"].double(), atol=1e-4, rtol=0)


def test_checkpoint_containers_and_timm(tmp_path):
    keys = authors_keys("sf_imagenet", 2, 256, 2, 11)
    state = random_state_dict(keys)
    timm_file = tmp_path / "checkpoint-100.pth.tar"  # timm CheckpointSaver layout, pickled Namespace
    torch.save({"epoch": 100, "arch": "Spikingformer", "state_dict": state, "optimizer": {}, "version": 2,
                "args": argparse.Namespace(lr=1e-3, model="Spikingformer"), "metric": 97.0}, timm_file)
    dvs_file = tmp_path / "checkpoint_max_test_acc1.pth"  # authors' DVS layout
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3, "max_test_acc1": 0.5}, dvs_file)
    expected = sf.create_model("spikingformer_dvs128_2_256", checkpoint_path=str(timm_file)).state_dict()
    for path in (timm_file, dvs_file):
        for model in (
            sf.create_model("spikingformer_dvs128_2_256", checkpoint_path=str(path)),
            timm.create_model("spikingformer_dvs128_2_256", checkpoint_path=str(path)),
        ):
            for k, v in model.state_dict().items():
                assert torch.equal(v, expected[k]), k
    assert torch.equal(expected["head.fc.weight"], state["head.weight"])
    with pytest.raises(RuntimeError, match="no pretrained weights are bundled.*checkpoint_path"):
        timm.create_model("spikingformer_8_512", pretrained=True)
    assert "spikformer_8_768" in timm.list_models("spik*")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        sf.create_model("spikingformer_8_512", checkpoint_path=str(tmp_path / "nope.pth"))


def test_native_state_dict_round_trip(tmp_path):
    model = sf.create_model("spikingformer_digits")
    path = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, path)
    again = sf.create_model("spikingformer_digits", checkpoint_path=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_the_model_itself_takes_only_its_own_key_names(tmp_path):
    """The translation is the builder's (load_weights, create_model and timm's checkpoint_path, model_from_checkpoint),
    applied openly: ``model.load_state_dict`` of an authors' state dict is torch's plain strict error."""
    state = random_state_dict(authors_keys("sf_cifar", 4, 256, 3, 10))
    model = sf.create_model("spikingformer_cifar10_4_256")
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(state)
    path = tmp_path / "authors.pth"
    torch.save({"state_dict": state}, path)
    expected = authors_to_native(state, model)
    for loaded in (sf.load_weights(model, str(path)), sf.models.model_from_checkpoint(path, "spikingformer_cifar10_4_256")):
        assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(expected["blocks.0.attn.q.linear.weight"], state["block.0.attn.q_conv.weight"].reshape(256, 256))
