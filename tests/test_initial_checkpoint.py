"""Fine-tuning: ``--initial-checkpoint`` copies another run's weights into a new run's model
(``spikingformer.models.initial``), checked against the strict loaders of the same files."""

from __future__ import annotations

import pytest
import torch

import spikingformer as sf
from spikingformer.checkpoints import export_safetensors, save_fused
from spikingformer.deploy.fuse import fuse_model
from spikingformer.models.initial import load_initial_weights
from test_authors_keys import authors_keys, random_state_dict


def _equal_except_head(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """The names of the tensors that differ between two models' state dicts (same names)."""
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]


def test_the_authors_cifar100_weights_start_a_cifar10_model_with_a_fresh_head(tmp_path):
    state = random_state_dict(authors_keys("sf_cifar", 4, 256, 3, 100))  # the authors' names, a 100-class head
    torch.save({"state_dict": state}, tmp_path / "authors.pth.tar")
    strict = sf.load_weights(sf.create_model("spikingformer_cifar100_4_256"), state)  # the strict loader's reading
    torch.manual_seed(0)
    model = sf.create_model("spikingformer_cifar10_4_256")
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    said = load_initial_weights(model, tmp_path / "authors.pth.tar")
    assert said == (f"initial weights from {tmp_path / 'authors.pth.tar'}; the head (head.fc.weight, head.fc.bias) "
                    "starts afresh: the file has 100 classes, this model 10")
    assert _equal_except_head(model, strict) == ["head.fc.weight", "head.fc.bias"]
    assert all(torch.equal(v, head[k]) for k, v in model.head.state_dict().items())  # its initialisation, untouched


def test_this_projects_checkpoint_and_export_start_a_model_with_other_time_steps(tmp_path):
    torch.manual_seed(1)
    trained = sf.create_model("spikingformer_digits")
    export_safetensors(trained, tmp_path / "m.safetensors", "spikingformer_digits")
    for time_steps in (4, 2):
        model = sf.create_model("spikingformer_digits", time_steps=time_steps)
        assert load_initial_weights(model, tmp_path / "m.safetensors") == f"initial weights from {tmp_path / 'm.safetensors'}"
        assert _equal_except_head(model, trained) == []


def test_another_architecture_or_a_fused_model_is_one_line(tmp_path):
    torch.manual_seed(2)
    other = sf.create_model("spikingformer_digits", embed_dim=32)
    export_safetensors(other, tmp_path / "small.safetensors", "spikingformer_digits")
    with pytest.raises(ValueError) as err:
        load_initial_weights(sf.create_model("spikingformer_digits"), tmp_path / "small.safetensors")
    assert str(err.value).startswith(f"--initial-checkpoint {tmp_path / 'small.safetensors'} holds another architecture (")
    assert str(err.value).endswith("the model and its arguments (--model-args) must match the file's, except the number of classes")
    save_fused(fuse_model(sf.create_model("spikingformer_digits").eval()), tmp_path / "fused.pt", "spikingformer_digits")
    with pytest.raises(ValueError, match="holds a fused model .*; start from the checkpoint it was fused from"):
        load_initial_weights(sf.create_model("spikingformer_digits"), tmp_path / "fused.pt")


def test_timm_pretrained_with_a_local_file_fine_tunes_as_initial_checkpoint_does(tmp_path):
    # timm's way to give local pretrained weights: pretrained=True, pretrained_cfg_overlay=dict(file=PATH);
    # with num_classes=N the head starts afresh, as timm does for fine-tuning
    import timm

    torch.manual_seed(3)
    trained = sf.create_model("spikingformer_digits")
    export_safetensors(trained, tmp_path / "m.safetensors", "spikingformer_digits")
    file = dict(file=str(tmp_path / "m.safetensors"))
    same = timm.create_model("spikingformer_digits", pretrained=True, pretrained_cfg_overlay=file)
    assert _equal_except_head(same, trained) == []
    torch.manual_seed(4)
    four = timm.create_model("spikingformer_digits", pretrained=True, num_classes=4, pretrained_cfg_overlay=file)
    torch.manual_seed(4)
    fresh = sf.create_model("spikingformer_digits", num_classes=4)
    assert _equal_except_head(four.head, fresh.head) == []  # the head: its own initialisation
    body = {k: v for k, v in four.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in body.items()) and len(body) > 50
    with pytest.raises(ValueError, match=r"^the pretrained file .*m\.safetensors holds another architecture \("):
        timm.create_model("spikingformer_digits", pretrained=True, embed_dim=32, pretrained_cfg_overlay=file)
    with pytest.raises(RuntimeError, match=r"no pretrained weights are bundled for spikingformer_digits .*"
                                           r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("spikingformer_digits", pretrained=True)
