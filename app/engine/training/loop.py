"""The one training loop every learned paradigm shares, and the :class:`Trainer` hooks it drives.

``run(key, cfg, progress, cancel)`` looks up the paradigm's trainer (``Registrar.trainer``, a
``"module:Class"`` string) and runs it:

* seed, torch threads, device (``auto``: CUDA when present, the local rank's GPU under torchrun);
* DistributedDataParallel when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU): every rank takes
  its own slice of each step's global sample list (the trainer's ``sample`` gets ``rank`` /
  ``world``) and rank 0 validates and writes;
* mixed precision on CUDA (bfloat16 when supported, else float16 with a gradient scaler);
* Adam over the trainer's trainable parameters, constant or cosine learning rate;
* validation every ``val_every`` steps and at the end (rank 0), a checkpoint every ``ckpt_every``
  steps and at the end, written atomically with the optimiser state (``resume`` continues it: the
  network comes from the checkpoint, the step count and the validation history too);
* ``progress(Progress("train", step, steps, loss, ...))`` every step; ``cancel`` (a
  ``threading.Event``) is checked every step and raises :class:`~app.engine.types.Cancelled`
  (the last periodic checkpoint stays valid);
* a non-finite loss stops training with a RuntimeError.

A paradigm's trainer subclasses :class:`Trainer` and implements what is its own: the data, the
network, the objective, validation, and the metadata written into the checkpoint.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from .. import checkpoints
from ..nn import resolve_device
from ..types import Progress, ProgressFn, check_cancel
from .config import LoopConfig

log = logging.getLogger(__name__)


class Trainer:
    """What a learned paradigm brings to the shared loop (subclass it; one module per paradigm).

    The loop calls, in order: ``build`` once, ``objective`` once, then per step ``sample`` ->
    ``objective()(**batch)`` -> backward/step -> ``after_step``; ``validate`` on rank 0 every
    ``val_every`` steps; ``preprocessing`` and ``record`` whenever it writes the checkpoint.

    Attributes set by the loop: ``key`` (paradigm), ``cfg`` (its TrainConfig), ``device``,
    ``rank``, ``world``, ``autocast`` (a context-manager factory, or None off CUDA).
    """

    def __init__(self, key: str, cfg: LoopConfig, device: torch.device, rank: int = 0, world: int = 1):
        self.key, self.cfg, self.device, self.rank, self.world = key, cfg, device, rank, world
        self.autocast: Optional[Callable] = None
        self.model: Optional[nn.Module] = None

    # -- required
    def build(self, resume: Optional[dict], progress: Optional[ProgressFn]) -> nn.Module:
        """Load the data and build the network (``resume``: the loaded checkpoint to continue, whose
        ``"model"`` is rebuilt already). Returns the module that is checkpointed (it has ``.config``)."""
        raise NotImplementedError

    def objective(self) -> nn.Module:
        """A module whose ``forward(**batch)`` returns a dict of scalar loss terms including ``"total"``
        (a module so that DistributedDataParallel can wrap it)."""
        raise NotImplementedError

    def sample(self, step: int, rng: np.random.Generator, step_rng: np.random.Generator) -> dict:
        """This rank's batch for ``step`` as keyword arguments of the objective. ``step_rng`` is the
        same on every rank (draw the global sample list from it, then take this rank's slice);
        ``rng`` is this rank's own."""
        raise NotImplementedError

    def preprocessing(self) -> dict:
        """The inference preprocessing stored in the checkpoint (grid shape, spacing, ...)."""
        raise NotImplementedError

    # -- shared helpers
    def load_training_subjects(self, prep, with_labels: bool, progress: Optional[ProgressFn] = None) -> list:
        """The split's training subjects (the first ``max_train_subjects`` when set), preprocessed with
        ``prep`` (cached in ``cache_dir``); sets ``self.names``. Returns the
        :class:`~app.engine.datasets.Subject` list."""
        from .. import datasets as D
        cfg = self.cfg
        self.names = list(D.load_split(cfg.split)["train"])[:cfg.max_train_subjects or None]
        if progress:
            progress(Progress("load", message=f"preprocessing {len(self.names)} training subjects"))
        return D.load_subjects(self.names, prep, cfg.data_root, with_labels=with_labels,
                               cache_dir=cfg.cache_dir or None)

    # -- optional
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def after_step(self, step: int, parts: dict) -> dict[str, float]:
        """Extra work after the optimiser step (e.g. a discriminator's own step); extra history values."""
        return {}

    def validate(self) -> dict[str, float]:
        """Validation numbers on rank 0 (empty: none)."""
        return {}

    def record(self) -> dict[str, Any]:
        """Paradigm-specific training metadata (data, losses, augmentation) for the checkpoint."""
        return {}

    def summary(self, val: dict) -> str:
        """A few words for the progress line from the latest validation numbers."""
        return " ".join(f"{k} {v:.3f}" for k, v in val.items() if k != "step" and isinstance(v, float))


def trainer_class(key: str) -> type:
    """The :class:`Trainer` subclass of learned paradigm ``key`` (ValueError when it has none)."""
    from .. import paradigms
    reg = paradigms.get(key)
    target = getattr(reg, "trainer", None)
    if not target:
        learned = [k for k in paradigms.available() if getattr(paradigms.registrar_class(k), "trainer", None)]
        raise ValueError(f"paradigm '{key}' is not trained (no trainer); trainable: {', '.join(learned)}")
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)


def dist_info() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist
    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def learning_rate(cfg: LoopConfig, step: int) -> float:
    """Learning rate at ``step`` (1-based): constant, or cosine from lr down to 10 % of lr."""
    if cfg.lr_schedule != "cosine":
        return cfg.lr
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - 1) / max(cfg.steps - 1, 1))))


def run(key: str, cfg: LoopConfig, progress: Optional[ProgressFn] = None,
        cancel: Optional[threading.Event] = None) -> dict:
    """Train paradigm ``key`` with ``cfg`` (its TrainConfig); returns ``{"path", "model", "history",
    "val", "trainer"}``. Raises ValueError for bad options, Cancelled when ``cancel`` is set."""
    from .. import paradigms
    reg_cls = paradigms.registrar_class(key)
    want = getattr(reg_cls, "TrainConfig", None)
    if want is None or not isinstance(cfg, want):
        raise ValueError(f"paradigm '{key}' trains with {getattr(want, '__name__', 'no config')}, "
                         f"got {type(cfg).__name__}")
    if not cfg.out:
        raise ValueError("the checkpoint file to write (out) is required")
    trainer_cls = trainer_class(key)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, created_pg = dist_info()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    try:
        resume = None
        if cfg.resume:
            resume = checkpoints.load_checkpoint(cfg.resume, expected_paradigm=key,
                                                 kinds=getattr(reg_cls, "network_kinds", ()))
        trainer: Trainer = trainer_cls(key, cfg, device, rank, world)
        model = trainer.build(resume, progress)
        trainer.model = model
        model.to(device)
        objective = trainer.objective()
        use_amp = device.type == "cuda" and cfg.amp
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        if use_amp:
            trainer.autocast = lambda: torch.autocast("cuda", dtype=amp_dtype)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        wrapped: nn.Module = objective
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            wrapped = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.Adam(trainer.trainable(), lr=cfg.lr)
        start, seconds_before, val_history = 0, 0.0, []
        if resume is not None:
            if resume.get("optimizer") is not None:
                opt.load_state_dict(resume["optimizer"])
            start = int(resume["training"].get("steps", 0))
            seconds_before = float(resume["training"].get("seconds", 0.0))
            val_history = list(resume["training"].get("val_history", []))
        out_path = Path(cfg.out)
        history: list[dict] = []
        val: dict = {}

        def save(step: int) -> None:
            if rank != 0:
                return
            training = {
                **trainer.record(),
                "steps": step, "batch_size": cfg.batch_size, "world_size": world, "lr": cfg.lr,
                "lr_schedule": cfg.lr_schedule, "validation": val, "val_history": val_history,
                "seconds": round(time.perf_counter() - t_start + seconds_before, 1),
                "device": str(device), "seed": cfg.seed, "config": dataclasses.asdict(cfg),
            }
            checkpoints.save_checkpoint(out_path, paradigm=key, model=model, preprocessing=trainer.preprocessing(),
                                        training=training, optimizer=opt.state_dict())

        for step in range(start + 1, cfg.steps + 1):
            check_cancel(cancel)
            model.train()
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg, step)
            batch = trainer.sample(step, np.random.default_rng([cfg.seed, step, rank, 1]),
                                   np.random.default_rng([cfg.seed, step]))
            parts = wrapped(**batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(parts["total"]).backward()
            scaler.step(opt)
            scaler.update()
            rec = {"step": step, **{k: float(v.detach()) for k, v in parts.items()}}
            rec.update(trainer.after_step(step, parts))
            if not math.isfinite(rec["total"]):
                raise RuntimeError(f"training diverged at step {step} (loss {rec['total']}); lower the lr")
            history.append(rec)
            if rank == 0 and cfg.val_every and step % cfg.val_every == 0:
                v = trainer.validate()
                if v:
                    val = {"step": step, **v}
                    val_history.append(val)
                    log.info("step %d validation %s", step, val)
            if progress:
                msg = f"loss {rec['total']:.4f}"
                if val:
                    msg += " | val " + trainer.summary(val)
                progress(Progress("train", iteration=step, total=cfg.steps, loss=rec["total"],
                                  fraction=step / cfg.steps, message=msg))
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step != cfg.steps:
                save(step)
        if rank == 0 and (not val or val.get("step") != cfg.steps):
            v = trainer.validate()
            if v:
                val = {"step": cfg.steps, **v}
                val_history.append(val)
        save(cfg.steps)
        if world > 1:
            import torch.distributed as dist
            dist.barrier()
        return {"path": out_path, "model": model, "history": history, "val": val, "trainer": trainer}
    finally:
        if created_pg:
            import torch.distributed as dist
            dist.destroy_process_group()
