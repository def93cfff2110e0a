"""FakeDiffer's objective, eqs. 9-12 of the paper (design/model.md, "Losses").

    L = L_cls + lambda_r * L_rr + lambda_f * L_fr                                  (eq. 12)
    L_rr = 1/|R| sum_{i in R} d(F_r(M_i), X_i),  L_fr likewise over the fakes F     (eqs. 9-10)
    L_cls = BCE with logits on one logit                                            (eq. 11)

d is the per-image mean absolute error (``recon: l1``, eqs. 9-10 and the released code) or mean
squared error (``recon: mse``, the paper's text), averaged over pixels.

``recon_reduction`` says which images a reconstruction is compared with:
  paired    (the equations) each reconstruction with its own input, averaged over the class:
            L_rr = 1/|R| sum_{i in R} d(X^_i, X_i)
  released  (the released code's ``exp_recons_loss``, which produced the paper's numbers) each
            reconstruction with every input of its class, averaged over those inputs, then summed:
            L_rr = sum_{i in R} 1/|R| sum_{j in R} d(X^_i, X_j)   (L_fr likewise over the fakes)
            A sum over the class, not a mean, so it grows with |R|; and X^_i is pulled towards
            the class's per-pixel median (l1) or mean (mse), not towards X_i.
An empty half of the batch contributes 0. Flooding (|L_cls - b| + b), as the released code
applies it, acts on the classification term only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fdtrain.config import LossConfig

# The terms of FakeDifferLoss's result, in this order wherever they are listed (logs, TensorBoard).
LOSS_TERMS = ("total", "cls", "rec_real", "rec_fake")


def _wide(t: Tensor) -> Tensor:
    """fp16/bf16/fp32 -> fp32; fp64 (the exactness tests) stays fp64."""
    return t if t.dtype == torch.float64 else t.float()


class FakeDifferLoss:
    """``loss_fn(out, x, labels) -> {"total", "cls", "rec_real", "rec_fake"}`` (scalar tensors).

    ``out`` is a FakeDifferOutput (reconstructions may be None: plain Xception), ``x`` the clean
    batch (B,3,H,W) in [-1, 1], ``labels`` (B,) with 0 = real, 1 = fake. Computed in fp32 (fp64 stays fp64).
    """

    def __init__(self, cfg: LossConfig | None = None, **overrides: Any):
        """``cfg`` (the ``loss`` section; LossConfig's defaults when None) with ``overrides`` of its
        fields on top, e.g. ``FakeDifferLoss(flooding=0.04)``; checked by LossConfig.validate."""
        cfg = dataclasses.replace(cfg if cfg is not None else LossConfig(), **overrides)
        cfg.validate()
        self.lambda_r, self.lambda_f = float(cfg.lambda_r), float(cfg.lambda_f)
        self.recon, self.flooding, self.recon_reduction = cfg.recon, float(cfg.flooding), cfg.recon_reduction

    def _distance(self, recon: Tensor, x: Tensor) -> Tensor:
        diff = _wide(recon) - _wide(x)  # (B,3,H,W)
        d = diff.abs() if self.recon == "l1" else diff.square()
        return d.flatten(1).mean(dim=1)  # (B,) one value per image

    @staticmethod
    def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
        # sum / max(count, 1): an empty half gives exactly 0 (and zero gradient), never NaN.
        # torch.where, not multiplication: a non-finite value in a masked-out row must not leak in.
        picked = torch.where(mask, values, torch.zeros_like(values))
        return picked.sum() / mask.sum().clamp(min=1)

    def reconstruction(self, recon: Optional[Tensor], x: Tensor, mask: Tensor, idx: Optional[Tensor] = None) -> Tensor:
        """One class's term: ``mask`` (B,) its rows; ``idx`` the same rows as indices (from
        ``class_rows``; found with ``nonzero`` when None, which ``released`` needs)."""
        if recon is None:
            return x.new_zeros((), dtype=_wide(x).dtype)
        if self.recon_reduction == "released":
            return self._released(recon, x, mask.nonzero().squeeze(1) if idx is None else idx)
        return self._masked_mean(self._distance(recon, x), mask)  # eq. 9 / eq. 10

    def _released(self, recon: Tensor, x: Tensor, idx: Tensor) -> Tensor:
        """sum_{i in class} mean_{j in class, pixels} d(recon_i, x_j), in O(n) memory per pixel.

        The direct broadcast holds n^2 images (16 reals at 299 px: 275 MB, twice for backward);
        here both distances reduce to per-pixel sums over the class's sorted targets.
        """
        n = idx.numel()  # idx (n,): the class's rows
        if n == 0:
            return x.new_zeros((), dtype=_wide(x).dtype)
        r = _wide(recon.index_select(0, idx)).flatten(1).T  # (P,n) pixel-major: one row per pixel
        t = _wide(x.index_select(0, idx)).flatten(1).T.detach()  # (P,n) the targets carry no gradient
        if self.recon == "mse":
            # sum_j (r - t_j)^2 = n r^2 - 2 r sum_j t_j + sum_j t_j^2
            per = n * r.square() - 2 * r * t.sum(1, keepdim=True) + t.square().sum(1, keepdim=True)  # (P,n)
        else:
            # sum_j |r - t_j| = r (2k - n) + S_n - 2 S_k, k = #{t_j <= r}, S_k the sum of the k smallest
            s = t.sort(dim=1).values.contiguous()  # (P,n)
            cum = torch.cat([s.new_zeros(s.shape[0], 1), s.cumsum(1)], dim=1)  # (P,n+1)
            k = torch.searchsorted(s, r.detach().contiguous(), right=True)  # (P,n)
            per = r * (2 * k - n) + cum[:, -1:] - 2 * cum.gather(1, k)  # (P,n)
        return per.sum() / (n * r.shape[0])  # each reconstruction: mean over n targets x P pixels; summed

    def __call__(self, out, x: Tensor, labels: Tensor, rows: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
        """``rows``: ``data.augment.class_rows(labels)`` made on the host (no device sync), or None."""
        y = labels.reshape(-1).float()  # (B,)
        is_real = y < 0.5  # (B,)
        cls = F.binary_cross_entropy_with_logits(_wide(out.logit.reshape(-1)), y.to(_wide(out.logit).dtype))  # eq. 11
        if self.flooding > 0:
            cls = (cls - self.flooding).abs() + self.flooding
        rows = rows or {}
        rec_real = self.reconstruction(out.recon_real, x, is_real, rows.get("real"))  # eq. 9, real rows only
        rec_fake = self.reconstruction(out.recon_fake, x, ~is_real, rows.get("fake"))  # eq. 10, fake rows only
        total = cls + self.lambda_r * rec_real + self.lambda_f * rec_fake  # eq. 12
        return dict(zip(LOSS_TERMS, (total, cls, rec_real, rec_fake)))
