"""FakeDiffer model: shapes, gradients, fused vs two_pass, size, every switch, weights, checkpoints.

CPU only and small: the 299/224 shape checks use one image; everything else runs at 64 px.
"""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from fdtrain.config import Config, ConfigError
from fdtrain.inference import load_model
from fdtrain.losses import FakeDifferLoss
from fdtrain.models import FakeDifferOutput, create_model, create_model_from_config
from fdtrain.models.fakediffer import Interaction

SMALL = 64


def batch(b: int = 4, size: int = SMALL, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    x_noisy = (x + 0.01 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    labels = (torch.arange(b) % 2).float()  # real, fake, real, fake
    return x, x_noisy, labels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model()


@pytest.mark.parametrize("size,side", [(299, 19), (224, 14)])
def test_shapes_at_paper_sizes(model, size, side):
    model.eval()  # one image: BN must use running statistics
    x = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        assert model.encode(x).shape == (1, 728, side, side)
        out = model(x, x, torch.tensor([1.0]))
        logits = model(x)
    assert isinstance(out, FakeDifferOutput)
    assert out.logit.shape == (1,) and logits.shape == (1,)
    torch.testing.assert_close(logits, out.logit)  # the inference path computes the same logit
    for r in (out.recon_real, out.recon_fake):
        assert r.shape == (1, 3, size, size)
        assert r.min() >= -1 and r.max() <= 1
    assert out.err_real.shape == out.err_fake.shape == (1, 728, side, side)
    assert out.fusion_weights.shape == (1, 3, 728)
    torch.testing.assert_close(out.fusion_weights.sum(1), torch.ones(1, 728))


def test_gradients_reach_every_part(model):
    model.train()
    x, x_noisy, y = batch()
    model.zero_grad(set_to_none=True)
    FakeDifferLoss()(model(x, x_noisy, y), x, y)["total"].backward()
    for name in ("encoder.conv1.weight", "encoder.block3.rep.1.pointwise.weight",
                 "decoders.real.body.0.conv.conv1.weight", "decoders.real.to_rgb.0.weight",
                 "decoders.fake.body.1.rep.1.pointwise.weight", "decoders.fake.to_rgb.0.weight",
                 "interaction.mlp.fc1.weight", "interaction.mlp.fc2.weight",
                 "head.block9.rep.1.pointwise.weight", "head.conv4.pointwise.weight", "fc.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Nothing left out of the graph (DDP without find_unused_parameters needs this).
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("labels", [[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
def test_fused_and_two_pass_agree(labels):
    """Eval mode only (dropout off, BN on running statistics): the released code's two passes and the
    fused pass compute the same losses and gradients. In train mode they do not (next test)."""
    torch.manual_seed(1)
    m = create_model().eval()
    x, _, _ = batch()
    y = torch.tensor(labels)
    loss_fn = FakeDifferLoss(flooding=0.04)
    results = {}
    for mode in ("fused", "two_pass"):
        m.forward_mode = mode
        m.zero_grad(set_to_none=True)
        losses = loss_fn(m(x, x, y), x, y)
        losses["total"].backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        results[mode] = ({k: v.detach() for k, v in losses.items()}, grads)
    (l_fused, g_fused), (l_two, g_two) = results["fused"], results["two_pass"]
    for k in l_fused:
        torch.testing.assert_close(l_two[k], l_fused[k], rtol=1e-5, atol=1e-6)
    assert g_fused.keys() == g_two.keys()
    for n in g_fused:
        torch.testing.assert_close(g_two[n], g_fused[n], rtol=1e-3, atol=1e-6, msg=n)


def test_two_pass_decoders_see_only_their_class():
    """Training mode, two_pass: the loss's reconstructions come from decoders run on their own
    class only (BN batch statistics included), as the released code's first pass does."""
    torch.manual_seed(0)
    m = create_model(forward="two_pass", encoder_dropout=0.0).train()
    x, _, y = batch()
    real, fake = (y == 0).nonzero().squeeze(1), (y == 1).nonzero().squeeze(1)
    with torch.no_grad():
        out = m(x, x, y)
        m_all = m.encode(x)
        want_real = m.reconstruct("real", m_all[real], x.shape[-2:])
        want_fake = m.reconstruct("fake", m_all[fake], x.shape[-2:])
        whole_batch = m.reconstruct("real", m_all, x.shape[-2:])[real]
    torch.testing.assert_close(out.recon_real[real], want_real)
    torch.testing.assert_close(out.recon_fake[fake], want_fake)
    assert not torch.allclose(whole_batch, want_real)  # fused would differ here: BN sees the whole batch


def test_parameter_count_and_no_dropped_blocks(model):
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 14.0e6) / 14.0e6 < 0.02, n
    names = [k for k, _ in model.named_parameters()] + list(model.state_dict())
    for i in range(4, 9):
        assert not any(f"block{i}." in k for k in names), f"block{i} kept"
    assert model.dropped_blocks == ["block4", "block5", "block6", "block7", "block8"]
    assert [k for k, _ in model.encoder.named_children()][-1] == "block3"
    assert [k for k, _ in model.head.named_children()][:4] == ["block9", "block10", "block11", "block12"]


VARIANTS = [
    {},
    {"forward": "two_pass"},
    {"forward": "fused_exact"},
    {"error_encoder": "separate"},
    {"error_encoder": "shared_conv"},
    {"fusion": "residual"},
    {"fusion": "add"},
    {"sources": ["inva"]},
    {"sources": ["real", "fake"]},
    {"sources": ["fake", "inva"], "error_encoder": "separate"},
    {"variant": "xception"},
    {"variant": "dual_recons"},
    {"variant": "dual_recons", "forward": "two_pass", "sources": ["inva", "real"]},
    {"dropout": 0.0, "encoder_dropout": 0.0, "input_size": 96},
]


@pytest.mark.parametrize("over", VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_every_variant_trains_and_predicts(over):
    torch.manual_seed(0)
    cfg = dataclasses.replace(Config().model, **over)
    m = create_model_from_config(cfg).train()
    size = cfg.input_size if cfg.input_size < 299 else SMALL
    x, x_noisy, y = batch(size=size)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    out = m(x, x_noisy, y)
    losses = FakeDifferLoss()(out, x, y)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    assert [n for n, p in m.named_parameters() if p.grad is None] == []
    opt.step()
    if cfg.variant == "xception":
        assert out.recon_real is None and out.fusion_weights is None
    else:
        assert out.recon_real.shape == out.recon_fake.shape == x.shape
        s = len(cfg.sources)
        assert (out.fusion_weights is None) == (cfg.fusion == "add")
        if out.fusion_weights is not None:
            assert out.fusion_weights.shape == (4, s, 728)
        assert (out.err_real is None) == ("real" not in cfg.sources)
        assert (out.err_fake is None) == ("fake" not in cfg.sources)
    m.eval()
    with torch.no_grad():
        logits = m(x)
    assert logits.shape == (4,) and torch.isfinite(logits).all()


def test_channels_last_is_only_a_layout():
    torch.manual_seed(0)
    nhwc = create_model()
    nchw = create_model(channels_last=False)
    nchw.load_state_dict(nhwc.state_dict())
    assert nhwc.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert nchw.encoder.conv1.weight.is_contiguous()
    x, _, y = batch()
    for m in (nhwc, nchw):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-4, atol=1e-5)
        a, b = nhwc(x, x, y), nchw(x, x, y)
    torch.testing.assert_close(a.recon_fake, b.recon_fake, rtol=1e-4, atol=1e-5)


def test_onednn_pointwise_is_the_same_convolution_on_another_kernel():
    """route_pointwise_to_onednn (train.onednn_pointwise), at one thread and batch 4 where torch runs
    1x1 convolutions on its im2col path: in float64 (no oneDNN kernel, so the same path) a training
    step (train mode, BN batch statistics) is bitwise the unrouted one, so dilation 2 on a 1x1 kernel
    is the same convolution; in float32 every routed convolution runs on oneDNN, and the outputs and
    losses agree to float rounding (gradients of an untrained net in train mode differ by rounding
    as much as channels_last vs NCHW do, so they are compared in float64)."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    from fdtrain.models import route_pointwise_to_onednn, torch_picks_slow_pointwise

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch_picks_slow_pointwise("cpu", 4) and not torch_picks_slow_pointwise("cpu", 16)
        assert not torch_picks_slow_pointwise("cuda", 4)
        torch.manual_seed(0)
        plain = create_model(input_size=64, dropout=0.0, encoder_dropout=0.0, channels_last=False).train()
        routed = copy.deepcopy(plain)
        assert route_pointwise_to_onednn(routed) == 41 and routed.training  # every 1x1 stride-1 conv
        g = torch.Generator().manual_seed(1)
        x = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
        y = torch.tensor([0.0, 1.0, 1.0, 0.0])
        loss_fn = FakeDifferLoss()

        def step(m, dtype):
            m = copy.deepcopy(m).to(dtype)
            losses = loss_fn(m(x.to(dtype), x.to(dtype), y.to(dtype)), x.to(dtype), y.to(dtype))
            losses["total"].backward()
            return losses, {k: p.grad for k, p in m.named_parameters()}, dict(m.named_buffers())

        a, b = step(plain, torch.float64), step(routed, torch.float64)
        for got, want in zip(b, a):
            assert all(torch.equal(got[k], want[k]) for k in want)
        ops = {}
        for name, m in (("plain", plain), ("routed", routed)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                ops[name] = step(m, torch.float32)[0]
            ops[name + "_ops"] = {e.key for e in prof.key_averages()}
        assert "aten::_slow_conv2d_forward" in ops["plain_ops"]  # torch's own choice for these convs
        assert "aten::_slow_conv2d_forward" not in ops["routed_ops"]  # all of them moved to oneDNN
        for k, want in ops["plain"].items():
            torch.testing.assert_close(ops["routed"][k], want, rtol=1e-5, atol=1e-6, msg=k)
        plain.eval(), routed.eval()
        with torch.no_grad():
            torch.testing.assert_close(routed(x), plain(x), rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("over,size,want", [({"variant": "xception"}, 299, 34), ({}, 299, 41), ({}, 96, 41),
                                            ({"error_encoder": "separate"}, 96, 47)])
def test_onednn_pointwise_moves_every_pointwise_conv_and_nothing_else(over, size, want):
    """Every 1x1 stride-1 convolution gets dilation 2 (the pointwise halves of the separable
    convolutions, the decoders' to-RGB, the fusion MLP); the strided 1x1 skips, the depthwise and
    the 3x3 stem convolutions keep theirs. The count does not depend on the input size (41 at 299 and
    96 px; a separate error encoder adds its own 6)."""
    from fdtrain.models import route_pointwise_to_onednn

    m = create_model(input_size=size, **over)
    pointwise = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1)
                 and c.stride == (1, 1) and c.groups == 1]
    others = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and not any(c is p for p in pointwise)]
    assert route_pointwise_to_onednn(m) == len(pointwise) == want
    assert all(c.dilation == (2, 2) for c in pointwise) and all(c.dilation == (1, 1) for c in others)
    assert any(c.kernel_size == (1, 1) and c.stride == (2, 2) for c in others)  # the skips stay as they are
    assert route_pointwise_to_onednn(m) == 0  # already moved: nothing left


def test_interaction_modes():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 3, 3) for _ in range(3)]
    for mode in ("select", "residual"):
        t, w = Interaction(8, 3, 2, mode).train()(feats)
        assert w.shape == (2, 3, 8)
        torch.testing.assert_close(w.sum(1), torch.ones(2, 8))
        want = sum(w[:, s, :, None, None] * f for s, f in enumerate(feats))
        if mode == "residual":
            want = want + sum(feats)
        torch.testing.assert_close(t, want)
    t, w = Interaction(8, 3, 2, "add")(feats)
    assert w is None
    torch.testing.assert_close(t, feats[0] + feats[1] + feats[2])


def _save_fake_imagenet(path):
    torch.manual_seed(123)
    ref = timm.create_model("legacy_xception", pretrained=False)  # 1000 classes, as the real file
    torch.save(ref.state_dict(), path)
    return ref.state_dict()


def test_pretrained_from_local_file(tmp_path):
    ref = _save_fake_imagenet(tmp_path / "xception.pth")
    m = create_model(pretrained=True, pretrained_path=str(tmp_path / "xception.pth"), error_encoder="separate")
    sd = m.state_dict()
    for ours, theirs in [("encoder.conv1.weight", "conv1.weight"),
                         ("encoder.block3.rep.4.pointwise.weight", "block3.rep.4.pointwise.weight"),
                         ("error_encoder.conv2.weight", "conv2.weight"),
                         ("head.block9.rep.1.pointwise.weight", "block9.rep.1.pointwise.weight"),
                         ("head.bn4.running_var", "bn4.running_var")]:
        torch.testing.assert_close(sd[ours], ref[theirs], msg=ours)


def test_pretrained_missing_says_where_to_put_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ConfigError) as e:
        create_model(pretrained=True)
    msg = str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "xception-43020ad28.pth") in msg
    assert "model.pretrained_path" in msg and "model.pretrained=false" in msg
    with pytest.raises(ConfigError, match="model.pretrained_path: no such file"):
        create_model(pretrained=True, pretrained_path=str(tmp_path / "nope.pth"))


def test_pretrained_file_that_is_not_xception_weights_is_refused(tmp_path):
    """Garbage, another network's weights or a pickle that runs code: one message naming the file."""
    garbage, foreign, crafted = tmp_path / "garbage.pth", tmp_path / "resnet.pth", tmp_path / "crafted.pth"
    garbage.write_bytes(b"\x00\x01not weights" * 100)
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), foreign)
    torch.save({"conv1.weight": __import__("os").system}, crafted)
    for f, why in [(garbage, "not a weights file torch can read safely"),
                   (foreign, "not ImageNet weights of legacy_xception: 27[34] of 274 backbone tensors"),
                   (crafted, "not a weights file torch can read safely")]:
        with pytest.raises(ConfigError, match=f"model.pretrained_path: {f}: {why}"):
            create_model(pretrained=True, pretrained_path=str(f))


def test_create_model_rejects_bad_fields():
    with pytest.raises(TypeError, match="unknown model field"):
        create_model(fusoin="add")
    with pytest.raises(ValueError, match="model.fusion"):
        create_model(fusion="concat")
    with pytest.raises(ValueError, match="model.sources"):
        create_model(sources=[])
    with pytest.raises(ValueError, match="model.name"):
        create_model("resnet")


def test_load_model_round_trip(tmp_path, model):
    cfg = Config()
    cfg.model.input_size = SMALL
    ckpt = tmp_path / "step_3"
    ckpt.mkdir()
    # As DDP would save it: prefixed names must still load.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"config": cfg.to_dict(), "state_dict": state, "step": 3, "epoch": 0, "metrics": {}},
               ckpt / "model.pt")
    loaded, cfg2 = load_model(ckpt)
    assert cfg2.model.input_size == SMALL and not loaded.training
    x, _, _ = batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_model(tmp_path / "missing")
