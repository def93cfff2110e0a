"""``python -m fdtrain.launch {accelerate|torchrun} ARGS...``: a launcher that pre-emption survives.

The arguments after the first word are exactly those of ``accelerate launch`` or ``torchrun``::

    python -m fdtrain.launch accelerate --config_file launch/accelerate/gpu8.yaml -m fdtrain train R.yaml
    python -m fdtrain.launch torchrun --standalone --nproc_per_node 8 -m fdtrain train R.yaml

What it adds to the plain launchers (which it runs in this process):

* **Signals.** SIGTERM and SIGUSR1, whether sent to this process, its process group, or every
  process of a SLURM step, are forwarded once to each worker; the workers checkpoint at the same
  step boundary and exit 75. torch's elastic agent, left to itself, dies of SIGUSR1 (its workers,
  in their own sessions, train on as orphans) and answers SIGTERM by killing the workers 30 s
  later, mid-checkpoint if need be. Here the agent runs in a thread, where it installs no signal
  handlers, and this process's main thread owns the signals. Ctrl-C (SIGINT) asks the workers to
  checkpoint (SIGTERM); a second Ctrl-C kills them.
* **Exit status.** The workers' own exit code: 75 (pre-empted, checkpoint written: requeue),
  2 (bad input, the message printed once by rank 0), 3 (too many non-finite losses), instead of 1
  and a ``ChildFailedError`` traceback.
* **No orphans.** Each worker asks the kernel for SIGTERM when this process dies
  (fdtrain.engine.signals.die_with_parent), even of SIGKILL.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

LAUNCHERS = ("accelerate", "torchrun")
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def _children() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children(recursive=False)
    except psutil.Error:
        return []


class _Forwarder:
    """Signal handlers of the main thread: pass each signal on to the workers."""

    def __init__(self):
        self.interrupts = 0

    def __call__(self, signum, frame):  # noqa: ARG002 - signal handler signature
        import psutil

        sig = signum
        if signum == signal.SIGINT:
            self.interrupts += 1
            sig = signal.SIGTERM if self.interrupts == 1 else signal.SIGKILL
            print("fdtrain.launch: Ctrl-C: " + ("the workers checkpoint and exit 75 (Ctrl-C again kills them)"
                                                if self.interrupts == 1 else "killing the workers"),
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGHUP:
            sig = signal.SIGTERM
        for child in _children():
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass


def exit_code(failures: dict[int, Any]) -> int:
    """One exit code for a job from its failed ranks: the first worker that exited with a code of
    its own (others are often killed by the agent tearing the group down after it)."""
    by_time = sorted(failures.items(), key=lambda kv: kv[1].timestamp)
    for _, f in by_time:
        if f.exitcode > 0:
            return f.exitcode
    return 128 - by_time[0][1].exitcode if by_time else 1


def _run_launcher(which: str, args: list[str], result: dict[str, Any]) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        if which == "accelerate":
            from accelerate.commands.launch import launch_command, launch_command_parser

            launch_command(launch_command_parser().parse_args(args))
        else:
            from torch.distributed.run import parse_args, run

            run(parse_args(args))
        result["code"] = 0
    except ChildFailedError as e:
        result["code"] = exit_code(e.failures)
        result["ranks"] = {r: f.exitcode for r, f in sorted(e.failures.items())}
    except SystemExit as e:  # argparse, or accelerate's quiet single-process path
        result["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BaseException as e:  # noqa: BLE001 - reported as one line below
        import subprocess

        if isinstance(e, subprocess.CalledProcessError):  # accelerate's single-process launcher
            result["code"] = e.returncode if e.returncode > 0 else 128 - e.returncode
        else:
            result["code"], result["error"] = 2, f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in LAUNCHERS:
        print(__doc__.split("\n\n")[0] + f"\nusage: python -m fdtrain.launch {{{','.join(LAUNCHERS)}}} ARGS...",
              file=sys.stderr)
        return 2
    # Our summary replaces the agent's per-failure error records and tracebacks.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    forward = _Forwarder()
    for sig in FORWARDED:
        signal.signal(sig, forward)
    result: dict[str, Any] = {}
    agent = threading.Thread(target=_run_launcher, args=(argv[0], argv[1:], result), name="launcher", daemon=True)
    agent.start()
    while agent.is_alive():
        agent.join(0.2)  # short waits: signal handlers run in the main thread between them
    code = int(result.get("code", 1))
    if "error" in result:
        print(f"fdtrain.launch: {argv[0]} failed: {result['error']}", file=sys.stderr, flush=True)
    elif code not in (0, 2):  # a 2 has already been explained by rank 0
        ranks = ", ".join(f"rank {r}: {c}" for r, c in result.get("ranks", {}).items())
        print(f"fdtrain.launch: workers exited {code}" + (f" ({ranks})" if ranks else ""), file=sys.stderr,
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
