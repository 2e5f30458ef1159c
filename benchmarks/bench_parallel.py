"""Sequence-parallel transformer steps on this machine (1 and 2 processes), and a model on paper for N GPUs.

    python -m benchmarks.bench_parallel                       # from the repository root: measure, then the model
    python -m benchmarks.bench_parallel --tokens 1024 --steps 2
    python -m benchmarks.bench_parallel --model-only --gpu-tflops 150 --link-gbs 300 25

Measured (CPU, gloo, one torch thread per process, so 2 processes use 2 cores as 2 GPUs would be 2 devices): a
mid-size transformer (hidden 256, 8 heads, 8 layers, the released block) over ``--tokens`` video tokens with 2 CFG
rows, one process with every token versus 2 processes with Ulysses degree 2. Per step: the transformer's seconds
(median), the bytes each process sends in the all-to-alls and in the final gather (counted by
:class:`easyanimate.models.sequence_parallel.CommStats`, and checked against :func:`all_to_all_bytes`), and the
share of the step spent in collectives (including waiting for the other process). Also checks that both give the same
output.

Modelled (on paper, not measured on a GPU): the released transformer's step at a stated achieved GPU throughput and a
stated per-GPU interconnect bandwidth, assuming communication does not overlap compute:
``t_N = flops / (N * throughput) + all_to_all_bytes(N) / bandwidth``, speedup ``t_1 / t_N``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from easyanimate.utils.system import cpu_name

REPO = Path(__file__).resolve().parents[1]

# The released EasyAnimateV4-XL-2-InP transformer.
RELEASED = dict(hidden=1408, layers=40, heads=16, ff_inner=int(1408 * 4.3637), text_tokens=77 + 256, clip_queries=16,
                out_width=2 * 2 * 8)
# (label, latent frames, tokens per frame): 144 frames are 36 latent frames; 384x672 has 24x42 patches.
RELEASED_SIZES = (("384x672, 144 frames", 36, 24 * 42), ("768x1344, 144 frames", 36, 48 * 84))


def all_to_all_bytes(layers: int, rows: int, tokens: int, hidden: int, processes: int, element: int) -> int:
    """Bytes one process sends per transformer step under Ulysses: in every block q, k, v go out and the attention
    output comes back (4 all-to-alls), each of its ``rows x tokens/N x hidden`` values, of which ``(N-1)/N`` leave
    the process."""
    local = rows * -(-tokens // processes) * hidden * element
    return layers * 4 * local * (processes - 1) // processes


def gather_bytes(rows: int, tokens: int, width: int, processes: int, element: int) -> int:
    """Bytes one process sends in the final gather: its ``rows x tokens/N x width`` output to each other process."""
    return rows * -(-tokens // processes) * width * element * (processes - 1)


def step_flops(cfg: dict, rows: int, tokens: int) -> float:
    """Matmul FLOPs of one transformer step: per token and block the q/k/v/out projections of attn1, q/out of the
    text and CLIP cross-attentions, the CLIP gate and the feed-forward; per block the self-attention ``4 T^2 h`` and
    the cross-attentions ``4 T (text + clip) h``. Text and CLIP k/v projections (per row, not per token) are left
    out."""
    h = cfg["hidden"]
    per_token = 2 * (4 * h * h + 2 * h * h + 2 * h * h + 2 * h * h + 2 * h * cfg["ff_inner"])
    attention = 4 * tokens * (tokens + cfg["text_tokens"] + cfg["clip_queries"]) * h
    return cfg["layers"] * rows * (tokens * per_token + attention)


# ------------------------------------------------------------------------------------------- measured on CPU
def bench_config(hidden: int, layers: int, heads: int) -> dict:
    from benchmarks.bench_transformer import build_config

    return build_config(hidden, layers, heads)


def worker(args) -> None:
    """One process of a measurement: builds the seeded transformer and inputs, enables sequence parallelism when
    launched with several processes, times ``args.steps`` steps after one warm-up; rank 0 writes the JSON."""
    from benchmarks.bench_transformer import make_inputs, video_shape
    from easyanimate.inference.distributed import launched_world_size, setup_sequence_parallel
    from easyanimate.models.sequence_parallel import enable_sequence_parallel
    from easyanimate.models.transformer import HunyuanTransformer3DModel

    torch.set_num_threads(args.threads)
    world = launched_world_size()
    cfg = bench_config(args.hidden, args.layers, args.heads)
    torch.manual_seed(0)
    model = HunyuanTransformer3DModel(**cfg).eval()
    frames, side = video_shape(args.tokens)
    inputs = make_inputs(cfg, args.rows, frames, side, 256, "cpu", torch.float32)
    parallel = None
    if world > 1:
        setup_sequence_parallel(world, 1, "cpu")
        parallel = enable_sequence_parallel(model, world)
    latents, inpaint, timestep = (inputs.pop(k) for k in ("hidden_states", "inpaint_latents", "timestep"))
    with torch.no_grad():
        conditioning = model.prepare_conditioning(**inputs, latent_shape=(args.rows, frames, 2 * side, 2 * side))
        step = lambda: model(latents, timestep, inpaint_latents=inpaint, conditioning=conditioning).sample  # noqa
        output = step()  # warm-up
        if parallel is not None:
            parallel.stats.reset()
            parallel.stats.timing = True
        seconds = []
        for _ in range(args.steps):
            if parallel is not None:
                torch.distributed.barrier()  # start together, so waiting for a late start is not counted
            began = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - began)
    stats = parallel.stats if parallel is not None else None
    result = dict(
        processes=world, tokens=args.tokens, rows=args.rows, step_seconds=statistics.median(seconds),
        all_to_all_bytes=stats.all_to_all_bytes // args.steps if stats else 0,
        gather_bytes=stats.gather_bytes // args.steps if stats else 0,
        comm_seconds=stats.seconds / args.steps if stats else 0.0,
        expected_all_to_all_bytes=all_to_all_bytes(args.layers, args.rows, args.tokens, args.hidden, world, 4),
    )
    results = [result]
    if parallel is not None:
        results = [None] * world
        torch.distributed.all_gather_object(results, result)
    if world == 1 or torch.distributed.get_rank() == 0:
        torch.save(output, Path(args.out).with_suffix(".pt"))
        Path(args.out).write_text(json.dumps(results))
    if parallel is not None:
        torch.distributed.destroy_process_group()


def launch(processes: int, args, out: Path) -> list[dict]:
    """Run :func:`worker` in ``processes`` processes with torchrun (gloo); returns each process's figures."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "benchmarks.bench_parallel", "--worker", "--out", str(out), "--tokens", str(args.tokens),
               "--rows", str(args.rows), "--steps", str(args.steps), "--hidden", str(args.hidden), "--layers",
               str(args.layers), "--heads", str(args.heads), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(args.threads),
           "EASYANIMATE_DIST_TIMEOUT_S": "600"}
    subprocess.run(command, cwd=REPO, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def measure(args) -> None:
    cpu = cpu_name()
    print(f"CPU: {cpu}; {os.cpu_count()} cores; torch {torch.__version__}; {args.threads} thread(s) per process")
    print(f"transformer: hidden {args.hidden}, {args.heads} heads, {args.layers} layers; {args.tokens} tokens x "
          f"{args.rows} rows, fp32; median of {args.steps} steps\n")
    print(f"{'processes':>9} {'s/step':>8} {'speedup':>8} {'all-to-all MB/step':>19} {'(formula)':>10} "
          f"{'gather MB/step':>15} {'comm share':>11}")
    with tempfile.TemporaryDirectory() as folder:
        rows, outputs = {}, {}
        for processes in (1, 2):
            figures = launch(processes, args, Path(folder) / f"p{processes}.json")
            outputs[processes] = torch.load(Path(folder) / f"p{processes}.pt")
            rows[processes] = figures
        base = rows[1][0]["step_seconds"]
        for processes, figures in rows.items():
            step = statistics.mean(f["step_seconds"] for f in figures)
            share = statistics.mean(f["comm_seconds"] / f["step_seconds"] for f in figures)
            print(f"{processes:>9} {step:>8.3f} {base / step:>8.2f} {figures[0]['all_to_all_bytes'] / 1e6:>19.2f} "
                  f"{figures[0]['expected_all_to_all_bytes'] / 1e6:>10.2f} {figures[0]['gather_bytes'] / 1e6:>15.3f} "
                  f"{100 * share:>10.1f}%")
        error = (outputs[1] - outputs[2]).abs().max().item()
        print(f"\nmax abs difference of the outputs, 1 vs 2 processes: {error:.2e}")


# ------------------------------------------------------------------------------------------ model on paper
def paper_model(gpu_tflops: float, link_gbs: list[float], element: int = 2, rows: int = 2) -> None:
    """The table of modelled transformer-step times and speedups for the released model (see the module
    docstring)."""
    cfg = RELEASED
    print(f"\nMODEL ON PAPER (not measured): released transformer, bf16, {rows} CFG rows, {gpu_tflops:g} TFLOP/s "
          "achieved per GPU, no compute/communication overlap")
    print(f"{'size':<22} {'GPUs':>4} {'TFLOP/step':>10} {'A2A GB/GPU/step':>16} "
          + " ".join(f"{f'{bw:g} GB/s: s/step (x)':>24}" for bw in link_gbs))
    for label, frames, per_frame in RELEASED_SIZES:
        tokens = frames * per_frame
        flops = step_flops(cfg, rows, tokens)
        single = flops / (gpu_tflops * 1e12)
        for gpus in (1, 2, 4, 8):
            sent = all_to_all_bytes(cfg["layers"], rows, tokens, cfg["hidden"], gpus, element)
            sent += gather_bytes(rows, tokens, cfg["out_width"], gpus, element)
            cells = []
            for bw in link_gbs:
                seconds = single / gpus + sent / (bw * 1e9)
                cells.append(f"{f'{seconds:.2f} ({single / seconds:.2f}x)':>24}")
            print(f"{label:<22} {gpus:>4} {flops / 1e12:>10.0f} {sent / 1e9:>16.2f} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="video tokens per row (a multiple of 256)")
    parser.add_argument("--rows", type=int, default=2, help="rows per step (2: classifier-free guidance)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--model-only", action="store_true", help="print the model on paper only")
    parser.add_argument("--gpu-tflops", type=float, default=150.0,
                        help="achieved bf16 TFLOP/s per GPU for the model (150: about half an A100's peak, which "
                             "reproduces the original's ~30 min for 768x1344x144 at 25 steps)")
    parser.add_argument("--link-gbs", type=float, nargs="+", default=[300.0, 25.0],
                        help="per-GPU interconnect GB/s for the model (300: A100 NVLink per direction; 25: PCIe 4 "
                             "x16 in practice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.model_only:
        measure(args)
    paper_model(args.gpu_tflops, args.link_gbs)


if __name__ == "__main__":
    main()
