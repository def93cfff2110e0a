"""One typed configuration tree for fdtrain.

Resolution order: dataclass defaults < recipe chain (``base:`` first, paths relative to the
recipe that names them) < command-line overrides ``--section.key=value``. Unknown keys and values
of the wrong type fail before anything runs, naming the key and the nearest valid one. The
resolved tree is written to the run folder as YAML and can be fed back as a recipe.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be resolved; the message names the key."""


# --------------------------------------------------------------------------------------------
# The tree. Every field carries a one-line doc in metadata["doc"] (shown by `fdtrain train
# --help-config`). Each section checks its own values in validate(): the one place for a field's
# rule, whoever builds the section (a recipe, a checkpoint, create_model, FakeDifferLoss).
# --------------------------------------------------------------------------------------------
def f(default: Any, doc: str) -> Any:
    """A dataclass field with a doc line; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


class Section:
    """Base of the section dataclasses: ``validate()`` and the helpers its rules share."""

    SECTION: ClassVar[str] = ""  # the dotted name errors use, e.g. "model" or "eval.robustness"

    def validate(self) -> None:
        """The choices of every Literal field (recipes check them on reading; a section built in
        code, e.g. by create_model, is checked here), then the section's own rules."""
        hints = _hints(type(self))
        for fl in dataclasses.fields(self):
            tp = hints[fl.name]
            if typing.get_origin(tp) is Literal and getattr(self, fl.name) not in typing.get_args(tp):
                self._fail(fl.name, f"expected one of {list(typing.get_args(tp))}, got {getattr(self, fl.name)!r}")
        self.check()

    def check(self) -> None:
        """The section's rules beyond its field types."""

    def _fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.SECTION}.{key}: {message}")

    def _positive(self, *keys: str) -> None:
        for k in keys:
            if getattr(self, k) <= 0:
                self._fail(k, f"must be > 0, got {getattr(self, k)}")

    def _non_negative(self, *keys: str) -> None:
        for k in keys:
            if getattr(self, k) < 0:
                self._fail(k, f"must be >= 0, got {getattr(self, k)}")

    def _probability(self, *keys: str) -> None:
        for k in keys:
            if not 0.0 <= getattr(self, k) <= 1.0:
                self._fail(k, f"a probability in [0, 1], got {getattr(self, k)}")


@dataclass
class RunConfig(Section):
    """Identity and placement of a run."""

    SECTION = "run"

    name: str = f("run", "run name; outputs go to <out_dir>/<name>/")
    out_dir: str = f("runs", "parent folder of run folders")
    seed: int = f(42, "global seed (model init, shuffling, augmentation)")
    resume: str = f("", "'' (fresh), 'auto' (newest checkpoint of this run) or a checkpoint path")
    device: Literal["auto", "cpu", "cuda"] = f("auto", "auto: CUDA when present, else CPU")
    deterministic: bool = f(False, "ask torch for deterministic kernels (slower)")
    nccl_timeout_s: int = f(1800, "timeout of the process group's collectives (NCCL or gloo), seconds: a rank "
                                  "that waits longer (a hung peer) fails instead of blocking the job forever")

    def check(self) -> None:
        name = self.name
        if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            self._fail("name", f"{name!r} must be one folder name inside run.out_dir ({self.out_dir}): "
                               "no '/', not '.' or '..'")
        if self.nccl_timeout_s <= 0:
            self._fail("nccl_timeout_s", f"must be > 0 seconds, got {self.nccl_timeout_s}")


MODEL_SOURCES = ("inva", "real", "fake")  # the fusable feature sources (fdtrain.models.fakediffer.SOURCES)


@dataclass
class ModelConfig(Section):
    """FakeDiffer and its ablations (design/model.md)."""

    SECTION = "model"

    name: str = f("fakediffer", "registered model name for create_model")
    variant: Literal["fakediffer", "xception", "dual_recons"] = f(
        "fakediffer", "fakediffer, plain xception baseline, or one shared decoder (dual_recons)")
    backbone: str = f("legacy_xception", "timm backbone providing entry flow and head blocks")
    pretrained: bool = f(False, "load ImageNet weights for the backbone from a local file/cache")
    pretrained_path: str = f("", "local weights file; '' = look in the timm/Hugging Face cache")
    input_size: int = f(299, "square input side in pixels (299 FF++/Celeb-DF, 224 WildDeepfake)")
    dropout: float = f(0.2, "dropout before the final linear layer")
    encoder_dropout: float = f(0.2, "dropout on the encoder output M (training only)")
    forward: Literal["fused", "two_pass", "fused_exact"] = f(
        "fused", "two_pass: the released code's step (a class-split reconstruction pass, then a whole-batch "
        "classification pass, each with its own noise and dropout draws); fused_exact: two_pass with one "
        "encoder pass shared by both (one draw; given equal draws the same losses, gradients and BN buffers); "
        "fused: one encoder pass, decoders once on the whole batch: ~3/4 of two_pass's compute, but in train "
        "mode decoder BN statistics mix the classes (not the released step)")
    error_encoder: Literal["shared", "separate", "shared_conv"] = f(
        "shared", "error maps through the encoder's own entry flow (shared), a second entry flow (separate), or "
        "the encoder's convolutions with BatchNorm layers of their own (shared_conv)")
    fusion: Literal["select", "residual", "add"] = f(
        "select", "select: code (default); residual: paper eq. 7; add: Table 5 ablation")
    sources: list[str] = f(["inva", "real", "fake"], "fused sources, non-empty subset of inva/real/fake")
    fusion_reduction: int = f(8, "channel reduction of the fusion MLP (728 -> 91)")
    channels_last: bool = f(True, "weights and activations in channels_last memory (CPU: ~25% faster steps)")

    @property
    def noisy_views(self) -> int:
        """Noisy views X~ a training batch must carry: two_pass draws a fresh one for each pass."""
        return 2 if self.forward == "two_pass" and self.variant != "xception" else 1

    def check(self) -> None:
        src = list(self.sources)
        if not src or any(s not in MODEL_SOURCES for s in src):
            self._fail("sources", f"need a non-empty subset of {list(MODEL_SOURCES)}, got {src}")
        if len(set(src)) != len(src):
            self._fail("sources", f"repeated entries in {src}")
        if self.input_size < 32:
            self._fail("input_size", f"Xception needs at least 32 px, got {self.input_size}")
        for key in ("dropout", "encoder_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                self._fail(key, f"a probability in [0, 1), got {getattr(self, key)}")
        if self.fusion_reduction < 1:
            self._fail("fusion_reduction", f"must be >= 1, got {self.fusion_reduction}")


@dataclass
class LossConfig(Section):
    """Eqs. 9-12: classification plus label-masked reconstruction losses."""

    SECTION = "loss"

    lambda_r: float = f(0.1, "weight of the real-reconstruction loss L_rr")
    lambda_f: float = f(0.1, "weight of the fake-reconstruction loss L_fr")
    recon: Literal["l1", "mse"] = f("l1", "reconstruction distance: l1 (code) or mse (paper text)")
    flooding: float = f(0.0, "flooding level b (|L-b|+b); 0 disables, released code uses 0.04")
    recon_reduction: Literal["paired", "released"] = f(
        "paired", "paired: each reconstruction vs its own input, averaged over the class (eqs. 9-10); released: "
        "each vs every input of its class, averaged over them, summed over the class (the released code)")

    def check(self) -> None:
        self._non_negative("flooding")


@dataclass
class DataConfig(Section):
    """Shards, loader backend and augmentation."""

    SECTION = "data"

    train: str = f("", "training shard folder (with manifest.json) or a tar glob/brace pattern")
    val: str = f("", "validation shard folder; '' = no validation during training")
    test: dict[str, str] = f({}, "named test sets evaluated at the end: {name: shard folder}")
    backend: Literal["auto", "dali", "torch"] = f("auto", "auto: DALI when importable, else torch")
    batch_size: int = f(32, "per-process training batch size")
    eval_batch_size: int = f(64, "per-process evaluation batch size")
    num_workers: int = f(4, "DataLoader workers (torch backend)")
    num_threads: int = f(4, "DALI CPU threads")
    prefetch: int = f(2, "batches prefetched per worker / DALI queue depth")
    shuffle_buffer: int = f(2000, "samples in the seeded shuffle buffer (training)")
    flip_p: float = f(0.5, "horizontal flip probability (training)")
    noise_p: float = f(0.5, "probability that a sample gets Gaussian noise in the noisy view")
    noise_std: float = f(1e-6, "std of that noise in normalized [-1,1] units (code: 1e-6)")
    balance: Literal["none", "subsample_fakes", "weighted"] = f(
        "none", "training class balance: none; subsample_fakes: fakes drawn once (seeded, without replacement) "
        "down to the real count (the released code, Celeb-DF/WildDeepfake); weighted: each epoch resamples the "
        "split with replacement, each draw real or fake with probability 1/2")
    on_corrupt: Literal["error", "skip"] = f("error", "undecodable sample: stop naming it, or skip and count")
    missing_index: Literal["build", "error"] = f("build", "shard without DALI index: build it (warn) or refuse")
    pin_memory: bool = f(True, "pinned host memory for the torch backend when on CUDA")
    hw_decoder_load: float = f(0.65, "DALI mixed decoder: share of JPEGs sent to the GPU's hardware decoder "
                                     "(A100/H100 class; DALI's default), the rest to CUDA nvJPEG")

    def check(self) -> None:
        self._positive("batch_size", "eval_batch_size")
        for name in ("prefetch", "num_threads", "shuffle_buffer"):
            if getattr(self, name) < 1:
                self._fail(name, f"must be >= 1, got {getattr(self, name)}")
        self._non_negative("num_workers", "noise_std")
        self._probability("flip_p", "noise_p")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            self._fail("hw_decoder_load", f"a share in [0, 1], got {self.hw_decoder_load}")


@dataclass
class OptimConfig(Section):
    """Optimizer and learning-rate schedule."""

    SECTION = "optim"

    name: Literal["adam", "adamw"] = f("adam", "adam: coupled weight decay as torch.optim.Adam")
    lr: float = f(2e-4, "peak learning rate at optim.reference_batch (see lr_scaling)")
    reference_batch: int = f(32, "global batch at which lr and the schedule lengths are defined; other global "
                                 "batches convert them (same lr per sample seen); 0 = lengths in this run's steps")
    lr_scaling: Literal["none", "linear", "sqrt"] = f(
        "none", "peak lr at another global batch: unchanged, x (global/reference) or x sqrt(global/reference)")
    weight_decay: float = f(1e-5, "weight decay")
    betas: list[float] = f([0.9, 0.999], "Adam betas")
    eps: float = f(1e-8, "Adam epsilon")
    schedule: Literal["hold_step", "cosine", "constant"] = f(
        "hold_step", "after warmup: hold then step decay (released code), cosine or constant")
    warmup_steps: int = f(10000, "linear warmup length in steps at optim.reference_batch")
    hold_steps: int = f(10000, "hold_step: steps at peak lr after warmup (at optim.reference_batch)")
    decay_every: int = f(3000, "hold_step: steps between decays (at optim.reference_batch)")
    decay_rate: float = f(0.9, "hold_step: multiplicative decay")
    min_lr_ratio: float = f(0.0, "cosine: final lr as a fraction of the peak")
    grad_clip: float = f(0.0, "max gradient norm; 0 disables clipping (norm is still logged)")
    fused: bool = f(True, "fused Adam kernel (CUDA and CPU): non-finite steps skipped on the device; "
                          "false: foreach Adam, one host read per step for the skip")

    def check(self) -> None:
        self._positive("decay_every")
        self._non_negative("warmup_steps", "hold_steps", "reference_batch")
        if len(self.betas) != 2:
            self._fail("betas", f"two values, got {self.betas}")
        if self.lr_scaling != "none" and not self.reference_batch:
            raise ConfigError(f"optim.lr_scaling={self.lr_scaling} scales relative to optim.reference_batch, "
                              "which is 0: set it (the global batch optim.lr was tuned at)")


@dataclass
class TrainConfig(Section):
    """The loop."""

    SECTION = "train"

    epochs: int = f(30, "training epochs")
    max_steps: int = f(0, "stop after this many optimizer steps; 0 = epochs decide")
    steps_per_epoch: int = f(0, "override the loader's steps per epoch; 0 = from the data")
    grad_accum: int = f(1, "gradient accumulation micro-steps per optimizer step")
    mixed_precision: Literal["no", "fp16", "bf16"] = f("bf16", "autocast dtype (fp16 uses a grad scaler)")
    max_nonfinite: int = f(20, "non-finite losses tolerated (steps skipped) before the run stops")
    compile: bool = f(False, "torch.compile the training model (first steps slow while it compiles)")
    sync_every: int = f(50, "optimizer steps between host reads that agree on a stop signal across ranks "
                            "(also done at every logging, evaluation and checkpoint step)")
    cudnn_benchmark: bool = f(True, "CUDA: let cuDNN pick the fastest convolution algorithms (fixed input size)")
    onednn_pointwise: bool = f(True, "CPU, one thread, batch under 16: run the 1x1 convolutions through oneDNN, "
                                     "not torch's slower im2col path (same math; measured with bench model)")

    def check(self) -> None:
        self._positive("grad_accum", "sync_every")
        self._non_negative("max_steps", "steps_per_epoch", "max_nonfinite")
        if self.epochs < 0 or (self.epochs == 0 and self.max_steps == 0):
            self._fail("epochs", f"must be >= 1 (or set train.max_steps), got {self.epochs}")


@dataclass
class RobustnessConfig(Section):
    """DeeperForensics-1.0 perturbation sweep of every test set after training (`fdtrain robustness`)."""

    SECTION = "eval.robustness"

    types: list[str] = f([], "distortion types: CS, CC, BW, GNC, GB, JPEG, VC or all; [] = no sweep")
    levels: list[int] = f([1, 2, 3, 4, 5], "severity levels, each in 1..5")

    def check(self) -> None:
        if self.types:  # names and levels checked now, not after training
            from fdtrain.data.distortions import parse_levels, parse_types

            try:
                parse_types(self.types)
                parse_levels(self.levels)
            except ValueError as e:
                raise ConfigError(f"{self.SECTION}: {e}") from None


@dataclass
class EvalConfig(Section):
    """Validation, model selection and final testing."""

    SECTION = "eval"

    every_steps: int = f(0, "validate every N optimizer steps; 0 = at each epoch end")
    metric: Literal["auc", "acc", "ap", "eer"] = f("auc", "metric choosing the best checkpoint")
    level: Literal["frame", "video"] = f("frame", "level of the selection metric")
    select_on: Literal["val", "test"] = f("val", "split used for selection; 'test' is labelled so")
    select_test: str = f("", "with select_on=test: which test set ('' = the first)")
    threshold: float = f(0.5, "score threshold for accuracy")
    max_batches: int = f(0, "cap evaluation batches per set (0 = all); for smoke runs")
    paper: list[str] = f([], "the paper's frame-level numbers (%) for this recipe, 'SET METRIC VALUE' each "
                         "(metric acc, auc or eer); `fdtrain report` prints them beside the results")
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)

    def check(self) -> None:
        for entry in self.paper:
            parts = entry.split()
            if len(parts) != 3 or parts[1] not in ("acc", "auc", "eer") or not _is_number(parts[2]):
                self._fail("paper", f"entries are 'SET METRIC VALUE' (metric acc, auc or eer), got {entry!r}")
        self._non_negative("every_steps", "max_batches")
        self.robustness.validate()


@dataclass
class LoggingConfig(Section):
    """TensorBoard and console output (rank 0)."""

    SECTION = "logging"

    tensorboard: bool = f(True, "write TensorBoard events to the run folder")
    every_steps: int = f(50, "scalar logging period in optimizer steps")
    image_every: int = f(1000, "reconstruction panel period in steps; 0 disables")
    progress: Literal["auto", "bar", "plain", "off"] = f("auto", "auto: a bar on a terminal, plain lines otherwise")

    def check(self) -> None:
        if self.every_steps <= 0:
            self._fail("every_steps", f"must be >= 1 (log every N steps), got {self.every_steps}")
        self._non_negative("image_every")


@dataclass
class CheckpointConfig(Section):
    """What is saved, when, and how many are kept."""

    SECTION = "checkpoint"

    every_steps: int = f(0, "save every N optimizer steps; 0 = at each epoch end only")
    keep_last: int = f(3, "periodic checkpoints kept (plus the best)")
    keep_best: bool = f(True, "keep the best checkpoint by eval.metric")

    def check(self) -> None:
        self._non_negative("every_steps", "keep_last")


@dataclass
class Config:
    """The whole resolved configuration of one fdtrain run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config (atomically) so it can be fed back as a recipe."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("# fdtrain resolved config: feed back with `fdtrain train THIS.yaml`\n" + self.to_yaml())
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_docs(cls: type = Config, prefix: str = "") -> dict[str, tuple[str, Any, str]]:
    """Flat {dotted.key: (type name, default, doc)} for every leaf of the tree."""
    out: dict[str, tuple[str, Any, str]] = {}
    hints = _hints(cls)
    inst = cls()
    for fl in dataclasses.fields(cls):
        tp = hints[fl.name]
        key = f"{prefix}{fl.name}"
        if dataclasses.is_dataclass(tp):
            out.update(field_docs(tp, key + "."))
        else:
            out[key] = (_type_name(tp), getattr(inst, fl.name), fl.metadata.get("doc", ""))
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def _nearest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f" (nearest valid key: '{close[0]}')" if close else ""


# --------------------------------------------------------------------------------------------
# Type checking / conversion
# --------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check a YAML-parsed value against a field type; convert where it is lossless."""
    origin = typing.get_origin(tp)
    if isinstance(value, _Raw):  # command-line text: strings stay verbatim ("007"), the rest parses
        if tp is str:
            return str(value)
        if origin is Literal and str(value) in typing.get_args(tp):  # "no" is a choice, not YAML's False
            return str(value)
        if origin is list and not value.lstrip().startswith("["):
            value = [_Raw(v.strip()) for v in value.split(",") if v.strip()]
        else:
            value = _parse_scalar(value)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")


class _Raw(str):
    """An override's text before it meets the field type it is meant for."""


def _parse_scalar(text: str) -> Any:
    """Command-line value -> Python value, with YAML's rules (1e-4 is a float, yes/no are not bools)."""
    text = str(text)
    if text.strip() in ("", "''", '""'):
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-4" as a string; accept it as a number where it parses as one.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------------------------
# Building the tree from nested dicts
# --------------------------------------------------------------------------------------------
def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [fl.name for fl in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            valid = list(field_docs(Config).keys()) + [fl.name for fl in dataclasses.fields(Config)]
            raise ConfigError(f"unknown config key '{key}'{_nearest(key, valid)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        # Mappings merge key by key, so a recipe adds test sets to its base's data.test;
        # `test: null` (or any non-mapping value) replaces the base's value outright.
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_recipe_dict(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and its ``base:`` chain into one nested dict (bases first)."""
    path = Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"recipe base cycle: {chain}")
    if not path.is_file():
        where = f" (named as base by {_seen[-1]})" if _seen else ""
        raise ConfigError(f"recipe not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base: expected a recipe path or a list of them, got {bases!r}")
    for b in bases:
        merged = _deep_merge(merged, load_recipe_dict(path.parent / b, (*_seen, path)))
    return _deep_merge(merged, data)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``--section.key=value`` (or ``--section.key value``) strings into a nested dict."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value: use --{body}=VALUE")
        if "." not in key:
            raise ConfigError(
                f"override '--{key}' must name a section and a key{_nearest(key, list(field_docs(Config)))}")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '--{key}' conflicts with an earlier one")
        node[parts[-1]] = _Raw(text)
        i += 1
    return out


def resolve(recipe: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults < recipe (with its base chain) < overrides, checked against the tree."""
    data: dict[str, Any] = load_recipe_dict(recipe) if recipe else {}
    if overrides:
        over = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _deep_merge(data, over)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """A Config from a plain nested dict (e.g. one stored in a checkpoint)."""
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every section's own rules (``Section.validate``), then the rules that span sections."""
    for fl in dataclasses.fields(cfg):
        getattr(cfg, fl.name).validate()
    if cfg.eval.select_on == "test":  # the selection set must be one of the run's test sets
        if not cfg.data.test:
            raise ConfigError("eval.select_on=test but data.test names no test set")
        if cfg.eval.select_test and cfg.eval.select_test not in cfg.data.test:
            raise ConfigError(f"eval.select_test: '{cfg.eval.select_test}' is not in data.test "
                              f"({sorted(cfg.data.test)})")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
