"""Small shard folders for the loader tests, in the shard format of design/system.md.

``write_split`` writes ``shard-000000.tar`` ... with webdataset's TarWriter (members ``<key>.jpg``,
``<key>.cls`` "0"/"1", ``<key>.json``), the DALI index of each tar with the ``wds2idx`` module of
the DALI wheel, and ``manifest.json``. Images are smooth random colour fields plus grain, JPEG q90,
so they compress like face crops and every sample differs. (It can switch to the shard writer of
``fdtrain.data.format`` once that is settled; the format is the same.)
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from fdtrain.config import Config, from_dict


def make_image(rng: np.random.Generator, size: int) -> Image.Image:
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def sample_keys(n: int, method: str = "Deepfakes") -> list[str]:
    """FF++-shaped keys: 4 frames per video."""
    return [f"ffpp/c23/{method}/{k // 4:03d}_{k // 4 + 500:03d}/{k % 4 * 10:04d}" for k in range(n)]


def write_split(root: str | Path, n: int, n_shards: int, *, size: int = 80, split: str = "train", seed: int = 0,
                corrupt: dict[int, str] | None = None, index: bool = True, image_ext: str = "jpg",
                real_every: int = 2) -> Path:
    """A split folder with n samples in n_shards tars; ``corrupt`` maps sample numbers to
    "truncated" (first half of the JPEG) or "garbage" (not an image). Sample k is real (0) when
    k % real_every == 0, else fake (1): labels alternate 0, 1 by default."""
    import wds2idx
    import webdataset as wds

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys = sample_keys(n)
    per = [n // n_shards + (i < n % n_shards) for i in range(n_shards)]
    corrupt = corrupt or {}
    shards, k = [], 0
    for s, count in enumerate(per):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for _ in range(count):
                buf = io.BytesIO()
                make_image(rng, size).save(buf, "JPEG" if image_ext == "jpg" else "PNG", quality=90)
                data = buf.getvalue()
                if corrupt.get(k) == "truncated":
                    data = data[: len(data) // 2]
                elif corrupt.get(k) == "garbage":
                    data = b"this is not an image " * 20
                label = int(k % real_every != 0)
                meta = {"key": keys[k], "dataset": "ffpp", "split": split, "method": "Deepfakes",
                        "compression": "c23", "video": keys[k].rsplit("/", 1)[0], "frame": int(keys[k][-4:]),
                        "label": label, "source": f"synthetic/{k}.png"}
                w.write({"__key__": keys[k], image_ext: data, "cls": str(label).encode(),
                         "json": json.dumps(meta).encode()})
                k += 1
        if index:
            with wds2idx.IndexCreator(str(root / name), str(root / f"shard-{s:06d}.idx"), verbose=False) as ic:
                ic.create_index()
        shards.append({"name": name, "num_samples": count, "sha256": ""})
    reals = len(range(0, n, real_every))
    manifest = {"split": split, "num_samples": n, "num_shards": n_shards, "shards": shards,
                "counts": {"label": {"0": reals, "1": n - reals}, "method": {"Deepfakes": n}},
                "skipped": [], "command": "tests/_loader_utils.py"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def small_cfg(train: str | Path = "", val: str | Path = "", **data: object) -> Config:
    """A config for tiny loaders: 64-px model input, small batches, 1 thread, 0 workers."""
    d = {"train": str(train), "val": str(val), "batch_size": 4, "eval_batch_size": 4, "num_workers": 0,
         "num_threads": 1, "prefetch": 1, "shuffle_buffer": 16, "noise_std": 0.1}
    d.update(data)
    return from_dict({"run": {"seed": 3}, "model": {"input_size": 64}, "data": d})
