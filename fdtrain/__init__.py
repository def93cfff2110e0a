"""fdtrain: training system for the FakeDiffer face-forgery detector (Wang et al., AAAI 2025)."""
__version__ = "0.1.0"

# Exit code of a run that saved a checkpoint on SIGTERM/SIGUSR1 and wants to be resumed
# (EX_TEMPFAIL); slurm/train.sbatch requeues on it.
EXIT_PREEMPTED = 75


class FdtrainError(Exception):
    """A problem the user can fix (a bad file, a full disk, a refused resume): the command line
    prints the message, without a traceback, and exits 2."""
