"""ONNX export (spikingformer.deploy.onnx_export, `spikingformer export --output NAME.onnx`): the graph
ONNX Runtime runs computes the model's spikes and logits, at any batch size, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FIXTURES, active_model, require
from spikingformer import checkpoints, create_model
from spikingformer.cli import main
from spikingformer.deploy.fuse import fuse_model
from spikingformer.deploy.onnx_export import example_input, export_onnx, plain_graph
from spikingformer.layers import routes
from spikingformer.neuron import MultiStepLIF

pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install 'spikingformer[onnx]'")
onnx = pytest.importorskip("onnx", reason="ONNX export needs onnx: pip install 'spikingformer[onnx]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="the exported graphs run on onnxruntime: pip install 'spikingformer[onnx]'")

EVENT_SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32, "time_steps": 2}


class WithSpikes(nn.Module):
    """The model's logits and every neuron's spikes, in call order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        spikes = []
        hooks = [m.register_forward_hook(lambda m, i, out: spikes.append(out))
                 for m in self.model.modules() if isinstance(m, MultiStepLIF)]
        try:
            logits = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        return (logits, *spikes)


def run_onnx(path, x: torch.Tensor) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {session.get_inputs()[0].name: x.numpy()})]


def model_under_test(kind: str) -> nn.Module:
    if kind == "event":
        model, _ = active_model("spikingformer_cifar10dvs_2_256", 4, **EVENT_SMALL)
    else:
        model, _ = active_model("spikformer_digits" if kind == "spikformer" else "spikingformer_digits")
    return fuse_model(model) if kind == "fused" else model


@pytest.mark.parametrize("kind", ["spikingformer", "fused", pytest.param("spikformer", marks=pytest.mark.slow),
                                  pytest.param("event", marks=pytest.mark.slow)])
def test_the_onnx_graph_computes_the_models_spikes_and_logits(tmp_path, kind):
    model = model_under_test(kind)
    x = example_input(model, batch_size=4, seed=3)
    export_onnx(WithSpikes(model), tmp_path / "m.onnx", example=x, check=False)
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    for batch in (4, 3):  # the batch dimension is free
        with plain_graph(model):  # the module calls, whose neurons' outputs the hooks see in their layout
            expected = WithSpikes(model)(x[:batch])
        got = run_onnx(tmp_path / "m.onnx", x[:batch])
        assert len(got) == len(expected) > 5
        spikes, want = torch.cat([g.flatten() for g in got[1:]]), torch.cat([e.flatten() for e in expected[1:]])
        assert set(spikes.unique().tolist()) <= {0.0, 1.0} and 0.01 < float(want.mean()) < 0.9
        flips = int((spikes != want).sum())  # a membrane within float32 rounding of the threshold
        assert flips <= max(2, 1e-4 * want.numel()), (kind, batch, flips, want.numel())
        if flips == 0:  # the same spikes: the same logits but for rounding
            torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-6)
        assert float(expected[0].abs().max()) > 1e-3


def test_export_leaves_the_model_its_mode_backends_and_routes(tmp_path, monkeypatch):
    model = create_model("spikingformer_digits", lif_backend="torch", depth=1, embed_dim=32, num_heads=2).train()
    model.tokenizer.stages[0].bn.eval()  # a frozen BatchNorm
    modes = {name: m.training for name, m in model.named_modules()}
    before = routes.active()
    check = export_onnx(model, tmp_path / "m.onnx")
    assert {name: m.training for name, m in model.named_modules()} == modes and routes.active() == before
    assert model.training and not model.tokenizer.stages[0].bn.training
    assert {m.backend for m in model.modules() if isinstance(m, MultiStepLIF)} == {"torch"}
    assert check.batch == 2 and check.same_predictions == 2 and check.max_abs_difference <= 1e-3 * check.output_scale
    one = example_input(model, batch_size=1)  # a batch of one traces too, and the batch stays free
    import importlib.util

    find_spec = importlib.util.find_spec  # without onnxruntime the file is written, not checked
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    assert export_onnx(model, tmp_path / "one.onnx", example=one) is None
    monkeypatch.undo()
    x = example_input(model, batch_size=3, seed=5)
    with plain_graph(model):
        torch.testing.assert_close(run_onnx(tmp_path / "one.onnx", x)[0], model(x), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"export a float32 model on the CPU \(model.float\(\).cpu\(\)\)"):
        export_onnx(model.double(), tmp_path / "d.onnx")
    with pytest.raises(ValueError, match="pass an example input"):
        export_onnx(nn.Linear(2, 2), tmp_path / "l.onnx")


def test_export_command_writes_an_onnx_file_of_a_checkpoint(tmp_path, capsys):
    model, _ = active_model("spikingformer_digits")
    source = checkpoints.export_safetensors(model, tmp_path / "m.safetensors", "spikingformer_digits")
    assert main(["export", "--checkpoint", str(source), "--output", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {tmp_path / 'm.onnx'} (the model's inference graph, batch size free, T = 4 unrolled)"
    assert out[1].startswith("ONNX Runtime on 2 example input(s): max |logit difference| ")
    x = example_input(model, batch_size=5, seed=7)
    with torch.no_grad():
        expected = model(x)
    assert run_onnx(tmp_path / "m.onnx", x)[0].argmax(1).tolist() == expected.argmax(1).tolist()
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape[1:]) for i in session.get_inputs()] == [("input", [1, 16, 16])]
    assert [(o.name, o.shape[1:]) for o in session.get_outputs()] == [("logits", [10])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.safetensors"]  # no temporary file left
    # at another number of time steps: the graph unrolls T = 2, as the model built for T = 2 computes
    assert main(["export", "--checkpoint", str(source), "--output", str(tmp_path / "t2.onnx"), "--time-steps", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 't2.onnx'} (the model's inference graph, batch size "
                                              "free, T = 2 unrolled)")
    at_two = create_model("spikingformer_digits", time_steps=2)
    at_two.load_state_dict(model.state_dict())
    with plain_graph(at_two):
        two, four = at_two(x), model(x)
    assert float((two - four).abs().max()) > 1e-3  # T changes what the model computes
    torch.testing.assert_close(run_onnx(tmp_path / "t2.onnx", x)[0], two, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fixture_name", [
    "spikingformer_dvs_tiny",
    *(pytest.param(name, marks=pytest.mark.slow) for name in ("spikingformer_cifar_tiny", "spikformer_cifar_tiny",
                                                               "spikingformer_imagenet_tiny", "spikformer_imagenet_tiny"))])
def test_onnx_runtime_gives_the_authors_golden_logits(tmp_path, fixture_name):
    """The authors' tiny models (their weights, inputs and logits, from their own code): the exported graph
    on ONNX Runtime in float32 gives their logits, its spikes those of the PyTorch model in float64."""
    from test_authors_keys import FIXTURE_MODELS, fixture_model

    from spikingformer import load_weights

    fixture = torch.load(require(FIXTURES / f"{fixture_name}.pt"), weights_only=False)
    container = {"model": fixture["state_dict"]} if "dvs" in fixture_name else {"state_dict": fixture["state_dict"]}
    model = load_weights(fixture_model(fixture, FIXTURE_MODELS[fixture_name]), container).eval()
    x = fixture["input"].float()
    export_onnx(WithSpikes(model), tmp_path / "m.onnx", example=x, check=False)
    got = run_onnx(tmp_path / "m.onnx", x)
    with plain_graph(model.double()):  # float64: no membrane on the other side of the threshold by rounding
        want = WithSpikes(model)(x.double())
    flips = sum(int((g != w.float()).sum()) for g, w in zip(got[1:], want[1:]))
    assert flips <= max(2, 1e-4 * sum(w.numel() for w in want[1:])), flips
    if flips == 0:
        torch.testing.assert_close(got[0].double(), fixture["logits"].double(), atol=1e-4, rtol=0)
    assert got[0].argmax(1).tolist() == fixture["logits"].argmax(1).tolist()


def test_eval_runs_an_exported_onnx_file_on_its_training_data(tmp_path, capsys):
    """``eval --checkpoint NAME.onnx``: the file records its model and training data, so eval finds the
    data set and scores the graph on ONNX Runtime as the checkpoint scores on PyTorch."""
    import json

    from conftest import write_cifar_folders

    write_cifar_folders(tmp_path / "cifar", per_class=2)
    model, _ = active_model("spikingformer_cifar10_4_256", 4, embed_dim=16, depth=1, num_heads=2, time_steps=2)
    config = {"data": {"dataset": "cifar10", "data_dir": str(tmp_path / "cifar")}}
    source = checkpoints.export_safetensors(model, tmp_path / "m.safetensors", "spikingformer_cifar10_4_256", config)
    assert main(["export", "--checkpoint", str(source), "--output", str(tmp_path / "m.onnx")]) == 0
    scores = {}
    for name in ("m.safetensors", "m.onnx"):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(tmp_path / name), "--output", str(tmp_path / f"{name}.json")]) == 0
        line = capsys.readouterr().out.splitlines()[0]
        assert line.startswith("spikingformer_cifar10_4_256 on cifar10 (20 images): top-1 ")
        assert line.endswith("(ONNX Runtime)") == (name == "m.onnx"), line
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    plain, graph = scores["m.safetensors"], scores["m.onnx"]
    assert graph["firing_rate"] is None and 0 < plain["firing_rate"] < 1
    assert (graph["samples"], graph["time_steps"], graph["dataset"]) == (20, 2, "cifar10")
    assert abs(graph["top1"] - plain["top1"]) <= 100 / 20 and graph["loss"] == pytest.approx(plain["loss"], abs=0.02)


def test_eval_of_an_onnx_file_refuses_what_the_graph_cannot_follow(tmp_path, capsys):
    model = create_model("spikingformer_digits", depth=1, embed_dim=32, num_heads=2)
    export_onnx(model, tmp_path / "m.onnx", model_name="spikingformer_digits", check=False)
    for extra, message in ((["--amp", "bf16"], "an ONNX file is evaluated in float32 on ONNX Runtime's CPU provider"),
                           (["--time-steps", "2"], f"{tmp_path / 'm.onnx'} holds the graph of T = 4 and its model's "
                                                   "configuration: export the checkpoint again with --time-steps"),
                           (["--model", "spikformer_digits"], f"{tmp_path / 'm.onnx'} holds the graph of a spikingformer_digits "
                                                             "model, not spikformer_digits; drop --model")):
        assert main(["eval", "--checkpoint", str(tmp_path / "m.onnx"), *extra]) == 2
        assert message in capsys.readouterr().err
    torch.onnx.export(nn.Linear(2, 2).eval(), (torch.zeros(1, 2),), str(tmp_path / "other.onnx"), dynamo=True, verbose=False)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    for name, message in (("other.onnx", "was not written by spikingformer export (it does not record its model)"),
                          ("junk.onnx", "is not a readable ONNX file"), ("gone.onnx", "ONNX file not found")):
        assert main(["eval", "--checkpoint", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
