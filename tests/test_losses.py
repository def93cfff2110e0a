"""Eqs. 9-12 against values worked out by hand with plain Python loops."""
from __future__ import annotations

import math

import pytest
import torch

from fdtrain.config import LossConfig
from fdtrain.losses import FakeDifferLoss
from fdtrain.models import FakeDifferOutput


def _case(labels):
    g = torch.Generator().manual_seed(7)
    b = len(labels)
    x = torch.rand(b, 3, 2, 2, generator=g) * 2 - 1
    out = FakeDifferOutput(
        logit=torch.randn(b, generator=g),
        recon_real=(torch.rand(b, 3, 2, 2, generator=g) * 2 - 1).requires_grad_(),
        recon_fake=(torch.rand(b, 3, 2, 2, generator=g) * 2 - 1).requires_grad_(),
    )
    return out, x, torch.tensor(labels)


def _by_hand(out, x, labels, lam_r=0.1, lam_f=0.1, recon="l1", flooding=0.0):
    def dist(r, t):
        vals = [float(a - c) for a, c in zip(r.flatten().tolist(), t.flatten().tolist())]
        return sum(abs(v) if recon == "l1" else v * v for v in vals) / len(vals)

    ys = labels.tolist()
    reals = [i for i, v in enumerate(ys) if v == 0]
    fakes = [i for i, v in enumerate(ys) if v == 1]
    l_rr = sum(dist(out.recon_real[i], x[i]) for i in reals) / len(reals) if reals else 0.0
    l_fr = sum(dist(out.recon_fake[i], x[i]) for i in fakes) / len(fakes) if fakes else 0.0
    bce = 0.0
    for z, yv in zip(out.logit.tolist(), ys):
        p = 1 / (1 + math.exp(-z))
        bce -= yv * math.log(p) + (1 - yv) * math.log(1 - p)
    bce /= len(ys)
    if flooding:
        bce = abs(bce - flooding) + flooding
    return {"cls": bce, "rec_real": l_rr, "rec_fake": l_fr, "total": bce + lam_r * l_rr + lam_f * l_fr}


LABELS = {"mixed": [0.0, 1.0, 1.0, 0.0, 1.0], "all_real": [0.0, 0.0, 0.0], "all_fake": [1.0, 1.0]}


@pytest.mark.parametrize("recon", ["l1", "mse"])
@pytest.mark.parametrize("which", sorted(LABELS))
def test_matches_hand_computation(which, recon):
    out, x, y = _case(LABELS[which])
    got = FakeDifferLoss(LossConfig(lambda_r=0.3, lambda_f=0.2, recon=recon))(out, x, y)
    want = _by_hand(out, x, y, 0.3, 0.2, recon)
    for k in want:
        assert torch.isfinite(got[k]) and got[k].dim() == 0
        assert got[k].item() == pytest.approx(want[k], rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("which", ["all_real", "all_fake"])
def test_empty_half_is_zero_with_finite_gradients(which):
    out, x, y = _case(LABELS[which])
    got = FakeDifferLoss()(out, x, y)
    empty = "rec_fake" if which == "all_real" else "rec_real"
    assert got[empty].item() == 0.0
    got["total"].backward()
    for r in (out.recon_real, out.recon_fake):
        assert torch.isfinite(r.grad).all()
    unused = out.recon_fake if which == "all_real" else out.recon_real
    assert unused.grad.abs().sum() == 0


def test_rows_of_the_other_class_do_not_leak():
    out, x, y = _case(LABELS["mixed"])
    with torch.no_grad():
        out.recon_real[1] = float("nan")  # a fake row of the real decoder: masked out
        out.recon_fake[0] = float("inf")  # a real row of the fake decoder: masked out
    got = FakeDifferLoss()(out, x, y)
    assert torch.isfinite(got["total"])


def test_each_image_is_compared_with_its_own_reconstruction():
    """recon_reduction=paired (the default): not the released code's every-against-every sum."""
    x = torch.zeros(2, 3, 2, 2)
    x[1] = 1.0
    out = FakeDifferOutput(logit=torch.zeros(2), recon_real=x.clone(), recon_fake=x.clone())
    got = FakeDifferLoss()(out, x, torch.tensor([0.0, 0.0]))
    assert got["rec_real"].item() == 0.0  # perfect reconstructions cost nothing


def test_flooding_acts_on_the_classification_term():
    out, x, y = _case(LABELS["mixed"])
    out.logit = torch.tensor([-9.0, 9.0, 9.0, -9.0, 9.0])  # confident and right: BCE ~ 1e-4 < b
    plain = FakeDifferLoss()(out, x, y)
    flooded = FakeDifferLoss(flooding=0.04)(out, x, y)
    assert flooded["cls"].item() == pytest.approx(0.08 - plain["cls"].item(), rel=1e-6)
    assert flooded["rec_real"].item() == plain["rec_real"].item()
    out.logit = -out.logit  # confident and wrong: BCE > b, flooding changes nothing
    assert FakeDifferLoss(flooding=0.04)(out, x, y)["cls"].item() == pytest.approx(
        FakeDifferLoss()(out, x, y)["cls"].item())


def test_plain_classifier_output_has_no_reconstruction_terms():
    out = FakeDifferOutput(logit=torch.tensor([0.0, 0.0]))
    got = FakeDifferLoss()(out, torch.zeros(2, 3, 4, 4), torch.tensor([0.0, 1.0]))
    assert got["rec_real"].item() == got["rec_fake"].item() == 0.0
    assert got["total"].item() == pytest.approx(math.log(2))


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="loss.recon"):
        FakeDifferLoss(recon="l2")
    with pytest.raises(ValueError, match="loss.flooding"):
        FakeDifferLoss(flooding=-1.0)


def _released_direct(recons, x, idx, recon):
    """The released exp_recons_loss, literally: for each reconstruction r_i of the class, the mean
    of d(r_i, x_j) over every image j of the class (a broadcast), summed over i."""
    total = recons.new_zeros(())
    for i in idx:
        diff = recons[i].unsqueeze(0) - x[idx]  # (1,3,H,W) - (n,3,H,W): every image of the class
        total = total + (diff.abs() if recon == "l1" else diff.square()).mean()
    return total


@pytest.mark.parametrize("recon", ["l1", "mse"])
@pytest.mark.parametrize("labels", [[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0, 1.0],
                                    [0.0, 0.0, 0.0]], ids=["1real", "2real", "3real", "3real_0fake"])
def test_released_reduction_is_the_broadcast_sum(labels, recon):
    """recon_reduction=released against a direct computation of the released broadcast-sum, with 1, 2
    and 3 real images (and the fakes likewise, against every fake): values and gradients, float64."""
    g = torch.Generator().manual_seed(3)
    b = len(labels)
    x = (torch.rand(b, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1)
    rr = (torch.rand(b, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    rf = (torch.rand(b, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    y = torch.tensor(labels, dtype=torch.float64)
    out = FakeDifferOutput(logit=torch.zeros(b, dtype=torch.float64), recon_real=rr, recon_fake=rf)
    got = FakeDifferLoss(recon=recon, recon_reduction="released", lambda_r=0.1, lambda_f=0.1)(out, x, y)
    reals = [i for i, v in enumerate(labels) if v == 0]
    fakes = [i for i, v in enumerate(labels) if v == 1]
    want_r = _released_direct(rr, x, reals, recon)
    want_f = _released_direct(rf, x, fakes, recon) if fakes else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(got["rec_real"], want_r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["rec_fake"], want_f, rtol=1e-12, atol=1e-12)
    g_rr, g_rf = torch.autograd.grad(got["total"], (rr, rf), allow_unused=True)
    w_rr, w_rf = torch.autograd.grad(0.1 * want_r + 0.1 * want_f, (rr, rf), allow_unused=True)
    torch.testing.assert_close(g_rr, w_rr, rtol=1e-12, atol=1e-12)
    if fakes:
        torch.testing.assert_close(g_rf, w_rf, rtol=1e-12, atol=1e-12)
    else:
        assert g_rf is None or g_rf.abs().sum() == 0
    if len(reals) > 1:  # not the paired loss: a perfect reconstruction of X_i still costs
        paired = FakeDifferLoss(recon=recon)(FakeDifferOutput(logit=out.logit, recon_real=x, recon_fake=x), x, y)
        released = FakeDifferLoss(recon=recon, recon_reduction="released")(
            FakeDifferOutput(logit=out.logit, recon_real=x, recon_fake=x), x, y)
        assert paired["rec_real"].item() == 0.0 and released["rec_real"].item() > 0.0


def test_released_reduction_from_the_config():
    assert FakeDifferLoss(LossConfig(recon_reduction="released")).recon_reduction == "released"
    assert FakeDifferLoss(LossConfig()).recon_reduction == "paired"
    with pytest.raises(ValueError, match="loss.recon_reduction"):
        FakeDifferLoss(recon_reduction="sum")
