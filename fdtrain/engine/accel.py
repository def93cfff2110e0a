"""The Accelerator for a run: devices, DDP, mixed precision, accumulation, DeepSpeed.

Who decides what: the launcher decides the processes (``python -m``, ``accelerate launch``,
``torchrun``, ``srun``: Accelerate reads RANK/WORLD_SIZE from the environment) and whether
DeepSpeed is on (an accelerate config with ``distributed_type: DEEPSPEED`` or ``--use_deepspeed``
sets ``ACCELERATE_USE_DEEPSPEED``); the recipe decides the device (``run.device``), the precision
(``train.mixed_precision``) and the accumulation (``train.grad_accum``).

CPU traps (../shared/notes/cpu-stack-facts.md): ``Accelerator(cpu=True)`` silently drops the
DeepSpeed plugin, so DeepSpeed without a GPU needs ``cpu=False`` and a gloo process group; fp16
autocast does nothing on a CPU (we say so and run fp32).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

from fdtrain.config import Config, ConfigError

log = logging.getLogger(__name__)


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def build_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if cfg.run.device == "cuda" and not cuda:
        raise ConfigError("run.device: 'cuda' asked for but torch sees no CUDA device (use auto or cpu)")
    on_cpu = cfg.run.device == "cpu" or not cuda
    precision = cfg.train.mixed_precision
    if on_cpu and precision == "fp16":
        log.warning("train.mixed_precision=fp16 has no effect on a CPU; running fp32 (use bf16 or no)")
        precision = "no"
    kwargs = dict(mixed_precision=precision, gradient_accumulation_steps=cfg.train.grad_accum)
    timeout = timedelta(seconds=cfg.run.nccl_timeout_s)
    if deepspeed_requested():
        if on_cpu:
            # cpu=True would silently ignore the DeepSpeed plugin; gloo is the CPU backend
            acc = Accelerator(cpu=False, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=timeout)],
                              **kwargs)
        else:
            acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)], **kwargs)
        configure_deepspeed(acc, cfg)
    else:
        acc = Accelerator(cpu=on_cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)], **kwargs)
    if on_cpu and precision == "bf16":
        log.warning("bf16 autocast on a CPU is slow without AMX (about 10x slower than fp32 on AVX2); "
                    "--train.mixed_precision=no for CPU runs")
    return acc


def configure_deepspeed(acc, cfg: Config) -> None:
    """Fill the DeepSpeed json's ``auto`` fields from the recipe; refuse contradictions.

    Our loader is not passed through ``prepare`` (DALI iterators are not DataLoaders), so
    Accelerate cannot infer the micro-batch; and the recipe, not the launcher, owns the
    hyper-parameters (batch, accumulation, clipping).
    """
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        raise ConfigError("ACCELERATE_USE_DEEPSPEED is set but Accelerate built no DeepSpeed plugin "
                          "(is deepspeed installed? pip install 'fdtrain[deepspeed]')")
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise ConfigError(f"DeepSpeed config sets {key}={have!r} but the recipe says {value!r}; "
                              "set it to \"auto\" in the DeepSpeed json (the recipe owns hyper-parameters)")
    ds["train_batch_size"] = cfg.data.batch_size * cfg.train.grad_accum * acc.num_processes
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"DeepSpeed config has an '{key}' section; fdtrain builds its own "
                              f"({'optim.name' if key == 'optimizer' else 'optim.schedule'}): remove it")


def is_deepspeed(acc) -> bool:
    return getattr(acc.state, "deepspeed_plugin", None) is not None

