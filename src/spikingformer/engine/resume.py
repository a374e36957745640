"""Exact resumption of a training run from its ``last.pt``: the run's objects are restored from the
training state (:class:`~spikingformer.checkpoints.TrainingState`) its checkpoints hold, random
number generators included, so a resumed run continues as if never stopped."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import yaml

from spikingformer import checkpoints
from spikingformer.config import SECTIONS, TrainConfig
from spikingformer.data import FOLDERS, local_folder
from spikingformer.models import model_config


def rng_state() -> dict:
    """The state of Python's, NumPy's and PyTorch's generators, as plain data and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), pos, has_gauss, cached]  # plain data: checkpoints load with weights_only
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def resume_path(cfg: TrainConfig, folder: Path) -> str | None:
    """The checkpoint ``--resume`` names (``auto``: the run folder's ``last.pt``, if there is one)."""
    if cfg.run.resume == "auto":
        return str(folder / "last.pt") if (folder / "last.pt").exists() else None
    return cfg.run.resume


def fresh_start_note(cfg: TrainConfig, folder: Path) -> str | None:
    """What ``--resume auto`` says where the run folder holds no ``last.pt``: a new run starts (as a job
    that restarts itself with one command wants), and the runs beside it that the user may have meant."""
    if cfg.run.resume != "auto" or (folder / "last.pt").exists():
        return None
    note = f"--resume auto: {folder} holds no last.pt, so this is a new run"
    others = sorted(p.parent.name for p in folder.parent.glob("*/last.pt") if p.parent.name != folder.name)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        note += (f"; to continue another run in {folder.parent} ({shown}), name it with --name "
                 "(and give its recipe's --config)")
    return note


def restore(path: str, cfg: TrainConfig, model, optimizer, scheduler, scaler) -> tuple[checkpoints.TrainingState, str | None]:
    """Load a ``last.pt`` into the run's objects; returns its training state (epoch, best, metrics) and
    a line naming the settings this run changes (None: none changed).

    The model, the optimizer's moments, the gradient scaler and the random generators continue as saved;
    the optimizer's settings and the learning-rate schedule are this run's (as timm's resume gives them):
    raising ``--epochs`` stretches the schedule, a new ``--lr`` applies. Unchanged settings continue
    exactly (every offered schedule is a function of the epoch alone).
    """
    ckpt = checkpoints.read(path)
    if ckpt.kind != checkpoints.FORMAT or ckpt.training is None:
        raise ValueError(f"{path} is not a spikingformer training checkpoint; --resume needs a last.pt written by `spikingformer train`")
    _check_resume_config(ckpt, cfg)
    checkpoints.load_matching(model, ckpt.state_dict, ckpt)
    state = ckpt.training
    chosen = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state.optimizer)
    for group, settings in zip(optimizer.param_groups, chosen):
        group.update(settings)  # this run's lr, weight decay, ...; the saved moments stay
    scheduler.step(state.epoch + 1)  # this run's schedule, at the epoch that comes next
    scaler.load_state_dict(state.scaler)
    set_rng_state(state.rng)
    return state, _changed_settings(ckpt, cfg)


def _changed_settings(ckpt: checkpoints.Checkpoint, cfg: TrainConfig) -> str | None:
    """``"batch_size 64 -> 32, lr 0.003 -> 0.0001, epochs 6 -> 8"``: the settings that differ from the
    checkpoint's run, in every section (settings it predates, and --resume / --overwrite, are not compared)."""
    saved, now = ckpt.train_config or {}, cfg.to_dict()
    data = saved.get("data", {})  # a run recorded before folders were made absolute (2026-12-06) named them as given
    saved = {**saved, "data": {**data, **{key: local_folder(data[key]) for key in FOLDERS if isinstance(data.get(key), str)}}}
    changes = [f"{key} {_shown(saved[section][key])} -> {_shown(value)}" for section in SECTIONS
               for key, value in now[section].items()
               if key not in _NOT_SETTINGS and key in saved.get(section, {}) and saved[section][key] != value]
    return ", ".join(changes) or None


# how this command continues the run, not how the run trains (a resumed run's weights are its last.pt's)
_NOT_SETTINGS = {"resume", "overwrite", "initial_checkpoint"}


def _shown(value) -> str:
    """A setting as a recipe writes it (``{time_steps: 2}``, ``[1.0, 1.0]``, ``true``), numbers as the epoch lines."""
    if isinstance(value, float):
        return f"{value:g}"
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def _check_optimizer(ckpt: checkpoints.Checkpoint, cfg: TrainConfig) -> None:
    saved = ((ckpt.train_config or {}).get("optim") or {}).get("opt")
    if saved is not None and saved != cfg.optim.opt:
        raise ValueError(f"cannot resume from {ckpt.where} with --opt {cfg.optim.opt}: its optimizer state is {saved}'s; "
                         f"resume with --opt {saved} or start a new run with --name")


def _check_resume_config(ckpt: checkpoints.Checkpoint, cfg: TrainConfig) -> None:
    _check_optimizer(ckpt, cfg)
    saved, mine = ckpt.model_config, model_config(cfg.model.model, **cfg.model.model_args).to_dict()
    if saved != mine:
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        own = Path(ckpt.where).parent / "config.yaml"  # the run's whole configuration, written beside it
        same = f" (or all of the run's own settings: --config {own} --resume {cfg.run.resume})" if own.exists() else ""
        raise ValueError(
            f"cannot resume from {ckpt.where}: it holds a different model ({ckpt.model_name}; differing fields "
            f"(checkpoint, now): {diff}). Use the same --model/--model-args{same} or start a new run with --name"
        )
