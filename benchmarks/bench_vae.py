"""Time and memory of the V4 video VAE: encode and decode seconds and peak memory per clip length.

    python benchmarks/bench_vae.py                         # F = 8 32 64 at 128x128, ch = 32: a few minutes on 2 cores
    python benchmarks/bench_vae.py --widths 128 32         # plus the released width (~1 hour on 2 CPU cores)
    python benchmarks/bench_vae.py --widths 128 --device cuda --frames 8 32 64 144 --size 384

Weights are random (speed and memory do not depend on their values); the block layout is the released one and
``--widths`` sets ``ch`` (128 is the release). Runs in float32 under ``torch.no_grad`` on the CPU, or on CUDA with
``--device cuda``.

How memory is measured: every (width, F, phase) runs in a fresh subprocess, so one measurement cannot inherit
another's allocator state. On the CPU a thread samples, every 2 ms during the call, the bytes glibc malloc has
handed out and not yet freed (``mallinfo2``: in-use heap + mmapped blocks, i.e. the live tensors; torch's CPU
allocator is plain malloc). "peak MB" is the highest sample minus the value just before the call (model and
input already allocated), so it counts the output and every temporary. "RSS MB" is the same difference for the
process's resident set (psutil); it is noisier because malloc keeps freed heap pages. On CUDA "peak MB" is
``torch.cuda.max_memory_allocated`` minus the allocation before the call. "beyond out" subtracts the output
tensor's size: for decoding it should stay flat as F grows, because the chunks are decoded one after another into
a preallocated output and only a two-frame cache per conv is carried between them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _malloc_live_bytes():
    """A function returning the bytes currently allocated through glibc malloc (falls back to the RSS)."""
    import ctypes

    import psutil

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        print("glibc mallinfo2 not available: peak MB falls back to the RSS", file=sys.stderr)
        return lambda: psutil.Process().memory_info().rss
    mallinfo2.restype = MallInfo2

    def live() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return live


def measure(args) -> dict:
    """One measurement (runs in the worker subprocess)."""
    import psutil
    import torch

    from easyanimate.models.vae import AutoencoderKLMagvit

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = AutoencoderKLMagvit(ch=args.width, norm_num_groups=min(32, args.width)).to(device).eval()
    if args.phase == "encode":
        x = torch.rand(1, 3, args.frames, args.size, args.size, device=device) * 2 - 1
        run = lambda: model.encode(x).latent_dist.mean  # noqa: E731
    else:
        latent = model.num_latent_frames(args.frames)
        s = args.size // model.spatial_compression_ratio
        x = torch.randn(1, 4, latent, s, s, device=device)
        run = lambda: model.decode(x).sample  # noqa: E731

    process, stop = psutil.Process(), threading.Event()
    live_bytes = _malloc_live_bytes()
    peak = {"live": 0, "rss": 0}

    def sample():
        while not stop.is_set():
            peak["live"] = max(peak["live"], live_bytes())
            peak["rss"] = max(peak["rss"], process.memory_info().rss)
            time.sleep(0.002)

    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = {"live": live_bytes(), "rss": process.memory_info().rss}
            peak.update(before)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            peak_mb, rss_mb = (torch.cuda.max_memory_allocated() - before) / 2**20, float("nan")
        else:
            stop.set()
            sampler.join()
            peak_mb = (peak["live"] - before["live"]) / 2**20
            rss_mb = (peak["rss"] - before["rss"]) / 2**20
    return {"seconds": seconds, "peak_mb": peak_mb, "rss_mb": rss_mb, "out_mb": out.numel() * out.element_size() / 2**20,
            "out_shape": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 32, 64], help="clip lengths F")
    parser.add_argument("--size", type=int, default=128, help="frame height = width in pixels (multiple of 8)")
    parser.add_argument("--widths", type=int, nargs="+", default=[32],
                        help="base widths ch (release: 128; ~40 s per frame on 2 CPU cores at 128x128)")
    parser.add_argument("--phases", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.frames = args.frames[0]
        print(json.dumps(measure(args)))
        return

    print(f"AutoencoderKLMagvit (V4 cache mode), float32, {args.size}x{args.size}, device {args.device}, "
          f"{args.threads} threads; peak = memory added during the call (see the module docstring)")
    header = (f"{'ch':>4} {'F':>4} {'phase':>7} {'seconds':>8} {'s/frame':>8} {'peak MB':>9} {'out MB':>8} "
              f"{'beyond out':>10} {'RSS MB':>8}")
    print(header)
    print("-" * len(header))
    for width in args.widths:
        for frames in args.frames:
            for phase in args.phases:
                cmd = [sys.executable, __file__, "--worker", "--width", str(width), "--frames", str(frames),
                       "--phase", phase, "--size", str(args.size), "--threads", str(args.threads),
                       "--device", args.device]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode:
                    print(f"{width:>4} {frames:>4} {phase:>7} failed: {result.stderr.strip().splitlines()[-1]}")
                    continue
                r = json.loads(result.stdout.strip().splitlines()[-1])
                print(f"{width:>4} {frames:>4} {phase:>7} {r['seconds']:>8.2f} {r['seconds'] / frames:>8.3f} "
                      f"{r['peak_mb']:>9.1f} {r['out_mb']:>8.1f} {r['peak_mb'] - r['out_mb']:>10.1f} {r['rss_mb']:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
