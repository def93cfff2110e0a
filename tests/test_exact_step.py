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
from tests._loader_utils import small_cfg, write_split


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("exact") / "train", 16, 2, size=64, seed=5)


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
        assert "x_noisy2" not in ba and set(bb) == {"x", "x_noisy", "x_noisy2", "label", "key"}
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
