"""The released training step (model.forward=two_pass): fresh noise and dropout in each pass.

The loader hands two_pass a second, independent draw of X~ (``x_noisy2``), seeded by (seed, epoch,
rank, step) like the first; the model feeds pass 1 with ``x_noisy`` and pass 2 with ``x_noisy2``
and draws its dropout masks per pass.
"""
from __future__ import annotations

import pytest
import torch

from fdtrain.data import build_loader
from fdtrain.models import create_model
from tests._data_utils import small_cfg


@pytest.fixture(scope="module")
def shards(shard_maker):
    return shard_maker(16, 2, seed=5)


def _batches(cfg, n=2):
    loader = build_loader(cfg, "train")
    loader.set_epoch(0)
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_two_pass_batches_carry_a_second_independent_noisy_view(shards):
    one = small_cfg(shards, backend="torch", noise_p=1.0, noise_std=0.1)
    two = small_cfg(shards, backend="torch", noise_p=1.0, noise_std=0.1)
    two.model.forward = "two_pass"
    assert (one.model.noisy_views, two.model.noisy_views) == (1, 2)
    a, b, again = _batches(one), _batches(two), _batches(two)
    for ba, bb, bc in zip(a, b, again):
        assert "x_noisy2" not in ba and set(bb) == {"x", "x_noisy", "x_noisy2", "label", "rows", "key"}
        for which, want in (("real", bb["label"] < 0.5), ("fake", bb["label"] >= 0.5)):  # made on the host
            assert bb["rows"][which].tolist() == want.nonzero().squeeze(1).tolist()
        torch.testing.assert_close(bb["x_noisy"], ba["x_noisy"], rtol=0, atol=0)  # the first view is unchanged
        n1, n2 = bb["x_noisy"] - bb["x"], bb["x_noisy2"] - bb["x"]
        assert n1.abs().mean() > 0.05 and n2.abs().mean() > 0.05  # both noisy (p = 1)...
        assert (n1 - n2).abs().mean() > 0.05  # ...with different draws
        for k in ("x_noisy", "x_noisy2"):  # deterministic for the seed
            torch.testing.assert_close(bc[k], bb[k], rtol=0, atol=0)
    two.model.variant = "xception"  # one encoder pass: no second view
    assert two.model.noisy_views == 1


def test_each_pass_encodes_its_own_view_with_its_own_dropout():
    torch.manual_seed(0)
    m = create_model(forward="two_pass", input_size=64, encoder_dropout=0.5).train()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    xn1 = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    xn2 = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0])
    seen, masks = [], []
    h1 = m.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    h2 = m.encoder_dropout.register_forward_hook(lambda mod, args, out: masks.append((out == 0).clone()))
    with torch.no_grad():
        m(x, xn1, y, x_noisy2=xn2)
        n_two = len(seen)
        m(x, xn1, y, x_noisy2=xn1)  # the same view in both passes: the dropout masks still differ
    h1.remove()
    h2.remove()
    # pass 1 on view 1, pass 2 on view 2, then the two error maps through the shared entry flow
    assert n_two == 4
    torch.testing.assert_close(seen[0], xn1, rtol=0, atol=0)
    torch.testing.assert_close(seen[1], xn2, rtol=0, atol=0)
    assert len(masks) == 4 and not torch.equal(masks[2], masks[3])


# ---------------------------------------------------------------------------------------------
# fused_exact vs two_pass: train mode (BN batch statistics), float64
# ---------------------------------------------------------------------------------------------
def _step(model, x, x_noisy, y, loss_fn, rows=None):
    """One training step's loss terms, parameter gradients and BN buffers afterwards."""
    model.zero_grad(set_to_none=True)
    losses = loss_fn(model(x, x_noisy, y, x_noisy2=x_noisy, rows=rows), x, y, rows=rows)  # one draw, both passes
    losses["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ({k: v.detach() for k, v in losses.items()}, grads,
            {n: b.clone() for n, b in model.named_buffers()})


def _pair(over, labels, reduction):
    from fdtrain.losses import FakeDifferLoss

    torch.manual_seed(0)
    # 32 px, NCHW: float64 depthwise convolutions have no fast CPU kernel, this keeps a step ~5 s
    two = create_model(forward="two_pass", input_size=32, dropout=0.0, encoder_dropout=0.0, channels_last=False,
                       **over).double().train()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(len(labels), 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    x_noisy = (x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    y = torch.tensor(labels, dtype=torch.float64)
    loss_fn = FakeDifferLoss(flooding=0.04, recon_reduction=reduction)
    return two, x, x_noisy, y, loss_fn


CASES = [  # (model switches, labels, reduction)
    ({}, [0.0, 1.0, 1.0, 0.0, 1.0], "released"),
    ({"error_encoder": "shared_conv"}, [1.0, 0.0, 0.0, 1.0], "paired"),
    ({"variant": "dual_recons", "error_encoder": "separate", "sources": ["inva", "real"]}, [0.0, 0.0, 0.0], "released"),
]


@pytest.mark.parametrize("over,labels,reduction", CASES, ids=["shared", "shared_conv", "dual_recons_separate_all_real"])
def test_fused_exact_equals_two_pass_in_train_mode(over, labels, reduction):
    """Given the same noise and dropout draws in both passes, fused_exact's step is two_pass's: the
    same losses, the same gradient of every parameter, and the same BN running statistics and batch
    counts afterwards (entry flow included: its image statistics count as two updates).
    fused, on the same batch, is not: whole-batch decoder statistics move the reconstruction losses
    and gradients, and the entry flow's BN is updated 3 times per step instead of 4."""
    import copy

    two, x, x_noisy, y, loss_fn = _pair(over, labels, reduction)
    exact = copy.deepcopy(two)
    exact.forward_mode = "fused_exact"
    fused = copy.deepcopy(two) if not over else None
    l2, g2, b2 = _step(two, x, x_noisy, y, loss_fn)
    le, ge, be = _step(exact, x, x_noisy, y, loss_fn)
    for k in l2:
        torch.testing.assert_close(le[k], l2[k], rtol=1e-10, atol=1e-12, msg=k)
    assert ge.keys() == g2.keys() and len(g2) == len(list(two.parameters()))
    for n in g2:
        torch.testing.assert_close(ge[n], g2[n], rtol=1e-8, atol=1e-12, msg=n)
    assert be.keys() == b2.keys()
    for n in b2:
        torch.testing.assert_close(be[n], b2[n], rtol=1e-9, atol=1e-12, msg=n)
    shared = over.get("error_encoder", "shared") == "shared"
    # the image's entry flow: twice per step, plus once per error map when the error maps share it
    assert b2["encoder.bn1.num_batches_tracked"].item() == 2 + (2 if shared else 0)
    if fused is None:
        return
    fused.forward_mode = "fused"
    lf, gf, bf = _step(fused, x, x_noisy, y, loss_fn)
    torch.testing.assert_close(lf["cls"], l2["cls"], rtol=1e-10, atol=1e-12)  # pass 2 is the same
    assert not torch.allclose(lf["rec_real"], l2["rec_real"], rtol=1e-6, atol=0)
    assert not torch.allclose(gf["decoders.real.to_rgb.0.weight"], g2["decoders.real.to_rgb.0.weight"], rtol=1e-6)
    assert bf["encoder.bn1.num_batches_tracked"].item() == 3
    assert not torch.allclose(bf["decoders.real.body.0.bn.running_var"], b2["decoders.real.body.0.bn.running_var"])


def test_the_paper_step_with_the_loaders_class_rows_is_the_step_without():
    """two_pass + released given the loader's host-made class rows (no nonzero on the device) is
    the step that finds the rows itself: bitwise the same losses, gradients and BN buffers."""
    import copy

    from fdtrain.data.augment import class_rows

    two, x, x_noisy, y, loss_fn = _pair(*CASES[0])  # two_pass, released, 2 reals and 3 fakes
    again = copy.deepcopy(two)
    l1, g1, b1 = _step(two, x, x_noisy, y, loss_fn)
    l2, g2, b2 = _step(again, x, x_noisy, y, loss_fn, rows=class_rows(y))
    for got, want in ((l2, l1), (g2, g1), (b2, b1)):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
