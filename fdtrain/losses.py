"""FakeDiffer's objective, eqs. 9-12 of the paper (design/model.md, "Losses").

    L = L_cls + lambda_r * L_rr + lambda_f * L_fr                                  (eq. 12)
    L_rr = 1/|R| sum_{i in R} d(F_r(M_i), X_i),  L_fr likewise over the fakes F     (eqs. 9-10)
    L_cls = BCE with logits on one logit                                            (eq. 11)

d is the per-image mean absolute error (``recon: l1``, eqs. 9-10 and the released code) or mean
squared error (``recon: mse``, the paper's text), averaged over pixels; each image is compared
with its own reconstruction only. (The released code instead compares each reconstruction with
every image of its class and sums: a bug, not copied.) An empty half of the batch contributes 0.
Flooding (|L_cls - b| + b), as the released code applies it, acts on the classification term.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class FakeDifferLoss:
    """``loss_fn(out, x, labels) -> {"total", "cls", "rec_real", "rec_fake"}`` (scalar tensors).

    ``out`` is a FakeDifferOutput (reconstructions may be None: plain Xception), ``x`` the clean
    batch (B,3,H,W) in [-1, 1], ``labels`` (B,) with 0 = real, 1 = fake. Computed in fp32.
    """

    def __init__(self, cfg=None, *, lambda_r: Optional[float] = None, lambda_f: Optional[float] = None,
                 recon: Optional[str] = None, flooding: Optional[float] = None):
        def pick(name: str, given, default):
            if given is not None:
                return given
            return getattr(cfg, name) if cfg is not None else default

        self.lambda_r = float(pick("lambda_r", lambda_r, 0.1))
        self.lambda_f = float(pick("lambda_f", lambda_f, 0.1))
        self.recon = pick("recon", recon, "l1")
        self.flooding = float(pick("flooding", flooding, 0.0))
        if self.recon not in ("l1", "mse"):
            raise ValueError(f"loss.recon: expected 'l1' or 'mse', got {self.recon!r}")
        if self.flooding < 0:
            raise ValueError(f"loss.flooding: must be >= 0, got {self.flooding}")

    def _distance(self, recon: Tensor, x: Tensor) -> Tensor:
        diff = recon.float() - x.float()  # (B,3,H,W)
        d = diff.abs() if self.recon == "l1" else diff.square()
        return d.flatten(1).mean(dim=1)  # (B,) one value per image

    @staticmethod
    def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
        # sum / max(count, 1): an empty half gives exactly 0 (and zero gradient), never NaN.
        # torch.where, not multiplication: a non-finite value in a masked-out row must not leak in.
        picked = torch.where(mask, values, torch.zeros_like(values))
        return picked.sum() / mask.sum().clamp(min=1)

    def reconstruction(self, recon: Optional[Tensor], x: Tensor, mask: Tensor) -> Tensor:
        if recon is None:
            return x.new_zeros((), dtype=torch.float32)
        return self._masked_mean(self._distance(recon, x), mask)  # eq. 9 / eq. 10

    def __call__(self, out, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        y = labels.reshape(-1).float()  # (B,)
        is_real = y < 0.5  # (B,)
        cls = F.binary_cross_entropy_with_logits(out.logit.reshape(-1).float(), y)  # eq. 11
        if self.flooding > 0:
            cls = (cls - self.flooding).abs() + self.flooding
        rec_real = self.reconstruction(out.recon_real, x, is_real)  # eq. 9, real rows only
        rec_fake = self.reconstruction(out.recon_fake, x, ~is_real)  # eq. 10, fake rows only
        total = cls + self.lambda_r * rec_real + self.lambda_f * rec_fake  # eq. 12
        return {"total": total, "cls": cls, "rec_real": rec_real, "rec_fake": rec_fake}
