"""Losses for training the video VAE: reconstruction, LPIPS, KL and a 2D + 3D hinge GAN.

What the original (``LPIPSWithDiscriminator`` in its VAE training code) computes, per batch of
clips ``x`` of shape ``(B, C, T, H, W)`` in [-1, 1] and reconstructions ``x_rec``:

* pixel terms on the ``B*T`` frames: ``l1 * |x - x_rec| + l2 * (x - x_rec)**2`` summed over the pixels, plus
  ``perceptual * LPIPS(x, x_rec)``, which the original broadcast-adds to every pixel of the frame, so it counts
  ``C*H*W`` times; the sum is divided by ``B*T`` (``nll``).
* ``kl = 0.5 * sum(mean**2 + var - 1 - logvar)`` over all non-batch dims, divided by ``B``; weight ``kl_weight``.
* generator GAN term ``g = -mean(D2d(frames)) - mean(D3d(clip))``, weighted by the adaptive weight
  ``clamp(|grad nll| / (|grad g| + 1e-4), 0, 1e4) * disc_weight`` with both gradients taken at the decoder's last
  layer, and switched on from ``disc_start``.
* discriminator step: ``hinge(D2d) + hinge(D3d)`` with ``hinge = 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``.

Two things of the original are deliberately left out:

* its ``nll = rec / exp(logvar) + logvar`` with a learnable scalar ``logvar``: that parameter is in no optimizer,
  so it stays 0 and ``nll == rec``; ``rec`` is computed directly, with no dead parameter.
* before ``disc_start`` it still runs both discriminators and the adaptive-weight gradients and then multiplies the
  result by 0; that work is skipped here (the loss value is the same).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.weights import CheckpointError, load_state_dict_strict, read_weights_file

# --------------------------------------------------------------------------------------------------------------
# LPIPS (VGG16 features + linear heads), the layout of taming-transformers / richzhang's ``lpips`` package
# --------------------------------------------------------------------------------------------------------------

VGG16_CHANNELS = (64, 128, 256, 512, 512)
# Number of 3x3 convs per VGG16 stage; the LPIPS taps sit after the last ReLU of each stage.
VGG16_CONVS_PER_STAGE = (2, 2, 3, 3, 3)
# Prefixes under which LPIPS weights are found in other files: the original's VAE training checkpoints carry them
# as ``loss.perceptual_loss.*``, and probably the released VAE safetensors too (they are about 21 M parameters
# larger than the VAE: LPIPS-VGG16 14.7 M plus the two discriminators).
LPIPS_KEY_PREFIXES = ("loss.perceptual_loss.", "perceptual_loss.")


class VGGFeatures(nn.Module):
    """The five VGG16 stages LPIPS taps (``slice1`` .. ``slice5``), with torchvision's layer indices as module
    names so that the keys match the usual LPIPS files (``slice2.5.weight`` is torchvision's ``features.5``)."""

    def __init__(self, channels: tuple[int, ...] = VGG16_CHANNELS):
        super().__init__()
        index, in_ch = 0, 3
        for stage, (out_ch, n_convs) in enumerate(zip(channels, VGG16_CONVS_PER_STAGE), start=1):
            layers: dict[str, nn.Module] = {}
            if stage > 1:
                layers[str(index)] = nn.MaxPool2d(kernel_size=2, stride=2)
                index += 1
            for _ in range(n_convs):
                layers[str(index)] = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
                layers[str(index + 1)] = nn.ReLU(inplace=False)
                index += 2
                in_ch = out_ch
            setattr(self, f"slice{stage}", nn.Sequential(OrderedDict(layers)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for stage in range(1, 6):
            x = getattr(self, f"slice{stage}")(x)
            taps.append(x)
        return taps


class LinearHead(nn.Module):
    """A 1x1 conv to one channel (``model.1``; ``model.0`` is the original's Dropout, kept for the key names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned perceptual distance (Zhang et al. 2018) with a VGG16 trunk; inputs in [-1, 1], shape (N, 3, H, W),
    output (N, 1, 1, 1). The weights are frozen: it is a fixed metric, loaded with :meth:`from_file`.

    ``channels`` is the width of the five VGG stages; the real network is VGG16's (64, 128, 256, 512, 512), tests
    use a narrower stand-in with the same structure."""

    def __init__(self, channels: tuple[int, ...] = VGG16_CHANNELS):
        super().__init__()
        if len(channels) != 5:
            raise ValueError(f"LPIPS needs 5 VGG stage widths, got {channels}")
        self.channels = tuple(int(c) for c in channels)
        # ImageNet normalisation expressed for [-1, 1] inputs (constants of the LPIPS paper's code).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.net = VGGFeatures(self.channels)
        for i, ch in enumerate(self.channels):
            setattr(self, f"lin{i}", LinearHead(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # A fixed metric: never switch to training behaviour, whatever the parent module does.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            diff = (_unit_normalize(a) - _unit_normalize(b)) ** 2
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(2, 3), keepdim=True)
        return total

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "LPIPS":
        """Build LPIPS from the VGG16 trunk (``net.slice*`` keys, or torchvision's ``features.*``) and the five
        heads (``lin{i}.model.1.weight``). ``path`` is one file, or several joined by commas whose keys are merged,
        e.g. torchvision's ``vgg16-397923af.pth`` and the ``lpips`` package's ``weights/v0.1/vgg.pth``. Keys may
        carry the original's ``loss.perceptual_loss.`` prefix, so a VAE training checkpoint of the original works
        as is. ``.pth`` files are read with ``torch.load(weights_only=True)``. The stage widths come from the
        weights."""
        paths = [Path(p.strip()) for p in str(path).split(",") if p.strip()]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing or not paths:
            raise CheckpointError(
                f"LPIPS weights not found: {', '.join(missing) or path!r}. Pass --lpips_weights with the VGG16 "
                "LPIPS weights (one file, or the VGG16 and LPIPS-head files joined by a comma), or set "
                "perceptual_weight to 0."
            )
        state: dict[str, torch.Tensor] = {}
        for p in paths:
            state.update(normalize_lpips_state_dict(read_weights_file(p)))
        source = ", ".join(str(p) for p in paths)
        channels = []
        for i in range(5):
            key = f"lin{i}.model.1.weight"
            if key not in state:
                raise CheckpointError(
                    f"{source}: not LPIPS weights, key '{key}' is missing (found e.g. {sorted(state)[:5]}). "
                    "The LPIPS heads are the lpips package's weights/v0.1/vgg.pth."
                )
            channels.append(state[key].shape[1])
        model = cls(tuple(channels))
        load_state_dict_strict(model, state, source=f"LPIPS weights {source}")
        return model


def normalize_lpips_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip known prefixes, drop the constant normalisation buffers and unrelated keys (other ``loss.*``
    modules, the VAE itself) and map torchvision's ``features.N`` naming onto ``net.sliceK.N``."""
    for prefix in LPIPS_KEY_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    stage_of_index = {}
    index = 0
    for stage, n_convs in enumerate(VGG16_CONVS_PER_STAGE, start=1):
        count = 2 * n_convs + (1 if stage > 1 else 0)
        for j in range(index, index + count):
            stage_of_index[j] = stage
        index += count
    out = {}
    for key, value in state.items():
        if key.startswith(("scaling_layer.", "classifier.")):
            continue  # the shift/scale constants (fixed in the module); torchvision VGG16's unused classifier
        if key.startswith("features."):
            layer = int(key.split(".")[1])
            if layer not in stage_of_index:
                continue  # the last max-pool of torchvision's trunk has no weights anyway
            key = f"net.slice{stage_of_index[layer]}.{key[len('features.'):]}"
        out[key] = value
    return out


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


# --------------------------------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------------------------------


class NLayerDiscriminator(nn.Module):
    """PatchGAN on single frames (pix2pix / taming): strided 4x4 convs with BatchNorm and LeakyReLU(0.2),
    one logit per overlapping patch. Initialised N(0, 0.02) (BatchNorm weights N(1, 0.02)) like the original."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(base_channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_patchgan_init)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.main(frames)


def _patchgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class BlurPool3D(nn.Module):
    """Anti-aliased 2x downsampling in T, H and W: a depthwise separable [1, 2, 1]^3 / 64 filter with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
        kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3, 3).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.kernel.to(x.dtype), stride=2, padding=1, groups=self.channels)


class DiscriminatorBlock3D(nn.Module):
    """Pre-activation residual block: GN, LeakyReLU, conv, GN, LeakyReLU, [BlurPool], conv; the shortcut is
    [BlurPool] then a 1x1x1 conv; output ``(h + shortcut) / sqrt(2)``."""

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, downsample: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=1e-6)
        self.downsample = BlurPool3D(out_channels) if downsample else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut_downsample = BlurPool3D(in_channels) if downsample else nn.Identity()
        self.shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(self.shortcut_downsample(x))
        h = self.conv1(F.leaky_relu(self.norm1(x), 0.2))
        h = self.conv2(self.downsample(F.leaky_relu(self.norm2(h), 0.2)))
        return (h + shortcut) / math.sqrt(2.0)


class VideoDiscriminator(nn.Module):
    """3D conv discriminator on whole clips (B, C, T, H, W): a stride-2 conv, residual blocks that each halve T, H
    and W except the last, and a 3x3x3 conv to one logit per space-time patch."""

    def __init__(
        self, in_channels: int = 3, block_channels: tuple[int, ...] = (64, 128, 256), norm_num_groups: int = 32
    ):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, block_channels[0], kernel_size=3, stride=2, padding=1)
        blocks, prev = [], block_channels[0]
        for i, ch in enumerate(block_channels):
            blocks.append(DiscriminatorBlock3D(prev, ch, norm_num_groups, downsample=i < len(block_channels) - 1))
            prev = ch
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv3d(prev, 1, kernel_size=3, padding=1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(video)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


class Discriminators(nn.Module):
    """The two discriminators trained together: a PatchGAN on frames and a 3D one on clips."""

    def __init__(
        self,
        in_channels: int = 3,
        frame_channels: int = 64,
        frame_layers: int = 3,
        video_channels: tuple[int, ...] = (64, 128, 256),
        video_norm_groups: int = 32,
    ):
        super().__init__()
        self.frame = NLayerDiscriminator(in_channels, frame_channels, frame_layers)
        self.video = VideoDiscriminator(in_channels, tuple(video_channels), video_norm_groups)

    def forward(self, *videos: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Frame- and video-discriminator logits for each batch of clips (B, C, T, H, W). Several batches (real,
        fake) go through one call, so that a distributed wrapper sees one forward per backward, but each is its
        own BatchNorm batch, as in the original."""
        return [(self.frame(frames_of(v)), self.video(v)) for v in videos]


# --------------------------------------------------------------------------------------------------------------
# Loss terms
# --------------------------------------------------------------------------------------------------------------


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W)."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all non-batch dims and averaged over the batch.
    ``logvar`` must already be clamped to [-30, 20] (the posterior does that)."""
    mean, logvar = mean.float(), logvar.float()
    per_sample = 0.5 * torch.sum(mean**2 + logvar.exp() - 1.0 - logvar, dim=tuple(range(1, mean.ndim)))
    return per_sample.mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """``clamp(|d nll/dW| / (|d g/dW| + 1e-4), 0, 1e4) * disc_weight`` at the decoder's last layer ``W``: scales
    the GAN term so that its gradient there is comparable to the reconstruction gradient."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grad.float()) / (torch.norm(g_grad.float()) + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


@dataclass
class LossWeights:
    """Weights of the VAE loss terms; defaults are the original's ``_slice.yaml``."""

    l1: float = 1.0
    l2: float = 0.0
    perceptual: float = 1.0
    kl: float = 1e-6
    disc: float = 0.5
    disc_start: int = 50001
    # Not in the original (1 = its loss): frame 0 of every clip counts this many times as much as each other frame
    # in the reconstruction terms. Image-to-video starts from that frame, and the V4 VAE codes frames 0-3 in one
    # latent, where frame 0 comes out blurred along the motion.
    first_frame: float = 1.0


class VAELoss(nn.Module):
    """All loss terms of VAE training. Holds the frozen LPIPS network and the trainable
    discriminators; the VAE itself is passed in by the trainer."""

    def __init__(self, weights: LossWeights, discriminators: Discriminators | None, lpips: LPIPS | None = None):
        super().__init__()
        if weights.perceptual > 0 and lpips is None:
            raise ValueError(
                f"perceptual_weight is {weights.perceptual} but no LPIPS network was given: pass --lpips_weights "
                "with a safetensors file of the VGG16 LPIPS weights (they cannot be downloaded here), or set "
                "perceptual_weight to 0"
            )
        if weights.l1 < 0 or weights.l2 < 0 or weights.perceptual < 0 or weights.kl < 0 or weights.disc < 0:
            raise ValueError(f"loss weights must be >= 0, got {weights}")
        if weights.first_frame <= 0:
            raise ValueError(f"the first-frame weight must be > 0, got {weights.first_frame}")
        self.weights = weights
        self.lpips = lpips if weights.perceptual > 0 else None
        self.discriminators = discriminators

    def disc_active(self, step: int) -> bool:
        """The original's ``adopt_weight``: the GAN terms count from ``global_step >= disc_start`` on."""
        return self.discriminators is not None and self.weights.disc > 0 and step >= self.weights.disc_start

    def reconstruction(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``nll``: the per-pixel terms summed over each frame and averaged over the ``B*T`` frames (a weighted
        average when ``first_frame`` != 1 and the clips have more than one frame)."""
        w = self.weights
        frames, rec_frames = frames_of(x).float(), frames_of(x_rec).float()
        n, c, h, wd = frames.shape
        diff = frames - rec_frames
        frame_weights = self.frame_weights(x)

        def frame_mean(values: torch.Tensor) -> torch.Tensor:  # (B*T, ...) -> the (weighted) mean
            if frame_weights is None:
                return values.mean()
            return (values.flatten(1).mean(1) * frame_weights).mean()

        per_pixel = torch.zeros((), device=x.device)
        logs: dict[str, torch.Tensor] = {}
        if w.l1 > 0:
            l1 = frame_mean(diff.abs())
            per_pixel = per_pixel + w.l1 * l1
            logs["l1"] = l1.detach()
        if w.l2 > 0:
            l2 = frame_mean(diff**2)
            per_pixel = per_pixel + w.l2 * l2
            logs["l2"] = l2.detach()
        # The original sums over the pixels of a frame and then averages over frames: mean * (C*H*W).
        nll = per_pixel * (c * h * wd)
        if self.lpips is not None:
            p = frame_mean(self.lpips(frames, rec_frames).float())
            # Broadcast-added to every pixel in the original, hence also scaled by C*H*W.
            nll = nll + w.perceptual * p * (c * h * wd)
            logs["lpips"] = p.detach()
        # The original's logged ``rec_loss``: the per-pixel mean of the reconstruction terms including LPIPS.
        logs["rec_loss"] = per_pixel.detach() + w.perceptual * logs.get("lpips", torch.zeros((), device=x.device))
        logs["nll_loss"] = nll.detach()
        return nll, logs

    def frame_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """(B*T,) weights of the frames of ``x`` (B, C, T, H, W), frame 0 of each clip ``first_frame`` times the
        others, scaled to mean 1 so the loss keeps its size; None when all frames count the same."""
        b, t = x.shape[0], x.shape[2]
        if self.weights.first_frame == 1 or t == 1:
            return None
        weights = torch.ones(b, t, device=x.device)
        weights[:, 0] = self.weights.first_frame
        return (weights / weights.mean()).reshape(b * t)

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None,
        discriminators: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the autoencoder. ``discriminators`` defaults to ``self.discriminators`` (the trainer passes the
        unwrapped module so that this step does not trigger distributed gradient sync of the discriminators)."""
        nll, logs = self.reconstruction(x, x_rec)
        kl = kl_divergence(mean, logvar)
        loss = nll + self.weights.kl * kl
        logs["kl_loss"] = kl.detach()
        if self.disc_active(step):
            disc = discriminators if discriminators is not None else self.discriminators
            [(frame_logits, video_logits)] = disc(x_rec)
            g_loss = -frame_logits.float().mean() - video_logits.float().mean()
            if last_layer is None or not last_layer.requires_grad:
                raise ValueError("the adaptive GAN weight needs a trainable last layer of the autoencoder")
            d_weight = adaptive_weight(nll, g_loss, last_layer, self.weights.disc)
            loss = loss + d_weight * g_loss
            logs["g_loss"] = g_loss.detach()
            logs["d_weight"] = d_weight
        logs["disc_factor"] = torch.tensor(1.0 if self.disc_active(step) else 0.0)
        logs["total_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, discriminators: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of both discriminators on real clips and (detached) reconstructions. Call it only when
        :meth:`disc_active`; before that the original's discriminator loss is multiplied by 0."""
        disc = discriminators if discriminators is not None else self.discriminators
        (real_frame, real_video), (fake_frame, fake_video) = disc(x.detach(), x_rec.detach())
        d_frame = hinge_d_loss(real_frame.float(), fake_frame.float())
        d_video = hinge_d_loss(real_video.float(), fake_video.float())
        logs = {
            "disc_loss": (d_frame + d_video).detach(),
            "disc_frame_loss": d_frame.detach(),
            "disc_video_loss": d_video.detach(),
            "logits_real": (real_frame.float().mean() + real_video.float().mean()).detach() / 2,
            "logits_fake": (fake_frame.float().mean() + fake_video.float().mean()).detach() / 2,
        }
        return d_frame + d_video, logs
