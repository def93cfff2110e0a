"""A briefly trained tiny model written as a real model.pt, for the export / serving tests.

A few Adam steps with the real loss in train mode move the weights and every BatchNorm's running
statistics away from their initial values, so an export that ignored eval-mode BN, or baked in
batch statistics, would not match.
"""
from __future__ import annotations

from pathlib import Path

SIZE = 64


def train_tiny(out: Path, *, variant: str = "fakediffer", steps: int = 3, seed: int = 0, **model) -> Path:
    """``out/model.pt`` (fdtrain's model file format) of a 64-px model after ``steps`` training steps."""
    import torch

    from fdtrain.config import resolve
    from fdtrain.losses import FakeDifferLoss
    from fdtrain.model_file import write_model_file
    from fdtrain.models import create_model_from_config

    overrides = {"model": {"variant": variant, "input_size": SIZE, "pretrained": False, **model},
                 "run": {"name": f"tiny_{variant}", "seed": seed}}
    cfg = resolve(None, overrides)
    torch.manual_seed(seed)
    net = create_model_from_config(cfg.model).train()
    loss_fn = FakeDifferLoss(cfg.loss)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # colour offsets per image: BN running means/vars drift well away from 0/1
        x = (torch.rand(4, 3, SIZE, SIZE, generator=g) * 1.6 - 0.3).clamp(-1, 1)
        y = torch.tensor([0.0, 1.0, 0.0, 1.0])
        loss = loss_fn(net(x, x, y), x, y)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().float() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    bn = [v for k, v in state.items() if k.endswith("running_var")]
    assert bn and all(float((v - 1).abs().max()) > 1e-3 for v in bn[:3]), "BN statistics did not move"
    out.mkdir(parents=True, exist_ok=True)
    write_model_file(out / "model.pt", config=cfg.to_dict(), state_dict=state, step=steps, epoch=0, metrics={})
    return out / "model.pt"

