"""The Xception backbone FakeDiffer borrows from timm, cut into the pieces the paper uses.

FakeDiffer (Wang et al., AAAI 2025) keeps Xception's entry flow as the unified encoder F_e and,
in the released code, as the error-map encoder f; it keeps the last middle-flow blocks and the
exit flow as the classification head. The middle-flow blocks in between are never run, so they
are deleted here rather than carried as dead weights (design/model.md, "Encoder").

Where the cut falls is read from timm's ``feature_info`` (channels and reductions), so the code
holds no channel literals; the module names (conv1..act2, blockN, conv3..act4) are timm's
``legacy_xception`` layout, which is the only backbone this builder accepts today.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn

from fdtrain.config import ConfigError

# Middle-flow blocks kept in front of the exit flow: the released code runs blocks 9, 10, 11 on the
# fused features T, then block12 and the exit convolutions.
HEAD_MIDDLE_BLOCKS = 3
STEM = ("conv1", "bn1", "act1", "conv2", "bn2", "act2")
EXIT = ("conv3", "bn3", "act3", "conv4", "bn4", "act4")
SUPPORTED = ("legacy_xception",)


@dataclass
class BackboneParts:
    """The pieces of one timm Xception, as modules, plus the sizes read from feature_info."""

    entry: nn.Sequential  # F_e: stem + entry-flow blocks, image -> M (C_m, H/16, W/16)
    head: nn.Sequential  # blocks 9-12 + conv3/conv4: T -> (C_out, H/32, W/32)
    m_channels: int  # channels of M (728 for Xception)
    m_reduction: int  # stride of M w.r.t. the input (16)
    out_channels: int  # channels entering global pooling (2048)
    decoder_channels: list[int]  # encoder widths below M, deepest first: [256, 128, 64]
    decoder_reduction: int  # stride of the shallowest of those levels (2)
    dropped: list[str]  # middle-flow blocks deleted (block4..block8)


def find_pretrained_weights(backbone: str, pretrained_path: str = "") -> Path:
    """A local ImageNet checkpoint for ``backbone``; never downloads.

    Looks at ``model.pretrained_path``, then torch hub's checkpoint cache (where timm puts
    legacy_xception's URL download), then the Hugging Face cache (offline lookup).
    """
    if pretrained_path:
        p = Path(pretrained_path).expanduser()
        if not p.is_file():
            raise ConfigError(f"model.pretrained_path: no such file: {p}")
        return p
    cfg = timm.models.get_pretrained_cfg(backbone)
    tried: list[str] = []
    url = getattr(cfg, "url", "") or ""
    if url:
        import torch.hub

        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if p.is_file():
            return p
        tried.append(str(p))
    hub_id = getattr(cfg, "hf_hub_id", "") or f"timm/{backbone}.{getattr(cfg, 'tag', '') or 'tf_in1k'}"
    try:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(hub_id, fname)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        tried.append(f"Hugging Face cache, repo {hub_id} (model.safetensors / pytorch_model.bin)")
    except ImportError:
        tried.append("Hugging Face cache (huggingface_hub not installed)")
    where = tried[0] if tried else "a file of your choice"
    raise ConfigError(
        f"model.pretrained=true but no ImageNet weights for '{backbone}' were found locally. Looked in: "
        + "; ".join(tried)
        + f". Download {url or hub_id} on a machine with internet access and put it at {where}, "
        "or set model.pretrained_path=/path/to/weights (.pth or .safetensors), "
        "or set model.pretrained=false to start from random weights."
    )


def check_pretrained_weights(backbone: str, path: Path) -> None:
    """Refuse a weights file that is not ``backbone``'s (garbage, another model, a crafted pickle)
    before timm loads it: timm accepts a partial match with a warning, which would train from
    mostly random weights while the recipe says ImageNet."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to parse is the same message to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.pretrained_path: {path}: not a weights file torch can read safely "
                          f"({first})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"model.pretrained_path: {path}: not a state dict of tensors")
    want = timm.create_model(backbone, pretrained=False).state_dict()
    head = {k for k in want if k.split(".")[0] in ("fc", "classifier", "head")}  # replaced by our 1-logit head
    wrong = [k for k in want if k not in head and (k not in sd or tuple(sd[k].shape) != tuple(want[k].shape))]
    if wrong:
        raise ConfigError(f"model.pretrained_path: {path}: not ImageNet weights of {backbone}: {len(wrong)} of "
                          f"{len(want) - len(head)} backbone tensors missing or of another shape "
                          f"(e.g. {', '.join(wrong[:3])})")


def create_backbone(backbone: str, pretrained: bool, pretrained_path: str = "", **kwargs) -> nn.Module:
    """A timm backbone with one output logit; ImageNet weights only from a local file."""
    if not pretrained:
        return timm.create_model(backbone, pretrained=False, num_classes=1, **kwargs)
    path = find_pretrained_weights(backbone, pretrained_path)
    check_pretrained_weights(backbone, path)
    # timm drops the 1000-class classifier itself when num_classes differs.
    return timm.create_model(
        backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=1, **kwargs)


def split_xception(model: nn.Module) -> BackboneParts:
    """Cut a timm legacy_xception into entry flow and head, deleting the blocks between them."""
    info = list(model.feature_info)  # [{num_chs, reduction, module}, ...] shallow to deep
    names = dict(model.named_children())
    missing = [n for n in (*STEM, *EXIT) if n not in names]
    if missing or not any(n.startswith("block") for n in names):
        raise ValueError(f"model.backbone: expected a timm legacy_xception layout; missing modules {missing}")
    blocks = sorted((n for n in names if n.startswith("block")), key=lambda n: int(n[5:]))
    # M is the first feature level at stride 16; its entry flow ends with the block fed by the
    # previous level's tap (timm taps a block's first ReLU, "block3.rep.0" -> block3).
    m_level = next(i for i, f in enumerate(info) if f["reduction"] == 16)
    last_entry = info[m_level - 1]["module"].split(".")[0]
    # The stride-16 level's own tap is block12's input: block12 starts the exit flow.
    exit_block = info[m_level]["module"].split(".")[0]
    i_entry, i_exit = blocks.index(last_entry), blocks.index(exit_block)
    entry_names = [*STEM, *blocks[: i_entry + 1]]
    head_names = [*blocks[i_exit - HEAD_MIDDLE_BLOCKS: i_exit + 1], *EXIT]
    dropped = blocks[i_entry + 1: i_exit - HEAD_MIDDLE_BLOCKS]
    entry = nn.Sequential(OrderedDict((n, names[n]) for n in entry_names))
    head = nn.Sequential(OrderedDict((n, names[n]) for n in head_names))
    for n in dropped:  # free them now: the timm model object is discarded by the caller anyway
        delattr(model, n)
    below = [f for f in info[:m_level]][::-1]  # levels shallower than M, deepest first
    below = [f for f in below if f["reduction"] >= 2]
    return BackboneParts(
        entry=entry,
        head=head,
        m_channels=info[m_level]["num_chs"],
        m_reduction=info[m_level]["reduction"],
        out_channels=info[-1]["num_chs"],
        decoder_channels=[f["num_chs"] for f in below],
        decoder_reduction=below[-1]["reduction"],
        dropped=dropped,
    )


def build_parts(backbone: str, pretrained: bool, pretrained_path: str = "") -> BackboneParts:
    """timm model -> BackboneParts (the model's classifier and dropped blocks are discarded)."""
    if backbone not in SUPPORTED:
        raise ValueError(f"model.backbone: FakeDiffer is built on {list(SUPPORTED)}, got '{backbone}'")
    return split_xception(create_backbone(backbone, pretrained, pretrained_path))
