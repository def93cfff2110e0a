"""TensorBoard and console output, rank 0 only.

Tags (what the tests read back):
  train:  loss/total loss/cls loss/rec_real loss/rec_fake, lr, grad_norm, images_per_sec,
          data_wait_share, nonfinite_skipped, gpu/mem_allocated_gb gpu/mem_reserved_gb (CUDA only)
  eval:   eval/<set>/<level>/<metric>   (set = val or a test name; level = frame | video)
  images: eval/<set>/roc (ROC curve), train/recon (rows of X | X^_r | X^_f | |X^_r-X| | |X^_f-X|)
  text:   config (the resolved YAML), plus hparams (config leaves vs final metrics)
Other ranks get a logger whose methods do nothing, so call sites need no rank checks.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

