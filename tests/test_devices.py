"""The run's device: the names --device takes, an Apple GPU (MPS), and what each device is given
(its autocast dtype, loss scaler and random generator). No Apple GPU is needed: where one is named,
PyTorch's answer to whether it is there is stood in; no tensor is put on it."""

from __future__ import annotations

import pytest
import torch

from spikingformer.cli import main
from spikingformer.engine import distributed, precision, resume

MPS = torch.device("mps")


@pytest.fixture
def apple_gpu(monkeypatch):
    """PyTorch reports an Apple GPU, and no CUDA GPU."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_mps_is_the_apple_gpu_and_auto_does_not_pick_it(apple_gpu):
    assert distributed.resolve_device("mps") == MPS
    assert distributed.resolve_device("auto") == torch.device("cpu")  # the CPU's fused kernels, unless mps is named
    with pytest.raises(ValueError, match=r"^unknown device 'metal'; valid: auto, cpu, mps, cuda, cuda:N$"):
        distributed.resolve_device("metal")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
@pytest.mark.parametrize("command", ["train", "eval"])
def test_mps_where_there_is_none_names_the_fix(tmp_path, capsys, monkeypatch, command):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = (["train", "--output", str(tmp_path)] if command == "train" else
            ["eval", "--checkpoint", str(_checkpoint(tmp_path))])
    assert main([*argv, "--device", "mps"]) == 2
    assert capsys.readouterr().err == (
        f"spikingformer {command}: error: --device mps was requested but PyTorch finds no Apple GPU here (MPS needs "
        "macOS on Apple silicon and a PyTorch built with MPS); use --device cpu or auto\n")
    assert list(tmp_path.iterdir()) == ([] if command == "train" else [tmp_path / "digits.pt"])  # before a run folder


def _checkpoint(tmp_path):
    from test_checkpoints import training_checkpoint

    training_checkpoint(tmp_path / "digits.pt")
    return tmp_path / "digits.pt"


def test_a_device_this_machine_lacks_is_said_once_per_machine(tmp_path, capsys, monkeypatch):
    # every process of a machine sees the same devices: LOCAL_RANK 0 says it, the others stay quiet
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for local_rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        monkeypatch.setenv("RANK", local_rank)
        for device in ("mps", "cuda"):
            assert main(["train", "--output", str(tmp_path), "--device", device]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"spikingformer train: error: --device {device} was requested but") if said else err == ""


def test_torchrun_on_the_apple_gpu_is_refused_before_a_process_group(apple_gpu, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match=r"^--device mps under torchrun: PyTorch's process groups .* use --device cpu "
                                         "under torchrun$") as raised:
        distributed.setup("mps")
    assert raised.value.alike_on_this_machine and not torch.distributed.is_initialized()


def test_the_apple_gpu_computes_in_float32_unless_asked(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda: True)  # a CPU with bf16 does not make the GPU's choice
    assert precision.autocast_dtype("auto", MPS) is None
    assert precision.autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16
    assert precision.autocast_dtype("bf16", MPS) is torch.bfloat16
    assert precision.autocast_dtype("fp16", MPS) is torch.float16  # refused on the CPU only


@pytest.mark.parametrize("dtype, device, scaled", [
    (torch.float16, "cuda", True), (torch.float16, "mps", True),
    (torch.bfloat16, "cuda", False), (torch.bfloat16, "mps", False), (torch.bfloat16, "cpu", False),
    (None, "cuda", False), (None, "mps", False), (None, "cpu", False),
])
def test_the_loss_is_scaled_for_float16_on_a_gpu_only(dtype, device, scaled, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else PyTorch's scaler turns itself off
    scaler = precision.grad_scaler(dtype, torch.device(device))
    assert scaler.is_enabled() == scaled
    loss = torch.tensor(3.0)
    assert float(scaler.scale(loss)) == (3.0 * 2.0**16 if scaled else 3.0)  # PyTorch's initial scale, 2^16


def test_a_resumed_run_continues_the_apple_gpus_generator(apple_gpu, monkeypatch):
    generator = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: generator.update(state=state.clone()))
    saved = resume.rng_state()
    assert torch.equal(saved["mps"], torch.tensor([1, 2, 3], dtype=torch.uint8))
    generator["state"] = torch.tensor([9], dtype=torch.uint8)  # the generator moved on after the save
    resume.set_rng_state(saved)
    assert torch.equal(generator["state"], torch.tensor([1, 2, 3], dtype=torch.uint8))

