"""VAE training losses: LPIPS (tiny stand-in network, loading), the 2D/3D discriminators, KL, hinge, the adaptive
GAN weight and how VAELoss combines them."""

import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from easyanimate.training.vae_losses import (
    LPIPS,
    BlurPool3D,
    Discriminators,
    LossWeights,
    NLayerDiscriminator,
    VAELoss,
    VideoDiscriminator,
    adaptive_weight,
    frames_of,
    hinge_d_loss,
    kl_divergence,
)
from easyanimate.utils.weights import CheckpointError

TINY_VGG = (4, 8, 8, 16, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_lpips(seed: int = 0) -> LPIPS:
    torch.manual_seed(seed)
    model = LPIPS(TINY_VGG)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.ndim > 1 else torch.randn_like(p) * 0.05)
        for i in range(5):  # LPIPS heads are non-negative weights
            head = getattr(model, f"lin{i}").model[1].weight
            head.abs_()
    return model


def test_lpips_is_a_frozen_metric():
    model = tiny_lpips()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert model(x, x).abs().max() < 1e-6
    d = model(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    assert torch.allclose(d, model(y, x), atol=1e-6)
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # Gradients still flow to the inputs (it is used as a loss).
    y.requires_grad_(True)
    model(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_full_size_matches_spec_parameter_count():
    # The released files' loss.* extras: LPIPS-VGG16 14.7 M, 2D PatchGAN 2.8 M, 3D discriminator 3.6 M.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(LPIPS()) / 1e5) == 147
    assert round(count(NLayerDiscriminator()) / 1e5) == 28
    assert round(count(VideoDiscriminator()) / 1e5) == 36


def test_lpips_from_file_layouts(tmp_path):
    model = tiny_lpips(1)
    x, y = torch.rand(2, 1, 3, 16, 16).unbind(0)
    expected = model(x * 2 - 1, y * 2 - 1)
    state = model.state_dict()

    plain = tmp_path / "lpips.safetensors"
    save_file(state, str(plain))
    assert torch.equal(LPIPS.from_file(plain)(x * 2 - 1, y * 2 - 1), expected)
    assert LPIPS.from_file(plain).channels == TINY_VGG

    # The original's training checkpoints: loss.perceptual_loss.* among the VAE and discriminator keys.
    prefixed = {f"loss.perceptual_loss.{k}": v for k, v in state.items()}
    prefixed["loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    prefixed["loss.discriminator.main.0.weight"] = torch.zeros(1)
    prefixed["encoder.conv_in.weight"] = torch.zeros(1)
    save_file(prefixed, str(tmp_path / "ckpt.safetensors"))
    assert torch.equal(LPIPS.from_file(tmp_path / "ckpt.safetensors")(x * 2 - 1, y * 2 - 1), expected)

    # torchvision's vgg16 ``features.N`` naming for the trunk.
    tv = {}
    for k, v in state.items():
        if k.startswith("net.slice"):
            tv["features." + k.split(".", 2)[2]] = v
        else:
            tv[k] = v
    tv["classifier.0.weight"] = torch.zeros(2, 2)
    save_file(tv, str(tmp_path / "tv.safetensors"))
    assert torch.equal(LPIPS.from_file(tmp_path / "tv.safetensors")(x * 2 - 1, y * 2 - 1), expected)

    # Two files as distributed: torchvision's VGG16 (.pth) and the lpips package's heads (.pth), comma-joined.
    torch.save({k: v for k, v in tv.items() if not k.startswith("lin")}, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in tv.items() if k.startswith("lin")}, tmp_path / "heads.pth")
    both = LPIPS.from_file(f"{tmp_path / 'vgg16.pth'},{tmp_path / 'heads.pth'}")
    assert torch.equal(both(x * 2 - 1, y * 2 - 1), expected)


def test_lpips_from_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="LPIPS weights not found.*perceptual_weight"):
        LPIPS.from_file(tmp_path / "missing.safetensors")
    state = tiny_lpips().state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("net.slice3")}
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys.*slice3"):
        LPIPS.from_file(tmp_path / "broken.safetensors")
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not LPIPS weights"):
        LPIPS.from_file(tmp_path / "other.safetensors")


def test_patchgan_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, 3)
    # 70x70 PatchGAN: 256 px -> 30x30 logits.
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.bias is None for c in convs] == [False, True, True, True, False]  # no bias before BatchNorm
    assert abs(convs[2].weight.std().item() - 0.02) < 0.002
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3


def test_blurpool_and_video_discriminator_shapes():
    pool = BlurPool3D(2)
    assert torch.allclose(pool.kernel[0].sum(), torch.tensor(1.0))
    constant = torch.full((1, 2, 6, 6, 6), 3.0)
    out = pool(constant)
    assert out.shape == (1, 2, 3, 3, 3)
    assert torch.allclose(out[:, :, 1:, 1:, 1:], torch.tensor(3.0))  # interior (no zero padding) keeps the value
    d = VideoDiscriminator(3, (8, 16, 16), 4)
    assert d(torch.randn(2, 3, 8, 32, 32)).shape == (2, 1, 1, 4, 4)  # conv_in /2, two blurpool blocks /2 each
    assert d(torch.randn(2, 3, 1, 32, 32)).shape == (2, 1, 1, 4, 4)  # images as 1-frame clips


def test_discriminators_keep_batches_separate():
    torch.manual_seed(0)
    disc = Discriminators(frame_channels=8, video_channels=(8, 16, 16), video_norm_groups=4).train()
    a, b = torch.randn(2, 2, 3, 8, 32, 32).unbind(0)
    together = disc(a, b)
    alone = [disc(a)[0], disc(b)[0]]
    for (f1, v1), (f2, v2) in zip(together, alone):
        assert torch.allclose(f1, f2, atol=1e-6) and torch.allclose(v1, v2, atol=1e-6)
    assert frames_of(a).shape == (2 * 8, 3, 32, 32)
    assert torch.equal(frames_of(a)[8 + 3], a[1, :, 3])


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5).clamp(-3, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    assert torch.allclose(kl_divergence(mean, logvar), expected, rtol=1e-5)


def test_hinge_loss():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0  # confident and right: no loss
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0
    real, fake = torch.randn(10), torch.randn(10)
    expected = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    assert torch.allclose(hinge_d_loss(real, fake), expected)


def test_adaptive_weight_is_gradient_norm_ratio():
    layer = nn.Linear(4, 4)
    x = torch.randn(8, 4)
    out = layer(x)
    nll, g = (out**2).sum(), -out.mean()
    w = adaptive_weight(nll, g, layer.weight, disc_weight=0.5)
    g_nll = torch.autograd.grad(nll, layer.weight, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, layer.weight, retain_graph=True)[0]
    assert torch.allclose(w, g_nll.norm() / (g_g.norm() + 1e-4) * 0.5)
    assert not w.requires_grad
    zero_g = 0.0 * out.sum()  # no adversarial gradient: clamped at 1e4
    assert adaptive_weight(nll, zero_g, layer.weight, 1.0) == 1e4


class _TinyDecoderLast(nn.Module):
    """A stand-in "autoencoder" whose last layer is a conv, to exercise the generator loss."""

    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv3d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv_out(x)


def test_reconstruction_follows_the_original_formula():
    torch.manual_seed(0)
    lpips = tiny_lpips()
    loss = VAELoss(LossWeights(l1=1.0, l2=0.3, perceptual=0.7), None, lpips)
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    x_rec = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    nll, logs = loss.reconstruction(x, x_rec)
    # The original: per-pixel terms plus the (N,1,1,1) LPIPS broadcast to every pixel, summed, / (B*T).
    fx, fr = frames_of(x), frames_of(x_rec)
    rec = 1.0 * (fx - fr).abs() + 0.3 * (fx - fr) ** 2 + 0.7 * lpips(fx, fr)
    assert torch.allclose(nll, rec.sum() / fx.shape[0], rtol=1e-5)
    assert torch.allclose(logs["rec_loss"], rec.mean(), rtol=1e-5)


def test_first_frame_weight_counts_frame_zero_of_each_clip_more():
    torch.manual_seed(0)
    lpips = tiny_lpips()
    x = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    x_rec = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    nll, logs = VAELoss(LossWeights(l1=1.0, l2=0.3, perceptual=0.7, first_frame=5.0), None, lpips).reconstruction(
        x, x_rec)
    # per-frame sums as in the original, then a weighted mean: frame 0 of each clip 5x, the weights of mean 1
    fx, fr = frames_of(x), frames_of(x_rec)
    per_frame = (1.0 * (fx - fr).abs() + 0.3 * (fx - fr) ** 2 + 0.7 * lpips(fx, fr)).flatten(1).sum(1)
    weights = torch.tensor([5.0, 1, 1, 1, 5, 1, 1, 1]) / 2.0
    assert torch.allclose(nll, (per_frame * weights).mean(), rtol=1e-5)
    unweighted, _ = VAELoss(LossWeights(l1=1.0, l2=0.3, perceptual=0.7), None, lpips).reconstruction(x, x_rec)
    assert not torch.allclose(nll, unweighted, rtol=1e-3)
    # a batch of images has no first frame to favour
    images, images_rec = x[:, :, :1], x_rec[:, :, :1]
    loss = VAELoss(LossWeights(l1=1.0, perceptual=0.0, first_frame=5.0), None)
    plain = VAELoss(LossWeights(l1=1.0, perceptual=0.0), None)
    assert torch.equal(loss.reconstruction(images, images_rec)[0], plain.reconstruction(images, images_rec)[0])
    with pytest.raises(ValueError, match="first-frame weight"):
        VAELoss(LossWeights(perceptual=0.0, first_frame=0.0), None)


def test_perceptual_weight_needs_lpips():
    with pytest.raises(ValueError, match="lpips_weights"):
        VAELoss(LossWeights(perceptual=1.0), None, None)


def test_generator_loss_switches_gan_on_at_disc_start():
    torch.manual_seed(0)
    disc = Discriminators(frame_channels=8, video_channels=(8, 16, 16), video_norm_groups=4)
    loss = VAELoss(LossWeights(l1=1.0, perceptual=0.0, kl=1e-3, disc=0.5, disc_start=5), disc)
    decoder = _TinyDecoderLast()
    x = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    mean, logvar = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 2, 2, 2)

    x_rec = decoder(x)
    before, logs = loss.generator_loss(x, x_rec, mean, logvar, 4, decoder.conv_out.weight)
    nll, _ = loss.reconstruction(x, x_rec)
    assert not loss.disc_active(4) and "g_loss" not in logs and logs["disc_factor"] == 0
    assert torch.allclose(before, nll + 1e-3 * kl_divergence(mean, logvar))

    x_rec = decoder(x)
    after, logs = loss.generator_loss(x, x_rec, mean, logvar, 5, decoder.conv_out.weight)
    assert loss.disc_active(5) and logs["disc_factor"] == 1
    [(f, v)] = disc(x_rec)
    g = -f.mean() - v.mean()
    expected_w = adaptive_weight(nll, g, decoder.conv_out.weight, 0.5)
    assert torch.allclose(logs["g_loss"], g)
    assert torch.allclose(logs["d_weight"], expected_w, rtol=1e-4)
    assert torch.allclose(after, nll + 1e-3 * kl_divergence(mean, logvar) + expected_w * g, rtol=1e-5)

    d_loss, d_logs = loss.discriminator_loss(x, x_rec)
    [(rf, rv), (ff, fv)] = disc(x, x_rec.detach())
    assert torch.allclose(d_loss, hinge_d_loss(rf, ff) + hinge_d_loss(rv, fv), rtol=1e-5)
    assert d_loss.grad_fn is not None and math.isfinite(d_logs["disc_loss"].item())
