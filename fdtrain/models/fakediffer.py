"""FakeDiffer: distributional disparity learning on differentiated reconstruction.

Wang et al., "FakeDiffer: Distributional Disparity Learning on Differentiated Reconstruction for
Face Forgery Detection", AAAI 2025 (../shared/paper/FakeDiffer-AAAI2025.md, "Proposed Method").
Where the paper is silent or disagrees with the authors' released code, design/model.md names the
switch and its default; this file follows it. Read top to bottom, it follows the equations:

  eq. 1     M   = F_e(X~)                   Xception entry flow on the noisy view, then dropout
  eqs. 2-3  X^r = F_r(M), X^f = F_f(M)      two decoders, same layout, separate weights
  eqs. 4-5  E_r = f(|X^r - X|), E_f = ...   error maps of the clean X through the entry flow
  eqs. 6-8  T   = interaction(M, E_r, E_f)  pooled MLP -> per-channel softmax over the sources
  head      logit = fc(GAP(Xception blocks 9-12 + exit convs (T)))

Shapes in comments are for a 299x299 input (224 gives 14x14 maps instead of 19x19).
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.xception import Block, SeparableConv2d
from torch import Tensor

from fdtrain.config import MODEL_SOURCES, ModelConfig
from fdtrain.data.augment import class_rows

from .backbone import build_parts, create_backbone

SOURCES = MODEL_SOURCES  # M (image-invariant), E_r, E_f: canonical order of fusion weights
# Layers FakeDiffer adds (decoders, fusion MLP) keep PyTorch's default init, as in the released
# PyTorch original; timm's kaiming fan_out init would saturate the decoders' tanh at the start.


@dataclass
class FakeDifferOutput:
    """What a training forward returns; the loss and the logger read it."""

    logit: Tensor  # (B,) one logit per image; score = sigmoid(logit)
    recon_real: Optional[Tensor] = None  # (B,3,H,W) F_r(M) in [-1, 1]; the loss reads the real rows
    recon_fake: Optional[Tensor] = None  # (B,3,H,W) F_f(M) in [-1, 1]; the loss reads the fake rows
    err_real: Optional[Tensor] = None  # (B,C,h,w) E_r, when "real" is a fused source
    err_fake: Optional[Tensor] = None  # (B,C,h,w) E_f, when "fake" is a fused source
    fusion_weights: Optional[Tensor] = None  # (B,S,C) softmax weights, sources in model.sources order


# ----------------------------------------------------------------------------------------------
# Eqs. 2-3: real and fake decoders F_r, F_f
# ----------------------------------------------------------------------------------------------
class UpSepConv(nn.Sequential):
    """Decoder step d1/d3/d5: nearest x2 -> SepConv (depthwise 3x3 + pointwise, no bias) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict(
            up=nn.Upsample(scale_factor=2, mode="nearest"),
            conv=SeparableConv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1),
            bn=nn.BatchNorm2d(out_channels),
            act=nn.ReLU(inplace=True),
        ))


class Decoder(nn.Module):
    """M -> image, mirroring the entry flow's widths (design/model.md decoder table).

    ``channels`` are the encoder's widths below M, deepest first ([256, 128, 64] for Xception):
    each gets an upsampling SepConv step, and all but the last an Xception block (3 reps,
    stride 1, identity skip). A 1x1 conv + tanh gives RGB, resized to the input size.
    """

    def __init__(self, in_channels: int, channels: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            layers.append(UpSepConv(c_in, c))  # d1, d3, d5
            if i < len(channels) - 1:
                layers.append(Block(c, c, reps=3, strides=1))  # d2, d4
            c_in = c
        self.body = nn.Sequential(*layers)
        self.to_rgb = nn.Sequential(nn.Conv2d(c_in, 3, 1, bias=False), nn.Tanh())  # d6

    def forward(self, m: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.to_rgb(self.body(m))  # (B,3,152,152) from M (B,728,19,19)
        # bilinear with align_corners=True, as the released code: a convex mix, so it stays in [-1, 1]
        return F.interpolate(y, size=size, mode="bilinear", align_corners=True)  # (B,3,299,299)


# ----------------------------------------------------------------------------------------------
# Eqs. 6-8: information interaction
# ----------------------------------------------------------------------------------------------
class Interaction(nn.Module):
    """Fuse S same-shaped feature maps with channel weights computed from their pooled sum.

    ``mode``: select (released code): T = sum_s w_s * X_s; residual (paper eq. 7): T = sum_s
    (X_s + w_s * X_s); add (Table 5 "Add"): T = sum_s X_s, no MLP and no weights.
    """

    def __init__(self, channels: int, num_sources: int, reduction: int, mode: str):
        super().__init__()
        self.mode, self.num_sources, self.channels = mode, num_sources, channels
        self.mlp = None
        if mode != "add":
            hidden = max(1, channels // reduction)  # 728 // 8 = 91
            self.mlp = nn.Sequential(OrderedDict(
                fc1=nn.Conv2d(channels, hidden, 1, bias=False),
                bn=nn.BatchNorm2d(hidden),
                act=nn.ReLU(inplace=True),
                fc2=nn.Conv2d(hidden, num_sources * channels, 1, bias=False),
            ))

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        k = feats[0]
        for x in feats[1:]:
            k = k + x  # (B,C,h,w) K = M + E_r + E_f
        if self.mlp is None:
            return k, None
        g = k.mean(dim=(2, 3), keepdim=True)  # (B,C,1,1) eq. 6, G
        w = self.mlp(g).view(k.shape[0], self.num_sources, self.channels)  # (B,S,C)
        w = w.softmax(dim=1)  # (B,S,C) eq. 7: softmax over the sources, per channel
        t = None
        for s, x in enumerate(feats):
            wx = w[:, s, :, None, None] * x  # (B,C,h,w)
            if self.mode == "residual":
                wx = x + wx  # eq. 7: X^ = X + softmax(..) * X
            t = wx if t is None else t + wx  # (B,C,h,w) eq. 8, T
        return t, w


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class FakeDiffer(nn.Module):
    """FakeDiffer and its dual_recons ablation on timm legacy_xception.

    ``model(x, x_noisy, labels)`` (training) -> FakeDifferOutput; ``model(x)`` -> logits (B,).
    x and x_noisy are NCHW in [-1, 1]; x_noisy feeds the encoder, x the targets and error maps.
    ``forward="two_pass"`` takes ``x_noisy2``, a second independent draw of X~ for its second pass
    (the training loader provides it); without it both passes see ``x_noisy``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        variant, backbone, input_size, forward = cfg.variant, cfg.backbone, cfg.input_size, cfg.forward
        error_encoder, fusion, sources, channels_last = cfg.error_encoder, cfg.fusion, cfg.sources, cfg.channels_last
        if variant not in ("fakediffer", "dual_recons"):
            raise ValueError(f"model.variant: FakeDiffer builds 'fakediffer' or 'dual_recons', got '{variant}'")
        self.variant, self.forward_mode, self.input_size = variant, forward, input_size
        # Canonical order, so fusion_weights[:, i] means the same source in every run.
        self.sources = tuple(s for s in SOURCES if s in sources)
        parts = build_parts(backbone, cfg.pretrained, cfg.pretrained_path)
        self.dropped_blocks = parts.dropped  # for the record: these weights were never kept

        # eq. 1: unified encoder F_e (entry flow) and the dropout on M
        self.encoder = parts.entry
        self.encoder_dropout = nn.Dropout(cfg.encoder_dropout)

        # eqs. 2-3: dual_recons shares one decoder between the real and the fake path
        names = ("shared",) if variant == "dual_recons" else ("real", "fake")
        self.decoders = nn.ModuleDict({n: Decoder(parts.m_channels, parts.decoder_channels) for n in names})

        # eqs. 4-5: f is the encoder itself (shared, released code), a second entry flow (separate),
        # or the encoder's convolutions with BatchNorm layers of its own (shared_conv); built only
        # when an error map is fused, so no parameter sits unused under DDP.
        uses_errors = "real" in self.sources or "fake" in self.sources
        self.error_encoder = None
        if error_encoder in ("separate", "shared_conv") and uses_errors:
            self.error_encoder = copy.deepcopy(parts.entry)
            if error_encoder == "shared_conv":
                tie_convolutions(self.error_encoder, self.encoder)

        # eqs. 6-8: interaction over the chosen sources
        self.interaction = Interaction(parts.m_channels, len(self.sources), cfg.fusion_reduction, fusion)

        # head: Xception blocks 9-12 + exit convs, GAP, dropout, one logit
        self.head = parts.head
        self.head_dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(parts.out_channels, 1)

        # NHWC: the depthwise convs at high resolution (entry flow, decoders) run far faster on
        # oneDNN; inputs are converted in forward, so callers may pass plain NCHW batches.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    # -- eq. 1 ---------------------------------------------------------------------------------
    def encode(self, x_noisy: Tensor) -> Tensor:
        return self.encoder_dropout(self.encoder(x_noisy))  # (B,728,19,19) M

    # -- eqs. 2-3 ------------------------------------------------------------------------------
    def reconstruct(self, which: str, m: Tensor, size: tuple[int, int]) -> Tensor:
        decoder = self.decoders["shared"] if self.variant == "dual_recons" else self.decoders[which]
        return decoder(m, size)  # (B,3,299,299)

    # -- eqs. 4-5 ------------------------------------------------------------------------------
    def error_maps(self, x: Tensor, recons: list[Tensor]) -> list[Tensor]:
        f = self.error_encoder if self.error_encoder is not None else self.encoder
        # One pass per map, not one on the concatenated maps: in training, BN batch statistics then
        # match the released code, and on the CPU the doubled batch measured 25% slower, not faster.
        return [f((r - x).abs()) for r in recons]  # (B,728,19,19) each, E_r / E_f from |X^ - X|

    def _errors_for(self, x: Tensor, recon: dict[str, Tensor]) -> dict[str, Tensor]:
        """Error maps of the fused sources only ("real" -> E_r, "fake" -> E_f)."""
        wanted = [s for s in ("real", "fake") if s in self.sources]
        if self.variant == "dual_recons" and wanted:
            (e,) = self.error_maps(x, [recon[wanted[0]]])  # one decoder, one error map for both slots
            return {s: e for s in wanted}
        return dict(zip(wanted, self.error_maps(x, [recon[s] for s in wanted])))

    # -- eqs. 6-8 and the head -----------------------------------------------------------------
    def classify(self, m: Tensor, errs: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        feats = {"inva": m, **errs}
        t, w = self.interaction([feats[s] for s in self.sources])  # (B,728,19,19), (B,S,728)
        z = self.head(t)  # (B,2048,10,10)
        z = self.head_dropout(z.mean(dim=(2, 3)))  # (B,2048)
        return self.fc(z).squeeze(1), w  # (B,)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: Tensor, x_noisy: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                x_noisy2: Optional[Tensor] = None, rows: Optional[dict[str, Tensor]] = None):
        """Training (``labels`` given): a FakeDifferOutput. ``rows`` (``data.augment.class_rows``):
        each class's row indices, made on the host by the loader; without them, two_pass and
        fused_exact find the rows with ``nonzero`` (a device sync on a GPU). Inference: logits."""
        x = x.contiguous(memory_format=self.memory_format)
        if labels is None:
            return self._forward_inference(x)
        x_noisy = x if x_noisy is None else x_noisy.contiguous(memory_format=self.memory_format)
        if self.forward_mode == "two_pass":
            x_noisy2 = x_noisy if x_noisy2 is None else x_noisy2.contiguous(memory_format=self.memory_format)
            return self._forward_two_pass(x, x_noisy, labels, x_noisy2, rows)
        if self.forward_mode == "fused_exact":
            return self._forward_fused_exact(x, x_noisy, labels, rows)
        return self._forward_fused(x, x_noisy)

    def _forward_inference(self, x: Tensor) -> Tensor:
        """Logits only: decoders and error maps just for the fused sources."""
        m = self.encode(x)  # (B,728,19,19)
        size = tuple(x.shape[-2:])
        wanted = [s for s in ("real", "fake") if s in self.sources]
        if self.variant == "dual_recons" and wanted:
            shared = self.reconstruct("real", m, size)
            recon = {s: shared for s in wanted}
        else:
            recon = {s: self.reconstruct(s, m, size) for s in wanted}  # (B,3,299,299) each
        logit, _ = self.classify(m, self._errors_for(x, recon))
        return logit  # (B,)

    def forward_with_reconstructions(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inference with the two reconstructions too (``fdtrain export --with-reconstructions``):
        (logit (B,), X^r (B,3,H,W), X^f (B,3,H,W)); dual_recons returns its one decoder's output twice."""
        x = x.contiguous(memory_format=self.memory_format)
        out = self._forward_fused(x, x)  # in eval mode: no dropout, so the same logit as the inference forward
        return out.logit, out.recon_real, out.recon_fake

    def _forward_fused(self, x: Tensor, x_noisy: Tensor, m: Optional[Tensor] = None) -> FakeDifferOutput:
        """One encoder pass; both decoders on the whole batch; the loss masks rows by label."""
        m = self.encode(x_noisy) if m is None else m  # (B,728,19,19) eq. 1
        size = tuple(x.shape[-2:])
        r_real = self.reconstruct("real", m, size)  # (B,3,299,299) eq. 2, every image
        r_fake = r_real if self.variant == "dual_recons" else self.reconstruct("fake", m, size)  # eq. 3
        errs = self._errors_for(x, {"real": r_real, "fake": r_fake})  # eqs. 4-5
        logit, w = self.classify(m, errs)  # (B,), (B,S,728) eqs. 6-8 + head
        return FakeDifferOutput(logit, r_real, r_fake, errs.get("real"), errs.get("fake"), w)

    def _forward_two_pass(self, x: Tensor, x_noisy: Tensor, labels: Tensor, x_noisy2: Tensor,
                          rows: Optional[dict[str, Tensor]] = None) -> FakeDifferOutput:
        """The released code's step: a reconstruction pass with M split by label (each decoder
        sees only its own class, so its BN statistics too), then a full pass for classification.
        Each pass has its own noisy view and its own dropout masks, as in the release."""
        m1 = self.encode(x_noisy)  # (B,728,19,19) pass 1, its own dropout mask
        r1 = self._reconstruction_pass(m1, labels, tuple(x.shape[-2:]), rows)
        out = self._forward_fused(x, x_noisy2)  # pass 2: logits from a fresh encoder pass and X~ draw
        return self._with_reconstructions(out, r1)

    def _forward_fused_exact(self, x: Tensor, x_noisy: Tensor, labels: Tensor,
                             rows: Optional[dict[str, Tensor]] = None) -> FakeDifferOutput:
        """two_pass with one encoder pass that both passes share (one X~ and dropout draw, not two).

        The decoders run as in two_pass (class-split for the losses, then whole-batch for the error
        maps), and the image's entry-flow BatchNorm moves its running statistics as two updates with
        this batch's statistics would. Given the same draws, loss, gradients and every BN buffer equal
        two_pass's (tests/test_exact_step.py); it saves one entry-flow pass on the image.
        """
        with _as_two_bn_updates(self.encoder):
            m = self.encode(x_noisy)  # (B,728,19,19)
        r1 = self._reconstruction_pass(m, labels, tuple(x.shape[-2:]), rows)
        return self._with_reconstructions(self._forward_fused(x, x_noisy, m=m), r1)

    def _reconstruction_pass(self, m: Tensor, labels: Tensor, size: tuple[int, int],
                             rows: Optional[dict[str, Tensor]] = None) -> dict:
        """The released first pass: each decoder on the rows of its own class (dual_recons: all rows)."""
        if self.variant == "dual_recons":
            return {"shared": self.reconstruct("real", m, size)}  # one decoder, every image
        rows = class_rows(labels) if rows is None else rows  # on a GPU, without rows: nonzero syncs
        r1 = {}
        for which in ("real", "fake"):
            idx = rows[which]  # (n,) its size is known on the host
            if idx.numel():
                r1[which] = (idx, self.reconstruct(which, m[idx], size))  # (n,3,299,299)
        return r1

    def _with_reconstructions(self, out: FakeDifferOutput, r1: dict) -> FakeDifferOutput:
        # The loss reads pass 1's rows; the other rows keep pass 2's values, which the loss masks out.
        if "shared" in r1:
            out.recon_real = out.recon_fake = r1["shared"]
            return out
        if "real" in r1:
            out.recon_real = out.recon_real.index_copy(0, *r1["real"])  # (B,3,299,299)
        if "fake" in r1:
            out.recon_fake = out.recon_fake.index_copy(0, *r1["fake"])  # (B,3,299,299)
        return out


@contextlib.contextmanager
def _as_two_bn_updates(module: nn.Module):
    """Running statistics of ``module``'s BatchNorms move as two updates with the same batch would:
    momentum m becomes 1 - (1 - m)^2 and the batch count goes up by 2 (fused_exact's shared pass)."""
    bns = [b for b in module.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)
           and b.training and b.track_running_stats]
    if any(b.momentum is None for b in bns):
        raise ValueError("model.forward=fused_exact needs BatchNorm with a momentum (not a cumulative average)")
    saved = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 1.0 - (1.0 - b.momentum) ** 2
    try:
        yield
    finally:
        for b, mom in zip(bns, saved):
            b.momentum = mom
            b.num_batches_tracked.add_(1)


def tie_convolutions(module: nn.Module, source: nn.Module) -> None:
    """Make ``module`` (a copy of ``source``) use ``source``'s convolution weights; its BatchNorm
    layers (statistics and affine) stay its own (error_encoder: shared_conv)."""
    src = dict(source.named_modules())
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.weight = src[name].weight
            if mod.bias is not None:
                mod.bias = src[name].bias


# ----------------------------------------------------------------------------------------------
# Ablation: plain Xception (the paper's baseline row)
# ----------------------------------------------------------------------------------------------
class XceptionClassifier(nn.Module):
    """``variant: xception``: timm legacy_xception, all 12 blocks, one logit; no decoders.

    Same call contract as FakeDiffer. In training it sees the noisy view X~, as FakeDiffer's
    encoder does. The decoder, fusion and forward switches do not apply to it.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.variant, self.input_size, self.sources = "xception", cfg.input_size, ()
        self.net = create_backbone(cfg.backbone, cfg.pretrained, cfg.pretrained_path, drop_rate=cfg.dropout)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)

    def forward(self, x: Tensor, x_noisy: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                x_noisy2: Optional[Tensor] = None, rows: Optional[dict[str, Tensor]] = None):
        """Training (``labels`` given): a FakeDifferOutput with the logit only (``x_noisy2`` and
        ``rows`` are accepted for the same call and unused: no second pass, no class split). Inference: logits."""
        x = x.contiguous(memory_format=self.memory_format)
        if x_noisy is not None:
            x_noisy = x_noisy.contiguous(memory_format=self.memory_format)
        if labels is None:
            return self.net(x).squeeze(1)  # (B,)
        return FakeDifferOutput(logit=self.net(x if x_noisy is None else x_noisy).squeeze(1))
