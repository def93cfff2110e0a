"""What the ranks of one run must agree on, and the collectives that make them agree.

Every rank of a run takes the same steps and makes the same decisions (stop, skip, save, fail):
one rank acting alone leaves the others waiting in a collective until the NCCL timeout. The
helpers here are the places where a rank's local view becomes the run's: a flag by max on the
device, an error raised on every rank, rank 0's value or BatchNorm statistics on all of them.
With one process they are plain pass-throughs (no process group is needed).
"""
from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def gather(acc, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank."""
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def broadcast(acc, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def agree_max(acc, flag: torch.Tensor) -> torch.Tensor:
    """Max of a float flag over ranks, in place; a device collective (NCCL does not block the host)."""
    if acc.num_processes > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag


def agreed_problems(acc, problem: str | None) -> list[str]:
    """Every rank's problem (None: none), deduplicated, on every rank: a collective, so also a barrier."""
    return list(dict.fromkeys(p for p in gather(acc, problem) if p))


def on_every_rank(acc, fn: Callable[[], None] | None) -> None:
    """Run ``fn`` (where given) and agree: an FdtrainError on one rank is raised on all of them."""
    from fdtrain import FdtrainError

    problem = None
    try:
        if fn is not None:
            fn()
    except FdtrainError as e:
        problem = e
    if acc.num_processes > 1:
        msgs = agreed_problems(acc, None if problem is None else str(problem))
        if msgs and problem is None:
            problem = FdtrainError("; ".join(msgs))
    if problem is not None:
        raise problem


def rank_local(acc, e: Exception) -> Exception:
    """A failure only this rank saw, named with its rank and host; printed here by ranks other
    than 0 too (the command line prints a job's errors from rank 0 only)."""
    if acc.num_processes == 1:
        return e
    tagged = type(e)(f"rank {acc.process_index} on {socket.gethostname()}: {e}")
    if not acc.is_main_process:
        print(f"fdtrain train: {tagged}", file=sys.stderr, flush=True)
    return tagged


def sync_buffers(acc, model) -> None:
    """Rank 0's BatchNorm running statistics to every rank, before evaluating or saving.

    Each rank updates its running stats from its own batches; DDP overwrites them from rank 0
    only at the next training forward, DeepSpeed never. Without this, rank 1 would evaluate
    with statistics that the checkpoint (rank 0's) does not hold.
    """
    if acc.num_processes > 1:
        for buf in acc.unwrap_model(model).buffers():
            torch.distributed.broadcast(buf.data, src=0)


def rank_agreement(acc, model, step: int, epoch: int) -> list[dict[str, Any]]:
    """Every rank's step count and a checksum of its weights (they must all agree: a
    desynchronised rank shows here), gathered to every rank; a warning when they differ."""
    with torch.no_grad():
        params = [p.detach().double() for p in acc.unwrap_model(model).parameters()]
        checksum = float(sum((p * (1 + (i % 7))).sum() for i, p in enumerate(params)))  # order-sensitive
    ranks = gather(acc, {"rank": acc.process_index, "step": step, "epoch": epoch, "param_checksum": checksum})
    if len({(r["step"], r["param_checksum"]) for r in ranks}) > 1:
        log.warning("ranks disagree on steps or weights at the end of training: %s", ranks)
    return ranks
