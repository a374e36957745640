"""The run folder ``<output>/<name>/``: one training at a time, never replaced by accident, and its
checkpoints and metrics log consistent after a kill at any point.

Write order per epoch: ``last.pt`` (atomic), then ``best.pt`` as an atomic byte copy of it when the
epoch is the best so far (:func:`save_checkpoint`), then the metrics log (:class:`RunLog`). A kill
between two writes leaves the files consistent, or repairable from ``last.pt`` alone, which
:func:`repair_best` does on resume.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from spikingformer import checkpoints

try:
    import fcntl

    msvcrt = None
except ImportError:  # Windows: msvcrt's byte-range lock instead (_lock_file)
    fcntl = None
    import msvcrt

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.csv", "config.yaml")  # plus tensorboard/
HOLDS_RUN = ("last.pt", "best.pt", "metrics.jsonl")  # a folder with any of these holds a run
LOCK = ".lock"


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (taken, in use, or not writable)."""


# Windows locks a byte range, and no other process may read a locked range there: the lock takes a
# byte past the holder's process id, which the lock file holds for the message of a second training.
LOCKED_BYTE = 4096


def _lock_file(handle: IO[str]) -> None:
    """Take the exclusive lock on ``handle``'s file without waiting, or raise ``BlockingIOError``
    where another process (or another open of the file here) holds it. ``flock`` where there is
    ``fcntl``; on Windows ``msvcrt.locking`` of :data:`LOCKED_BYTE`. Either is dropped with the
    process, however it ends."""
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    handle.seek(LOCKED_BYTE)
    try:
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EDEADLK):
            raise BlockingIOError(err.errno, "locked by another process") from err
        raise


def lock(folder: Path) -> IO[str]:
    """Create ``folder`` and hold an exclusive lock on its lock file until the returned file is
    closed or the process ends (also by SIGKILL: the kernel drops the lock with the process)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+")
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {folder}: {err.strerror or err}; choose a writable --output") from err
    try:
        _lock_file(handle)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(LOCKED_BYTE).strip() or "unknown"
        handle.close()
        raise RunFolderError(f"run folder {folder} is in use by another training (process {holder}); wait for it "
                             "to finish, or train into another folder with --name") from None
    except OSError as err:  # e.g. a file system without locks
        handle.close()
        raise RunFolderError(f"cannot lock the run folder {folder}: {err.strerror or err}; choose an --output on a "
                             "local file system") from err
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextmanager
def locked(folder: Path) -> Iterator[IO[str]]:
    """:func:`lock` ``folder`` for the block. A run that ends before writing anything (a data set
    not found, a wrong class count) leaves no empty folder behind: where the block created the
    folder (and its parents) and it still holds only the lock file, they are removed, while the
    lock is held."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    handle = lock(folder)
    try:
        yield handle
    finally:
        try:
            if created and [p.name for p in folder.iterdir()] == [LOCK]:
                (folder / LOCK).unlink()
                for path in created:
                    path.rmdir()  # a parent that something else wrote into meanwhile stays (OSError)
        except OSError:
            pass
        finally:
            handle.close()


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files interrupted atomic writes leave (``.last.pt.*.tmp`` ...)."""
    for name in RUN_FILES:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink()


def prepare(folder: Path, resume: str | None, overwrite: bool) -> None:
    """Apply the overwrite policy to a locked run folder and clear leftovers of interrupted writes.

    A folder that holds a run is only trained into to continue it (``resume`` is its ``last.pt``)
    or with ``overwrite``, which deletes the run's own files first (:data:`RUN_FILES`, tensorboard/).
    """
    remove_temporaries(folder)
    present = [name for name in HOLDS_RUN if (folder / name).exists()]
    own_last = (folder / "last.pt").resolve()
    continuing = resume is not None and Path(resume).resolve() == own_last
    if overwrite:  # never together with resume (config validation)
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    elif present and not continuing:
        raise RunFolderError(f"run folder {folder} already holds a run ({', '.join(present)}); continue it with "
                             "--resume auto, replace it with --overwrite, or train into another folder with --name")


def save_checkpoint(folder: Path, checkpoint: dict, best: bool) -> None:
    """Write a training checkpoint (:func:`spikingformer.checkpoints.training_checkpoint`) as ``last.pt``,
    then copy it to ``best.pt`` when its epoch is the ``best`` so far."""
    checkpoints.save_atomic(checkpoint, folder / "last.pt")
    if best:
        checkpoints.copy_atomic(folder / "last.pt", folder / "best.pt")


def repair_best(folder: Path, last: checkpoints.TrainingState) -> str | None:
    """Make ``best.pt`` the checkpoint of the best epoch ``last.pt`` records; returns a note when it acted.

    ``last.pt`` is written first, so a kill before its ``best.pt`` copy leaves ``best.pt`` one best
    epoch behind; the copy is redone here.
    """
    best_epoch = last.best["epoch"]
    if best_epoch < 0:
        return None  # not evaluated yet
    best_path = folder / "best.pt"
    held_state = checkpoints.read(best_path).training if best_path.exists() else None
    held = held_state.epoch if held_state is not None else None
    if held == best_epoch:
        return None
    if best_epoch == last.epoch:
        checkpoints.copy_atomic(folder / "last.pt", best_path)
        return f"best.pt restored from last.pt (epoch {best_epoch + 1}); the previous run stopped before copying it"
    return (f"warning: {best_path} holds epoch {'none' if held is None else held + 1} but last.pt records the best at "
            f"epoch {best_epoch + 1}; that checkpoint is gone (was best.pt replaced by hand?)")


@dataclass
class RunLog:
    """Per-epoch metrics in ``metrics.jsonl`` and ``metrics.csv`` (and TensorBoard).

    Both files are rewritten atomically with every row, so neither is ever torn, and the CSV has
    one column set for all rows (test columns stay empty in epochs without evaluation).
    """

    folder: Path
    use_tensorboard: bool
    writer: object = field(default=None, init=False)
    rows: list = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed, so no tensorboard/ folder is written (the metrics are in "
                      "metrics.jsonl and metrics.csv); pip install tensorboard, or --tensorboard false to silence this")

    def resume(self, last_row: dict) -> None:
        """Continue the log of the checkpoint whose own row is ``last_row``: keep the logged rows of
        earlier epochs, then ``last_row``. A kill can leave rows the checkpoint never held, or end
        the log before the checkpoint's row; a resumed log neither repeats nor misses an epoch."""
        path = self.folder / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        self.rows = [row for row in map(_json_row, lines) if row is not None and row["epoch"] < last_row["epoch"]]
        self.rows.append(last_row)
        self._save()

    def _save(self) -> None:
        checkpoints.write_atomic(self.folder / "metrics.jsonl",
                                 lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.rows).encode()))
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        checkpoints.write_atomic(self.folder / "metrics.csv", lambda f: f.write(text.getvalue().encode()))

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._save()
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _json_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("epoch"), int) else None
