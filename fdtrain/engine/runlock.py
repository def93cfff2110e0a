"""One live run per run folder: ``runs/<name>/run.lock``.

The lock file holds the owner's host, pid, process start time and a token. A second run that
finds it refuses to start, naming the owner, unless the owner is provably gone: same host and the
pid is dead, or the pid now belongs to a process started at another time (reused after a crash or
a kill -9). On another host liveness cannot be checked, so the lock is kept and the message says
how to remove it. Taking the lock is also the start-up check that the run folder is writable.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from fdtrain import FdtrainError

LOCK_NAME = "run.lock"


class RunLockError(FdtrainError):
    """The run folder is owned by another live run, or cannot be written."""


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of a live process, None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # alive but not ours to inspect: treat as alive, start unknown
        return -1.0


def _owner_alive(info: dict[str, Any]) -> bool | None:
    """True/False when this host can tell, None for another host."""
    if info.get("host") != socket.gethostname():
        return None
    started = _process_start(int(info.get("pid", -1)))
    if started is None:
        return False
    if started < 0:
        return True
    return abs(started - float(info.get("process_start", started))) < 2.0  # else: a reused pid


class RunLock:
    """Acquire with :meth:`acquire` (one process per job: global rank 0), :meth:`release` at exit."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.token = secrets.token_hex(8)
        self.held = False

    def acquire(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLockError(f"run.out_dir: cannot create the run folder {self.run_dir}: {e.strerror}") from None
        import psutil

        me = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": psutil.Process().create_time(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            except OSError as e:
                raise RunLockError(f"run folder {self.run_dir} is not writable: {e.strerror}") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            return
        raise RunLockError(f"{self.path}: could not take the run folder's lock (other runs keep taking it)")

    def _clear_if_stale(self) -> None:
        try:
            text = self.path.read_text()
            info = json.loads(text)
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            if time.time() - self.path.stat().st_mtime < 10:  # being written right now
                time.sleep(0.2)
                return
            info, text = {}, None
        alive = _owner_alive(info) if info else False
        owner = (f"{info.get('host', '?')} pid {info.get('pid', '?')}, started {info.get('started', '?')}"
                 if info else "an unreadable lock")
        if alive is None:
            raise RunLockError(f"{self.run_dir} is in use by a run on {owner}; this host cannot check whether it is "
                               f"still alive. If it is not, remove {self.path} and start again, or pick another "
                               "--run.name")
        if alive:
            raise RunLockError(f"{self.run_dir} is in use by a live run ({owner}); two runs cannot share a run "
                               "folder: wait for it to finish, or pick another --run.name")
        # Stale (its owner died without releasing it): move it aside, and take over only if what was
        # moved is what was judged stale (another starter may have replaced it meanwhile).
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if text is not None and aside.read_text() != text:
            os.rename(aside, self.path)  # not the stale one: put it back and look again
            return
        aside.unlink(missing_ok=True)
        print(f"fdtrain: {self.path}: removed the lock of a run that is gone ({owner})", flush=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass
