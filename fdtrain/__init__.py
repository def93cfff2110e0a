"""fdtrain: training system for the FakeDiffer face-forgery detector (Wang et al., AAAI 2025)."""
__version__ = "0.1.0"

# Exit code of a run that saved a checkpoint on SIGTERM/SIGUSR1 and wants to be resumed
# (EX_TEMPFAIL); slurm/train.sbatch requeues on it.
EXIT_PREEMPTED = 75


class FdtrainError(Exception):
    """A problem the user can fix (a bad file, a full disk, a refused resume): the command line
    prints the message, without a traceback, and exits 2."""


def report_error(message: str) -> None:
    """A user-facing error, printed once per job: by global rank 0 (every rank of a launched job
    raises the same error at the same point; the engine gathers rank-local failures to rank 0)."""
    import os
    import sys

    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
