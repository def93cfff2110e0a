"""The training loop: ``train(cfg) -> exit code``; ``Trainer.fit()`` calls ``train_step()`` per micro-batch.

One FakeDiffer goes through ``accelerator.prepare`` with its optimizer (DDP or DeepSpeed, mixed
precision); the loader is built per rank by fdtrain.data.build_loader and is *not* prepared (DALI
shards by rank itself). The schedule is stepped once per optimizer step. At each step boundary:
log, validate, checkpoint, and honour a preemption signal, in that order.

Exit codes: 0 done; fdtrain.EXIT_PREEMPTED (75) checkpointed after SIGTERM/SIGUSR1, resume with
``--resume auto``; 3 too many non-finite losses (the last good checkpoint is left as it was);
2 configuration errors (raised as ConfigError, reported by the CLI).
"""
from __future__ import annotations

import atexit
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fdtrain import EXIT_PREEMPTED
from fdtrain.config import Config, ConfigError
from fdtrain.data import DataError
from fdtrain.engine import evaluate as ev
from fdtrain.engine import resume_config
from fdtrain.engine.accel import build_accelerator, is_deepspeed
from fdtrain.engine.checkpoint import (
    Checkpointer,
    best_checkpoint,
    checkpoint_config,
    list_checkpoints,
    newest_checkpoint,
)
from fdtrain.engine.optim import Schedule, apply_schedule, build_optimizer, build_scheduler, optimizer_steps_per_epoch
from fdtrain.engine.runlock import RunLock
from fdtrain.engine.signals import PreemptionHandler
from fdtrain.engine.tblog import Progress, TBLogger

log = logging.getLogger("fdtrain.train")

EXIT_OK = 0
EXIT_NONFINITE = 3


class NonFiniteLimitError(RuntimeError):
    """More non-finite losses than train.max_nonfinite."""


class Trainer:
    """Owns the accelerator, model, optimizer, schedule, loaders, checkpointer and loggers of one run."""

    def __init__(self, cfg: Config):
        from accelerate.utils import set_seed

        from fdtrain.data import build_loader
        from fdtrain.losses import FakeDifferLoss
        from fdtrain.models import create_model_from_config

        self.cfg = cfg
        self.acc = acc = build_accelerator(cfg)
        self.deepspeed = is_deepspeed(acc)
        self.run_dir = Path(cfg.run_dir)
        self.lock = RunLock(self.run_dir)
        _on_every_rank(acc, self.lock.acquire if acc.is_main_process else None)  # one live run per folder
        atexit.register(self.lock.release)  # whatever way this process ends, short of a kill -9
        self._check_inputs()  # every data path, before minutes of model and loader set-up
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.deepspeed and cfg.model.channels_last:
            # DeepSpeed broadcasts and flattens parameters as contiguous byte buffers and refuses
            # channels_last conv weights: NCHW end to end there (weights, model inputs, DALI output),
            # so that no step re-lays a tensor out.
            log.info("DeepSpeed: model.channels_last=false (NCHW weights and inputs)")
            cfg.model.channels_last = False
        set_seed(cfg.run.seed)  # identical initial weights on every rank
        model = create_model_from_config(cfg.model)
        self.loss_fn = FakeDifferLoss(cfg.loss)
        self._build_loader = build_loader
        self.loader = build_loader(cfg, "train", rank=acc.process_index, world_size=acc.num_processes,
                                   device=acc.device)
        self.steps_per_epoch = self._optimizer_steps_per_epoch()
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.global_batch = cfg.data.batch_size * acc.num_processes * cfg.train.grad_accum
        if acc.device.type == "cuda":
            # fixed input size: cuDNN's autotuner picks each convolution's fastest algorithm once
            torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
        optimizer = build_optimizer(model, cfg.optim)
        # the torch optimizer itself (Accelerate and DeepSpeed wrap it): takes the found_inf flag
        self._opt = optimizer
        self._fused = bool(optimizer.defaults.get("fused"))
        if self.deepspeed and not self._fused:
            raise ConfigError("optim.fused=false under DeepSpeed: a non-finite step is skipped through the fused "
                              "Adam kernel's found_inf flag there; set optim.fused=true")
        self.schedule = Schedule(cfg.optim, self.global_batch, self.total_steps)
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps, schedule=self.schedule)
        if cfg.train.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # DeepSpeed bf16/fp16 casts the module itself (no autocast), so inputs must follow
        self.input_dtype = next(self.model.parameters()).dtype if self.deepspeed else None
        set_seed(cfg.run.seed + acc.process_index)  # per-rank dropout streams after the shared init

        self.ckpt = Checkpointer(self.run_dir / "checkpoints", acc, keep_last=cfg.checkpoint.keep_last,
                                 keep_best=cfg.checkpoint.keep_best)
        self.tb = TBLogger(self.run_dir / "tb", enabled=acc.is_main_process and cfg.logging.tensorboard)
        self.progress: Progress | None = None
        self.signals: PreemptionHandler | None = None
        self._eval_loaders: dict[str, Any] = {}
        # trainer state saved in every checkpoint
        self.step = 0  # optimizer steps taken (= scheduler steps)
        self.epoch = 0  # epochs completed
        self.nonfinite = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.best: dict[str, Any] | None = None  # {"value", "step"} of the best evaluation so far
        self.last_metrics: dict[str, Any] = {}
        self._micro_start = 0  # micro-batches of the current epoch already consumed (resume)
        self.on_batch: Callable[[int, dict], None] | None = None  # test hook: (step about to run, batch)
        # Device-side state between host reads (see _host_read): the window's loss sums, the
        # accumulation window's "non-finite" flag, and the counts of skipped steps since the last read.
        self._win_bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        self._skips = torch.zeros(2, device=acc.device)  # [non-finite steps, AMP overflow skips] since the last read
        self._stop_dev = torch.zeros(1, device=acc.device)
        self.amp_skipped = 0  # steps the grad scaler skipped for overflowing (finite-loss) gradients
        self._new_window()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # BatchNorm running stats change in the forward pass, before the loss can be checked: a
        # snapshot per accumulation window lets a skipped (non-finite) step leave no trace.
        self._bn = _BufferGuard(list(acc.unwrap_model(self.model).buffers()))
        self._micro_in_window = 0
        self._epoch_labels = torch.zeros(2, device=acc.device)  # (images, fakes) this rank trained on this epoch
        self._panel: tuple | None = None  # (x, recon_real, recon_fake, y) due for TensorBoard at the boundary

    def _check_inputs(self) -> None:
        """Fail now, not after an epoch (val) or after all of training (test sets): every split
        of the recipe must be a readable shard folder, and the selection set must exist."""
        from fdtrain import FdtrainError
        from fdtrain.data import DataError
        from fdtrain.data.format import open_shards, split_path

        cfg = self.cfg
        self._selection_set()
        problems = []
        for split in ["train", *(["val"] if cfg.data.val else []), *cfg.data.test]:
            location, field = split_path(cfg, split, None)
            try:
                open_shards(location, split, field=field, need_index=False)
            except DataError as e:
                problems.append(str(e))
        if cfg.model.pretrained:  # the weights file too, in the same message
            from fdtrain.models.backbone import check_pretrained_weights, find_pretrained_weights

            try:
                check_pretrained_weights(cfg.model.backbone,
                                         find_pretrained_weights(cfg.model.backbone, cfg.model.pretrained_path))
            except ConfigError as e:
                problems.append(str(e))
        if problems:
            raise FdtrainError("cannot start: " + "; ".join(problems))

    # ---- sizes ---------------------------------------------------------------------------
    def _optimizer_steps_per_epoch(self) -> int:
        """Optimizer steps per epoch; the remainder micro-batches (< grad_accum) are dropped so that
        epochs and accumulation windows line up (and resume lands on a window boundary)."""
        micro = len(self.loader)
        if self.cfg.train.steps_per_epoch > micro:
            log.warning("train.steps_per_epoch=%d exceeds the loader's %d batches; using %d",
                        self.cfg.train.steps_per_epoch, micro, micro)
        steps = optimizer_steps_per_epoch(micro, self.cfg.train)
        if steps == 0:
            micro = min(micro, self.cfg.train.steps_per_epoch or micro)
            raise ConfigError(f"data.train: {micro} batches per epoch per rank cannot fill one optimizer step of "
                              f"train.grad_accum={self.cfg.train.grad_accum}; lower data.batch_size or grad_accum")
        return steps

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "nonfinite": self.nonfinite, "best": self.best,
                "last_metrics": self.last_metrics, "samples": self.schedule.samples_at(self.step),
                "schedule": self._schedule_summary()}

    def _schedule_summary(self) -> dict[str, Any]:
        """What a resumed run compares to see whether its config changed the schedule."""
        c = self.cfg.optim
        return {"global_batch": self.global_batch, "total_steps": self.total_steps, "peak_lr": self.schedule.peak_lr,
                "reference_batch": c.reference_batch, "lr_scaling": c.lr_scaling, "schedule": c.schedule,
                "warmup_steps": c.warmup_steps, "hold_steps": c.hold_steps, "decay_every": c.decay_every,
                "decay_rate": c.decay_rate, "min_lr_ratio": c.min_lr_ratio}

    def _rebuild_schedule(self, trainer_state: dict[str, Any], path: Path) -> None:
        """The schedule of *this* config, continued from the samples the checkpoint had seen.

        LambdaLR's saved state holds the old base lr and the optimizer the old next lr; both are
        replaced, so a raised max_steps/epochs (cosine length), a new lr or another global batch take
        effect from the first resumed step instead of the old schedule's end (lr 0 for cosine).
        """
        samples = int(trainer_state.get("samples", self.step * self.global_batch))
        self.schedule.rebase(self.step, samples)
        apply_schedule(self.scheduler, self.cfg.optim, self.step)
        old, new = trainer_state.get("schedule"), self._schedule_summary()
        if old is None:
            return
        changed = [f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v]
        if changed:
            self._say(f"schedule rebuilt from the new config at step {self.step} ({samples} samples seen, "
                      f"checkpoint {path.name}): {', '.join(changed)}; next lr {self.schedule.lr(self.step):.4g}")

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.nonfinite = sd.get("nonfinite", 0)
        self.best = sd.get("best")
        self.last_metrics = sd.get("last_metrics", {})

    def _restore_best(self, ckpt_dir: Path) -> None:
        """The best so far from best.json: a checkpoint is saved before its step's validation, so
        its own trainer state may predate the best it became."""
        try:
            info = json.loads((ckpt_dir / "best.json").read_text())
        except (OSError, ValueError):
            return
        step = info.get("step")
        if isinstance(step, int) and step <= self.step and (self.best is None or step >= self.best["step"]):
            self.best = {"value": info["value"], "step": step}

    def _resume(self) -> None:
        ckpt_dir = self.run_dir / "checkpoints"
        choice = self.cfg.run.resume
        if not choice:
            if list_checkpoints(ckpt_dir):
                raise ConfigError(f"run.resume: {self.run_dir} already has checkpoints; continue it with "
                                  "--resume auto, or pick another --run.name")
            self.loader.set_epoch(0)
            return
        path = newest_checkpoint(ckpt_dir) if choice == "auto" else Path(choice)
        if path is None:
            log.info("--resume auto: no checkpoint in %s yet, starting from scratch", ckpt_dir)
            self.loader.set_epoch(0)
            return
        changed = resume_config.compare(checkpoint_config(path), self.cfg, str(path))  # before any weights load
        state = self.ckpt.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step, self.epoch = state["step"], state["epoch"]
        self.load_state_dict(state["trainer"])
        self._restore_best(ckpt_dir)
        for group in self.optimizer.param_groups:  # the loaded state holds the old values; the config rules
            group.update(weight_decay=self.cfg.optim.weight_decay, betas=tuple(self.cfg.optim.betas),
                         eps=self.cfg.optim.eps)
        if changed:
            self._say(f"resumed with config changes (they take effect now): {resume_config.describe(changed)}")
            if self.acc.is_main_process:
                resume_config.record(self.run_dir, self.step, str(path), changed)
        self._rebuild_schedule(state["trainer"], path)
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
            pos = self.loader.state_dict()  # the loader may roll a finished epoch over
            self._micro_start = int(pos["step_in_epoch"])
            if int(pos["epoch"]) != self.epoch:
                raise RuntimeError(f"{path}: trainer at epoch {self.epoch} but loader at epoch {pos['epoch']}")
        else:
            self.loader.set_epoch(self.epoch)
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, "
                  f"{self._micro_start} batches into it)")

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> int:
        cfg = self.cfg
        with PreemptionHandler() as sig:
            self.signals = sig
            self._resume()
            if self.acc.is_main_process:
                cfg.save(self.run_dir / "config.yaml")
                (self.run_dir / "preempted.json").unlink(missing_ok=True)
                self.tb.config(cfg.to_yaml(), _flat(cfg.to_dict()))
            self._say(self.schedule.describe(self.steps_per_epoch, batch=cfg.data.batch_size,
                                             processes=self.acc.num_processes, grad_accum=cfg.train.grad_accum))
            self.progress = Progress(self.total_steps, self.step, mode=cfg.logging.progress,
                                     enabled=self.acc.is_main_process)
            self._say(f"training {self.total_steps} optimizer steps ({self.steps_per_epoch}/epoch) on "
                      f"{self.acc.num_processes} x {self.acc.device} ({self.acc.distributed_type}), "
                      f"loader {self.loader.backend}, precision {self.acc.mixed_precision}, "
                      f"batch {cfg.data.batch_size}x{cfg.train.grad_accum}x{self.acc.num_processes}")
            self.model.train()
            try:
                while self.step < self.total_steps:
                    status = self._train_epoch()
                    if status is not None:
                        return status
            except NonFiniteLimitError as e:
                last = newest_checkpoint(self.run_dir / "checkpoints")
                self._say(f"fdtrain: stopping: {e}. Last good checkpoint: {last or 'none'} (left untouched).")
                return EXIT_NONFINITE
            return self._final_evaluation()

    def _train_epoch(self) -> int | None:
        ga = self.cfg.train.grad_accum
        limit = self.steps_per_epoch * ga
        micro = self._micro_start
        self._micro_start = 0
        it = iter(self.loader)
        while micro < limit and self.step < self.total_steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:  # every rank must take the same steps, or DDP hangs: fail loudly
                raise RuntimeError(f"train loader ended after {micro} batches but promised {len(self.loader)} "
                                   f"(backend {self.loader.backend}, epoch {self.epoch})") from None
            except DataError as e:  # this rank's shards only (a damaged sample): the others wait in a collective
                raise self._rank_local(e) from None
            self._win["data"] += time.perf_counter() - t0
            if self.on_batch is not None:
                self.on_batch(self.step, batch)
            self.train_step(batch)
            micro += 1
            if not self.acc.sync_gradients:
                continue
            if micro >= limit:  # the epoch's last step: its boundary comes after the epoch is closed
                break
            status = self._step_boundary(epoch_done=False)
            if status is not None:
                return status
        del it  # release the reader before the next epoch is set up
        if micro < limit:  # max_steps reached mid-epoch; that step's boundary is done
            return None
        self._log_class_share()
        self.epoch += 1
        self.loader.set_epoch(self.epoch)  # so the epoch-end checkpoint resumes at the next epoch
        return self._step_boundary(epoch_done=True)

    def train_step(self, batch: dict) -> None:
        """One micro-batch: forward, loss, backward; at an accumulation boundary, the optimizer step.

        Reads nothing back from the device: the loss sums, the non-finite flag and the skip decision
        stay there (the fused optimizer takes the flag as ``found_inf``, as with a grad scaler) until
        the next host read at a step boundary (``_host_read``).
        """
        x, y = batch["x"], batch["label"]
        x_noisy = batch.get("x_noisy", x)
        x_noisy2 = batch.get("x_noisy2")  # two_pass: its second pass's own X~ draw
        if self.input_dtype is not None and x.dtype != self.input_dtype:
            x, x_noisy = x.to(self.input_dtype), x_noisy.to(self.input_dtype)
            x_noisy2 = None if x_noisy2 is None else x_noisy2.to(self.input_dtype)
        if self._micro_in_window == 0:
            self._bn.save()
        self._micro_in_window += 1
        with self.acc.accumulate(self.model):
            out = self.model(x, x_noisy, labels=y, x_noisy2=x_noisy2)
            losses = self.loss_fn(out, x, y)
            loss = losses["total"]
            finite = torch.isfinite(loss.detach())
            self._win_bad |= ~finite
            terms = torch.stack([losses[k].detach().float() for k in ("total", "cls", "rec_real", "rec_fake")]
                                + [self._one])
            self._win_dev[:5] += torch.where(finite, terms, 0.0)  # sums of the finite terms, their count
            self._win["images"] += x.shape[0]
            self._epoch_labels[0] += y.numel()
            self._epoch_labels[1] += y.detach().float().sum()
            if self.deepspeed:
                bad = self._deepspeed_backward(loss)
            else:
                self.acc.backward(loss)
                bad = self._optimizer_step() if self.acc.sync_gradients else None
            if bad is not None:
                self._after_step(bad, out, x, y)

    def _agree(self, flag: torch.Tensor) -> torch.Tensor:
        """Max of a 0/1 float flag over ranks; a device collective (NCCL does not block the host)."""
        if self.acc.num_processes > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag

    def _optimizer_step(self) -> torch.Tensor:
        """Unscale (fp16), clip/measure the gradient, decide the skip on the device, step.

        Returns the agreed "non-finite" flag (float 0/1 on the device): a non-finite loss in the
        window, or a non-finite gradient where no grad scaler owns that case. With a scaler, an
        overflowing gradient of a finite loss is the scaler's business: skipped and the scale backed
        off, counted apart (``amp/overflow_skipped``).
        """
        opt, scaler = self._opt, self.acc.scaler
        if scaler is not None:
            scaler.unscale_(opt)  # once per step, here; found_inf lands on the device
        gn = _grad_norm(self._params, self.cfg.optim.grad_clip)
        bad = self._win_bad if scaler is not None else self._win_bad | ~torch.isfinite(gn)
        bad = self._agree(bad.float())
        skip = bad
        if scaler is not None:
            found = list(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
            skip = torch.maximum(bad, torch.stack(found).amax())
            self._skips[1] += skip - bad
        if self._fused:
            opt.found_inf = skip
            try:
                opt.step()
            finally:
                del opt.found_inf
        elif not skip.item():  # foreach Adam takes no found_inf: the host read that optim.fused avoids
            opt.step()
        if scaler is not None:
            for t in found:
                t.copy_(skip)  # a non-finite loss backs the scale off too
            scaler.update()  # every step, skipped or not: the scaler is ready for the next unscale_
        self.optimizer.zero_grad(set_to_none=True)
        self._win_dev[5] = gn.detach().float()
        return bad

    def _deepspeed_backward(self, loss: torch.Tensor) -> torch.Tensor | None:
        """DeepSpeed steps right after backward: the skip flag goes to our fused Adam as found_inf
        between the two, so a non-finite window moves no weight and no Adam moment. DeepSpeed's
        ZeRO optimizer also checks the gradients itself (fp16 loss scaling, overflow skip), on the
        host, inside its own step."""
        engine = self.acc.deepspeed_engine_wrapped.engine
        boundary = self.acc.sync_gradients
        engine.set_gradient_accumulation_boundary(is_boundary=boundary)
        engine.backward(loss)
        if not boundary:
            return None
        bad = self._agree(self._win_bad.float())
        self._opt.found_inf = bad
        try:
            engine.step()
        finally:
            del self._opt.found_inf
        return bad

    def _after_step(self, bad: torch.Tensor, out, x, y) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self._win["steps"] += 1
        self._win["lr"] = lr
        self._skips[0] += bad
        self._bn.restore_if(bad)
        self._win_bad.zero_()
        self._micro_in_window = 0
        every = self.cfg.logging.image_every
        if every and self.step % every == 0 and isinstance(getattr(out, "recon_real", None), torch.Tensor):
            self._panel = (x.detach(), out.recon_real.detach(), out.recon_fake.detach(), y)

    def _log_class_share(self) -> None:
        """The real/fake share of the images trained on this epoch, over all ranks (data.balance's effect).
        A resumed epoch counts from the resume point."""
        seen = self.acc.reduce(self._epoch_labels.clone(), reduction="sum") if self.acc.num_processes > 1 \
            else self._epoch_labels
        n, fake = (float(v) for v in seen.tolist())
        self._epoch_labels.zero_()
        if n:
            self._say(f"epoch {self.epoch}: trained on {int(n)} images, {n - fake:.0f} real / {fake:.0f} fake "
                      f"({100 * fake / n:.1f}% fake, data.balance={self.cfg.data.balance})")
            self.tb.scalars({"data/fake_share": fake / n}, self.step)

    def _rank_local(self, e: Exception) -> Exception:
        """A failure only this rank saw, named with its rank and host; printed here by ranks other
        than 0 too (the command line prints a job's errors from rank 0 only)."""
        if self.acc.num_processes == 1:
            return e
        tagged = type(e)(f"rank {self.acc.process_index} on {socket.gethostname()}: {e}")
        if not self.acc.is_main_process:
            print(f"fdtrain train: {tagged}", file=sys.stderr, flush=True)
        return tagged

    # ---- step boundary: log, validate, checkpoint, stop --------------------------------------
    def _step_boundary(self, *, epoch_done: bool) -> int | None:
        """Between optimizer steps. The device is read (one host read, ``_host_read``) only where
        something needs it: logging, evaluation, a checkpoint, every ``train.sync_every`` steps to
        agree on a stop signal across ranks, or a stop signal seen by this (single) process."""
        cfg = self.cfg
        last = self.step >= self.total_steps
        log_due = self.step % cfg.logging.every_steps == 0 or last or self.step == 1
        evaluate = (cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0) or (
            not cfg.eval.every_steps and epoch_done) or last
        save_due = (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0) or (
            not cfg.checkpoint.every_steps and epoch_done) or last
        local_stop = self.signals is not None and self.signals.stop_requested
        single = self.acc.num_processes == 1
        if not (log_due or evaluate or save_due or self.step % cfg.train.sync_every == 0 or (single and local_stop)):
            return None
        stop = self._host_read(local_stop)
        if log_due or stop:
            self._log_window()
        save_due = save_due or stop
        improved = False
        t_pause = time.perf_counter()  # evaluation, checkpoint and panel time stay out of images/s
        if self._panel is not None:
            self.tb.recon_panel(*self._panel, self.step)
            self._panel = None
        if evaluate or save_due:
            self._sync_buffers()
        # Save before validating: a validation that fails, or a kill during it, costs no checkpoint.
        path = self._save() if save_due else None
        if evaluate and self._selection_set() is not None:
            if stop:  # pre-empted: the checkpoint is what counts; the grace time is short
                self._say(f"step {self.step}: validation skipped (pre-empted; the checkpoint is written)")
            else:
                improved = self._validate()
        if improved and cfg.checkpoint.keep_best:
            path = path or self._save()
            self.ckpt.mark_best(path, {**self.best, **self._selection_label()})
        if path is not None:
            self.ckpt.prune()
        self._win["t0"] += time.perf_counter() - t_pause
        if stop:
            self._say(f"preempted: checkpoint at step {self.step} written; exiting with {EXIT_PREEMPTED} "
                      "(continue with --resume auto)")
            if self.acc.is_main_process:
                ev.write_json(self.run_dir / "preempted.json", {"step": self.step, "exit_code": EXIT_PREEMPTED,
                                                                "signal": self.signals.requested})
            return EXIT_PREEMPTED
        return None

    def _save(self) -> Path:
        return self.ckpt.save(step=self.step, epoch=self.epoch, model=self.model, optimizer=self.optimizer,
                              scheduler=self.scheduler, config=self.cfg.to_dict(), metrics=self.last_metrics,
                              trainer_state=self.state_dict(), loader_state=self.loader.state_dict())

    def _new_window(self) -> None:
        dev = self.acc.device
        self._win = {"t0": time.perf_counter(), "data": 0.0, "images": 0, "steps": 0, "lr": 0.0, "host": None}
        # [sum total, sum cls, sum rec_real, sum rec_fake, finite micro-batches, last grad norm]
        self._win_dev = torch.zeros(6, device=dev)
        self._win_dev[5] = float("nan")
        self._one = torch.ones((), device=dev)

    def _host_read(self, local_stop: bool) -> bool:
        """The one host read of a logging period: window sums, skip counts and (several ranks) the
        stop flag agreed by max, in one copy. It waits for the device, so the window's elapsed
        time taken after it covers all the work queued in the window (images/s needs no other sync).

        Returns whether to stop (a signal on any rank); raises NonFiniteLimitError past
        train.max_nonfinite (checked here, so it may show up to a logging period late; the steps
        between were skipped and moved no weight).
        """
        scale = getattr(self.acc.scaler, "_scale", None)  # the grad scaler's scale (a device tensor)
        parts = [self._win_dev, self._skips, (scale.float().view(1).to(self._win_dev.device) if scale is not None
                                              else torch.full((1,), float("nan"), device=self._win_dev.device))]
        if self.acc.num_processes > 1:
            self._stop_dev.fill_(float(local_stop))  # a fill, not a host-to-device copy
            parts.append(self._agree(self._stop_dev))
        vals = torch.cat(parts).tolist()
        self._win["host"] = vals[:6]
        self._win["loss_scale"] = vals[8]
        new_bad, new_amp = int(vals[6]), int(vals[7])
        stop = bool(vals[9]) if len(vals) > 9 else local_stop
        self._skips.zero_()
        self.amp_skipped += new_amp
        if new_bad:
            self.nonfinite += new_bad
            self._say(f"step {self.step}: {new_bad} step(s) with a non-finite loss or gradient since the last check, "
                      f"updates skipped ({self.nonfinite}/{self.cfg.train.max_nonfinite} allowed)")
            if self.nonfinite > self.cfg.train.max_nonfinite:
                raise NonFiniteLimitError(f"{self.nonfinite} non-finite steps exceed train.max_nonfinite="
                                          f"{self.cfg.train.max_nonfinite}")
        return stop

    def _log_window(self) -> None:
        """Scalars of the window since the last log. images/s: images over the wall time between
        two host reads (each waits for the device), evaluation and checkpoint time left out;
        data_wait_share: the part of it the loop spent waiting in the loader's next()."""
        w = self._win
        elapsed = max(1e-9, time.perf_counter() - w["t0"])
        host = w["host"] if w["host"] is not None else self._win_dev.tolist()
        n = host[4]  # finite micro-batches in the window; none: the means are NaN, not 0
        total, cls, rr, rf = [v / n for v in host[:4]] if n else [float("nan")] * 4
        gn = host[5]
        if self.deepspeed:  # DeepSpeed clips and measures inside its step (a host float already)
            gn = self.acc.deepspeed_engine_wrapped.engine.get_global_grad_norm()
            gn = float(gn) if gn is not None else float("nan")
        stats = {"loss/total": total, "loss/cls": cls, "loss/rec_real": rr, "loss/rec_fake": rf, "lr": w["lr"],
                 "grad_norm": gn, "images_per_sec": w["images"] * self.acc.num_processes / elapsed,
                 "data_wait_share": w["data"] / elapsed, "nonfinite_skipped": self.nonfinite}
        if self.acc.scaler is not None:
            stats["amp/loss_scale"] = w.get("loss_scale", float("nan"))
            stats["amp/overflow_skipped"] = self.amp_skipped
        if self.acc.device.type == "cuda":
            stats["gpu/mem_allocated_gb"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
            stats["gpu/mem_reserved_gb"] = torch.cuda.memory_reserved(self.acc.device) / 2**30
        self.last_train_stats = stats
        self.tb.scalars(stats, self.step)
        if self.progress is not None:
            self.progress.update(self.step, stats)
        self._new_window()

    # ---- evaluation ----------------------------------------------------------------------------
    def _selection_set(self) -> tuple[str, str] | None:
        """(set name, split for build_loader) used to pick the best checkpoint, or None."""
        cfg = self.cfg
        if cfg.eval.select_on == "val":
            return ("val", "val") if cfg.data.val else None
        if not cfg.data.test:
            raise ConfigError("eval.select_on=test but data.test names no test set")
        name = cfg.eval.select_test or next(iter(cfg.data.test))
        if name not in cfg.data.test:
            raise ConfigError(f"eval.select_test: '{name}' is not in data.test ({sorted(cfg.data.test)})")
        return name, name

    def _selection_label(self) -> dict[str, Any]:
        name, _ = self._selection_set()
        label = {"selected_on": "val" if self.cfg.eval.select_on == "val" else f"test:{name}",
                 "metric": self.cfg.eval.metric, "level": self.cfg.eval.level}
        if self.cfg.eval.select_on == "test":
            label["note"] = (f"model selected on the test set '{name}' (as the paper's authors did); "
                             "results on that set are optimistic")
        return label

    def evaluate_set(self, name: str, split: str) -> ev.EvalResult:
        if split not in self._eval_loaders:
            self._eval_loaders[split] = self._build_loader(
                self.cfg, split, rank=self.acc.process_index, world_size=self.acc.num_processes,
                device=self.acc.device)
        result = ev.evaluate_loader(self.model, self._eval_loaders[split], accelerator=self.acc, name=name,
                                    threshold=self.cfg.eval.threshold, max_batches=self.cfg.eval.max_batches,
                                    input_dtype=self.input_dtype)
        ev.log_result(self.tb, result, self.step)
        return result

    def _validate(self) -> bool:
        """Evaluate the selection set; True when this step is the new best."""
        name, split = self._selection_set()
        result = self.evaluate_set(name, split)
        value = ev.selection_value(result.metrics, self.cfg.eval.metric, self.cfg.eval.level)
        self.last_metrics = {name: result.metrics}
        improved = ev.is_better(value, None if self.best is None else self.best["value"], self.cfg.eval.metric)
        if improved:
            self.best = {"value": value, "step": self.step}
        self._say(f"step {self.step}: {name} {self.cfg.eval.level} {self.cfg.eval.metric} {value:.4f}"
                  + (" (best)" if improved else f" (best {self.best['value']:.4f} at step {self.best['step']})"
                     if self.best else ""))
        return improved

    def _final_evaluation(self) -> int:
        """Every test set of the recipe, with the best weights, to metrics.json and TensorBoard."""
        cfg = self.cfg
        ranks = self._rank_agreement()  # before the best weights replace the final ones
        best = best_checkpoint(self.run_dir / "checkpoints") if cfg.checkpoint.keep_best else None
        evaluated = f"step-{self.step:08d} (final weights)"
        if best is not None and self.best is not None and self.best["step"] != self.step:
            self.ckpt.load_weights(self.model, best)
            evaluated = f"{best.name} (best by {cfg.eval.select_on} {cfg.eval.level} {cfg.eval.metric})"
        elif best is not None:
            evaluated = f"{best.name} (best, = final weights)"
        report: dict[str, Any] = {"run": cfg.run.name, "final_step": self.step, "epochs": self.epoch,
                                  "evaluated": evaluated, "nonfinite_skipped": self.nonfinite, "ranks": ranks,
                                  "test": {}}
        if self._selection_set() is not None and self.best is not None:
            report["selection"] = {**self._selection_label(), "best_value": self.best["value"],
                                   "best_step": self.best["step"]}
            report["selection_metrics"] = self.last_metrics
        for name in cfg.data.test:
            result = self.evaluate_set(name, name)
            report["test"][name] = result.metrics
        report["skipped_samples"] = self._skipped_samples()
        if self.acc.is_main_process:
            from fdtrain.fingerprint import fingerprint

            report["fingerprint"] = fingerprint(cfg.to_dict(), {"evaluated": evaluated, **report.get("selection", {})})
            ev.write_json(self.run_dir / "metrics.json", report)
            if report["test"]:
                self._say(ev.format_table(report["test"]))
            flat = {f"{n}/{lvl}/{k}": v for n, lv in report["test"].items() for lvl, m in lv.items()
                    for k, v in m.items() if k in ("acc", "auc", "eer", "ap")}
            self.tb.hparams(flat)
        if cfg.eval.robustness.types:  # the DeeperForensics-1.0 sweep, same weights (fdtrain.engine.robustness)
            from fdtrain.engine.robustness import sweep_after_training
            sweep_after_training(self.model, cfg, self.acc, self.tb, self.run_dir, self.step, self.input_dtype)
        self.acc.wait_for_everyone()
        return EXIT_OK

    def _skipped_samples(self) -> dict[str, Any]:
        """Samples skipped as undecodable (data.on_corrupt=skip) per split, over every rank: a count
        and up to 100 keys with the shard and reason."""
        loaders = {"train": self.loader, **self._eval_loaders}
        mine = {split: dict(getattr(loader, "skipped", {})) for split, loader in loaders.items()}
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([mine])
        else:
            parts = [mine]
        merged: dict[str, dict[str, str]] = {}
        for part in parts:
            for split, skipped in part.items():
                merged.setdefault(split, {}).update(skipped)
        return {split: {"count": len(d), "samples": dict(sorted(d.items())[:100])} for split, d in merged.items()}

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm running statistics to every rank, before evaluating or saving.

        Each rank updates its running stats from its own batches; DDP overwrites them from rank 0
        only at the next training forward, DeepSpeed never. Without this, rank 1 would evaluate
        with statistics that the checkpoint (rank 0's) does not hold.
        """
        if self.acc.num_processes > 1:
            for buf in self.acc.unwrap_model(self.model).buffers():
                torch.distributed.broadcast(buf.data, src=0)

    def _rank_agreement(self) -> list[dict[str, Any]]:
        """Every rank's step count and a checksum of its final weights (they must all agree: a
        desynchronised rank shows here), gathered to every rank; a warning when they differ."""
        from accelerate.utils import gather_object

        with torch.no_grad():
            params = [p.detach().double() for p in self.acc.unwrap_model(self.model).parameters()]
            checksum = float(sum((p * (1 + (i % 7))).sum() for i, p in enumerate(params)))  # order-sensitive
        mine = {"rank": self.acc.process_index, "step": self.step, "epoch": self.epoch, "param_checksum": checksum}
        ranks = gather_object([mine]) if self.acc.num_processes > 1 else [mine]
        if len({(r["step"], r["param_checksum"]) for r in ranks}) > 1:
            log.warning("ranks disagree on steps or weights at the end of training: %s", ranks)
        return ranks

    # ---- misc --------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if not self.acc.is_main_process:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.tb.close()
        for loader in [self.loader, *self._eval_loaders.values()]:
            closer = getattr(loader, "close", None)
            if callable(closer):
                closer()


def _on_every_rank(acc, fn: Callable[[], None] | None) -> None:
    """Run ``fn`` (where given) and agree: an FdtrainError on one rank is raised on all of them."""
    from fdtrain import FdtrainError

    problem = None
    try:
        if fn is not None:
            fn()
    except FdtrainError as e:
        problem = e
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        msgs = [m for m in gather_object([None if problem is None else str(problem)]) if m]
        if msgs and problem is None:
            problem = FdtrainError("; ".join(dict.fromkeys(msgs)))
    if problem is not None:
        raise problem


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(cfg: Config) -> int:
    """Run one training job to completion, preemption or failure; returns the process exit code."""
    import os

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    where = f"rank {rank}/{world} on {socket.gethostname()}"
    tag = f"[{where}] " if world > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {tag}%(name)s %(levelname)s: %(message)s")
    from fdtrain import FdtrainError
    from fdtrain.data import DataError
    from fdtrain.engine.signals import die_with_parent, launched_worker

    if launched_worker():
        die_with_parent()  # a launcher killed outright must not leave this worker training on
    try:
        trainer = Trainer(cfg)
        try:
            code = trainer.fit()
        finally:
            trainer.close()  # local resources only: no collective here, a failing rank must not hang
            trainer.lock.release()
    except (ConfigError, DataError, FdtrainError):
        # every rank raises these at the same point (checks at start, agreed save/load errors): end the
        # process group here, as a normal exit does, so that no rank aborts in gloo's teardown
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    except BaseException as e:
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            # on a cluster the launcher interleaves every rank's traceback: say whose this one is
            print(f"fdtrain train: {where} (local rank {os.environ.get('LOCAL_RANK', '0')}) failed: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    trainer.acc.end_training()
    return code


__all__ = ["train", "Trainer", "EXIT_OK", "EXIT_NONFINITE", "EXIT_PREEMPTED"]


def _grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Total gradient norm (a device tensor, no host read), clipping to ``max_norm`` when > 0."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


class _BufferGuard:
    """Snapshot of the model's buffers (BatchNorm running stats) at the start of an accumulation
    window, put back on the device when the window's step is skipped: ``torch.where`` over one flat
    copy per dtype (a handful of kernels, no host read), not a branch on the flag."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.groups = []
        for dtype in dict.fromkeys(b.dtype for b in buffers):
            views = [b.view(-1) for b in buffers if b.dtype == dtype and b.numel()]
            if views:
                self.groups.append((views, [v.numel() for v in views], torch.cat(views)))

    def save(self) -> None:
        for views, _, snap in self.groups:
            torch.cat(views, out=snap)

    def restore_if(self, flag: torch.Tensor) -> None:
        cond = flag.bool()
        for views, sizes, snap in self.groups:
            torch._foreach_copy_(views, list(torch.where(cond, snap, torch.cat(views)).split(sizes)))
