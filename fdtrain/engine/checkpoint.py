"""Checkpoints: everything needed to continue as if never stopped, written atomically.

Layout of ``runs/<name>/checkpoints/``::

    step-00001200/            one checkpoint (the name is the optimizer step)
      model.pt                {"format", "config", "state_dict", "step", "epoch", "metrics"}: plain
                              torch, fp32, no Accelerate/DeepSpeed needed (fdtrain.inference.load_model)
      train_state.pt          optimizer, scheduler, grad scaler, trainer counters (rank 0)
      rank-00000.pt ...       per rank: RNG states (python, numpy, torch, cuda) and loader position
      deepspeed/state/...     DeepSpeed runs only: the engine's own (ZeRO-partitioned) checkpoint,
                              which replaces the optimizer in train_state.pt
      meta.json               step, epoch, metrics, world size, written last
    best -> step-00000800     symlink to the best checkpoint by eval.metric, with best.json beside it
    .tmp-step-00001400-TOKEN/ a checkpoint being written by the run whose token it carries; never read,
                              removed by the next run that takes the folder's lock

Atomicity: every rank writes into ``.tmp-step-N-TOKEN/``; after a barrier rank 0 fsyncs and renames it to
``step-N/``. A crash (even kill -9) mid-write leaves only a ``.tmp-`` folder, so the newest complete
checkpoint is untouched. The last ``checkpoint.keep_last`` checkpoints plus the best are kept.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import secrets
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fdtrain.model_file import (
    CheckpointError,
    best_checkpoint,
    list_checkpoints,
    load_file,
    load_model_file,
    newest_checkpoint,
    plain,
    step_dir_name,
    write_model_file,
)

log = logging.getLogger(__name__)

DS_TAG = "state"
LOW_SPACE = 256 * 2**20  # a write failing with less than this free is reported as a full disk



# --------------------------------------------------------------------------------------------
# Reading without a trainer: fdtrain.model_file (model.pt, checkpoint folders, load_file)
# --------------------------------------------------------------------------------------------
def consolidate_deepspeed(ds_dir: str | os.PathLike, tag: str = DS_TAG) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict from a DeepSpeed ZeRO (1-3) checkpoint folder (offline, one process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    return {k: v.detach() for k, v in sd.items()}  # its parameters come back with requires_grad


# --------------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Every RNG of this process, in types ``torch.load(weights_only=True)`` accepts (no numpy objects)."""
    version, mt, gauss = random.getstate()
    npst = np.random.get_state(legacy=False)
    state = {"python": {"version": version, "state": list(mt), "gauss": gauss},
             "numpy": {"bit_generator": npst["bit_generator"],
                       "key": torch.from_numpy(npst["state"]["key"].astype(np.int64)),
                       "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                       "gauss": float(npst["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npst = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# The checkpointer used by the trainer (every rank calls save/load)
# --------------------------------------------------------------------------------------------
class Stateful(Protocol):
    """A part of the training state (the loop's position, the metrics window, model selection):
    its ``state_dict()`` keys are saved together in ``train_state.pt``'s ``"trainer"`` entry."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


class Checkpointer:
    """Saves and restores one run's checkpoints; every rank must call :meth:`save` and :meth:`load`.

    It is given the run's components once: the prepared ``model`` and ``optimizer``, the
    ``scheduler``, this rank's ``loader`` (its position goes to ``rank-N.pt``), the ``config``
    (stored with the weights; its ``checkpoint`` section says how many are kept) and the ``parts``
    that own the rest of the training state.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, accelerator, *, model, optimizer, scheduler, loader,
                 config, parts: Sequence[Stateful] = ()):
        from fdtrain.engine.ranks import broadcast

        self.dir = Path(ckpt_dir)
        self.acc = accelerator
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.config, self.parts = config, list(parts)
        self.keep_last = max(1, config.checkpoint.keep_last)  # the newest is always kept: --resume uses it
        self.keep_best = config.checkpoint.keep_best
        self.is_deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        # Temporary folders carry this run's token: a process removes only what it wrote.
        self.token = broadcast(accelerator, f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")
        if self.acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            # The caller holds the run folder's lock (fdtrain.engine.runlock), so a .tmp- folder here
            # was left by a run that died while writing it, never by a live one.
            for stale in self.dir.glob(".tmp-step-*"):
                log.warning("removing incomplete checkpoint %s (a previous run died while writing it)", stale)
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _parts_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for part in self.parts:
            sd = part.state_dict()
            clash = state.keys() & sd.keys()
            if clash:
                raise ValueError(f"checkpoint parts both save {sorted(clash)}")
            state.update(sd)
        return state

    # ---- save ---------------------------------------------------------------------------
    def save(self, step: int, epoch: int, metrics: dict) -> Path:
        """Write ``step-N/`` atomically; every rank calls it. ``metrics``: the latest evaluation,
        kept beside the weights. A write that fails on any rank (a full disk) removes the incomplete
        folder and raises :class:`CheckpointError` on every rank."""
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}-{self.token}"
        if final.is_dir():  # e.g. best and periodic at the same step
            return final
        acc = self.acc
        with self._all_ranks(tmp):
            if acc.is_main_process:
                tmp.mkdir(parents=True)

        with self._all_ranks(tmp):  # all partitions on disk before consolidation and rename
            # every rank makes the folder it writes to: on NFS another node may not see rank 0's mkdir yet
            tmp.mkdir(parents=True, exist_ok=True)
            if self.is_deepspeed:  # every rank writes its ZeRO partition of the optimizer
                self.model.save_checkpoint(str(tmp / "deepspeed"), tag=DS_TAG, save_latest=False)
            torch.save(plain({"rng": rng_state(), "loader": self.loader.state_dict()}),
                       tmp / f"rank-{acc.process_index:05d}.pt")
            if acc.is_main_process:
                state = {"scheduler": self.scheduler.state_dict(), "trainer": self._parts_state(), "step": step,
                         "epoch": epoch}
                if not self.is_deepspeed:
                    state["optimizer"] = self.optimizer.state_dict()
                scaler = getattr(acc, "scaler", None)
                if scaler is not None:
                    state["scaler"] = scaler.state_dict()
                torch.save(plain(state), tmp / "train_state.pt")

        with self._all_ranks(tmp):
            if acc.is_main_process:
                config = self.config.to_dict()
                write_model_file(tmp / "model.pt", config=config, state_dict=self._plain_state_dict(tmp),
                                 step=step, epoch=epoch, metrics=metrics)
                meta = {"step": step, "epoch": epoch, "metrics": metrics, "world_size": acc.num_processes,
                        "deepspeed": self.is_deepspeed, "config": config}
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=float))
                _fsync_tree(tmp)
                os.rename(tmp, final)
                _fsync_dir(self.dir)
                log.info("checkpoint saved: %s", final)
        return final

    @contextlib.contextmanager
    def _all_ranks(self, tmp: Path):
        """Run one phase of a save on every rank, then agree (a collective, so also a barrier): a
        write error on any rank becomes the same CheckpointError on all of them."""
        from fdtrain.engine.ranks import agreed_problems

        problem = None
        try:
            yield
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            problem = self._explain_write_error(e, tmp)
        problems = agreed_problems(self.acc, problem)
        if problems:
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            newest = newest_checkpoint(self.dir)
            raise CheckpointError("; ".join(problems) + f". The incomplete checkpoint was removed; the newest "
                                  f"complete one is {newest or 'none'}. Free some space and continue with "
                                  "--resume auto")

    def _explain_write_error(self, e: Exception, tmp: Path) -> str:
        free = shutil.disk_usage(self.dir).free if self.dir.exists() else 0
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < LOW_SPACE
        what = "disk full" if full else f"write failed ({first})"
        return (f"{what} while writing checkpoint {tmp} on rank {self.acc.process_index}; "
                f"{_human(free)} free on the file system of {self.dir}")

    def _plain_state_dict(self, tmp: Path) -> dict[str, torch.Tensor]:
        """fp32 weights with the plain model's keys (no DDP/DeepSpeed/compile wrappers)."""
        if self.is_deepspeed and self.model.zero_optimization_stage() >= 1:
            # the fp32 master weights from the partitions just written (the module may hold bf16)
            sd = consolidate_deepspeed(tmp / "deepspeed")
        else:
            sd = self.acc.unwrap_model(self.model, keep_torch_compile=False).state_dict()
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone() for k, v in sd.items()}

    def mark_best(self, path: Path, info: dict) -> None:
        """Point ``best`` at ``path`` (rank 0), atomically, and record why in best.json."""
        if not self.acc.is_main_process:
            return
        link, tmp_link = self.dir / "best", self.dir / ".best.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(path.name, tmp_link)
        os.replace(tmp_link, link)
        tmp_json = self.dir / ".best.json.tmp"
        tmp_json.write_text(json.dumps({"checkpoint": path.name, **info}, indent=1, default=float))
        os.replace(tmp_json, self.dir / "best.json")

    def prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints and the best (rank 0)."""
        if not self.acc.is_main_process:
            return
        best = best_checkpoint(self.dir) if self.keep_best else None
        for _, p in list_checkpoints(self.dir)[: -self.keep_last]:
            if best is None or p.resolve() != best:
                shutil.rmtree(p, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------
    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore everything a checkpoint holds: model, optimizer, scheduler, scaler, this rank's
        RNG and loader position, and the parts' state. Returns ``{"step", "epoch", "trainer" (the
        parts' saved state), "loader" (whether this rank's position was restored; if not, the loader
        starts the saved epoch afresh)}``. A file that fails on any rank (its own rank-N.pt damaged)
        raises the same CheckpointError on every rank."""
        from fdtrain.engine.ranks import agreed_problems

        problem, out = None, None
        try:
            out = self._load(Path(path))
        except CheckpointError as e:
            problem = str(e)
        problems = agreed_problems(self.acc, problem)
        if problems:
            raise CheckpointError("; ".join(problems))
        return out

    def _load(self, path: Path) -> dict[str, Any]:
        if not (path / "meta.json").is_file():
            raise CheckpointError(f"{path}: not a complete fdtrain checkpoint (no meta.json)")
        meta = json.loads((path / "meta.json").read_text())
        ds_dir = path / "deepspeed"
        if self.is_deepspeed != ds_dir.is_dir():
            raise ValueError(f"{path}: saved {'with' if ds_dir.is_dir() else 'without'} DeepSpeed; resuming it "
                             f"{'with' if self.is_deepspeed else 'without'} DeepSpeed is not supported. "
                             "Start a new run from its weights (model.pt) instead.")
        state = load_file(path / "train_state.pt")
        if self.is_deepspeed:
            if meta.get("world_size") != self.acc.num_processes:
                raise ValueError(f"{path}: DeepSpeed checkpoint of {meta.get('world_size')} ranks cannot resume on "
                                 f"{self.acc.num_processes}")
            self.model.load_checkpoint(str(ds_dir), tag=DS_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
        else:
            self._load_plain_weights(path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])

        rank_file = path / f"rank-{self.acc.process_index:05d}.pt"
        loader_state = None
        if rank_file.is_file() and meta.get("world_size") == self.acc.num_processes:
            rank_state = load_file(rank_file)
            set_rng_state(rank_state["rng"])
            loader_state = rank_state["loader"]
        else:
            log.warning("%s: saved with %s ranks, resuming on %s: RNG states not restored and the data order "
                        "restarts at the saved epoch", path, meta.get("world_size"), self.acc.num_processes)
        if loader_state is not None:
            self.loader.load_state_dict(loader_state)
        else:
            self.loader.set_epoch(state["epoch"])
        # step and epoch from the file's top level: they name the checkpoint, whatever the parts saved
        trainer = {**state.get("trainer", {}), "step": state["step"], "epoch": state["epoch"]}
        for part in self.parts:
            part.load_state_dict(trainer)
        return {"step": state["step"], "epoch": state["epoch"], "trainer": trainer,
                "loader": loader_state is not None}

    def load_weights(self, path: str | os.PathLike) -> None:
        """A checkpoint's weights (not its optimizer state) into the live model: the best weights
        for the final evaluation. Every rank calls it."""
        if self.is_deepspeed:
            self.model.load_checkpoint(str(Path(path) / "deepspeed"), tag=DS_TAG, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
        else:
            self._load_plain_weights(path)

    def _load_plain_weights(self, path: str | os.PathLike) -> None:
        try:
            weights = load_model_file(Path(path) / "model.pt").state_dict
        except FileNotFoundError as e:
            raise CheckpointError(str(e)) from None
        self.acc.unwrap_model(self.model, keep_torch_compile=False).load_state_dict(weights)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))
