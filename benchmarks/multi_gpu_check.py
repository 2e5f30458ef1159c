"""One-shot check of sequence parallelism on several GPUs: parity with one GPU and speed, for every degree.

    torchrun --nproc_per_node N -m benchmarks.multi_gpu_check --json multi_gpu.json    # N = 2..8 GPUs (NCCL)
    torchrun --nproc_per_node 2 -m benchmarks.multi_gpu_check --dry-run                # the same code on CPUs (gloo)

Every process builds the same random-weight transformer (seed 0; by default the released sizes: hidden 1408, 40
layers, 16 heads, ``--layers`` cuts depth) and the same inputs: one guidance batch of 2 rows at ``--size`` (384x672)
and ``--frames`` (49), in the compute dtype (bf16 on CUDA). Rank 0 prints one table and writes ``--json`` after every
row (a crash leaves the rows so far). Rows:

* **setup**: the model and inputs, with a checksum per rank (different weights on different GPUs would void every
  parity row; they are then broadcast from rank 0).
* **reference**: rank 0 alone (no sequence parallelism) at the main size and at a size whose token count no tested
  degree divides (the padding case): in fp32 with TF32 off, and in the compute dtype. The compute-dtype row's error
  against fp32 is the *yardstick*: how far bf16 rounding alone moves this model's output.
* **speed, 1 GPU**: rank 0's median seconds per transformer step (one call on the 2 rows; conditioning prepared once,
  as the pipeline does).
* **parity / speed, per degree**: for every ``ulysses x ring`` whose product divides N (ulysses-only first, then ring
  combinations such as 2x2 on 4 GPUs; largest degree first): the output against rank 0's single-GPU output (max abs
  and relative RMS error), then the median seconds per step, speedup, achieved TFLOP/s per GPU (the FLOP count of
  ``benchmarks/bench_parallel.py``), the bytes each rank sends per step in the all-to-alls (and ring passes) and the
  final gather (:class:`~easyanimate.models.sequence_parallel.CommStats`), and the bandwidth achieved in them (those
  bytes over the seconds spent in the collectives during one extra step with every collective synchronised, which
  includes waiting for the slowest rank; for ring rows it also includes the ring's attention compute, so it is a lower
  bound). Peak GPU memory of every rank. Ulysses-only degrees are also run at the padding size (parity), and ring at
  that size must refuse with its "needs the token count to divide" error.

Degrees equal to N use the project's ``setup_sequence_parallel`` + ``enable_sequence_parallel`` exactly as a
``torchrun ... --ulysses-degree`` launch does. Smaller degrees run on ranks ``0 .. d-1`` (the others wait):
``enable_sequence_parallel`` insists on the whole launch (``dist.group.WORLD``), so :func:`attach` builds the same
state (:class:`SequenceParallel`, its attention processors, yunchang's groups for ``d`` of N ranks) on a sub-group.

Tolerance. fp32 (the dry run): max abs error <= 1e-5, as ``tests/test_sequence_parallel.py``. bf16 / fp16: the
relative RMS error against the single-GPU output in the same dtype must stay within ``2 x`` the yardstick (floor
2^-8, one bf16 rounding step): a parallel run changes only the order and the kernels of some sums (matmuls on fewer
tokens, attention over a subset of heads, the padding mask, the ring's log-sum-exp merge), each by about one rounding
of the dtype, while the yardstick holds every rounding of the whole forward; if both outputs carry independent
rounding noise of the yardstick's size their difference is ~1.4x it. Max abs error is reported (with the yardstick's)
but not judged: it is one element of millions and scales with the random weights. Without a yardstick (its row
skipped) gpu_check's bf16 transformer tolerance (0.03) is used.

``--dry-run``: CPUs over gloo, a tiny model of the same architecture (hidden 64, 2 layers, 4 heads), 64x96x9 (and
48x80x9 for the padding), in the CPU's compute dtype (``EASYANIMATE_CPU_DTYPE``; fp32 in the test). Ring rows are
skipped with the project's reason (CUDA only); the ring's refusal of a padded count comes before any ring kernel, so
that row runs there too. What only runs on GPUs: NCCL, the ring kernels, the yardstick in bf16 on a GPU, TF32 and
peak-memory figures.

Guards: every row runs on every rank and the ranks agree on its outcome (``ControlChannel.run_together``): an error
or out-of-memory becomes the row's status and the next row runs; rank 0 decides the time budget (``--budget-s``,
default 420 s) for all. What no guard can catch: a rank that fails *inside* a collective leaves the others waiting
in NCCL until ``EASYANIMATE_DIST_TIMEOUT_S`` (set to 180 s here unless given), when torch ends the launch; the JSON
then holds the rows before it.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_parallel import RELEASED, all_to_all_bytes, step_flops  # noqa: E402
from benchmarks.gpu_check import (  # noqa: E402
    BF16_TOLERANCES, Sizes, environment, fp32_exact, max_abs, peak_gib, random_weights_, relative_rms, reset_memory,
    step_inputs, synchronize)

FP32_TOLERANCE = 1e-5  # max abs, as tests/test_sequence_parallel.py
YARDSTICK_FACTOR = 2.0  # parallel relative RMS error <= this x (bf16 vs fp32 on one GPU)
BF16_FLOOR = 2.0 ** -8  # one bf16 rounding step: the least a 16-bit tolerance can be
TIMESTEP = 500.0  # exact in bf16, so the fp32 reference sees the same timestep
DEFAULT_TIMEOUT_S = "180"  # a rank stuck in a collective ends the launch after this (unless the variable is set)
DRY_RUN_MODEL = dict(hidden=64, layers=2, heads=4)


# ------------------------------------------------------------------------------------------------ rows and guards


@dataclass
class Row:
    """One line of the table. ``status``: ok, FAIL (outside tolerance), OOM, error or skipped."""

    section: str  # setup, reference, parity, speed
    name: str
    case: str = "main"  # main size, or "padded" (a token count no tested degree divides)
    gpus: int = 1
    ulysses: int | None = None
    ring: int | None = None
    status: str = "ok"
    tokens: int | None = None  # video tokens per row
    max_abs: float | None = None
    rel_rms: float | None = None
    tolerance: float | None = None  # on max_abs (fp32) or rel_rms (16-bit)
    seconds: float | None = None  # median seconds per step (speed); run time (setup, reference)
    speedup: float | None = None
    tflops_per_gpu: float | None = None
    all_to_all_bytes: int | None = None  # per rank and step (ring rows: the ring's k/v passes too)
    gather_bytes: int | None = None
    comm_seconds: float | None = None  # seconds in collectives during one synchronised step (rank 0)
    bandwidth_gbs: float | None = None  # (all-to-all + gather bytes) / comm_seconds, rank 0
    peak_gib: list | None = None  # per rank (None on CPUs)
    per_rank: list | None = None
    note: str = ""


@dataclass
class MultiCheck:
    """Runs rows on every rank under one time budget; rank 0 keeps, prints and writes them."""

    channel: object  # easyanimate.inference.distributed.ControlChannel
    device: torch.device
    budget_s: float
    json_path: Path | None
    header: dict
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    broken: str | None = None  # set when a collective failed: later rows are not run
    t1: float | None = None  # rank 0: one step on one GPU, for the estimates

    @property
    def leader(self) -> bool:
        return self.channel.rank == 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def scaled(self, seconds: float) -> float:
        """A fixed cost estimated for a GPU (model build, NCCL set-up); CPUs (the dry run) take it as 1 s."""
        return seconds if self.device.type == "cuda" else 1.0

    def step_estimate(self, gpus: int) -> float:
        return (self.t1 if self.t1 is not None else self.scaled(3.0)) / gpus

    def skip(self, section: str, name: str, reason: str, **fields) -> Row:
        return self._keep(Row(section, name, status="skipped", note=reason, **fields))

    def run(self, section: str, name: str, body: Callable[[Row], object], *, estimate: Callable[[], float],
            finish: Callable[[Row, list], None] | None = None, **fields) -> Row:
        """``body(row)`` on every rank (rank 0's fills ``row``; each returns its picklable figures), unless rank 0
        finds the budget cannot take ``estimate()`` more seconds. The ranks agree on the outcome; then rank 0 gets
        every rank's figures and peak memory for ``finish(row, figures)``."""
        row = Row(section, name, **fields)
        if self.broken:
            row.status, row.note = "skipped", f"not run: {self.broken}"
            return self._keep(row)
        over = self.channel.share(self.elapsed() + estimate() > self.budget_s if self.leader else None)
        if over:
            row.status, row.note = "skipped", f"time budget ({self.budget_s:.0f} s) would be exceeded"
            return self._keep(row)
        reset_memory(self.device)
        try:
            result = self.channel.run_together(lambda: self._guarded(body, row))
            gathered = self.channel.gather((result, peak_gib(self.device)))
            if self.leader:
                row.peak_gib = [None if p is None else round(p, 3) for _, p in gathered]
                if finish is not None:
                    finish(row, [r for r, _ in gathered])
        except Exception as exc:  # noqa: BLE001 - every failure is a row, the next row still runs
            from easyanimate.inference.distributed import ProcessesOutOfStep
            from easyanimate.inference.loading import OUT_OF_MEMORY_ERRORS

            out_of_memory = isinstance(exc, OUT_OF_MEMORY_ERRORS) or "OutOfMemoryError" in str(exc)
            row.status = "OOM" if out_of_memory else "error"
            row.note = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            if isinstance(exc, ProcessesOutOfStep):
                self.broken = f"a collective failed in row {section} {name!r}"
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self._keep(row)

    def _guarded(self, body, row):
        try:
            return body(row)
        except Exception:
            print(f"[rank {self.channel.rank}] {row.section} {row.name}:", file=sys.stderr)
            traceback.print_exc(limit=4)
            raise

    def _keep(self, row: Row) -> Row:
        if self.leader:
            self.rows.append(row)
            print(format_row(row), flush=True)
            self.write()
        return row

    def write(self) -> None:
        if self.json_path is None:
            return
        result = {**self.header, "seconds": round(self.elapsed(), 1), "rows": [asdict(r) for r in self.rows]}
        partial = self.json_path.with_name(self.json_path.name + ".part")
        partial.write_text(json.dumps(result, indent=1) + "\n")
        partial.replace(self.json_path)


def _fmt(value, spec: str) -> str:
    """``value`` in ``spec`` (width first, e.g. "9.2e"), or a "-" as wide."""
    width = int(spec.split(".")[0].rstrip("de") or 0)
    return "-".rjust(width) if value is None else format(value, spec)


HEADER = (f"{'section':9} {'check':30} {'status':7} {'tokens':>6} {'max abs':>9} {'rel RMS':>9} {'tol':>8} "
          f"{'s/step':>8} {'speedup':>7} {'TFLOP/s':>7} {'A2A MB':>8} {'GB/s':>7} {'GiB max':>7}  note")


def format_row(row: Row) -> str:
    peak = max((p for p in row.peak_gib or [] if p is not None), default=None)
    mb = None if row.all_to_all_bytes is None else row.all_to_all_bytes / 1e6
    return (f"{row.section:9} {row.name[:30]:30} {row.status:7} {_fmt(row.tokens, '6d')} {_fmt(row.max_abs, '9.2e')} "
            f"{_fmt(row.rel_rms, '9.2e')} {_fmt(row.tolerance, '8.1e')} {_fmt(row.seconds, '8.3f')} "
            f"{_fmt(row.speedup, '7.2f')} {_fmt(row.tflops_per_gpu, '7.1f')} {_fmt(mb, '8.1f')} "
            f"{_fmt(row.bandwidth_gbs, '7.1f')} {_fmt(peak, '7.2f')}  {row.note}")


# ------------------------------------------------------------------------------------------------ model and inputs


@dataclass
class Case:
    """One input size: the same inputs on every rank (compute dtype) and, on rank 0, the single-GPU outputs."""

    label: str
    height: int
    width: int
    frames: int
    latent_frames: int
    inputs: dict | None = None
    conditioning: dict = field(default_factory=dict)  # per dtype, prepared once
    reference: torch.Tensor | None = None  # rank 0: one GPU, compute dtype (as fp32 on the CPU)
    fp32: torch.Tensor | None = None  # rank 0: one GPU, fp32, TF32 off
    tolerance: float | None = None  # rank 0: for the relative RMS error of 16-bit parallel rows
    tolerance_note: str = ""

    @property
    def tokens(self) -> int:
        return self.latent_frames * (self.height // 16) * (self.width // 16)


def model_config(args) -> tuple[dict, dict]:
    """``(kwargs for HunyuanTransformer3DModel, the same sizes as bench_parallel's FLOP-count dict)``: the released
    InP transformer (the class's defaults) with ``--layers``; the dry run's tiny width through bench_transformer's
    ``build_config`` (the released architecture, narrower)."""
    if args.dry_run:
        from benchmarks.bench_transformer import build_config

        hidden, heads = DRY_RUN_MODEL["hidden"], DRY_RUN_MODEL["heads"]
        config = build_config(hidden, args.layers, heads)
        flops = dict(RELEASED, hidden=hidden, layers=args.layers, heads=heads, ff_inner=int(hidden * 4.3637))
        return config, flops
    return dict(num_layers=args.layers), dict(RELEASED, layers=args.layers)


@functools.lru_cache(maxsize=None)
def meta_vae():
    """The released V4 VAE on the meta device (no memory): what turns pixel frames into latent frames."""
    from easyanimate.models.vae import AutoencoderKLMagvit

    with torch.device("meta"):
        return AutoencoderKLMagvit.from_config({})


def latent_frames_of(frames: int) -> int:
    return meta_vae().num_latent_frames(frames)


def padded_case(height: int, width: int, frames: int, degrees: list[int]) -> tuple[int, int, int]:
    """A size near ``height x width x frames`` whose token count no degree in ``degrees`` divides (Ulysses pads it,
    ring must refuse it): 384x672x49 -> 368x656x49 (13 x 23 x 41 tokens)."""
    for frame_cut in (0, 4, 8):
        for cut in range(8):
            for dh in range(cut + 1):
                h, w, f = height - 16 * dh, width - 16 * (cut - dh), frames - frame_cut
                if min(h, w) < 16 or f < 1:
                    continue
                tokens = latent_frames_of(f) * (h // 16) * (w // 16)
                if all(tokens % d for d in degrees):
                    return h, w, f
    raise SystemExit(f"no size near {height}x{width}x{frames} has a token count that none of {degrees} divides")


def make_inputs(model, case: Case, device: torch.device, dtype: torch.dtype) -> dict:
    """gpu_check's step inputs (2 rows: latents, inpaint latents, text / CLIP conditioning), seeded on the device."""
    sizes = Sizes(case.height, case.width, (case.frames,), {}, {}, timed_steps=1, golden_subset=False,
                  compile_backend="")
    return step_inputs(model, meta_vae(), sizes, case.frames, device, dtype)


def _cast(value, dtype: torch.dtype | None):
    if dtype is not None and torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    return value


def stepper(model, case: Case, dtype: torch.dtype | None = None) -> Callable[[], torch.Tensor]:
    """One transformer step on ``case``'s inputs (cast to ``dtype`` when given: the fp32 reference); the step's
    conditioning (text, CLIP, RoPE) is prepared once per dtype, as a generation does."""
    inputs = case.inputs
    latents, inpaint = _cast(inputs["latents"], dtype), _cast(inputs["inpaint_latents"], dtype)
    key = str(latents.dtype)
    if key not in case.conditioning:
        with torch.no_grad():
            case.conditioning[key] = model.prepare_conditioning(
                **{k: _cast(v, dtype) for k, v in inputs["conditioning"].items()},
                latent_shape=(latents.shape[0], *latents.shape[2:]))
    conditioning = case.conditioning[key]
    timestep = torch.full((latents.shape[0],), TIMESTEP, device=latents.device, dtype=latents.dtype)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(latents, timestep, conditioning=conditioning, inpaint_latents=inpaint).sample

    return step


def fingerprint(model, cases: list[Case]) -> list[float]:
    """Sums of every weight and input in float64: equal on every rank when all built the same."""
    sums = [p.detach().double().sum() for p in model.parameters()]
    for case in cases:
        sums += [t.double().sum() for t in _tensors(case.inputs)]
    return torch.stack(sums).cpu().tolist()


def _tensors(inputs: dict) -> list[torch.Tensor]:
    return [v for v in inputs.values() if torch.is_tensor(v)] + [
        v for v in inputs["conditioning"].values() if torch.is_tensor(v)]


# ------------------------------------------------------------------------------------------------ parallel set-up


def attach(model, ulysses: int, ring: int, device: torch.device, subgroups: dict):
    """Turn on ``ulysses x ring`` sequence parallelism on ``model``; the state, or None on a rank that sits this
    degree out. Every rank calls it (group creation is collective). The whole launch: the project's
    ``setup_sequence_parallel`` + ``enable_sequence_parallel``. A degree ``d`` below the launch's N: yunchang's groups
    for ``d``-rank replicas (the first replica, ranks ``0 .. d-1``, runs) and ``enable_sequence_parallel`` on a
    ``d``-rank group."""
    import torch.distributed as dist
    from yunchang import set_seq_parallel_pg
    from yunchang.globals import PROCESS_GROUP

    from easyanimate.inference.distributed import setup_sequence_parallel
    from easyanimate.models.sequence_parallel import check_heads, enable_sequence_parallel

    check_heads(int(model.config.num_attention_heads), ulysses)  # the same on every rank: raised before any group
    degree, rank, world = ulysses * ring, dist.get_rank(), dist.get_world_size()
    if degree == world:
        setup_sequence_parallel(ulysses, ring, device)
        return enable_sequence_parallel(model, ulysses, ring)
    if (ulysses, ring) not in subgroups:
        set_seq_parallel_pg(ulysses, ring, rank, world)
        if degree not in subgroups:
            subgroups[degree] = dist.new_group(list(range(degree)))
        subgroups[(ulysses, ring)] = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = subgroups[(ulysses, ring)]  # read by yunchang's ring layer
    PROCESS_GROUP.easyanimate_degrees = None  # setup_sequence_parallel must make the whole-launch groups again
    if rank >= degree:
        return None
    return enable_sequence_parallel(model, ulysses, ring, group=subgroups[degree])


def group_barrier(group, device: torch.device) -> None:
    """All ranks of ``group`` start the next step together (an all-reduce: works the same on NCCL and gloo)."""
    import torch.distributed as dist

    flag = torch.zeros(1, device=device)
    dist.all_reduce(flag, group=group)
    synchronize(device)


def median_step(step, steps: int, device: torch.device, group=None) -> float:
    seconds = []
    for _ in range(steps):
        if group is not None:
            group_barrier(group, device)
        began = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def parallel_configs(world: int) -> list[tuple[int, int]]:
    """``(ulysses, ring)`` for every degree ``d >= 2`` dividing the launch, largest first; within a degree
    Ulysses alone, then ring 2, 4, ..."""
    configs = []
    for degree in sorted((d for d in range(2, world + 1) if world % d == 0), reverse=True):
        for ring in (r for r in range(1, degree + 1) if degree % r == 0):
            configs.append((degree // ring, ring))
    return configs


def refusal(heads: int, ulysses: int, ring: int, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``ulysses x ring`` cannot run here (the project's own checks), or None."""
    from easyanimate.models.sequence_parallel import SequenceParallelError, check_heads, check_ring_support

    try:
        check_heads(heads, ulysses)
        if ring > 1:
            check_ring_support(device.type, dtype)
    except SequenceParallelError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------------ the rows


def judge(row: Row, got: torch.Tensor, case: Case, dtype: torch.dtype) -> None:
    """Rank 0: the parallel output against the single-GPU one (see the module docstring for the tolerance)."""
    if case.reference is None:
        row.status, row.note = "error", "no single-GPU reference (its row did not run)"
        return
    got = got.float().cpu()
    row.max_abs, row.rel_rms = max_abs(got, case.reference), relative_rms(got, case.reference)
    if not torch.isfinite(got).all():
        row.status, row.note = "FAIL", "non-finite values in the output"
        return
    if dtype == torch.float32:
        row.tolerance = FP32_TOLERANCE
        row.status = "ok" if row.max_abs <= FP32_TOLERANCE else "FAIL"
        row.note = "fp32: judged on max abs"
        return
    row.tolerance = case.tolerance
    row.status = "ok" if row.rel_rms <= case.tolerance else "FAIL"
    against = "" if case.fp32 is None else f"; vs fp32 rel RMS {relative_rms(got, case.fp32):.2e}"
    row.note = f"judged on rel RMS ({case.tolerance_note}){against}"


def run_check(args, check: MultiCheck, device: torch.device, dtype: torch.dtype) -> None:
    import torch.distributed as dist

    from easyanimate.models.sequence_parallel import SequenceParallelError, disable_sequence_parallel
    from easyanimate.models.transformer import HunyuanTransformer3DModel

    rank, world = dist.get_rank(), dist.get_world_size()
    config, flops_config = model_config(args)
    heads = int(config.get("num_attention_heads", RELEASED["heads"]))
    configs = parallel_configs(world)
    height, width = args.size
    main = Case(f"{height}x{width}x{args.frames}", height, width, args.frames, latent_frames_of(args.frames))
    ph, pw, pf = padded_case(height, width, args.frames, sorted({u * r for u, r in configs}))
    padded = Case(f"{ph}x{pw}x{pf}", ph, pw, pf, latent_frames_of(pf))
    cases = (main, padded)
    state: dict = {}
    sixteen_bit = dtype != torch.float32
    one = "1 GPU" if device.type == "cuda" else "1 process"

    # ---- setup: model and inputs on every rank, checked equal
    def build(row: Row):
        began = time.perf_counter()
        with torch.device(device):
            model = HunyuanTransformer3DModel(**config).eval()
        random_weights_(model)  # fp32 first: the fp32 reference, then rounded once to the compute dtype
        for case in cases:
            case.inputs = make_inputs(model, case, device, dtype)
        state["model"] = model
        row.seconds = time.perf_counter() - began
        cfg = model.config
        row.note = (f"hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_attention_heads} heads, "
                    f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} G params; {_dtype_name(dtype)}; "
                    f"cases {main.label} ({main.tokens} tokens), {padded.label} ({padded.tokens} tokens, padding)")
        return fingerprint(model, cases)

    def compare_builds(row: Row, prints: list) -> None:
        state["same"] = all(p == prints[0] for p in prints)
        if not state["same"]:
            row.status = "FAIL"
            row.note += "; weights or inputs differ between ranks: broadcast from rank 0"

    setup = check.run("setup", f"random weights, {world} ranks", build, estimate=lambda: check.scaled(40),
                      finish=compare_builds)
    if setup.status in ("error", "OOM", "skipped"):  # set alike on every rank (FAIL is rank 0's verdict only)
        return
    if not check.channel.share(state.get("same") if check.leader else None):
        def broadcast(row: Row) -> None:
            row.note = "weights, buffers and inputs"
            for tensor in [*state["model"].parameters(), *state["model"].buffers()] + [
                    t for case in cases for t in _tensors(case.inputs)]:
                dist.broadcast(tensor.data, 0)

        check.run("setup", "broadcast weights from rank 0", broadcast, estimate=lambda: check.scaled(60))
    model = state["model"]

    # ---- references on rank 0: fp32 (TF32 off), then the compute dtype; the yardstick is their difference
    if sixteen_bit:
        for case in cases:
            def fp32_reference(row: Row, case=case) -> None:
                if rank != 0:
                    return
                previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
                fp32_exact(True)
                try:
                    began = time.perf_counter()
                    case.fp32 = stepper(model, case, torch.float32)().float().cpu()
                    row.seconds = time.perf_counter() - began
                finally:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
                    case.conditioning.clear()

            check.run("reference", f"{one} fp32 {case.label}", fp32_reference, case=_case_name(case, main),
                      tokens=case.tokens, estimate=lambda: check.scaled(60), note="TF32 off")
        model.to(dtype)
    for case in cases:
        def reference(row: Row, case=case) -> None:
            if rank != 0:
                return
            step = stepper(model, case)
            step()  # warm-up (kernel selection)
            synchronize(device)
            began = time.perf_counter()
            case.reference = step().float().cpu()
            synchronize(device)
            row.seconds = time.perf_counter() - began
            if case is main:
                check.t1 = row.seconds
            if not sixteen_bit:
                row.note = f"fp32: parallel rows judged on max abs <= {FP32_TOLERANCE:g}"
            elif case.fp32 is None:
                case.tolerance = BF16_TOLERANCES["transformer"]
                case.tolerance_note = "no fp32 yardstick: gpu_check's bf16 transformer tolerance"
                row.note = case.tolerance_note
            else:
                row.max_abs, row.rel_rms = max_abs(case.reference, case.fp32), relative_rms(case.reference, case.fp32)
                case.tolerance = max(YARDSTICK_FACTOR * row.rel_rms, BF16_FLOOR)
                row.tolerance = case.tolerance
                case.tolerance_note = f"{YARDSTICK_FACTOR:g} x yardstick {row.rel_rms:.2e}, floor 2^-8"
                row.note = (f"yardstick: {_dtype_name(dtype)} vs fp32, both on {one}; parallel rows allowed "
                            f"{YARDSTICK_FACTOR:g}x")

        check.run("reference", f"{one} {_dtype_name(dtype)} {case.label}", reference, case=_case_name(case, main),
                  tokens=case.tokens, estimate=lambda: check.scaled(30))

    flops = step_flops(flops_config, 2, main.tokens)

    def one_gpu(row: Row):
        if rank != 0:
            return None
        step = stepper(model, main)
        step()
        return median_step(step, args.steps, device)

    def one_gpu_figures(row: Row, figures: list) -> None:
        row.seconds = figures[0]
        check.t1 = row.seconds
        row.speedup, row.tflops_per_gpu = 1.0, flops / row.seconds / 1e12
        row.note = f"median of {args.steps} steps after a warm-up; 2 rows"

    check.run("speed", one, one_gpu, tokens=main.tokens, estimate=lambda: (args.steps + 1) * check.step_estimate(1),
              finish=one_gpu_figures)

    # ---- every degree: parity at the main size, speed, parity at the padding size (Ulysses alone)
    subgroups: dict = {}
    for ulysses, ring in configs:
        degree = ulysses * ring
        name = f"ulysses {ulysses} x ring {ring}"
        fields = dict(gpus=degree, ulysses=ulysses, ring=ring, tokens=main.tokens)
        reason = refusal(heads, ulysses, ring, device, dtype)
        if reason is not None:
            check.skip("parity", name, reason, **fields)
            check.skip("speed", name, reason, **fields)
            continue
        attached: dict = {}

        def enabled():
            if "parallel" not in attached:
                attached["parallel"] = attach(model, ulysses, ring, device, subgroups)
            return attached["parallel"]

        def parity(row: Row, case: Case) -> None:
            parallel = enabled()
            if parallel is None:
                return
            out = stepper(model, case)()
            if rank == 0:
                judge(row, out, case, dtype)
                shard = parallel.current
                if shard.padded != shard.tokens:
                    row.note = f"{shard.tokens} tokens padded to {shard.padded}; " + row.note
                if ring > 1:
                    row.note += f"; ring kernel {_ring_kernel(device, dtype)}"

        def speed(row: Row):
            parallel = enabled()
            if parallel is None:
                return None
            step = stepper(model, main)
            step()  # warm-up
            stats = parallel.stats
            stats.reset()
            stats.timing = False
            seconds = median_step(step, args.steps, device, parallel.group)
            figures = dict(rank=rank, seconds=seconds, all_to_all_bytes=stats.all_to_all_bytes // args.steps,
                           gather_bytes=stats.gather_bytes // args.steps)
            stats.reset()
            stats.timing = True  # one more step with every collective synchronised: the time spent in them
            try:
                group_barrier(parallel.group, device)
                began = time.perf_counter()
                step()
                synchronize(device)
                figures.update(instrumented_seconds=time.perf_counter() - began, comm_seconds=stats.seconds)
            finally:
                stats.timing = False
            return figures

        def speed_figures(row: Row, figures: list, ulysses=ulysses, ring=ring, degree=degree) -> None:
            ours = figures[0]
            row.per_rank = [f for f in figures if f is not None]
            row.seconds = ours["seconds"]
            row.all_to_all_bytes, row.gather_bytes = ours["all_to_all_bytes"], ours["gather_bytes"]
            row.comm_seconds = ours["comm_seconds"]
            row.tflops_per_gpu = flops / degree / row.seconds / 1e12
            if check.t1 is not None:
                row.speedup = check.t1 / row.seconds
            if row.comm_seconds > 0:
                row.bandwidth_gbs = (row.all_to_all_bytes + row.gather_bytes) / row.comm_seconds / 1e9
            share = row.comm_seconds / ours["instrumented_seconds"]
            slowest = max(f["seconds"] for f in row.per_rank)
            row.note = (f"collectives {100 * share:.0f}% of a synchronised step; slowest rank {slowest:.3f} s/step"
                        + (f"; efficiency {row.speedup / degree:.2f}" if row.speedup else ""))
            if ring == 1:
                element = torch.tensor([], dtype=dtype).element_size()
                expected = all_to_all_bytes(flops_config["layers"], 2, main.tokens, flops_config["hidden"], degree,
                                            element)
                # (the counter rounds each call's (P-1)/P share down, the formula the step's: a byte per call)
                same = abs(expected - row.all_to_all_bytes) <= 4 * flops_config["layers"]
                row.note += f"; A2A bytes {'=' if same else f'!= {expected} of'} bench_parallel's formula"
            else:
                row.note += "; GB/s includes the ring's attention compute (a lower bound)"

        step_s = lambda d=degree: check.step_estimate(d)  # noqa: E731
        check.run("parity", name, lambda row: parity(row, main), estimate=lambda: 2 * step_s() + check.scaled(15),
                  **fields)
        check.run("speed", name, speed, estimate=lambda: (args.steps + 3) * 1.5 * step_s() + check.scaled(5),
                  finish=speed_figures, **fields)
        if ring == 1:
            check.run("parity", f"{name} padded", lambda row: parity(row, padded), case="padded",
                      estimate=lambda: 2 * step_s() + check.scaled(5), **{**fields, "tokens": padded.tokens})
        disable_sequence_parallel(model)

    # ---- ring attention must refuse a token count it cannot split (before any collective)
    ring_configs = [(u, r) for u, r in configs if r > 1 and u * r == world and heads % u == 0]
    if ring_configs:
        ulysses, ring = ring_configs[0]

        def refuses(row: Row):
            attach(model, ulysses, ring, device, subgroups)
            try:
                stepper(model, padded)()
            except SequenceParallelError as exc:
                return str(exc)
            finally:
                disable_sequence_parallel(model)
            return None

        def refusal_figures(row: Row, messages: list) -> None:
            refused = all(m and "ring attention needs the token count to divide" in m for m in messages)
            row.status = "ok" if refused else "FAIL"
            row.note = ("refused on every rank: " + messages[0]) if refused else f"not refused: {messages}"
            if device.type != "cuda":
                row.note = "checked before any ring kernel, so also on CPUs; " + row.note

        check.run("parity", f"ring refuses padding ({ulysses}x{ring})", refuses, case="padded", gpus=world,
                  ulysses=ulysses, ring=ring, tokens=padded.tokens, estimate=lambda: check.scaled(5),
                  finish=refusal_figures)


def _case_name(case: Case, main: Case) -> str:
    return "main" if case is main else "padded"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _ring_kernel(device: torch.device, dtype: torch.dtype) -> str:
    from easyanimate.models.sequence_parallel import ring_attention_type

    return str(ring_attention_type(device, dtype))


def describe(device: torch.device, world: int) -> dict:
    """gpu_check's environment plus what the collectives ran over."""
    info = environment(device)
    info.update(world_size=world, backend="nccl" if device.type == "cuda" else "gloo")
    try:
        from yunchang.globals import HAS_FLASH_ATTN

        info["flash_attn"] = HAS_FLASH_ATTN
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informational
            pass
        try:  # NVLink or PCIe between the GPUs: what the bandwidth column means
            info["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                                              timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes HEIGHTxWIDTH, e.g. 384x672; got {text!r}") from None
    if height % 16 or width % 16 or height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"--size: height and width must be multiples of 16, >= 32; got {text!r}")
    return height, width


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPUs over gloo, a tiny model (hidden 64, 4 heads), 64x96x9: what the test runs")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (rank 0, after every row)")
    parser.add_argument("--size", type=parse_size, default=None, help="HEIGHTxWIDTH (default 384x672; dry run 64x96)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 49; dry run 9)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 40; dry run 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per speed row (default 3; dry run 2)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip rows that would end after this")
    args = parser.parse_args(argv)
    args.size = args.size or ((64, 96) if args.dry_run else (384, 672))
    args.frames = args.frames or (9 if args.dry_run else 49)
    args.layers = args.layers or (DRY_RUN_MODEL["layers"] if args.dry_run else RELEASED["layers"])
    args.steps = args.steps or (2 if args.dry_run else 3)

    from easyanimate.inference.distributed import (TIMEOUT_ENV, ControlChannel, launched_rank, launched_world_size,
                                                   process_device, shutdown)
    from easyanimate.inference.loading import default_dtype

    world = launched_world_size()
    if world < 2:
        parser.error("launch it with torchrun --nproc_per_node N (N >= 2, one process per GPU), e.g. "
                     "torchrun --nproc_per_node 2 -m benchmarks.multi_gpu_check --dry-run")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU here: --dry-run runs the same code on CPUs over gloo")
        if torch.cuda.device_count() < world:
            parser.error(f"{world} processes but {torch.cuda.device_count()} GPU(s): NCCL needs one GPU per process")
    os.environ.setdefault(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    channel = ControlChannel.connect(world, 1, device)  # the default group (NCCL / gloo) and a gloo control group
    device = process_device(device)
    dtype = default_dtype(device)
    header = {"environment": describe(device, world) if launched_rank() == 0 else {}, "dry_run": args.dry_run,
              "settings": {"size": list(args.size), "frames": args.frames, "layers": args.layers, "steps": args.steps,
                           "dtype": _dtype_name(dtype), "budget_s": args.budget_s, "rows": 2,
                           "yardstick_factor": YARDSTICK_FACTOR, "bf16_floor": BF16_FLOOR,
                           "fp32_tolerance": FP32_TOLERANCE}}
    check = MultiCheck(channel, device, args.budget_s, args.json, header)
    if check.leader:
        print(f"multi_gpu_check: {world} ranks on {header['environment'].get('gpu', device)} "
              f"({header['environment']['backend']}), {_dtype_name(dtype)}{' (dry run)' if args.dry_run else ''}")
        print(HEADER, flush=True)
    try:
        run_check(args, check, device, dtype)
    finally:
        if check.leader:
            failed = [r for r in check.rows if r.status not in ("ok", "skipped")]
            print(f"\n{len(check.rows)} rows in {check.elapsed():.0f} s; {len(failed)} not ok"
                  + (f"; written to {args.json}" if args.json else ""), flush=True)
            check.write()
        shutdown()


if __name__ == "__main__":
    main()
