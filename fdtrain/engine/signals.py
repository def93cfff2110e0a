"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the next step boundary -> exit EXIT_PREEMPTED.

SLURM sends SIGUSR1 (``--signal=USR1@T``) some time before the time limit and SIGTERM when it
cancels or preempts; both mean "save and go". The handler only sets a flag: the training loop
reads it at a step boundary, where the model, optimizer and loader position are consistent.
A signal may reach only some ranks (a launcher that forwards to one process, ``kill`` of one
pid), so the loop all-reduces the flag and every rank stops at the same step.

The same signal usually arrives more than once: ``scancel`` and a process-group kill reach every
process, and the launcher (torch's elastic agent, ``python -m fdtrain.launch``) forwards its own
copy to each worker. Repeats within ``FDTRAIN_SIGNAL_GRACE`` seconds (default 300, more than
SLURM's warning time) are therefore ignored; a SIGTERM after that grace falls through to the
previous handler (or exits 143), for a run that cannot reach its step boundary.

A worker started by a launcher asks the kernel for SIGTERM when its parent dies
(:func:`die_with_parent`), so a launcher killed outright (SIGKILL, an unhandled SIGUSR1) leaves no
orphan training into the run folder: the worker checkpoints and exits 75 like any pre-emption.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DEFAULT_GRACE_S = 300.0


def grace_seconds() -> float:
    try:
        return float(os.environ.get("FDTRAIN_SIGNAL_GRACE", DEFAULT_GRACE_S))
    except ValueError:
        return DEFAULT_GRACE_S


class PreemptionHandler:
    """Installs handlers on enter, restores the previous ones on exit (every exit path)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, grace_s: float | None = None):
        self.signals = signals
        self.grace_s = grace_seconds() if grace_s is None else grace_s
        self.requested: int | None = None  # the signal number that asked us to stop
        self.received = 0  # every stop signal, repeats included
        self._first = 0.0
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.received += 1
        name = signal.Signals(signum).name
        # print, not logging: logging inside a handler can deadlock on the handler lock
        if self.requested is None:
            self.requested, self._first = signum, time.monotonic()
            print(f"fdtrain: received {name}; checkpointing at the next step boundary", flush=True)
            return
        if time.monotonic() - self._first <= self.grace_s or signum != signal.SIGTERM:
            return  # the same request again (a launcher forwarding it, a group kill): already on it
        prev = self._previous.get(signum)
        print(f"fdtrain: {name} again {self.grace_s:.0f} s after the first; stopping without a checkpoint",
              flush=True)
        if callable(prev):
            prev(signum, frame)
            return
        raise SystemExit(128 + signum)

    @property
    def stop_requested(self) -> bool:
        return self.requested is not None

    def __enter__(self) -> PreemptionHandler:
        # signal.signal only works in the main thread; elsewhere (a test runner thread) stay inert
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


def launched_worker() -> bool:
    """Whether this process is a worker started by a launcher (accelerate, torchrun, fdtrain.launch)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``sig`` to this process when its parent exits; True when set.

    The parent is the launcher that started this worker; without this, a launcher killed outright
    leaves its workers (in their own sessions) training on, unseen.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request: act now
        os.kill(os.getpid(), sig)
    return True
