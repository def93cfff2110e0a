"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the next step boundary -> exit EXIT_PREEMPTED.

SLURM sends SIGUSR1 (``--signal=USR1@T``) some time before the time limit and SIGTERM when it
cancels or preempts; both mean "save and go". The handler only sets a flag: the training loop
reads it at a step boundary, where the model, optimizer and loader position are consistent.
A signal may reach only some ranks (a launcher that forwards to one process, ``kill`` of one
pid), so the loop all-reduces the flag (max) and every rank stops at the same step.

A second SIGTERM/SIGINT while the flag is set falls through to the previous handler, so an
impatient Ctrl-C twice still kills the process.
"""
from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Installs handlers on enter, restores the previous ones on exit (every exit path)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested: int | None = None  # the signal number that asked us to stop
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        if self.requested is not None and signum == signal.SIGTERM:
            prev = self._previous.get(signum)
            if callable(prev):
                prev(signum, frame)
                return
            raise SystemExit(128 + signum)
        self.requested = signum
        # logging inside a handler can deadlock on the handler lock; print is re-entrant enough
        print(f"fdtrain: received {signal.Signals(signum).name}; checkpointing at the next step boundary",
              flush=True)

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
