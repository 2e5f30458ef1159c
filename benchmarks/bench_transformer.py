"""Speed and memory of the V4 transformer at a mid-size config over a few sequence lengths.

    python -m benchmarks.bench_transformer        # from the repository root: hidden 512, 8 layers, 1k/4k/16k tokens
    python -m benchmarks.bench_transformer --tokens 1024 4096 --no-backward-above 4096

Prints, per sequence length: forward seconds, forward+backward seconds, model FLOPs per step (analytic: matmuls,
convs and attention; backward = 2x forward), achieved GFLOP/s, peak memory of the step above the model and
inputs, and that memory per 1k tokens (constant = linear in sequence length; an explicit N x N attention matrix
would grow it linearly instead). A plain fp32 matmul of the FFN's size at the largest length is the reference
for GFLOP/s. On a shared CPU the figures are noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import threading
import time

import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

from easyanimate.models.transformer import HunyuanTransformer3DModel


def build_config(hidden: int, layers: int, heads: int) -> dict:
    """The released InP architecture (CLIP branch, long skips, BERT 77 + T5 256 text tokens) at a smaller width."""
    return dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        hidden_size=hidden,
        num_layers=layers,
        in_channels=12,
        out_channels=8,
        cross_attention_dim=hidden,
        cross_attention_dim_t5=hidden,
        pooled_projection_dim=hidden,
        projection_dim=hidden,
        text_len=77,
        text_len_t5=256,
    )


def video_shape(tokens: int) -> tuple[int, int]:
    """(frames, patch-grid side) with frames * side^2 = tokens: 32x32 patches (512 px) from 4k tokens on."""
    side = 32 if tokens >= 4096 else 16
    if tokens % (side * side):
        raise SystemExit(f"--tokens {tokens} must be a multiple of {side * side}")
    return tokens // (side * side), side


def make_inputs(cfg: dict, batch: int, frames: int, side: int, clip_tokens: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    latent = 2 * side
    return dict(
        hidden_states=randn(batch, 4, frames, latent, latent),
        inpaint_latents=randn(batch, 8, frames, latent, latent),
        timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
        encoder_hidden_states=randn(batch, cfg["text_len"], cfg["cross_attention_dim"]),
        text_embedding_mask=torch.ones(batch, cfg["text_len"], dtype=torch.long, device=device),
        encoder_hidden_states_t5=randn(batch, cfg["text_len_t5"], cfg["cross_attention_dim_t5"]),
        text_embedding_mask_t5=torch.ones(batch, cfg["text_len_t5"], dtype=torch.long, device=device),
        image_meta_size=torch.tensor([[1024, 1024, 8 * latent, 8 * latent, 0, 0]] * batch, device=device, dtype=dtype),
        style=torch.zeros(batch, dtype=torch.long, device=device),
        clip_encoder_hidden_states=randn(batch, clip_tokens, cfg["projection_dim"]),
        clip_attention_mask=torch.ones(batch, 16, device=device, dtype=dtype),
    )


def attention_flops(cfg: dict, batch: int, tokens: int, clip_queries: int = 16) -> int:
    """QK^T and AV of the three attentions of every block (SDPA; not seen by FlopCounterMode on CPU)."""
    text = cfg["text_len"] + cfg["text_len_t5"]
    per_block = 4 * tokens * (tokens + text + clip_queries) * cfg["hidden_size"]
    return batch * cfg["num_layers"] * per_block


def linear_flops(cfg: dict, batch: int, frames: int, side: int, clip_tokens: int) -> int:
    """All matmul/conv FLOPs outside attention scores (2 per multiply-add)."""
    d, n, L = cfg["hidden_size"], frames * side * side, cfg["num_layers"]
    dc, dt5, text = cfg["cross_attention_dim"], cfg["cross_attention_dim_t5"], cfg["text_len"] + cfg["text_len_t5"]
    ff = int(d * 4.3637)
    per_block = (
        2 * n * d * d * 4  # self-attention q, k, v, out
        + 2 * n * d * d * 2 + 2 * text * dc * d * 2  # text cross-attention q, out / k, v
        + 2 * n * d * d * 2 + 2 * 16 * dc * d * 2  # CLIP cross-attention q, out / k, v
        + 2 * n * d * 2 * d  # CLIP gate
        + 2 * n * d * ff * 2  # feed-forward
        + 2 * d * d  # norm1 shift from temb
    )
    skips = (L - L // 2 - 1) * 2 * n * 2 * d * d
    stem = 2 * n * 12 * 4 * d + 2 * n * d * 4 * 8 + 2 * d * 2 * d  # patch conv, proj_out, norm_out
    text_proj = 2 * cfg["text_len_t5"] * (dt5 * 4 * dt5 + 4 * dt5 * dc)
    temb = 2 * (256 * d + d * d) + 2 * (cfg["pooled_projection_dim"] + 1536 + d) * 4 * d + 2 * 4 * d * d
    pool = 2 * (dt5 * dt5 + 2 * (cfg["text_len_t5"] + 1) * dt5 * dt5 + dt5 * cfg["pooled_projection_dim"])
    resampler = 2 * (16 * dc * dc * 2 + 2 * clip_tokens * dc * dc)
    return batch * (L * per_block + skips + stem + text_proj + temb + pool + resampler)


class PeakRSS:
    """Peak resident memory above the level at start, sampled from /proc every 2 ms (CPU).

    glibc keeps freed memory mapped, which would hide a step's peak behind the previous one's; ``malloc_trim``
    hands it back first so that the baseline is the live memory (model, inputs).
    """

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc: figures include retained memory
            self.trim = lambda pad: None

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        gc.collect()
        self.trim(0)
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.base


class PeakCUDA:
    def __enter__(self):
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.bytes = torch.cuda.max_memory_allocated() - self.base


def timed(fn, device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(m: int, k: int, n: int, device, dtype, repeats: int) -> float:
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    a @ b  # warm-up
    return 2 * m * k * n / timed(lambda: a @ b, device, repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384], help="video tokens F*h*w")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--clip-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings (after one warm-up)")
    parser.add_argument("--no-backward-above", type=int, default=None, help="skip fwd+bwd above this many tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    diffusers_logging.set_verbosity_error()  # diffusers 0.42 warns on every ModelMixin.to(dtype)
    cfg = build_config(args.hidden, args.layers, args.heads)
    model = HunyuanTransformer3DModel(**cfg).to(device, dtype)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()  # fwd+bwd then also re-runs each block's forward (not in GFLOP/step)
    params = sum(p.numel() for p in model.parameters())
    peak_meter = PeakCUDA if device.type == "cuda" else PeakRSS
    print(
        f"HunyuanTransformer3DModel InP: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
        f"{params / 1e6:.1f} M params, batch {args.batch}, text 333 + CLIP {args.clip_tokens} tokens, {args.dtype} "
        f"on {device} ({torch.get_num_threads()} CPU threads), gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}. Shared machines give noisy figures."
    )

    # Check the analytic matmul count against torch's FLOP counter on the smallest case.
    frames, side = video_shape(min(args.tokens))
    inputs = make_inputs(cfg, args.batch, frames, side, args.clip_tokens, device, dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    counted = counter.get_total_flops()
    if device.type == "cuda":  # CUDA SDPA kernels are counted too
        counted -= attention_flops(cfg, args.batch, frames * side * side)
    formula = linear_flops(cfg, args.batch, frames, side, args.clip_tokens)
    print(f"FLOP formula check ({min(args.tokens)} tokens, non-attention): formula {formula / 1e9:.4f} G, "
          f"torch FlopCounterMode {counted / 1e9:.4f} G")

    header = (f"{'tokens':>7} {'F x h x w':>12} {'fwd s':>8} {'fwd+bwd s':>10} {'GFLOP/step':>11} {'fwd GFLOP/s':>12} "
              f"{'f+b GFLOP/s':>12} {'fwd peak MiB':>13} {'f+b peak MiB':>13} {'f+b MiB/1k tok':>15}")
    print(header)
    print("-" * len(header))
    largest = None
    for tokens in args.tokens:
        frames, side = video_shape(tokens)
        inputs = make_inputs(cfg, args.batch, frames, side, args.clip_tokens, device, dtype)
        flops = linear_flops(cfg, args.batch, frames, side, args.clip_tokens) + attention_flops(cfg, args.batch, tokens)

        model.eval()
        with torch.no_grad():
            model(**inputs)  # warm-up
            with peak_meter() as fwd_mem:
                fwd_s = timed(lambda: model(**inputs), device, args.repeats)

        bwd_s = bwd_mem = None
        if args.no_backward_above is None or tokens <= args.no_backward_above:
            model.train()

            def step():
                model.zero_grad(set_to_none=True)
                model(**inputs).sample.float().square().mean().backward()

            with peak_meter() as mem:
                bwd_s = timed(step, device, args.repeats)
            bwd_mem = mem.bytes
            model.zero_grad(set_to_none=True)

        mib = 2**20
        cells = [
            f"{tokens:>7}", f"{f'{frames}x{side}x{side}':>12}", f"{fwd_s:>8.2f}",
            f"{bwd_s:>10.2f}" if bwd_s else f"{'-':>10}", f"{flops / 1e9:>11.1f}", f"{flops / fwd_s / 1e9:>12.1f}",
            f"{3 * flops / bwd_s / 1e9:>12.1f}" if bwd_s else f"{'-':>12}", f"{fwd_mem.bytes / mib:>13.0f}",
            f"{bwd_mem / mib:>13.0f}" if bwd_mem else f"{'-':>13}",
            f"{bwd_mem / mib / (tokens / 1024):>15.0f}" if bwd_mem else f"{'-':>15}",
        ]
        print(" ".join(cells), flush=True)
        largest = (tokens, flops / fwd_s / 1e9)

    tokens, achieved = largest
    ff = int(args.hidden * 4.3637)
    ref = matmul_gflops(args.batch * tokens, args.hidden, ff, device, dtype, max(args.repeats, 3))
    explicit = args.batch * args.heads * tokens * tokens * torch.finfo(dtype).bits // 8 / 2**20
    print(
        f"plain {args.dtype} matmul ({args.batch * tokens} x {args.hidden}) @ ({args.hidden} x {ff}): {ref:.1f} GFLOP/s; "
        f"forward at {tokens} tokens reaches {achieved:.1f} GFLOP/s = {100 * achieved / ref:.0f}% of it.\n"
        f"(an explicit N x N attention matrix at {tokens} tokens would take {explicit:.0f} MiB per attention call)"
    )


if __name__ == "__main__":
    main()
