"""DALI backend: ``fn.readers.webdataset`` -> ``fn.decoders.image`` -> resize -> flip + normalize.

One parameter, the decoder device, separates the GPU graph ("mixed": nvJPEG, everything after it on
the GPU) from the CPU graph ("cpu", ``device_id=None``); the graph is otherwise identical. The
pipeline is rebuilt each epoch: the shard list is permuted with (seed, epoch), the same permutation
on every rank (and the one the fallback uses), so the ranks' contiguous reader ranges stay disjoint
while each epoch reads the shards in a new order; the pipeline seed (shuffle buffer, flips) is
mixed from (seed, epoch, rank), so ranks flip different samples. An epoch's order depends only on
(seed, epoch, rank). Resume: training pipelines run with DALI's checkpointing, and the loader's
state holds the reader's checkpoint at the saved step, so a resumed epoch restarts from it without
decoding the consumed batches again; without one (older checkpoint, skipped samples) the consumed
batches are run again before the first new one. The noisy view X~ is added after DALI, on the
output device, by the code shared with the fallback (``augment.add_gated_noise``).

Decoder failures surface as a ``RuntimeError`` from DALI that does not always name the sample, so
the batches in flight are replayed through a reader-only pipeline (same seed, same order) and each
of their images is decoded alone to find the bad one(s); the error then names shard and key, or
with ``data.on_corrupt=skip`` the samples are dropped from this rank's index and the epoch resumes.
"""
from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from fdtrain.data.format import (
    IMAGE_EXTS,
    DataError,
    ShardSet,
    line_key,
    parse_label,
    read_index,
    sample_key,
    write_index,
)
from fdtrain.data.loading.base import Loader, log
from fdtrain.data.loading.sampling import mix_seed

READER = "Reader"
_FAILED_SAMPLE = re.compile(r"Failed to decode sample #\d+ : (\S+):(\d+):(\S+)")


def parse_source_info(info: str) -> tuple[str, str]:
    """(tar path, sample key) from DALI's ``source_info`` ``<tar>:<offset>:<member name>``."""
    tar, _offset, name = info.rsplit(":", 2)
    return tar, sample_key(name)


def image_pipeline(*, tars: list[str], indexes: list[str], shard_id: int, num_shards: int, batch_size: int,
                   size: int, train: bool, seed: int, flip_p: float, decoder: str, device_id: int | None,
                   num_threads: int, prefetch: int, shuffle_buffer: int, fp16: bool = False,
                   decode: bool = True, checkpointing: bool = False, checkpoint: bytes | None = None,
                   layout: str = "CHW", hw_decoder_load: float = 0.65) -> Pipeline:
    """The DALI graph. Outputs: x (B,3,S,S) normalized, or (B,S,S,3) with ``layout="HWC"`` (then
    ``permute(0, 3, 1, 2)`` is a channels_last view: no copy for a channels_last model), cls bytes
    and source_info bytes (zero-padded). ``hw_decoder_load``: the share of images the "mixed"
    decoder hands to the GPU's hardware JPEG engine (A100/H100 class), the rest to CUDA nvJPEG.

    ``decode=False`` keeps only the reader (same seed, same order): used to replay the samples of a
    failed batch without decoding them. ``checkpointing``/``checkpoint``: DALI's pipeline checkpoints
    (reader position, shuffle buffer and random generators), saved and restored by the loader.
    """
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch, enable_checkpointing=checkpointing, checkpoint=checkpoint)
    with pipe:
        images, cls = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=[";".join(IMAGE_EXTS), "cls"], missing_component_behavior="error",
            shard_id=shard_id, num_shards=num_shards, stick_to_shard=True,
            random_shuffle=train, initial_fill=max(1, shuffle_buffer), seed=seed,
            pad_last_batch=not train,  # eval: the iterator drops the padding (LastBatchPolicy.PARTIAL)
            name=READER)
        info = fn.pad(fn.get_property(images, key="source_info"), fill_value=0)
        cls = fn.pad(cls, fill_value=0)  # raw ASCII bytes ("0"/"1"), parsed on the host
        if not decode:
            pipe.set_outputs(cls, info)
            return pipe
        hw = {"hw_decoder_load": hw_decoder_load} if decoder == "mixed" else {}
        images = fn.decoders.image(images, device=decoder, output_type=types.RGB, **hw)
        # linear + antialias: a triangle filter over the source footprint, like PIL's BILINEAR
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        mirror = fn.random.coin_flip(probability=flip_p) if train and flip_p > 0 else 0
        x = fn.crop_mirror_normalize(images, dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout=layout,
                                     mean=[127.5] * 3, std=[127.5] * 3, mirror=mirror)
        pipe.set_outputs(x, cls, info)
    return pipe


class DaliLoader(Loader):
    """``fn.readers.webdataset`` with ``shard_id``/``num_shards`` over ranks; DALIGenericIterator output."""

    backend = "dali"

    def __init__(self, cfg: Any, shards: Any, **kw: Any):
        super().__init__(cfg, shards, **kw)
        cuda = self.device.type == "cuda"
        self.decoder = "mixed" if cuda else "cpu"
        # device_id=None is DALI's CPU-only mode; any GPU id fails to build without a GPU
        self.device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if cuda else None
        self._tmp: tempfile.TemporaryDirectory | None = None  # filtered index files (on_corrupt=skip)
        self._live: DALIGenericIterator | None = None  # the training epoch's iterator, for state_dict
        self._resume_from: tuple[int, int, bytes] | None = None  # (epoch, step, DALI checkpoint) to resume
        # channels_last models take HWC as a free view; NCHW models get CHW (no re-layout either way)
        self.layout = "HWC" if cfg.model.channels_last else "CHW"

    def describe(self) -> str:
        d = self.cfg.data
        return f"decoder={self.decoder}, {d.num_threads} threads, prefetch {d.prefetch}"

    # --- state: DALI's own checkpoint of the reader, so a resume need not decode the consumed part -----
    def _pipeline_id(self) -> str:
        """What a DALI checkpoint is only valid for: the same reader over the same samples and batches."""
        d = self.cfg.data
        return (f"batch {self.batch_size}, ranks {self.world_size}, seed {self.seed}, shuffle_buffer "
                f"{d.shuffle_buffer}, shards {self.shards.num_shards}, skipped {len(self.skipped)}")

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.train and self._live is not None and self.step_in_epoch > 0:
            sd["dali_checkpoint"] = self._live.checkpoints()[0]  # bytes: loads with weights_only=True
            sd["dali_pipeline"] = self._pipeline_id()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        ck = sd.get("dali_checkpoint")
        if isinstance(ck, bytes) and self.step_in_epoch == int(sd["step_in_epoch"]) > 0:
            if sd.get("dali_pipeline") == self._pipeline_id():
                self._resume_from = (self.epoch, self.step_in_epoch, ck)
            else:
                log.info("data[%s]: the saved DALI reader checkpoint is for another pipeline (%s, now %s): "
                         "replaying the epoch's consumed batches instead", self.shards.split,
                         sd.get("dali_pipeline"), self._pipeline_id())

    # --- pipeline per epoch ------------------------------------------------------------------
    def _epoch_shards(self, epoch: int) -> ShardSet:
        """Training: the shards in this epoch's order, a permutation by (seed, epoch) that every rank
        (and the fallback) draws alike; evaluation: manifest order."""
        if not self.train:
            return self.shards
        s = self.selected_shards(epoch)  # data.balance's selection (all shards without it)
        order = list(range(s.num_shards))
        random.Random(mix_seed(self.seed, epoch, 0x5A4D)).shuffle(order)
        return ShardSet(split=s.split, root=s.root, tars=[s.tars[i] for i in order],
                        indexes=[s.indexes[i] for i in order], counts=[s.counts[i] for i in order])

    def _reader_args(self, epoch: int) -> dict[str, Any]:
        # Training also moves each rank to the next reader shard every epoch (what DALI's
        # stick_to_shard=False does inside one pipeline; explicit here as we rebuild per epoch).
        shard_id = (self.rank + epoch) % self.world_size if self.train else self.rank
        shards = self._epoch_shards(epoch)
        tars = [str(t) for t in shards.tars]
        idx = [str(i) for i in shards.indexes]
        num_shards = self.world_size
        if self.skipped:  # known-bad samples: this rank's range from indexes that leave them out
            tars, idx = self._filtered_indexes(shards, shard_id, epoch)
            shard_id, num_shards = 0, 1
        # per-rank seed: the reader's shuffle buffer and the flips differ between ranks
        seed = mix_seed(self.seed, epoch, self.rank, 0xDA11) % 2**31 if self.train else self.seed
        return dict(tars=tars, indexes=idx, shard_id=shard_id, num_shards=num_shards, seed=seed)

    def _pipeline(self, epoch: int, decode: bool = True, checkpoint: bytes | None = None) -> Pipeline:
        d = self.cfg.data
        pipe = image_pipeline(**self._reader_args(epoch), batch_size=self.batch_size, size=self.size,
                              train=self.train, flip_p=d.flip_p, decoder=self.decoder, device_id=self.device_id,
                              num_threads=d.num_threads, prefetch=d.prefetch, shuffle_buffer=d.shuffle_buffer,
                              fp16=self.dtype == torch.float16, decode=decode,
                              checkpointing=self.train and decode, checkpoint=checkpoint, layout=self.layout,
                              hw_decoder_load=d.hw_decoder_load)
        try:
            pipe.build()
        except RuntimeError as e:
            raise DataError(f"data[{self.shards.split}]: DALI cannot build the pipeline for {self.shards.root}: "
                            f"{e}") from e
        return pipe

    def _batches(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        resume, self._resume_from = self._resume_from, None
        checkpoint = resume[2] if resume is not None and resume[:2] == (epoch, skip) and self.train else None
        while True:
            step = 0  # batches this epoch's reader has produced (handed out or fast-forwarded)
            try:
                pipe = self._pipeline(epoch, checkpoint=checkpoint)
            except DataError:
                if checkpoint is None:
                    raise
                log.warning("data[%s]: DALI could not restore its reader checkpoint (another DALI version?); "
                            "replaying %d batch(es) instead", self.shards.split, skip)
                checkpoint = None
                pipe = self._pipeline(epoch)
            if checkpoint is not None:
                log.info("data[%s]: DALI reader restored from its checkpoint at step %d (nothing replayed)",
                         self.shards.split, skip)
                step, checkpoint = skip, None
            elif skip:
                log.info("data[%s]: DALI replays %d batch(es) to reach the saved position", self.shards.split, skip)
            try:
                it = DALIGenericIterator([pipe], ["x", "cls", "info"], reader_name=READER, auto_reset=False,
                                         prepare_first_batch=False, last_batch_policy=LastBatchPolicy.DROP
                                         if self.train else LastBatchPolicy.PARTIAL)
                self._live = it if self.train else None
                for out in self._stream(it):
                    step += 1
                    if step > skip:
                        yield self._host_fields(out)
                return
            except DataError:  # ours (e.g. a bad label): already names the sample
                raise
            except RuntimeError as e:  # any DALI error leaves the pipeline unusable
                failed = e
            finally:
                it = pipe = self._live = None  # release the pipeline (and its threads/GPU buffers) now
            bad = self._locate_bad(epoch, step, failed)
            if not bad or all(key in self.skipped for _, key, _ in bad):
                raise DataError(f"data[{self.shards.split}] rank {self.rank}: DALI failed in epoch {epoch} near step "
                                f"{step + 1} and no single sample could be blamed (shards {self.shards.root}):\n"
                                f"{failed}") from failed
            if self.cfg.data.on_corrupt != "skip":
                shard, key, reason = bad[0]
                more = f" (and {len(bad) - 1} more in the same batches)" if len(bad) > 1 else ""
                raise DataError(f"undecodable image in shard {shard}, key {key}{more}: {reason}; "
                                "set data.on_corrupt=skip to skip and count such samples") from failed
            for shard, key, reason in bad:
                self._record_skip(key, shard, reason)
            skip = step  # rebuild without them and continue where this epoch was

    def _stream(self, it: DALIGenericIterator) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            try:
                yield next(it)[0]
            except StopIteration:
                if not self.train:
                    return
                it.reset()  # a rank range shorter than the epoch (after skipped samples): wrap around

    def _host_fields(self, out: dict[str, torch.Tensor]) -> dict[str, Any]:
        keys, labels = [], []
        for info, cls in zip(out["info"].numpy(), out["cls"].numpy()):
            tar, key = parse_source_info(bytes(info).rstrip(b"\0").decode())
            keys.append(key)
            labels.append(parse_label(bytes(cls), key, tar))
        x = out["x"].permute(0, 3, 1, 2) if self.layout == "HWC" else out["x"]
        return {"x": x, "label": torch.tensor(labels, dtype=torch.float32), "key": keys}

    # --- corrupt samples ---------------------------------------------------------------------
    def _locate_bad(self, epoch: int, step: int, err: BaseException | None) -> list[tuple[str, str, str]]:
        """(shard, key, reason) of undecodable images among the batches that were in flight."""
        text = str(err)
        candidates: dict[tuple[str, int], str] = {}
        m = _FAILED_SAMPLE.search(text)
        if m:
            candidates[(m.group(1), int(m.group(2)))] = m.group(3)
        pipe = self._pipeline(epoch, decode=False)  # same reader, same seed: the same samples in order
        try:
            for b in range(step + self.cfg.data.prefetch + 1):
                cls, info = pipe.run()
                if b < step:
                    continue
                for row in info.as_array():
                    tar, offset, name = bytes(row).rstrip(b"\0").decode().rsplit(":", 2)
                    candidates[(tar, int(offset))] = name
        except (RuntimeError, StopIteration):
            pass  # the reader itself failed: keep what the message named
        finally:
            del pipe
        checker = _DecodeChecker(self.decoder, self.device_id)
        bad = []
        for (tar, offset), name in sorted(candidates.items()):
            reason = checker.check(tar, offset)
            if reason is not None:
                bad.append((tar, sample_key(name), reason))
        return bad

    def _filtered_indexes(self, shards: ShardSet, shard_id: int, epoch: int) -> tuple[list[str], list[str]]:
        """Index files holding this reader shard's samples minus the skipped keys (same tars, same offsets)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fdtrain-idx-")
        lo, hi = shards.rank_range(shard_id, self.world_size)
        tars, idx, kept = [], [], 0
        for i, first, end in shards.pieces(lo, hi):
            lines = read_index(shards.indexes[i])[first:end]
            lines = [ln for ln in lines if line_key(ln) not in self.skipped]
            if not lines:
                continue
            out = Path(self._tmp.name) / f"e{epoch}-{i:06d}-s{shard_id}.idx"
            write_index(out, lines)
            tars.append(str(shards.tars[i]))
            idx.append(str(out))
            kept += len(lines)
        if kept < (self.batch_size if self.train else 1):
            raise DataError(f"data[{self.shards.split}] rank {self.rank}: {kept} decodable samples left in its range "
                            f"after skipping {len(self.skipped)}: cannot fill a batch")
        return tars, idx


class _DecodeChecker:
    """Decodes one encoded image at a time with the loader's own decoder; None when it decodes."""

    def __init__(self, decoder: str, device_id: int | None):
        self.decoder, self.device_id = decoder, device_id
        self.pipe: Pipeline | None = None

    def _build(self) -> Pipeline:
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1)
        with pipe:
            data = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            pipe.set_outputs(fn.decoders.image(data, device=self.decoder, output_type=types.RGB))
        pipe.build()
        return pipe

    def check(self, tar: str, offset: int) -> str | None:
        data = _member_bytes(tar, offset)
        if self.pipe is None:
            self.pipe = self._build()
        try:
            self.pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8)])
            self.pipe.run()
            return None
        except RuntimeError as e:
            self.pipe = None  # invalid after an error
            return f"{len(data)}-byte image does not decode (DALI {self.decoder} decoder: {dali_reason(e)})"


def dali_reason(err: BaseException) -> str:
    """The line after "encountered:" in a DALI operator error, without the source info it may repeat."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for i, ln in enumerate(lines[:-1]):
        if ln == "encountered:":
            return re.sub(r"\s*:(\s*\S+:\d+:\S+)?$", "", lines[i + 1])  # drop " : <tar>:<offset>:<name>"
    return lines[-1] if lines else type(err).__name__


def _member_bytes(tar: str, offset: int) -> bytes:
    """Bytes of the tar member whose data starts at ``offset`` (its ustar header is the block before)."""
    with open(tar, "rb") as fh:
        fh.seek(offset - 512)
        header = fh.read(512)
        size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
        return fh.read(size)
