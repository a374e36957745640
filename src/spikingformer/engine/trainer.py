"""Training and evaluation loops (one process or many under torchrun).

``train(cfg)`` runs a whole recipe: data, model, timm optimiser / scheduler / mixup, mixed
precision, per-epoch evaluation, atomic ``last.pt`` / ``best.pt`` checkpoints, JSONL + CSV logs
(and TensorBoard when installed), and exact resumption from ``last.pt``
(:mod:`spikingformer.engine.resume`). The run folder is locked while training and never replaced
by accident (:mod:`spikingformer.engine.run_folder`).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from spikingformer import checkpoints
from spikingformer.checkpoints import TrainingState
from spikingformer.config import TrainConfig
from spikingformer.config_rules import validate
from spikingformer.data import build_dataset, check_batch, collate, unread_settings, with_local_folders
from spikingformer.data.workers import leave_sigterm_to_the_main_process, loader_workers
from spikingformer.engine import run_folder as folders
from spikingformer.engine.distributed import (Runtime, alike_everywhere, alike_on_this_machine, all_reduce_sum, barrier,
                                              setup, teardown)
from spikingformer.engine.firing import FiringRateMeter, rate_of
from spikingformer.engine.resume import fresh_start_note, restore, resume_path, rng_state
from spikingformer.engine.run_folder import RunLog
from spikingformer.models import ModelConfig, SpikingTransformer, model_config
from spikingformer.allocator import empty_cache
from spikingformer.cpu_features import pin_threads
from spikingformer.progress import progress
from spikingformer.engine.precision import AMP_NAMES, autocast_dtype, grad_scaler, tf32_switches


# ----------------------------------------------------------------------------------------------
# seeding, data


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        pin_threads()  # another thread count mid-run would sum in another order
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def make_loader(dataset: Dataset, batch_size: int, train: bool, runtime: Runtime, workers: int, seed: int) -> DataLoader:
    """Shuffled, drop-last training loader or in-order eval loader, sharded across processes.

    Training always uses a :class:`DistributedSampler` (a world of one included), so the global
    order of samples depends only on the seed and the epoch: a run resumed on a different number of
    processes sees the same epochs.
    """
    if train:
        sampler = DistributedSampler(dataset, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed, drop_last=True)
    else:  # every sample exactly once; results are summed across processes
        dataset = Subset(dataset, range(runtime.rank, len(dataset), runtime.world_size))
        sampler = None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=train,
        num_workers=loader_workers(workers, warn=runtime.is_main),
        collate_fn=collate,  # leaves out images a folder data set could not decode (warned, named)
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=leave_sigterm_to_the_main_process,
    )


# ----------------------------------------------------------------------------------------------
# metrics


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[int]:
    k_max = min(max(ks), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [int(hits[:, : min(k, k_max)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, runtime: Runtime, amp_dtype: torch.dtype | None) -> dict:
    """Top-1 / top-5 accuracy (%), cross-entropy and firing rate over the whole loader, summed across processes
    (a progress bar on standard error while it runs)."""
    model.eval()
    meter = FiringRateMeter(model)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count: host numbers, summed on the host
    with progress(loader, desc="test", unit="batch", disable=not runtime.is_main) as bar:
        for step, (images, target) in enumerate(bar):
            check_batch(images, loader, step)
            images = images.to(runtime.device, non_blocking=True)
            target = target.to(runtime.device, non_blocking=True)
            with _autocast(runtime.device, amp_dtype):
                logits = model(images)
            loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
            top1, top5 = topk_correct(logits, target)
            sums += torch.tensor([float(loss), top1, top5, len(target)], dtype=torch.float64)
    counts = all_reduce_sum(meter.take(), runtime)  # every process's spikes, as its sums
    meter.close()
    sums = all_reduce_sum(sums, runtime)
    n = max(float(sums[3]), 1.0)
    return {"top1": 100 * float(sums[1]) / n, "top5": 100 * float(sums[2]) / n, "loss": float(sums[0]) / n,
            "firing_rate": rate_of(counts), "samples": int(sums[3])}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# the run


def run_folder(cfg: TrainConfig) -> Path:
    name = cfg.run.name or f"{cfg.config_name}-{cfg.model.model}"
    return Path(cfg.run.output) / name


def build_model(cfg: TrainConfig, num_classes: int) -> SpikingTransformer:
    mcfg = model_config(cfg.model.model, **cfg.model.model_args)
    if mcfg.num_classes != num_classes:
        raise ValueError(
            f"model {cfg.model.model} has {mcfg.num_classes} classes but dataset '{cfg.data.dataset}' has {num_classes}; "
            f"pick a matching model or pass --model-args '{{num_classes: {num_classes}}}'"
        )
    return SpikingTransformer(mcfg)


def train(cfg: TrainConfig) -> dict:
    """Run the recipe; returns the final metrics (and the checkpoint path) on every process.

    The whole configuration is validated first; the main process then holds the run folder's
    lock for the whole run and applies the overwrite policy (:mod:`spikingformer.engine.run_folder`).
    """
    validate(cfg, training=True)
    cfg.data = with_local_folders(cfg.data)  # the checkpoints' record holds for any working folder
    runtime = setup(cfg.run.device)
    with contextlib.ExitStack() as held:
        try:
            if runtime.is_main:
                folder = run_folder(cfg)
                held.enter_context(folders.locked(folder))
                folders.prepare(folder, resume_path(cfg, folder), cfg.run.overwrite)
            with tf32_switches(cfg.run.tf32, runtime.device if runtime.is_main else None):
                return _train(cfg, runtime)
        finally:
            teardown()


def _criterion(mx, num_classes: int):
    """Loss and timm ``Mixup`` (None when off) for the recipe's mixup section."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mx.mixup > 0 or mx.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=mx.mixup, cutmix_alpha=mx.cutmix, prob=mx.mixup_prob, switch_prob=mx.mixup_switch_prob,
                         mode=mx.mixup_mode, label_smoothing=mx.smoothing, num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup_fn
    if mx.smoothing > 0:
        return LabelSmoothingCrossEntropy(mx.smoothing), None
    return nn.CrossEntropyLoss(), None


@dataclass
class _Step:
    """What one optimisation step needs (built once per run)."""

    net: nn.Module  # the model, wrapped in DistributedDataParallel when distributed
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mixup_fn: object
    amp_dtype: torch.dtype | None
    clip_grad: float | None


def _train_one_epoch(st: _Step, loader: DataLoader, runtime: Runtime, meter: FiringRateMeter, epoch: int,
                     total_epochs: int, log_interval: int) -> torch.Tensor:
    """One pass over ``loader`` with a progress bar; returns this process's (loss sum, correct, count)."""
    st.net.train()
    meter.detach()  # attached for the logged steps only (see FiringRateMeter)
    meter.pop()
    sums = torch.zeros(3, dtype=torch.float64)
    t0, seen = time.perf_counter(), 0
    # closed however the epoch ends, so that an error or an interrupt starts on a clean line
    with progress(loader, desc=f"epoch {epoch + 1}/{total_epochs}", disable=not runtime.is_main) as bar:
        for step, (images, target) in enumerate(bar):
            check_batch(images, loader, step)
            images = images.to(runtime.device, non_blocking=True)
            hard_target = target = target.to(runtime.device, non_blocking=True)
            if st.mixup_fn is not None:
                images, target = mix_batch(st.mixup_fn, images, hard_target)
            logged = runtime.is_main and (step % log_interval == 0 or step == len(loader) - 1)
            if logged:
                meter.attach()
            with _autocast(runtime.device, st.amp_dtype):
                logits = st.net(images)
            meter.detach()
            loss = st.criterion(logits.float(), target)
            where = f"at epoch {epoch + 1}, step {step + 1} of {len(loader)}"
            loss_value = stop_if_diverged(loss, runtime, f"{where} (learning rate {st.optimizer.param_groups[0]['lr']:.3g})")
            st.optimizer.zero_grad(set_to_none=True)
            st.scaler.scale(loss).backward()
            if st.clip_grad:
                st.scaler.unscale_(st.optimizer)
                nn.utils.clip_grad_norm_(st.model.parameters(), st.clip_grad)
            st.scaler.step(st.optimizer)
            st.scaler.update()
            n = len(hard_target)
            seen += n
            sums += torch.tensor([loss_value * n, float((logits.argmax(1) == hard_target).sum()), n], dtype=torch.float64)
            if logged:  # fr: the firing rate of this step's forward
                bar.set_postfix(refresh=False, loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}%",
                                lr=f"{st.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{seen * runtime.world_size / (time.perf_counter() - t0):.0f}", fr=f"{meter.pop():.3f}")
    return sums


def stop_if_diverged(loss: torch.Tensor, runtime: Runtime, where: str) -> float:
    """This process's loss as a number; raises ``FloatingPointError`` where it is not finite in any
    process: under torchrun each process learns whether any process's loss is (one all-reduce of two
    numbers a step), so that all stop at this step and the first says it once (marked
    :func:`~spikingformer.engine.distributed.alike_everywhere`). A process stopping alone would leave
    the others waiting in the gradients' all-reduce until torchrun ends them, and a loss that fails
    in every process would be said once by each."""
    value = loss.item()
    state = all_reduce_sum(torch.tensor([value, 0.0 if math.isfinite(value) else 1.0], dtype=torch.float64), runtime)
    failed = int(state[1])
    if failed:
        on = f" on {failed} of {runtime.world_size} processes" if runtime.distributed else ""
        raise alike_everywhere(FloatingPointError(
            f"training diverged: the loss became {state[0].item()}{on} {where}; lower --lr or clip the gradient norm "
            "with --clip-grad (e.g. 1.0)"))
    return value


def mix_batch(mixup_fn, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's ``Mixup`` of a training batch ``(images, soft targets)``. Mixup and CutMix pair the
    batch's images, so timm refuses an odd batch; a batch that an unreadable image (named in a
    warning) left at an odd size trains its last image unmixed, with the target ``Mixup`` gives an
    image it does not mix (one-hot, label-smoothed), instead of leaving it out."""
    from timm.data.mixup import mixup_target

    paired = len(images) - len(images) % 2
    if paired == len(images):
        return mixup_fn(images, target)
    last = mixup_target(target[paired:], mixup_fn.num_classes, smoothing=mixup_fn.label_smoothing)
    if paired == 0:
        return images, last
    mixed, soft = mixup_fn(images[:paired].clone(), target[:paired])
    return torch.cat([mixed, images[paired:]]), torch.cat([soft, last])


# PyTorch's optimizers with a fused kernel for CPU, CUDA and MPS parameters (Adagrad's is the CPU's only;
# timm's own, LAMB, Lookahead, ... have none)
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer ``cfg.optim.opt`` for ``model`` (no weight decay on biases and norms), built
    with ``fused=True`` where it is one of PyTorch's with a fused kernel (:data:`FUSED_OPTIMIZERS`):
    one pass over every parameter instead of several elementwise operations per parameter (CIFAR
    4-384's AdamW step on 2-core CPUs: 4.8-9 ms against 10.7-23)."""
    from timm.optim import create_optimizer_v2

    o = cfg.optim
    kwargs = dict(opt=o.opt, lr=o.lr, weight_decay=o.weight_decay, eps=o.opt_eps, momentum=o.momentum)
    built = create_optimizer_v2(model, **kwargs)
    return create_optimizer_v2(model, fused=True, **kwargs) if type(built) in FUSED_OPTIMIZERS else built


def _train(cfg: TrainConfig, runtime: Runtime) -> dict:
    from timm.scheduler import create_scheduler_v2
    from tqdm import tqdm

    seed_everything(cfg.run.seed, cfg.run.deterministic)
    folder = run_folder(cfg)
    model_cfg: ModelConfig = model_config(cfg.model.model, **cfg.model.model_args)
    with alike_on_this_machine():  # the data set's files and the checkpoint to start from
        train_set = build_dataset(cfg.data, model_cfg.img_size, train=True)
        eval_set = build_dataset(cfg.data, model_cfg.img_size, train=False)
        model = build_model(cfg, train_set.num_classes)
        if cfg.model.initial_checkpoint and not resume_path(cfg, folder):  # a resumed run has its own weights
            from spikingformer.models.initial import load_initial_weights

            taken = load_initial_weights(model, cfg.model.initial_checkpoint)
            if runtime.is_main:
                print(taken)
    model = model.to(runtime.device)
    if runtime.distributed and cfg.model.sync_bn:
        if runtime.device.type != "cuda":
            raise ValueError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm does not run on the CPU); drop it for CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.model.sync_bn:
        warnings.warn("spikingformer: --sync-bn shares BatchNorm's statistics between torchrun's processes; this run "
                      "has one process (it has no effect)", UserWarning, stacklevel=2)
    net: nn.Module = model
    if runtime.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if cfg.run.compile:  # training steps only; evaluation and checkpoints use `model` itself
        net = torch.compile(net)

    o, s = cfg.optim, cfg.schedule
    optimizer = build_optimizer(model, cfg)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=s.epochs, warmup_epochs=s.warmup_epochs, cooldown_epochs=s.cooldown_epochs,
        warmup_lr=s.warmup_lr, min_lr=s.min_lr, decay_epochs=s.decay_epochs, decay_milestones=s.decay_milestones,
        decay_rate=s.decay_rate, step_on_epochs=True,
    )
    amp_dtype = autocast_dtype(cfg.run.amp, runtime.device)
    scaler = grad_scaler(amp_dtype, runtime.device)
    criterion, mixup_fn = _criterion(cfg.mixup, train_set.num_classes)
    st = _Step(net, model, optimizer, scaler, criterion, mixup_fn, amp_dtype, o.clip_grad)

    start_epoch, best, restored, changed = 0, {"top1": -1.0, "epoch": -1}, None, None
    resume = resume_path(cfg, folder)
    if resume:
        with alike_on_this_machine():
            restored, changed = restore(resume, cfg, model, optimizer, scheduler, scaler)
        start_epoch, best = restored.epoch + 1, restored.best
    else:
        scheduler.step(0)
    if runtime.is_main and (unread := unread_settings(cfg.data)):
        warnings.warn(unread, UserWarning, stacklevel=2)
    if runtime.is_main and s.warmup_epochs >= s.epochs:
        warnings.warn(f"spikingformer: --warmup-epochs {s.warmup_epochs} is not below --epochs {s.epochs}: the learning "
                      f"rate stays in its warm-up from {s.warmup_lr:g} and never reaches --lr {o.lr:g}; for a short "
                      "run pass --warmup-epochs 0 (or fewer than --epochs)", UserWarning, stacklevel=2)

    train_loader = make_loader(train_set, cfg.data.batch_size, True, runtime, cfg.data.workers, cfg.run.seed)
    eval_loader = make_loader(eval_set, cfg.data.eval_batch_size, False, runtime, cfg.data.workers, cfg.run.seed)
    if len(train_loader) == 0:
        with alike_on_this_machine():  # the same count on every process that reads these files
            raise ValueError(f"batch size {cfg.data.batch_size} x {runtime.world_size} processes exceeds the {len(train_set)} "
                             "training samples")
    log = None
    if runtime.is_main:
        checkpoints.write_atomic(folder / "config.yaml", lambda f: f.write(_yaml(cfg.to_dict()).encode()))
        log = RunLog(folder, cfg.run.tensorboard)
        if restored is not None:
            log.resume(restored.metrics)
            own = Path(resume).resolve() == (folder / "last.pt").resolve()
            note = folders.repair_best(folder, restored) if own else None
            if note:
                print(note)
            if changed:
                print(f"resuming with changed settings (the checkpoint's -> this run's): {changed}")
        elif note := fresh_start_note(cfg, folder):
            print(note)
        if start_epoch >= total_epochs:
            print(f"{folder}: this run already finished its {total_epochs} epochs; its recorded final metrics follow "
                  "(to train longer, raise --epochs with --resume auto)")
        else:
            print(f"training {cfg.model.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on {cfg.data.dataset}: "
                  f"{len(train_set)} train / {len(eval_set)} test samples, {runtime.world_size} process(es) on {runtime.device}, "
                  f"amp={AMP_NAMES[amp_dtype]}, epochs {start_epoch + 1}..{total_epochs}"
                  f"{f' ({s.epochs} + {s.cooldown_epochs} of cooldown at --min-lr)' if s.cooldown_epochs else ''} -> {folder}")

    metrics: dict = restored.metrics if restored is not None else {}
    meter = FiringRateMeter(model)
    saved = start_epoch - 1  # the last epoch whose checkpoint is on disk
    try:
        for epoch in range(start_epoch, total_epochs):
            train_loader.sampler.set_epoch(epoch)
            if mixup_fn is not None and cfg.mixup.mixup_off_epoch and epoch >= cfg.mixup.mixup_off_epoch:
                mixup_fn.mixup_enabled = False  # targets stay label-smoothed, as in the authors' code
            t0 = time.perf_counter()
            sums = _train_one_epoch(st, train_loader, runtime, meter, epoch, total_epochs, cfg.run.log_interval)
            epoch_time = time.perf_counter() - t0
            sums = all_reduce_sum(sums, runtime)
            lr = optimizer.param_groups[0]["lr"]  # this epoch's, as timm logs it: before the step to the next one's
            scheduler.step(epoch + 1)
            row = {"epoch": epoch, "lr": lr, "train_loss": float(sums[0] / sums[2]),
                   "train_top1": float(100 * sums[1] / sums[2]), "epoch_time_s": epoch_time,
                   "images_per_s": float(sums[2]) / epoch_time}
            if (epoch + 1) % cfg.run.eval_interval == 0 or epoch == total_epochs - 1:
                empty_cache()  # the CPU blocks cached for training steps do not fit evaluation's sizes
                ev = evaluate(model, eval_loader, runtime, amp_dtype)
                empty_cache()
                row.update({f"test_{k}": v for k, v in ev.items() if k != "samples"})
                if ev["top1"] > best["top1"]:
                    best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": epoch}
            metrics = row
            if runtime.is_main:  # last.pt, then best.pt (a copy of it), then the log: see engine/run_folder.py
                state = TrainingState(epoch, row, best, optimizer.state_dict(), scheduler.state_dict(), scaler.state_dict(),
                                      rng_state())
                folders.save_checkpoint(folder, checkpoints.training_checkpoint(model, cfg.model.model, cfg.to_dict(), state),
                                        best=best["epoch"] == epoch)
                log.write(row)
                tqdm.write(_epoch_line(row, total_epochs))
            barrier(runtime)
            saved = epoch
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM (cli.Terminated): one line that says what is kept
        raise type(err)(_interrupted(folder, saved)) from None
    meter.close()
    if log is not None:
        log.close()
    return {"metrics": metrics, "best": best, "folder": str(folder), "checkpoint": str(folder / "best.pt"),
            "last": str(folder / "last.pt"), "is_main": runtime.is_main}


def _interrupted(folder: Path, saved: int) -> str:
    if saved < 0:
        return "no epoch had finished, so no checkpoint was written"
    return f"{folder / 'last.pt'} holds epoch {saved + 1}: continue with --resume auto"


def _epoch_line(row: dict, total: int) -> str:
    line = (f"epoch {row['epoch'] + 1}/{total}  loss {row['train_loss']:.4f}  train {row['train_top1']:.1f}%  "
            f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s")
    if "test_top1" in row:
        line += f"  | test top-1 {row['test_top1']:.2f}%  top-5 {row['test_top5']:.2f}%  firing rate {row['test_firing_rate']:.3f}"
    return line


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)

