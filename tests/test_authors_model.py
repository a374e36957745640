"""The model benchmark's baseline is the authors' model: it must reproduce their code's outputs."""

from __future__ import annotations

import pytest
import torch

import authors_model
from bench_model import MODELS, build
from conftest import FIXTURES, require
from spikingformer.neuron import MultiStepLIF


def ours_neuron(tau: float, v_threshold: float) -> MultiStepLIF:
    return MultiStepLIF(tau=tau, v_threshold=v_threshold, detach_reset=True)


def _neurons():
    yield ours_neuron
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return
    yield authors_model.spikingjelly_neuron


FIXTURE_FAMILIES = {
    "spikingformer_cifar_tiny": ("cifar", 2.0),
    "spikingformer_imagenet_tiny": ("imagenet", 2.0),
    "spikingformer_dvs_tiny": ("event", 1.5),
}


@pytest.mark.parametrize("fixture_name", sorted(FIXTURE_FAMILIES))
def test_twin_reproduces_the_authors_logits(fixture_name):
    fixture = torch.load(require(FIXTURES / f"{fixture_name}.pt"), weights_only=False)
    c = fixture["config"]
    family, tau = FIXTURE_FAMILIES[fixture_name]
    for neuron in _neurons():
        model = authors_model.AuthorsSpikingformer(
            family, c["embed_dims"], c["num_heads"], c["depths"], c["num_classes"],
            in_channels=c["in_channels"], time_steps=c.get("T", 4), tau=tau, neuron=neuron,
        )
        model.load_state_dict(fixture["state_dict"], strict=True)  # the authors' exact key names
        with torch.no_grad():  # float64: no membrane lands on the other side of V_th by this CPU's rounding
            logits = model.double().eval()(fixture["input"].double())
        torch.testing.assert_close(logits, fixture["logits"].double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("key, overrides", [
    ("cifar", dict(embed_dim=64, num_heads=4, depth=1, batch=2)),
    ("event", dict(embed_dim=64, num_heads=4, depth=1, batch=2, time_steps=3, img_size=32)),
])
def test_benchmark_builds_share_weights_and_outputs(key, overrides):
    """``ours`` and the authors' build of the benchmark are the same function of the same weights
    (compared in float64: their layers round differently, and in float32 a spike may flip)."""
    name, batch = MODELS[key][:2]
    job = dict(name=name, batch=batch, overrides=overrides)
    ours, x, y = build(dict(job, build="ours"))
    authors, x2, y2 = build(dict(job, build="authors", authors_neuron="ours"))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    ours.double().train()
    authors.double().train()
    out_ours, out_authors = ours(x.double()), authors(x.double())
    torch.testing.assert_close(out_ours, out_authors, atol=1e-9, rtol=1e-9)
    out_ours.square().sum().backward()
    out_authors.square().sum().backward()
    g_ours = ours.tokenizer.stages[1].conv.weight.grad
    g_authors = authors.patch_embed.get_submodule(
        "block1_conv" if key == "cifar" else "proj1_conv").weight.grad
    torch.testing.assert_close(g_ours, g_authors, atol=1e-8, rtol=1e-7)


def test_twin_refuses_spikformer():
    from spikingformer.models.zoo import create_model

    with pytest.raises(ValueError, match="Spikingformer"):
        authors_model.from_zoo_config(create_model("spikformer_cifar10_4_384").config)
