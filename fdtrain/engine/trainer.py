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
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fdtrain import EXIT_PREEMPTED
from fdtrain.config import Config, ConfigError, validate
from fdtrain.data import DataError
from fdtrain.engine import evaluate as ev
from fdtrain.engine import resume_config
from fdtrain.engine.accel import build_accelerator, is_deepspeed
from fdtrain.engine.checkpoint import Checkpointer
from fdtrain.engine.optim import (
    BufferGuard,
    Schedule,
    apply_schedule,
    build_optimizer,
    build_scheduler,
    grad_norm,
    optimizer_steps_per_epoch,
)
from fdtrain.engine.ranks import agree_max, on_every_rank, rank_agreement, rank_local, sync_buffers
from fdtrain.engine.runlock import RunLock
from fdtrain.engine.selection import Evaluator, Selection
from fdtrain.engine.signals import PreemptionHandler
from fdtrain.engine.tblog import Progress, StepWindow, TBLogger
from fdtrain.model_file import best_checkpoint, checkpoint_config, list_checkpoints, newest_checkpoint

log = logging.getLogger("fdtrain.train")

EXIT_OK = 0
EXIT_NONFINITE = 3


class NonFiniteLimitError(RuntimeError):
    """More non-finite losses than train.max_nonfinite."""


class Trainer:
    """One run: builds the components, then loops over micro-batches (``fit`` -> ``train_step``).

    The components and the state each owns (``state_dict``/``load_state_dict``, saved in every
    checkpoint by the Checkpointer, which also saves the model, optimizer, scheduler, grad scaler,
    RNG and loader position it is given):
      Trainer      the loop's position: optimizer steps, epochs, samples seen, the schedule's shape
      StepWindow   (tblog) the metrics between logging points on the device; non-finite steps skipped
      Selection    (selection) the selection rule, the best value and step, the last selection metrics
    The Evaluator (selection) keeps the evaluation loaders; fdtrain.engine.ranks makes ranks agree.
    """

    def __init__(self, cfg: Config):
        from accelerate.utils import set_seed

        validate(cfg)  # a config changed after resolve (a library caller, a test) meets the same rules

        from fdtrain.data import build_loader
        from fdtrain.losses import FakeDifferLoss
        from fdtrain.models import create_model_from_config, route_pointwise_to_onednn, torch_picks_slow_pointwise

        self.cfg = cfg
        self.acc = acc = build_accelerator(cfg)
        self.deepspeed = is_deepspeed(acc)
        self.run_dir = Path(cfg.run_dir)
        self.lock = RunLock(self.run_dir)
        on_every_rank(acc, self.lock.acquire if acc.is_main_process else None)  # one live run per folder
        atexit.register(self.lock.release)  # whatever way this process ends, short of a kill -9
        self.selection = Selection(cfg)  # the eval.select_* rule is checked before anything is built
        _check_inputs(cfg)  # every data path, before minutes of model and loader set-up
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
        if cfg.train.onednn_pointwise and torch_picks_slow_pointwise(acc.device, cfg.data.batch_size):
            moved = route_pointwise_to_onednn(model)
            log.info("CPU, 1 thread: %d 1x1 convolutions run on oneDNN (train.onednn_pointwise)", moved)
        self.loss_fn = FakeDifferLoss(cfg.loss)
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

        self.step = 0  # optimizer steps taken (= scheduler steps)
        self.epoch = 0  # epochs completed
        self._micro_start = 0  # micro-batches of the current epoch already consumed (resume)
        self.window = StepWindow(acc)
        self.tb = TBLogger(self.run_dir / "tb", enabled=acc.is_main_process and cfg.logging.tensorboard)
        self.evaluator = Evaluator(cfg, acc, self.tb, build_loader, self.input_dtype)
        self.ckpt = Checkpointer(self.run_dir / "checkpoints", acc, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, loader=self.loader, config=cfg,
                                 parts=[self, self.window, self.selection])
        self.progress: Progress | None = None
        self.signals: PreemptionHandler | None = None
        self.last_train_stats: dict[str, float] = {}
        self.on_batch: Callable[[int, dict], None] | None = None  # test hook: (step about to run, batch)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # BatchNorm running stats change in the forward pass, before the loss can be checked: a
        # snapshot per accumulation window lets a skipped (non-finite) step leave no trace.
        self._bn = BufferGuard(list(acc.unwrap_model(self.model).buffers()))
        self._micro_in_window = 0
        self._panel: tuple | None = None  # (x, recon_real, recon_fake, y) due for TensorBoard at the boundary

    @property
    def nonfinite(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient (counted at host reads)."""
        return self.window.nonfinite

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

    # ---- the loop's own state ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "samples": self.schedule.samples_at(self.step),
                "schedule": self.schedule.summary()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """The position only: the schedule is rebuilt by ``_rebuild_schedule`` once the config is compared."""
        self.step, self.epoch = sd["step"], sd["epoch"]

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> int:
        with PreemptionHandler() as sig:
            self.signals = sig
            self._resume()
            self._start()
            self.model.train()
            try:
                while self.step < self.total_steps:
                    status = self._train_epoch()
                    if status is not None:
                        return status
            except NonFiniteLimitError as e:
                last = newest_checkpoint(self.ckpt.dir)
                self._say(f"fdtrain: stopping: {e}. Last good checkpoint: {last or 'none'} (left untouched).")
                return EXIT_NONFINITE
            return self._final_evaluation()

    def _train_epoch(self) -> int | None:
        limit = self.steps_per_epoch * self.cfg.train.grad_accum
        micro, self._micro_start = self._micro_start, 0
        it = iter(self.loader)
        while micro < limit and self.step < self.total_steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:  # every rank must take the same steps, or DDP hangs: fail loudly
                raise RuntimeError(f"train loader ended after {micro} batches but promised {len(self.loader)} "
                                   f"(backend {self.loader.backend}, epoch {self.epoch})") from None
            except DataError as e:  # this rank's shards only (a damaged sample): the others wait in a collective
                raise rank_local(self.acc, e) from None
            self.window.add_wait(time.perf_counter() - t0)
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
            rows = batch.get("rows")  # each class's rows, made on the host: no nonzero on the device
            out = self.model(x, x_noisy, labels=y, x_noisy2=x_noisy2, rows=rows)
            losses = self.loss_fn(out, x, y, rows=rows)
            self.window.add(losses, y)
            if self.deepspeed:
                bad = self._deepspeed_backward(losses["total"])
            else:
                self.acc.backward(losses["total"])
                bad = self._optimizer_step() if self.acc.sync_gradients else None
            if bad is not None:
                self._after_step(bad, out, x, y)

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
        gn = grad_norm(self._params, self.cfg.optim.grad_clip)
        bad = self.window.step_bad if scaler is not None else self.window.step_bad | ~torch.isfinite(gn)
        bad = agree_max(self.acc, bad.float())
        skip = bad
        if scaler is not None:
            found = list(scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
            skip = torch.maximum(bad, torch.stack(found).amax())
            self.window.count_amp_skip(skip - bad)
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
        self.window.set_grad_norm(gn)
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
        bad = agree_max(self.acc, self.window.step_bad.float())
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
        self.window.step_done(bad, lr)
        self._bn.restore_if(bad)
        self._micro_in_window = 0
        every = self.cfg.logging.image_every
        if every and self.step % every == 0 and isinstance(getattr(out, "recon_real", None), torch.Tensor):
            self._panel = (x.detach(), out.recon_real.detach(), out.recon_fake.detach(), y)

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
        with self.window.paused():  # evaluation, checkpoint and panel time stay out of images/s
            if self._panel is not None:
                self.tb.recon_panel(*self._panel, self.step)
                self._panel = None
            if evaluate or save_due:
                sync_buffers(self.acc, self.model)
            # Save before validating: a validation that fails, or a kill during it, costs no checkpoint.
            path = self._save() if save_due else None
            improved = False
            if evaluate and self.selection.target is not None:
                if stop:  # pre-empted: the checkpoint is what counts; the grace time is short
                    self._say(f"step {self.step}: validation skipped (pre-empted; the checkpoint is written)")
                else:
                    improved = self._validate()
            if improved and cfg.checkpoint.keep_best:
                path = path or self._save()
                self.ckpt.mark_best(path, self.selection.best_record())
            if path is not None:
                self.ckpt.prune()
        if stop:
            self._say(f"preempted: checkpoint at step {self.step} written; exiting with {EXIT_PREEMPTED} "
                      "(continue with --resume auto)")
            if self.acc.is_main_process:
                ev.write_json(self.run_dir / "preempted.json", {"step": self.step, "exit_code": EXIT_PREEMPTED,
                                                                "signal": self.signals.requested})
            return EXIT_PREEMPTED
        return None

    # ---- around the loop: start, resume, logging, validation, the final report ------------------
    def _start(self) -> None:
        cfg = self.cfg
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

    def _resume(self) -> None:
        ckpt_dir = self.ckpt.dir
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
        state = self.ckpt.load(path)  # every component, this trainer's position included
        self.selection.restore_best(ckpt_dir, self.step)
        for group in self.optimizer.param_groups:  # the loaded state holds the old values; the config rules
            group.update(weight_decay=self.cfg.optim.weight_decay, betas=tuple(self.cfg.optim.betas),
                         eps=self.cfg.optim.eps)
        if changed:
            self._say(f"resumed with config changes (they take effect now): {resume_config.describe(changed)}")
            if self.acc.is_main_process:
                resume_config.record(self.run_dir, self.step, str(path), changed)
        self._rebuild_schedule(state["trainer"], path)
        if state["loader"]:
            pos = self.loader.state_dict()  # the loader may roll a finished epoch over
            self._micro_start = int(pos["step_in_epoch"])
            if int(pos["epoch"]) != self.epoch:
                raise RuntimeError(f"{path}: trainer at epoch {self.epoch} but loader at epoch {pos['epoch']}")
        self._say(f"resumed from {path} at step {self.step} (epoch {self.epoch}, "
                  f"{self._micro_start} batches into it)")

    def _rebuild_schedule(self, saved: dict[str, Any], path: Path) -> None:
        """The schedule of *this* config, continued from the samples the checkpoint had seen.

        LambdaLR's saved state holds the old base lr and the optimizer the old next lr; both are
        replaced, so a raised max_steps/epochs (cosine length), a new lr or another global batch take
        effect from the first resumed step instead of the old schedule's end (lr 0 for cosine).
        """
        samples = int(saved.get("samples", self.step * self.global_batch))
        self.schedule.rebase(self.step, samples)
        apply_schedule(self.scheduler, self.cfg.optim, self.step)
        old, new = saved.get("schedule"), self.schedule.summary()
        if old is None:
            return
        changed = [f"{k} {old.get(k)} -> {v}" for k, v in new.items() if old.get(k) != v]
        if changed:
            self._say(f"schedule rebuilt from the new config at step {self.step} ({samples} samples seen, "
                      f"checkpoint {path.name}): {', '.join(changed)}; next lr {self.schedule.lr(self.step):.4g}")

    def _host_read(self, local_stop: bool) -> bool:
        """The one host read of a logging period (StepWindow.read); whether to stop (a signal on any
        rank). Raises NonFiniteLimitError past train.max_nonfinite (checked here, so it may show up
        to a logging period late; the steps between were skipped and moved no weight)."""
        stop, new_bad = self.window.read(local_stop)
        if new_bad:
            limit = self.cfg.train.max_nonfinite
            self._say(f"step {self.step}: {new_bad} step(s) with a non-finite loss or gradient since the last check, "
                      f"updates skipped ({self.nonfinite}/{limit} allowed)")
            if self.nonfinite > limit:
                raise NonFiniteLimitError(f"{self.nonfinite} non-finite steps exceed train.max_nonfinite={limit}")
        return stop

    def _log_window(self) -> None:
        gn = None
        if self.deepspeed:  # DeepSpeed clips and measures inside its step (a host float already)
            gn = self.acc.deepspeed_engine_wrapped.engine.get_global_grad_norm()
            gn = float(gn) if gn is not None else float("nan")
        self.last_train_stats = stats = self.window.flush(grad_norm=gn)
        self.tb.scalars(stats, self.step)
        if self.progress is not None:
            self.progress.update(self.step, stats)

    def _log_class_share(self) -> None:
        """The real/fake share of the images trained on this epoch, over all ranks (data.balance's effect).
        A resumed epoch counts from the resume point."""
        n, fake = self.window.epoch_class_counts()
        if n:
            self._say(f"epoch {self.epoch}: trained on {int(n)} images, {n - fake:.0f} real / {fake:.0f} fake "
                      f"({100 * fake / n:.1f}% fake, data.balance={self.cfg.data.balance})")
            self.tb.scalars({"data/fake_share": fake / n}, self.step)

    def _save(self) -> Path:
        return self.ckpt.save(self.step, self.epoch, self.selection.last_metrics)

    def _validate(self) -> bool:
        """Evaluate the selection set; True when this step is the new best."""
        name, split = self.selection.target
        improved, line = self.selection.update(self.evaluator.evaluate(self.model, name, split, self.step), self.step)
        self._say(line)
        return improved

    def _final_evaluation(self) -> int:
        """Every test set of the recipe, with the best weights, to metrics.json and TensorBoard."""
        cfg, best_so_far = self.cfg, self.selection.best
        ranks = rank_agreement(self.acc, self.model, self.step, self.epoch)  # before the best weights load
        best = best_checkpoint(self.ckpt.dir) if cfg.checkpoint.keep_best else None
        evaluated = f"step-{self.step:08d} (final weights)"
        if best is not None and best_so_far is not None and best_so_far["step"] != self.step:
            self.ckpt.load_weights(best)
            evaluated = f"{best.name} (best by {cfg.eval.select_on} {cfg.eval.level} {cfg.eval.metric})"
        elif best is not None:
            evaluated = f"{best.name} (best, = final weights)"
        report: dict[str, Any] = {"run": cfg.run.name, "final_step": self.step, "epochs": self.epoch,
                                  "evaluated": evaluated, "nonfinite_skipped": self.nonfinite, "ranks": ranks,
                                  "test": {}, **self.selection.report()}
        for name in cfg.data.test:
            report["test"][name] = self.evaluator.evaluate(self.model, name, name, self.step).metrics
        report["skipped_samples"] = self.evaluator.skipped_samples(self.loader)
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
        closer = getattr(self.loader, "close", None)
        if callable(closer):
            closer()
        self.evaluator.close()


def _check_inputs(cfg: Config) -> None:
    """Fail now, not after an epoch (val) or after all of training (test sets): every split of the
    recipe must be a readable shard folder, and the pretrained weights file must be there."""
    from fdtrain import FdtrainError
    from fdtrain.data import DataError
    from fdtrain.data.format import open_shards, split_path

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
