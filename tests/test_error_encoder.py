"""model.error_encoder: shared (released code), separate, and shared_conv (the entry flow's
convolutions with BatchNorm layers of their own for the error maps)."""
from __future__ import annotations

import torch
import torch.nn as nn

from fdtrain.losses import FakeDifferLoss
from fdtrain.models import create_model


def _bns(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    return x, torch.tensor([0.0, 1.0, 0.0, 1.0])


def test_shared_conv_ties_the_convolutions_and_keeps_its_own_batchnorm(tmp_path):
    torch.manual_seed(0)
    shared = create_model(input_size=64)
    torch.manual_seed(0)
    m = create_model(input_size=64, error_encoder="shared_conv").train()
    enc, err = dict(m.encoder.named_modules()), dict(m.error_encoder.named_modules())
    convs = [n for n, mod in enc.items() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 17  # conv1, conv2, and per block: the skip and two separable convs (2 each)
    for n in convs:
        assert err[n].weight is enc[n].weight, n  # one parameter, not a copy
    for n in _bns(m.encoder):
        assert err[n].weight is not enc[n].weight and err[n].running_mean is not enc[n].running_mean
    # parameter count: the shared model's plus the entry flow's BN affine parameters, nothing else
    bn_params = sum(p.numel() for b in _bns(m.encoder).values() for p in b.parameters())
    count = sum(p.numel() for p in m.parameters())
    assert count == sum(p.numel() for p in shared.parameters()) + bn_params

    # forward/backward: the tied convs get gradient from the image and the error maps; both BN sets train
    x, y = _batch()
    out = m(x, x, y)
    assert out.logit.shape == (4,) and out.err_real.shape == out.err_fake.shape == (4, 728, 4, 4)
    FakeDifferLoss()(out, x, y)["total"].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    assert m.error_encoder.bn1.weight.grad.abs().sum() > 0 and m.encoder.bn1.weight.grad.abs().sum() > 0
    # separate statistics: the image's and the error maps' running means part ways after one step
    assert not torch.allclose(m.error_encoder.bn1.running_mean, m.encoder.bn1.running_mean)
    torch.optim.SGD(m.parameters(), lr=0.1).step()
    assert m.error_encoder.conv1.weight is m.encoder.conv1.weight

    # state_dict: both names are saved; a fresh model loads it and stays tied, with equal outputs
    torch.save(m.state_dict(), tmp_path / "m.pt")
    sd = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "error_encoder.conv1.weight" in sd and "error_encoder.bn1.running_mean" in sd
    torch.manual_seed(1)
    fresh = create_model(input_size=64, error_encoder="shared_conv")
    fresh.load_state_dict(sd)
    assert fresh.error_encoder.conv1.weight is fresh.encoder.conv1.weight
    m.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), m(x))
