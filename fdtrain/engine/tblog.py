"""TensorBoard and console output (rank 0 only), and the step-metrics window they show.

Tags (what the tests read back):
  train:  loss/total loss/cls loss/rec_real loss/rec_fake, lr, grad_norm, images_per_sec,
          data_wait_share, nonfinite_skipped, gpu/mem_allocated_gb gpu/mem_reserved_gb (CUDA only)
  eval:   eval/<set>/<level>/<metric>   (set = val or a test name; level = frame | video)
  images: eval/<set>/roc (ROC curve), train/recon (rows of X | X^_r | X^_f | |X^_r-X| | |X^_f-X|)
  text:   config (the resolved YAML), plus hparams (config leaves vs final metrics)
Other ranks get a logger whose methods do nothing, so call sites need no rank checks.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdtrain.losses import LOSS_TERMS

log = logging.getLogger(__name__)


class TBLogger:
    """A SummaryWriter on the main process (when enabled); a no-op elsewhere."""

    def __init__(self, log_dir: str | Path, *, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def metrics(self, set_name: str, metrics: dict[str, dict[str, float]], step: int) -> None:
        """eval/<set>/<level>/<metric> for every numeric metric."""
        if self.writer is None:
            return
        for level, values in metrics.items():
            for name, v in values.items():
                if isinstance(v, (int, float)) and np.isfinite(v):
                    self.writer.add_scalar(f"eval/{set_name}/{level}/{name}", float(v), step)

    def roc(self, set_name: str, fpr, tpr, auc: float, step: int) -> None:
        if self.writer is None:
            return
        self.writer.add_image(f"eval/{set_name}/roc", roc_image(fpr, tpr, auc, set_name), step, dataformats="HWC")

    def recon_panel(self, x, recon_real, recon_fake, labels, step: int, max_rows: int = 4) -> None:
        if self.writer is None or recon_real is None or recon_fake is None:
            return
        self.writer.add_image("train/recon", recon_panel(x, recon_real, recon_fake, max_rows), step,
                              dataformats="CHW")
        self.writer.add_text("train/recon_labels", " ".join(str(int(v)) for v in labels[:max_rows].tolist()), step)

    def config(self, yaml_text: str, flat: dict[str, Any]) -> None:
        if self.writer is None:
            return
        self.writer.add_text("config", "```\n" + yaml_text + "\n```", 0)
        self._hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}

    def hparams(self, final_metrics: dict[str, float]) -> None:
        """Config leaves against final metrics, in this run's own event file."""
        if self.writer is None or not getattr(self, "_hparams", None):
            return
        from torch.utils.tensorboard.summary import hparams

        metric_dict = {f"hparam/{k}": float(v) for k, v in final_metrics.items() if np.isfinite(v)}
        exp, ssi, sei = hparams(self._hparams, metric_dict)
        fw = self.writer._get_file_writer()
        for s in (exp, ssi, sei):
            fw.add_summary(s)
        for k, v in metric_dict.items():
            self.writer.add_scalar(k, v, 0)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def roc_image(fpr, tpr, auc: float, title: str) -> np.ndarray:
    """An HWC uint8 picture of the ROC curve (matplotlib Agg: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def recon_panel(x, recon_real, recon_fake, max_rows: int = 4) -> torch.Tensor:
    """CHW grid in [0,1]: each row X, X^_r, X^_f, |X^_r - X|, |X^_f - X| (error maps scaled by 1/2)."""
    n = min(max_rows, x.shape[0])
    x, rr, rf = (t[:n].detach().float().cpu() for t in (x, recon_real, recon_fake))
    to01 = lambda t: (t.clamp(-1, 1) + 1) / 2  # [-1,1] -> [0,1]
    err_r, err_f = (rr - x).abs() / 2, (rf - x).abs() / 2  # |a-b| <= 2 on [-1,1]
    cols = [to01(x), to01(rr), to01(rf), err_r.clamp(0, 1), err_f.clamp(0, 1)]
    rows = [torch.cat([c[i] for c in cols], dim=2) for i in range(n)]  # each 3 x H x 5W
    return torch.cat(rows, dim=1)


# --------------------------------------------------------------------------------------------
# The step-metrics window: what the train scalars are computed from
# --------------------------------------------------------------------------------------------
class StepWindow:
    """Loss terms, skip counts and throughput between two logging points, kept on the device.

    The hot path (:meth:`add`, :meth:`set_grad_norm`, :meth:`step_done`) only adds to device
    tensors; :meth:`read` is the one host read of a logging period (the trainer calls it at a
    step boundary that needs the device's values). The window's elapsed time runs from one
    :meth:`flush` to the next, minus :meth:`paused` time; each read waits for the device, so it
    covers all the work queued in the window (images/s needs no other sync).

    Owns the run's count of non-finite steps skipped (saved in checkpoints: ``nonfinite``) and of
    steps the grad scaler skipped for overflow; the real/fake count of the epoch's images.
    """

    def __init__(self, acc, terms: tuple[str, ...] = LOSS_TERMS):
        dev = acc.device
        self.acc, self.terms = acc, terms
        # [sum of each term over finite micro-batches..., finite micro-batches, last grad norm]
        self._sums = torch.zeros(len(terms) + 2, device=dev)
        self._one = torch.ones((), device=dev)
        self.step_bad = torch.zeros((), dtype=torch.bool, device=dev)  # non-finite loss in this accumulation window
        self._skips = torch.zeros(2, device=dev)  # [non-finite steps, AMP overflow skips] since the last read
        self._stop = torch.zeros(1, device=dev)
        self._labels = torch.zeros(2, device=dev)  # (images, fakes) this rank trained on this epoch
        self.nonfinite = 0  # optimizer steps skipped for a non-finite loss or gradient, all run
        self.amp_skipped = 0  # steps the grad scaler skipped for overflowing (finite-loss) gradients
        self._new()

    def _new(self) -> None:
        self.t0, self.data_wait, self.images, self.lr = time.perf_counter(), 0.0, 0, 0.0
        self._host: list[float] | None = None
        self._loss_scale = float("nan")
        self._sums.zero_()
        self._sums[-1] = float("nan")

    # ---- hot path: device tensors only --------------------------------------------------------
    def add_wait(self, seconds: float) -> None:
        """Time the loop spent waiting for the loader's next batch."""
        self.data_wait += seconds

    def add(self, losses: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """One micro-batch's loss terms; a non-finite total is left out of the sums and flags the window."""
        finite = torch.isfinite(losses[self.terms[0]].detach())
        self.step_bad |= ~finite
        terms = torch.stack([losses[k].detach().float() for k in self.terms] + [self._one])
        self._sums[:-1] += torch.where(finite, terms, 0.0)  # sums of the finite terms, their count
        self.images += labels.shape[0]
        self._labels[0] += labels.numel()
        self._labels[1] += labels.detach().float().sum()

    def set_grad_norm(self, gn: torch.Tensor) -> None:
        self._sums[-1] = gn.detach().float()

    def count_amp_skip(self, extra: torch.Tensor) -> None:
        """Steps skipped by the grad scaler alone (overflowing gradients of a finite loss)."""
        self._skips[1] += extra

    def step_done(self, bad: torch.Tensor, lr: float) -> None:
        """An optimizer step taken (or skipped: ``bad``, 0/1 on the device); a new accumulation window."""
        self._skips[0] += bad
        self.step_bad.zero_()
        self.lr = lr

    # ---- host reads ----------------------------------------------------------------------------
    def read(self, local_stop: bool) -> tuple[bool, int]:
        """The one host read of a logging period: sums, skip counts, the grad scaler's scale and
        (several ranks) the stop flag agreed by max, in one copy. Returns (stop on any rank,
        non-finite steps since the last read)."""
        from fdtrain.engine.ranks import agree_max

        dev = self._sums.device
        scale = getattr(self.acc.scaler, "_scale", None)  # the grad scaler's scale (a device tensor)
        parts = [self._sums, self._skips, (scale.float().view(1).to(dev) if scale is not None
                                           else torch.full((1,), float("nan"), device=dev))]
        if self.acc.num_processes > 1:
            self._stop.fill_(float(local_stop))  # a fill, not a host-to-device copy
            parts.append(agree_max(self.acc, self._stop))
        vals = torch.cat(parts).tolist()
        n = len(self._sums)
        self._host, self._loss_scale = vals[:n], vals[n + 2]
        new_bad, new_amp = int(vals[n]), int(vals[n + 1])
        self._skips.zero_()
        self.amp_skipped += new_amp
        self.nonfinite += new_bad
        return (bool(vals[n + 3]) if len(vals) > n + 3 else local_stop), new_bad

    def flush(self, grad_norm: float | None = None) -> dict[str, float]:
        """The window's scalars (TensorBoard tags), then a new window. images/s: images over the
        wall time since the last flush, pauses left out; data_wait_share: the part of it spent
        waiting for the loader. ``grad_norm``: measured elsewhere (DeepSpeed), else the window's last."""
        elapsed = max(1e-9, time.perf_counter() - self.t0)
        host = self._host if self._host is not None else self._sums.tolist()
        n = host[-2]  # finite micro-batches in the window; none: the means are NaN, not 0
        means = [v / n for v in host[:-2]] if n else [float("nan")] * len(self.terms)
        stats = {**{f"loss/{k}": v for k, v in zip(self.terms, means)}, "lr": self.lr,
                 "grad_norm": host[-1] if grad_norm is None else grad_norm,
                 "images_per_sec": self.images * self.acc.num_processes / elapsed,
                 "data_wait_share": self.data_wait / elapsed, "nonfinite_skipped": self.nonfinite}
        if self.acc.scaler is not None:
            stats["amp/loss_scale"] = self._loss_scale
            stats["amp/overflow_skipped"] = self.amp_skipped
        if self.acc.device.type == "cuda":
            stats["gpu/mem_allocated_gb"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
            stats["gpu/mem_reserved_gb"] = torch.cuda.memory_reserved(self.acc.device) / 2**30
        self._new()
        return stats

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoints, images) stays out of images/s."""
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def epoch_class_counts(self) -> tuple[float, float]:
        """(images, fakes) trained on this epoch over all ranks, then zeroed (one host read)."""
        seen = self.acc.reduce(self._labels.clone(), reduction="sum") if self.acc.num_processes > 1 else self._labels
        n, fake = (float(v) for v in seen.tolist())
        self._labels.zero_()
        return n, fake

    # ---- checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite": self.nonfinite}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.nonfinite = sd.get("nonfinite", 0)


# --------------------------------------------------------------------------------------------
# Console: a tqdm bar on a terminal, plain log lines otherwise (rank 0)
# --------------------------------------------------------------------------------------------
class Progress:
    """Training progress: loss, lr, images/s, ETA; ``mode`` auto | bar | plain | off."""

    def __init__(self, total_steps: int, start_step: int, *, mode: str, enabled: bool):
        self.total, self.enabled = total_steps, enabled
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "plain"
        self.mode = mode if enabled else "off"
        self.bar = None
        self.t0, self.s0 = time.monotonic(), start_step
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def update(self, step: int, stats: dict[str, float]) -> None:
        """Called at each logging point with the step reached and the window's statistics."""
        if self.mode == "off":
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{stats['loss/total']:.4f}", lr=f"{stats['lr']:.2e}",
                                 img_s=f"{stats['images_per_sec']:.1f}", refresh=False)
            self.bar.refresh()
            return
        rate = (step - self.s0) / max(1e-9, time.monotonic() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        print(f"step {step}/{self.total} loss {stats['loss/total']:.4f} lr {stats['lr']:.3e} "
              f"img/s {stats['images_per_sec']:.1f} data_wait {100 * stats['data_wait_share']:.1f}% "
              f"eta {_fmt_eta(eta)}", flush=True)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

