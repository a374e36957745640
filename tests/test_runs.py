"""The run folder: overwrite policy, the lock, checkpoint/log consistency after a kill at every write,
leftover temporaries, finished runs, full disks and unwritable folders.

The runs here train a tiny model on 48 training and 24 test digits (the data set is sliced in the
trainer), so each epoch takes well under a second; the behaviour tested does not depend on the size.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from spikingformer import checkpoints
from spikingformer.cli import main
from spikingformer.engine import run_folder, trainer

TINY = ["--model-args", "{embed_dim: 16, num_heads: 2, time_steps: 1}", "--batch-size", "16", "--eval-batch-size", "24",
        "--amp", "off", "--tensorboard", "false", "--warmup-epochs", "0", "--lr", "3e-3", "--seed", "5"]


class _Slice(Subset):
    def __init__(self, dataset, n: int) -> None:
        super().__init__(dataset, range(n))
        self.num_classes = dataset.num_classes


@pytest.fixture(autouse=True, scope="module")
def small_digits():
    build = trainer.build_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_dataset", lambda cfg, size, train: _Slice(build(cfg, size, train), 48 if train else 24))
        # the energy printout after training reads its own batches; it is not what these tests check
        mp.setattr("spikingformer.engine.commands._print_energy", lambda checkpoint, cfg: None)
        yield


def train(tmp_path: Path, name: str, *extra: str) -> int:
    return main(["train", "--output", str(tmp_path), "--name", name, *TINY, *extra])


def rows(folder: Path) -> list[dict]:
    """The run's metrics rows; none before its first epoch has ended."""
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_existing_run_is_refused_without_resume_or_overwrite(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1") == 0
    folder = tmp_path / "r"
    before = (folder / "best.pt").read_bytes(), (folder / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train(tmp_path, "r", "--epochs", "1", "--lr", "1e-2") == 2
    err = capsys.readouterr().err
    assert f"run folder {folder} already holds a run (last.pt, best.pt, metrics.jsonl)" in err
    assert "--resume auto" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert ((folder / "best.pt").read_bytes(), (folder / "metrics.jsonl").read_text()) == before  # nothing lost
    # --overwrite starts afresh: one row, a new checkpoint
    assert train(tmp_path, "r", "--epochs", "1", "--lr", "1e-2", "--overwrite") == 0
    assert [r["epoch"] for r in rows(folder)] == [0]
    assert checkpoints.load_checkpoint(folder / "last.pt")["train_config"]["optim"]["lr"] == 1e-2
    # the two ways are exclusive
    assert train(tmp_path, "r", "--epochs", "1", "--overwrite", "--resume", "auto") == 2
    assert "pass only one of them" in capsys.readouterr().err


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from spikingformer.engine.run_folder import lock
    handle = lock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_training_into_a_locked_folder_fails(tmp_path, capsys):
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(tmp_path, "busy", "--epochs", "1") == 2
        err = capsys.readouterr().err
        assert f"run folder {folder} is in use by another training (process {holder.pid})" in err
        assert not (folder / "last.pt").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock with the process
        holder.wait()
    assert train(tmp_path, "busy", "--epochs", "1") == 0
    with pytest.raises(run_folder.RunFolderError, match="in use by another training"):
        with run_folder.lock(folder):  # and a lock held in this process excludes a second holder too
            run_folder.lock(folder)


# A Python without fcntl, as on Windows, whose msvcrt.locking (a byte range from the file's position,
# EACCES where another process holds it) stands in through POSIX record locks. The stand-in is seen
# by the run folder's module alone: the standard library takes msvcrt's presence for Windows.
WITHOUT_FCNTL = textwrap.dedent("""
    import errno, fcntl, os, sys, types
    import spikingformer.checkpoints  # PyTorch and what it imports, before the stand-in
    msvcrt = types.ModuleType("msvcrt")
    msvcrt.LK_NBLCK = 2
    def locking(fd, mode, nbytes, _fcntl=fcntl):
        assert mode == msvcrt.LK_NBLCK
        at = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            _fcntl.lockf(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB, nbytes, at)
        except OSError:
            raise PermissionError(errno.EACCES, "Permission denied") from None
        print(f"msvcrt.locking at byte {at}", file=sys.stderr, flush=True)
    msvcrt.locking = locking
    sys.modules["msvcrt"], sys.modules["fcntl"] = msvcrt, None
    from spikingformer.engine import run_folder
    assert run_folder.fcntl is None and run_folder.msvcrt is msvcrt
    del sys.modules["msvcrt"]
""")


def test_the_run_folder_lock_where_python_has_no_fcntl(tmp_path):
    """Windows' Python has no fcntl (until 2026-12-06 ``spikingformer train`` stopped there at an
    import): the run folder is locked with msvcrt's byte-range lock instead, past the holder's
    process id, which a second training names. Windows itself not run: msvcrt is a stand-in here."""
    folder = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", WITHOUT_FCNTL + HOLD_LOCK, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    argv = ["train", "--output", str(tmp_path), "--name", "busy", "--epochs", "1", *TINY]
    run = [sys.executable, "-c", WITHOUT_FCNTL + "from spikingformer.cli import main; sys.exit(main(sys.argv[1:]))", *argv]
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(run, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"run folder {folder} is in use by another training (process {holder.pid})" in second.stderr
    finally:
        holder.kill()
        holder.wait()
    assert holder.stderr.read().strip() == f"msvcrt.locking at byte {run_folder.LOCKED_BYTE}"
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (folder / "best.pt").is_file() and "checkpoint:" in done.stdout


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    """A data set not found (here: N-MNIST under an empty folder) ends the run before it writes
    anything: the run folder and the output folder it created are gone, not left holding a lock file."""
    output = tmp_path / "new" / "runs"
    argv = ["train", "--config", "nmnist", "--data-dir", str(tmp_path), "--output", str(output), "--epochs", "1"]
    assert main(argv) == 2
    assert "no train recordings found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # a folder that was there before stays, and so does a run's folder once it holds files
    output.mkdir(parents=True)
    assert main(argv) == 2 and list(output.iterdir()) == []
    assert train(tmp_path, "kept", "--epochs", "1") == 0
    assert train(tmp_path, "kept", "--epochs", "2", "--resume", "auto", "--model", "spikformer_digits") == 2
    assert {"last.pt", "best.pt", run_folder.LOCK} <= {p.name for p in (tmp_path / "kept").iterdir()}


def test_leftover_temporaries_are_removed_on_start(tmp_path):
    assert train(tmp_path, "t", "--epochs", "1") == 0
    folder = tmp_path / "t"
    for name in (".last.pt.abc123.tmp", ".best.pt.x_y.tmp", ".metrics.jsonl.q.tmp"):
        (folder / name).write_bytes(b"torn")
    (folder / "notes.tmp").write_text("mine")  # not ours: kept
    assert train(tmp_path, "t", "--epochs", "2", "--resume", "auto") == 0
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == ["notes.tmp"]


def test_resuming_a_finished_run_reports_its_final_metrics(tmp_path, capsys):
    assert train(tmp_path, "f", "--epochs", "2") == 0
    last = rows(tmp_path / "f")[-1]
    capsys.readouterr()
    assert train(tmp_path, "f", "--epochs", "2", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "this run already finished its 2 epochs" in out
    assert f"final test top-1 {last['test_top1']:.2f}%  top-5 {last['test_top5']:.2f}%" in out and "nan" not in out
    assert [r["epoch"] for r in rows(tmp_path / "f")] == [0, 1]


def test_the_header_counts_epochs_as_the_epoch_lines_do(tmp_path, capsys):
    assert train(tmp_path, "c", "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "epochs 1..1 -> " in out and "epoch 1/1  loss" in out
    # trained longer: the header names the epochs this run adds, numbered as its epoch lines
    assert train(tmp_path, "c", "--epochs", "3", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "epochs 2..3 -> " in out and "epoch 2/3  loss" in out and "epoch 3/3  loss" in out
    assert [r["epoch"] for r in rows(tmp_path / "c")] == [0, 1, 2]
    # cooldown epochs run after --epochs (as timm's): the header says where the extra epochs come from
    assert train(tmp_path, "cool", "--epochs", "1", "--cooldown-epochs", "1") == 0
    out = capsys.readouterr().out
    assert "epochs 1..2 (1 + 1 of cooldown at --min-lr) -> " in out and "epoch 2/2  loss" in out


def test_evaluation_shows_its_progress_as_training_does(tmp_path, capsys):
    # an ImageNet test split on a CPU takes hours: the evaluation after each epoch and `eval` show a bar
    assert train(tmp_path, "e", "--epochs", "1") == 0
    assert re.search(r"^test: +\d+%\|.*\| \d/1 \[", capsys.readouterr().err.replace("\r", "\n"), re.M)
    assert main(["eval", "--checkpoint", str(tmp_path / "e" / "best.pt"), "--batch-size", "10"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"^test: +\d+%\|.*\| \d+/36 \[", captured.err.replace("\r", "\n"), re.M)
    assert "test: " not in captured.out


def test_a_log_gets_no_redraw_for_each_logged_step(tmp_path, capsys):
    # into a file or pipe the epoch bar redraws at most once a minute: the loss/accuracy shown every
    # --log-interval steps waits for that redraw instead of forcing one (here 3 steps: 4 draws before)
    assert train(tmp_path, "l", "--epochs", "1", "--log-interval", "1") == 0
    err = capsys.readouterr().err
    epoch = [draw for draw in err.split("\r") if draw.startswith("epoch 1/1:")]
    assert len(epoch) == 1, epoch  # drawn when it starts; the run takes seconds, not a minute


def test_more_workers_than_cpus_load_with_one_per_cpu_and_say_so(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert train(tmp_path, "w", "--epochs", "1", "--workers", "3") == 0
    said = [str(w.message) for w in recwarn if "worker" in str(w.message)]
    assert said == ["spikingformer: --workers 3 exceeds the 1 CPU(s) this process may use; loading with 1"]
    runtime = trainer.Runtime(torch.device("cpu"))
    assert trainer.make_loader(list(range(8)), 4, True, runtime, 3, 0).num_workers == 1
    assert trainer.make_loader(list(range(8)), 4, False, runtime, 1, 0).num_workers == 1


def test_a_setting_without_effect_in_this_run_is_said_once(tmp_path, recwarn):
    assert train(tmp_path, "u", "--epochs", "1", "--aa", "rand-m9-n1-mstd0.4-inc1") == 0
    said = [str(w.message) for w in recwarn if "does not read" in str(w.message)]
    assert said == ["spikingformer: digits does not read --aa (for cifar10, cifar100, imagenet); it has no effect in this run"]
    assert train(tmp_path, "s", "--epochs", "1", "--sync-bn", "true") == 0  # a world of one process
    said = [str(w.message) for w in recwarn if "--sync-bn" in str(w.message)]
    assert said == ["spikingformer: --sync-bn shares BatchNorm's statistics between torchrun's processes; this run "
                    "has one process (it has no effect)"]


def test_a_warm_up_as_long_as_the_run_is_said(tmp_path, recwarn):
    assert train(tmp_path, "w", "--epochs", "2", "--warmup-epochs", "2") == 0
    said = [str(w.message) for w in recwarn if "warm-up" in str(w.message)]
    assert said == ["spikingformer: --warmup-epochs 2 is not below --epochs 2: the learning rate stays in its warm-up "
                    "from 0.0001 and never reaches --lr 0.003; for a short run pass --warmup-epochs 0 (or fewer than --epochs)"]
    lrs = [r["lr"] for r in rows(tmp_path / "w")]
    assert max(lrs) < 0.003  # what it says: the rate never reached --lr
    recwarn.clear()
    assert train(tmp_path, "w3", "--epochs", "3", "--warmup-epochs", "2") == 0
    assert not [w for w in recwarn if "warm-up" in str(w.message)]


@pytest.mark.parametrize("schedule, rates", [
    # the rate each epoch trained at, as timm's own logs give it (before the step to the next epoch's)
    (["--sched", "step", "--decay-epochs", "1", "--decay-rate", "0.5"], [3e-3, 1.5e-3, 7.5e-4]),
    # milestones count epochs from 1, as the epoch lines do: from epoch 3 on, a tenth
    (["--sched", "multistep", "--decay-milestones", "[3]"], [3e-3, 3e-3, 3e-4]),
    (["--sched", "constant"], [3e-3, 3e-3, 3e-3]),
])
def test_each_epoch_logs_the_rate_it_trained_at(tmp_path, capsys, schedule, rates):
    assert train(tmp_path, "s", "--epochs", "3", *schedule) == 0
    assert [r["lr"] for r in rows(tmp_path / "s")] == pytest.approx(rates)
    out = capsys.readouterr().out
    assert all(f"epoch {i + 1}/3  loss" in out and f"lr {rate:.2e}" in out for i, rate in enumerate(rates))


@pytest.mark.parametrize("at_epoch, said", [
    (2, "interrupted; {folder}/last.pt holds epoch 1: continue with --resume auto"),
    (1, "interrupted; no epoch had finished, so no checkpoint was written"),
])
def test_ctrl_c_is_one_line_that_says_what_was_kept(tmp_path, capsys, monkeypatch, at_epoch, said):
    one_epoch = trainer._train_one_epoch

    def interrupted_in_epoch(st, loader, runtime, meter, epoch, *rest):
        if epoch + 1 == at_epoch:  # as Ctrl-C does in the middle of a step
            raise KeyboardInterrupt
        return one_epoch(st, loader, runtime, meter, epoch, *rest)

    monkeypatch.setattr(trainer, "_train_one_epoch", interrupted_in_epoch)
    assert train(tmp_path, "i", "--epochs", "3") == 130
    folder = tmp_path / "i"
    assert capsys.readouterr().err.strip().splitlines()[-1] == "spikingformer train: " + said.format(folder=folder)
    if at_epoch > 1:  # and the run continues from there
        monkeypatch.setattr(trainer, "_train_one_epoch", one_epoch)
        assert train(tmp_path, "i", "--epochs", "3", "--resume", "auto") == 0
        assert [r["epoch"] for r in rows(folder)] == [0, 1, 2]


def test_a_resumed_run_takes_this_runs_schedule_and_says_what_changed(tmp_path, capsys):
    # trained 2 epochs of a 2-epoch cosine, then longer and at another peak rate: epochs 3-4 train at
    # the rates a 4-epoch run at that peak trains them at (as timm's resume gives them), not at min_lr
    assert train(tmp_path, "r", "--epochs", "2") == 0
    assert train(tmp_path, "straight", "--epochs", "4", "--lr", "1e-2") == 0
    capsys.readouterr()
    assert train(tmp_path, "r", "--epochs", "4", "--lr", "1e-2", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings (the checkpoint's -> this run's): lr 0.003 -> 0.01, epochs 2 -> 4" in out
    resumed, straight = rows(tmp_path / "r"), rows(tmp_path / "straight")
    assert [r["lr"] for r in resumed[2:]] == pytest.approx([r["lr"] for r in straight[2:]])
    assert max(r["lr"] for r in resumed[2:]) > 3e-3
    # another optimizer cannot take the saved moments
    assert train(tmp_path, "r", "--epochs", "5", "--opt", "sgd", "--resume", "auto") == 2
    assert ("cannot resume from" in (err := capsys.readouterr().err) and "with --opt sgd: its optimizer state is adamw's"
            in err and "--opt adamw" in err)


def test_a_run_saved_with_the_per_parameter_optimizer_resumes_fused_and_as_it_would_have_gone_on(tmp_path, monkeypatch,
                                                                                                capsys):
    """Runs saved before the trainer built PyTorch's fused AdamW (2026-12-06) hold the per-parameter
    loop's state: a resume takes its moments and step counts into the fused optimizer, names no
    optimizer setting as changed, and trains epoch 2 as the loop would have, to rounding."""
    with monkeypatch.context() as mp:
        mp.setattr(trainer, "FUSED_OPTIMIZERS", ())  # as the trainer built it before
        assert train(tmp_path, "old", "--epochs", "1") == 0
        assert train(tmp_path, "loop", "--epochs", "2") == 0
    saved = torch.load(tmp_path / "old" / "last.pt", weights_only=False)["optimizer"]
    assert not any(g.get("fused") for g in saved["param_groups"])
    capsys.readouterr()
    assert train(tmp_path, "old", "--epochs", "2", "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "changed settings" in line] == [
        "resuming with changed settings (the checkpoint's -> this run's): epochs 1 -> 2"]  # the optimizer's not among them
    resumed = torch.load(tmp_path / "old" / "last.pt", weights_only=False)
    assert all(g["fused"] for g in resumed["optimizer"]["param_groups"])
    assert {float(s["step"]) for s in resumed["optimizer"]["state"].values()} == {float(s["step"]) * 2 for s in
                                                                                   saved["state"].values()}
    loop = torch.load(tmp_path / "loop" / "last.pt", weights_only=False)["model"]
    # a linear's bias before a BatchNorm changes nothing downstream and its gradient is rounding noise,
    # which Adam scales to steps of lr either way: those alone are not compared
    before_bn = {n for n in loop if n.endswith(".linear.bias") and n.replace(".linear.bias", ".bn.weight") in loop}
    assert before_bn and len(before_bn) < len(loop) // 4
    for name, value in loop.items():
        if name not in before_bn:
            torch.testing.assert_close(resumed["model"][name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_a_resume_names_every_changed_setting_and_only_those(tmp_path, capsys):
    assert train(tmp_path, "r", "--epochs", "1") == 0
    capsys.readouterr()
    assert train(tmp_path, "r", "--epochs", "1", "--resume", "auto") == 0  # unchanged: nothing to name
    assert "resuming with changed" not in (out := capsys.readouterr().out) and "already finished its 1 epochs" in out
    assert train(tmp_path, "r", "--epochs", "2", "--batch-size", "8", "--smoothing", "0", "--seed", "6",
                 "--tensorboard", "true", "--resume", "auto") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resuming with changed settings"))
    assert line == ("resuming with changed settings (the checkpoint's -> this run's): batch_size 16 -> 8, "
                    "epochs 1 -> 2, smoothing 0.1 -> 0, seed 5 -> 6, tensorboard false -> true")


@pytest.mark.filterwarnings("ignore:spikingformer. digits does not read --cache-dir")  # recorded all the same
def test_a_run_that_recorded_a_relative_folder_resumes_without_a_changed_setting(tmp_path, capsys, monkeypatch):
    # runs before 2026-12-06 recorded --data-dir / --cache-dir as given; they are now made absolute
    monkeypatch.chdir(tmp_path)
    assert train(tmp_path, "f", "--epochs", "1", "--cache-dir", "frames") == 0
    last = tmp_path / "f" / "last.pt"
    saved = torch.load(last, weights_only=False)
    assert saved["train_config"]["data"]["cache_dir"] == str(tmp_path / "frames")
    saved["train_config"]["data"]["cache_dir"] = "frames"
    torch.save(saved, last)
    capsys.readouterr()
    assert train(tmp_path, "f", "--epochs", "2", "--cache-dir", "frames", "--resume", "auto") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("resuming with changed settings"))
    assert line == "resuming with changed settings (the checkpoint's -> this run's): epochs 1 -> 2"


def test_resume_auto_without_a_checkpoint_says_it_starts_a_new_run(tmp_path, capsys):
    # `--resume auto` restarts a job with one command, so it starts a run where none is; but a user who
    # left out --config or --name meant another folder: the line names the runs beside it
    assert train(tmp_path, "a", "--epochs", "1", "--resume", "auto") == 0
    assert capsys.readouterr().out.splitlines()[0] == f"--resume auto: {tmp_path / 'a'} holds no last.pt, so this is a new run"
    assert train(tmp_path, "b", "--epochs", "1", "--resume", "auto") == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"--resume auto: {tmp_path / 'b'} holds no last.pt, so this is a new run; to continue another run in "
        f"{tmp_path} (a), name it with --name (and give its recipe's --config)")
    assert train(tmp_path, "a", "--epochs", "2", "--resume", "auto") == 0
    assert "holds no last.pt" not in capsys.readouterr().out


def test_a_resume_with_another_model_names_the_runs_own_configuration(tmp_path, capsys):
    assert train(tmp_path, "m", "--epochs", "1") == 0
    capsys.readouterr()
    own = tmp_path / "m" / "config.yaml"
    assert main(["train", "--output", str(tmp_path), "--name", "m", "--epochs", "2", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "it holds a different model" in err and f"(or all of the run's own settings: --config {own} --resume auto)" in err
    # and that command continues the run with everything it was started with
    assert main(["train", "--config", str(own), "--epochs", "2", "--resume", "auto"]) == 0
    assert "resuming with changed settings (the checkpoint's -> this run's): epochs 1 -> 2" in capsys.readouterr().out
    assert [r["epoch"] for r in rows(tmp_path / "m")] == [0, 1]


def test_a_run_starts_from_another_runs_weights_and_resumes_from_its_own(tmp_path, capsys):
    assert train(tmp_path, "base", "--epochs", "1") == 0
    base = tmp_path / "base" / "best.pt"
    capsys.readouterr()
    assert train(tmp_path, "ft", "--epochs", "1", "--initial-checkpoint", str(tmp_path / "base")) == 2
    assert capsys.readouterr().err.strip().endswith("a folder; pass the checkpoint file in it (e.g. best.pt)")
    assert not (tmp_path / "ft").exists()  # refused before anything was read or written
    calls = []
    import spikingformer.models.initial as initial

    load = initial.load_initial_weights
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(initial, "load_initial_weights", lambda model, path: calls.append(path) or load(model, path))
        assert train(tmp_path, "ft", "--epochs", "1", "--initial-checkpoint", str(base)) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"initial weights from {base}"
        # its first epoch started from base's weights: steps at lr 1e-12 leave them within 1e-9 of them
        assert train(tmp_path, "still", "--epochs", "1", "--initial-checkpoint", str(base), "--lr", "1e-12",
                     "--min-lr", "1e-12", "--weight-decay", "0") == 0
        mine = checkpoints.load_checkpoint(tmp_path / "still" / "last.pt")["model"]
        theirs = checkpoints.load_checkpoint(base)["model"]
        weights = [k for k in theirs if "running" not in k and "num_batches" not in k]
        assert len(weights) > 20 and all(torch.allclose(mine[k], theirs[k], rtol=0, atol=1e-9) for k in weights)
        assert not all(torch.equal(mine[k], theirs[k]) for k in weights)  # they did train
        capsys.readouterr()
        # resumed, the run takes its own last.pt: the initial checkpoint is not read again, nor named as changed
        assert train(tmp_path, "ft", "--epochs", "2", "--initial-checkpoint", str(base), "--resume", "auto") == 0
        out = capsys.readouterr().out
    assert calls == [str(base), str(base)]
    assert "initial weights" not in out and "initial_checkpoint" not in out


def test_amp_is_named_as_the_option_names_it_and_fp16_on_the_cpu_is_refused(tmp_path, capsys):
    assert train(tmp_path, "h", "--amp", "fp16") == 2
    assert capsys.readouterr().err.strip().startswith("spikingformer train: error: --amp fp16 is for GPUs")
    assert not (tmp_path / "h").exists()
    assert train(tmp_path, "h", "--epochs", "1") == 0  # TINY trains with --amp off
    assert ", amp=off, epochs 1..1 -> " in capsys.readouterr().out


def test_a_diverging_run_ends_with_one_line_and_what_to_change(tmp_path, capsys):
    assert train(tmp_path, "d", "--epochs", "4", "--lr", "1e9") == 1
    err = capsys.readouterr().err.splitlines()[-1].split("\r")[-1]  # after the progress bar's carriage return
    found = re.fullmatch(r"spikingformer train: error: training diverged: the loss became (nan|inf|-inf) at epoch "
                         r"(\d), step (\d) of 3 \(learning rate [0-9.e+]+\); lower --lr or clip the gradient norm "
                         r"with --clip-grad \(e\.g\. 1\.0\)", err)
    assert found, err
    epoch = int(found[2])  # numbered from 1; the epochs finished before it keep their checkpoint
    last = tmp_path / "d" / "last.pt"
    assert checkpoints.load_checkpoint(last)["epoch"] == epoch - 2 if epoch > 1 else not last.exists()


WRITE_POINTS = ["last.pt", "best.pt", "metrics.jsonl", "metrics.csv"]
KILL_RUN = ["--epochs", "3", "--smoothing", "0"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run to compare the interrupted ones with."""
    output = tmp_path_factory.mktemp("straight")
    assert train(output, "straight", *KILL_RUN) == 0
    return output / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("point", WRITE_POINTS)
def test_kill_at_every_write_point_then_resume_is_consistent(tmp_path, monkeypatch, point, straight):
    """An interruption at a write of epoch 2 (0-based 1), then a resume, ends exactly like an uninterrupted run."""
    common = KILL_RUN
    best_epoch = checkpoints.load_checkpoint(straight / "last.pt")["best"]["epoch"]
    assert checkpoints.load_checkpoint(straight / "best.pt")["epoch"] == best_epoch

    # the write to interrupt: the one of epoch 1 (best.pt: its second write, if the run had one)
    improved = [r["epoch"] for r in rows(straight) if r["test_top1"] > max([-1.0] + [q["test_top1"] for q in rows(straight)][: r["epoch"]])]
    fail_at = 2 if point != "best.pt" or len(improved) > 1 else 1
    real = checkpoints.write_atomic
    calls = {"n": 0}

    def torn(f):
        f.write(b"partial")
        raise KeyboardInterrupt(f"killed while writing {point}")

    def failing(path, write):
        if Path(path).name == point:
            calls["n"] += 1
            if calls["n"] == fail_at:
                return real(path, torn)
        return real(path, write)

    monkeypatch.setattr(checkpoints, "write_atomic", failing)
    assert train(tmp_path, "killed", *common) == 130  # the command's exit code for an interrupt
    monkeypatch.setattr(checkpoints, "write_atomic", real)
    killed = tmp_path / "killed"
    assert not list(killed.glob(".*.tmp"))
    logged = [r["epoch"] for r in rows(killed)]
    held = checkpoints.load_checkpoint(killed / "last.pt")["epoch"]
    # never a row without its checkpoint (none at all where the one write of best.pt, epoch 0's, was cut)
    assert logged == list(range(len(logged))) and all(epoch <= held for epoch in logged)
    assert train(tmp_path, "killed", *common, "--resume", "auto") == 0
    a, b = (checkpoints.load_checkpoint(f / "last.pt") for f in (straight, killed))
    assert b["epoch"] == 2 and b["best"] == a["best"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    best = checkpoints.load_checkpoint(killed / "best.pt")
    assert best["epoch"] == best_epoch  # best.pt is the checkpoint last.pt names as best
    for k in a["model"]:
        assert torch.equal(best["model"][k], checkpoints.load_checkpoint(straight / "best.pt")["model"][k]), k
    assert [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows(killed)] == \
        [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows(straight)]
    csv_lines = (killed / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("epoch,lr,train_loss")


def test_stale_best_is_repaired_from_last_on_resume(tmp_path, capsys):
    """The kill the issue describes: last.pt (the new best) written, best.pt still the older epoch."""
    assert train(tmp_path, "s", "--epochs", "2", "--smoothing", "0") == 0
    folder = tmp_path / "s"
    last = checkpoints.load_checkpoint(folder / "last.pt")
    older = dict(last, epoch=0, model={k: torch.zeros_like(v) for k, v in last["model"].items()})
    last["best"] = {"top1": 100.0, "top5": 100.0, "epoch": 1}  # last.pt names itself the best
    checkpoints.save_atomic(last, folder / "last.pt")
    checkpoints.save_atomic(older, folder / "best.pt")
    capsys.readouterr()
    assert train(tmp_path, "s", "--epochs", "2", "--smoothing", "0", "--resume", "auto") == 0
    assert "best.pt restored from last.pt (epoch 2)" in capsys.readouterr().out
    assert (folder / "best.pt").read_bytes() == (folder / "last.pt").read_bytes()


def test_full_disk_is_one_line_and_keeps_previous_checkpoints(tmp_path, monkeypatch, capsys, full_disk):
    assert train(tmp_path, "d", "--epochs", "1") == 0
    folder = tmp_path / "d"
    before = {name: (folder / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    full_disk(4096)  # torch.save turns the failed write into a RuntimeError of its own ("unexpected pos")
    assert train(tmp_path, "d", "--epochs", "2", "--resume", "auto") == 2
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err == (f"spikingformer train: error: no space left on device while writing {folder / 'last.pt'}; the previous "
                   "file there (if any) is intact: free some space and run the command again (training: add --resume auto)")
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert not list(folder.glob(".*.tmp"))


def test_unwritable_output_is_one_line(tmp_path, monkeypatch, capsys):
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["train", "--output", str(tmp_path / "ro"), *TINY, "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spikingformer train: error: cannot create the run folder") and "Read-only file system" in err
    assert "--output" in err and len(err.splitlines()) == 1
