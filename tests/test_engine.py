"""The training engine end to end on the embedded digits: accuracy, reload, resume, atomic writes, torchrun, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spikingformer import checkpoints
from spikingformer.cli import main
from spikingformer.config import ConfigError, load_config
from spikingformer.engine import evaluate_checkpoint

TINY = ["--model-args", "{embed_dim: 32, num_heads: 2}", "--batch-size", "64", "--amp", "off", "--tensorboard", "false"]


def train(tmp_path: Path, name: str, *extra: str) -> Path:
    assert main(["train", "--output", str(tmp_path), "--name", name, *TINY, *extra]) == 0
    return tmp_path / name


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_then_eval_reloads_same_result(tmp_path, capsys):
    folder = train(tmp_path, "e2e", "--epochs", "4", "--warmup-epochs", "0")
    rows = metrics(folder)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["test_top1"] > 50.0  # chance is 10%
    out = capsys.readouterr().out
    assert "final test top-1" in out and f"checkpoint: {folder / 'best.pt'}" in out
    best = max(rows, key=lambda r: r["test_top1"])
    # the training's evaluation batch (180): another batch size may round differently and flip a spike
    again = evaluate_checkpoint(folder / "best.pt", device="cpu", batch_size=180)
    assert again["samples"] == 360
    assert again["top1"] == pytest.approx(best["test_top1"], abs=1e-9)
    assert main(["eval", "--checkpoint", str(folder / "last.pt"), "--device", "cpu", "--batch-size", "180"]) == 0
    assert f"top-1 {rows[-1]['test_top1']:.2f}%" in capsys.readouterr().out
    assert (folder / "metrics.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")


def cli_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "spikingformer", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_epoch(path: Path, epoch: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and checkpoints.load_checkpoint(path)["epoch"] >= epoch:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stdout.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint for epoch {epoch} after {timeout} s")


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    common = ["--epochs", "3", "--warmup-epochs", "1", "--augment", "true", "--seed", "7"]
    straight = train(tmp_path, "straight", *common)
    # the same run, killed with SIGKILL during its second epoch, then resumed
    proc = cli_process("train", "--output", str(tmp_path), "--name", "killed", *TINY, *common)
    wait_for_epoch(tmp_path / "killed" / "last.pt", 0, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints.load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 0
    resumed = train(tmp_path, "killed", *common, "--resume", "auto")
    a = checkpoints.load_checkpoint(straight / "last.pt")
    b = checkpoints.load_checkpoint(resumed / "last.pt")
    assert b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert metrics(resumed)[-1]["train_loss"] == metrics(straight)[-1]["train_loss"]


def test_sigterm_to_the_whole_job_says_what_was_kept_and_exits_143(tmp_path):
    # a batch scheduler's time limit sends SIGTERM to every process of the job, DataLoader workers
    # included: one line naming the checkpoint kept, the signal's exit status, no traceback after it
    proc = subprocess.Popen([sys.executable, "-m", "spikingformer", "train", "--output", str(tmp_path), "--name", "t",
                             *TINY, "--epochs", "50", "--workers", "2"], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_epoch(tmp_path / "t" / "last.pt", 0, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    kept = checkpoints.load_checkpoint(tmp_path / "t" / "last.pt")["epoch"] + 1
    assert proc.returncode == 143, err[-3000:]
    assert err.rstrip().splitlines()[-1] == (f"spikingformer train: terminated (SIGTERM); {tmp_path / 't' / 'last.pt'} holds "
                                             f"epoch {kept}: continue with --resume auto")
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]


def test_a_worker_says_nothing_of_a_hand_over_the_main_process_dropped():
    """The worker's excepthook drops a connection error raised in multiprocessing's resource sharer
    (the main process left mid-transfer: its traceback came after the line above, once in about ten
    terminations) and passes every other error on."""
    import multiprocessing.resource_sharer

    from spikingformer.data import workers

    def raised_in(filename: str, exc_type: type) -> tuple:
        """sys.exc_info() of an error caught where it was raised, in a function of ``filename`` (as the
        resource sharer's thread catches and reports its errors)."""
        namespace = {"E": exc_type, "sys": sys}
        source = "def serve():\n    try:\n        raise E()\n    except E:\n        return sys.exc_info()\n"
        exec(compile(source, filename, "exec"), namespace)
        return namespace["serve"]()

    printed = []
    hook = workers._quiet_hand_over(lambda exc_type, exc, tb: printed.append(exc_type))
    sharer = multiprocessing.resource_sharer.__file__
    hook(*raised_in(sharer, ConnectionResetError))
    hook(*raised_in(sharer, EOFError))
    assert printed == []
    hook(*raised_in(sharer, ValueError))
    hook(*raised_in(__file__, ConnectionResetError))
    assert printed == [ValueError, ConnectionResetError]


CRASH_IN_AN_EPOCH = """
import sys
from spikingformer.cli import main
from spikingformer.engine import trainer

def check_batch(images, loader, step):
    if step == 1:
        raise RuntimeError("an error the command does not handle")

trainer.check_batch = check_batch
sys.exit(main(sys.argv[1:]))
"""


def test_an_uncaught_error_with_workers_ends_the_process(tmp_path):
    # Python stops the DataLoader workers of an interpreter that exits on an uncaught error with
    # SIGTERM and waits for them: a worker that ignored it hung the process for ever
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_AN_EPOCH, "train", "--output", str(tmp_path), "--name", "c",
                           *TINY, "--epochs", "2", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith("RuntimeError: an error the command does not handle")


def test_sigterm_restores_the_handler_it_replaced(capsys, monkeypatch):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the command")

    monkeypatch.setattr("spikingformer.engine.commands.run_models", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["models"]) == 143
    assert capsys.readouterr().err == "spikingformer models: terminated (SIGTERM)\n"
    assert signal.getsignal(signal.SIGTERM) is before


WRITER = """
import sys, torch
from spikingformer.checkpoints import save_atomic
big = {"model": {"w": torch.randn(8_000_000)}, "epoch": 1}
print("writing", flush=True)
while True:
    save_atomic(big, sys.argv[1])
"""


def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoints.save_atomic({"model": {"w": torch.ones(3)}, "epoch": 0}, path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    for _ in range(5):  # kill at several points of the 32 MB writes
        time.sleep(0.15)
        loaded = checkpoints.load_checkpoint(path)
        assert loaded["epoch"] in (0, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loaded = checkpoints.load_checkpoint(path)  # never a torn file: the old one or a complete new one
    assert loaded["epoch"] in (0, 1) and loaded["model"]["w"].numel() in (3, 8_000_000)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers)


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "best.pt"
    checkpoints.save_atomic({"epoch": 0}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save_atomic({"epoch": 1, "bad": Unpicklable()}, path)
    assert checkpoints.load_checkpoint(path) == {"epoch": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    # the temporary file of an atomic write is mkstemp's (0600): the file renamed into place gets the
    # mode open() gives under the process's umask (0644 under 022), so colleagues can read a shared run
    written = checkpoints.write_json(tmp_path / "a.json", {"x": 1})
    with open(tmp_path / "plain", "w"):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o666 & ~umask


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_two_processes_match_single_process(tmp_path):
    args = ["--epochs", "2", "--warmup-epochs", "0", "--lr", "3e-3", "--smoothing", "0", "--seed", "3", "--workers", "0"]
    single = train(tmp_path, "single", *args, "--batch-size", "64")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "spikingformer", "train", "--output", str(tmp_path),
           "--name", "ddp", *TINY, *args, "--batch-size", "32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = tmp_path / "ddp"
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert len(metrics(ddp)) == 2  # one writer (rank 0): one line per epoch
    assert done.stdout.count("final test top-1") == 1
    # Same global batch (2 x 32 = 64) and sample order; BatchNorm statistics are per process (SyncBatchNorm
    # is GPU-only), so the runs agree closely but not bit for bit: within 3% on the first epoch's mean
    # loss (0.2% seen), and they drift apart later as every step compounds the difference.
    loss_single, loss_ddp = metrics(single)[0]["train_loss"], metrics(ddp)[0]["train_loss"]
    assert loss_ddp == pytest.approx(loss_single, rel=0.03)
    assert metrics(ddp)[1]["train_loss"] < metrics(ddp)[0]["train_loss"]  # it learns
    # evaluated by two processes: one line, the whole test split's figures, as one process gives them
    one = subprocess.run([sys.executable, "-m", "spikingformer", "eval", "--checkpoint", str(ddp / "best.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "spikingformer", "eval", "--checkpoint",
                          str(ddp / "best.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == two.returncode == 0, two.stderr[-3000:]
    lines = one.stdout.splitlines(), two.stdout.splitlines()
    assert len(lines[1]) == 1 and "(360 images)" in lines[1][0], two.stdout
    rate = [float(x[0].split("firing rate ")[1]) for x in lines]
    assert lines[1][0].split("loss")[0] == lines[0][0].split("loss")[0] and rate[1] == pytest.approx(rate[0], abs=2e-4)
    # the two-process run's checkpoint resumes in a single process (a different world size)
    resumed = train(tmp_path, "ddp", *args, "--batch-size", "64", "--epochs", "3", "--resume", "auto")
    assert [r["epoch"] for r in metrics(resumed)] == [0, 1, 2]
    assert checkpoints.load_checkpoint(resumed / "last.pt")["epoch"] == 2


def test_bad_inputs_give_one_clear_message(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key 'epoch'; did you mean 'epochs'\\? valid keys: .*epochs"):
        load_config("digits", {"epoch": 3})
    with pytest.raises(ConfigError, match="unknown recipe 'cifar11'; did you mean 'cifar10'.* bundled recipes: cifar10, cifar100"):
        load_config("cifar11")
    assert main(["train", "--model", "spikingformer_9_999", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'spikingformer_9_999'" in err and "available models: spikformer_8_384" in err
    assert main(["train", "--config", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cifar10 not found under" in err and "cifar-10-batches-py" in err and "--data-dir" in err
    assert main(["train", "--config", "nmnist", "--output", str(tmp_path)]) == 2
    assert "pass its folder with --data-dir" in capsys.readouterr().err
    assert main(["train", "--lr", "fast", "--output", str(tmp_path)]) == 2
    assert "config key 'lr' expects float, got 'fast'" in capsys.readouterr().err
    # a checkpoint of another architecture
    folder = train(tmp_path, "digits", "--epochs", "1", "--warmup-epochs", "0")
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--model", "spikformer_digits"]) == 2
    assert "holds a spikingformer_digits model, not spikformer_digits" in capsys.readouterr().err
    assert main(["train", "--output", str(tmp_path), "--name", "digits", "--epochs", "2", "--resume", "auto",
                 "--model-args", "{embed_dim: 64}", "--batch-size", "64"]) == 2
    assert "cannot resume from" in capsys.readouterr().err
    # a data set the checkpoint's model cannot take: said before the data is looked for
    assert main(["eval", "--checkpoint", str(folder / "best.pt"), "--dataset", "cifar10", "--data-dir", str(folder)]) == 2
    assert capsys.readouterr().err.strip() == (
        "spikingformer eval: error: --dataset cifar10 gives 3-channel images, but the model spikingformer_digits takes "
        "1-channel inputs; is this the right checkpoint for this data set?")


def test_every_recipe_loads_with_valid_names():
    from spikingformer.config import recipe_names
    from spikingformer.data import DATASETS
    from spikingformer.models import list_models, model_config

    assert recipe_names() == ["cifar10", "cifar100", "cifar10_dvs", "digits", "digits_dvs", "dvs128_gesture", "imagenet", "nmnist"]
    for name in recipe_names():
        cfg = load_config(name)
        assert cfg.model.model in list_models() and cfg.data.dataset in DATASETS, name
        model_config(cfg.model.model, **cfg.model.model_args)
    cifar = load_config("cifar10")  # spot checks against REFERENCE.md s.5.1
    assert (cifar.optim.lr, cifar.optim.weight_decay, cifar.schedule.epochs, cifar.schedule.cooldown_epochs) == (5e-4, 0.06, 400, 10)
    assert (cifar.mixup.mixup, cifar.mixup.mixup_off_epoch, cifar.data.aa) == (0.5, 200, "rand-m9-n1-mstd0.4-inc1")
    dvs = load_config("cifar10_dvs")
    assert (dvs.optim.lr, dvs.data.time_steps, dvs.mixup.mixup_prob, dvs.mixup.mixup_off_epoch, dvs.run.seed) == (1e-3, 16, 0.5, 75, 2021)


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("flags, on", [((), False), (("--tf32",), True)])
def test_tf32_flag_sets_both_switches_for_the_run_only(tmp_path, monkeypatch, recwarn, command, flags, on):
    """``--tf32`` lets a GPU's float32 products and convolutions both use TF32 tensor cores while the
    run computes; without it both are full float32 (PyTorch's own default differs between the two).
    Afterwards the caller's switches are back: ``train`` and ``evaluate_checkpoint`` are library calls."""
    from spikingformer.engine import evaluation, trainer
    from spikingformer.models.zoo import create_model

    class Stop(Exception):
        pass

    seen = []

    def stop(*args, **kwargs):  # where the run computes: record the switches, end the run
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        raise Stop

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not on, not on)
    if command == "train":
        monkeypatch.setattr(trainer, "build_dataset", stop)
        args = ["train", "--output", str(tmp_path), *TINY, "--device", "cpu"]
    else:
        monkeypatch.setattr(evaluation, "evaluate", stop)
        weights = tmp_path / "weights.pt"
        torch.save(create_model("spikingformer_digits").state_dict(), weights)
        args = ["eval", "--checkpoint", str(weights), "--model", "spikingformer_digits", "--dataset", "digits",
                "--device", "cpu"]
    try:
        with pytest.raises(Stop):
            main([*args, *flags])
        assert seen == [(on, on)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (not on, not on)
        # on the CPU it does nothing, and says so once
        said = [str(w.message) for w in recwarn if "--tf32" in str(w.message)]
        assert said == (["spikingformer: --tf32 is for NVIDIA GPUs; on the cpu float32 products stay in full float32 "
                         "(it has no effect in this run)"] if on else [])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_trainers_optimizer_steps_every_parameter_as_the_plain_loop():
    """The digits recipe's model and optimizer (PyTorch's fused AdamW), with this CPU's routes,
    against a per-parameter AdamW twin given the same gradients: the same updates to float32
    rounding (a bias before a BatchNorm has a gradient of rounding noise, which Adam scales to
    steps of lr either way, so each model's own gradients would part them)."""
    from spikingformer.engine.trainer import build_model, build_optimizer

    cfg = load_config("digits")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model(cfg, 10).train())
    model, twin_model = models
    built = build_optimizer(model, cfg)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    twin_params = list(twin_model.parameters())
    twin = torch.optim.AdamW([{**{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")},
                               "params": [twin_params[index[id(p)]] for p in g["params"]]} for g in built.param_groups],
                             foreach=False)
    c = model.config
    x = torch.rand(8, c.in_channels, c.img_size, c.img_size)
    y = torch.arange(8) % 10
    for _ in range(3):
        built.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), twin_params):
            q.grad = p.grad.clone()
        built.step()
        twin.step()
    torch.manual_seed(0)
    start = build_model(cfg, 10)
    assert not all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), start.parameters()))  # it stepped
    for (name, p), q in zip(model.named_parameters(), twin_model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert type(built) is torch.optim.AdamW and sorted({g["weight_decay"] for g in built.param_groups}) == [0.0, 0.01]
    assert all(g["fused"] for g in built.param_groups)


@pytest.mark.parametrize("opt", ["adamw", "adam", "sgd", "momentum", "lamb", "lookahead_adamw"])
def test_the_trainer_fuses_pytorchs_optimizers_and_keeps_timms_as_they_are(opt):
    """PyTorch's Adam, AdamW and SGD (timm's sgd: Nesterov's; momentum: plain) are built fused,
    with timm's groups and settings; timm's own (LAMB, Lookahead around AdamW) as timm builds them."""
    from spikingformer.engine.trainer import FUSED_OPTIMIZERS, build_optimizer

    cfg = load_config("digits", {"opt": opt})
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8))
    built = build_optimizer(model, cfg)
    groups = built.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, cfg.optim.weight_decay]
    assert all(g["lr"] == cfg.optim.lr for g in groups)
    if opt in ("sgd", "momentum"):
        assert all(g["nesterov"] == (opt == "sgd") and g["momentum"] == cfg.optim.momentum for g in groups)
    assert (type(built) in FUSED_OPTIMIZERS) == (opt in ("adamw", "adam", "sgd", "momentum"))
    assert all(g.get("fused") is True for g in groups) == (type(built) in FUSED_OPTIMIZERS)


def test_the_firing_rate_is_each_layers_spikes_over_its_outputs_averaged_and_sums_across_processes():
    """Hand counts: layer a fires 1 of 4 outputs then 3 of 4 (rate 0.5), layer b 2 of 8 (0.25): 0.375.
    Two processes' counts summed give what one process counting everything gives."""
    from spikingformer.engine.firing import FiringRateMeter, rate_of
    from spikingformer.neuron import MultiStepLIF

    model = torch.nn.Sequential(MultiStepLIF(), MultiStepLIF())
    a, b = model[0], model[1]
    meter = FiringRateMeter(model)
    meter._hook(a, (), torch.tensor([1.0, 0, 0, 0]))
    meter._hook(a, (), torch.tensor([1.0, 1, 1, 0]))
    meter._hook(b, (), torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 1]))
    counts = meter.take()
    assert counts.tolist() == [[4.0, 8.0], [2.0, 8.0]] and rate_of(counts) == 0.375
    meter._hook(a, (), torch.tensor([1.0, 0, 0, 0]))  # one process ...
    first = meter.take()
    meter._hook(a, (), torch.tensor([1.0, 1, 1, 0]))  # ... and another; layer b fired on neither
    assert rate_of(first + meter.take()) == 0.5 and meter.take().sum() == 0
    assert math.isnan(rate_of(meter.take()))
    meter.close()
