"""Sequence parallelism for the V4 transformer: the tokens of one video split across the processes of a launch.

Built on yunchang (xDiT's attention layer): its all-to-all (``SeqAllToAll4D``) for Ulysses and its
``LongContextAttention`` for ring attention. What each process does in one transformer call:

* after patchify, the ``(B, T, hidden)`` tokens of every row are padded at the end to a multiple of the degree
  ``P = ulysses x ring`` and process ``r`` keeps tokens ``[r T'/P, (r+1) T'/P)`` (:class:`TokenShard`);
* every per-token layer (norms, feed-forward, the long skips) runs on those tokens only; the frame-index encoding adds
  each token's *global* frame row, and RoPE uses the token's global row of the table;
* cross-attention to the text and CLIP tokens runs locally: every process holds all of them (they are few);
* self-attention (``attn1``, the only place tokens meet) goes through :class:`SequenceParallelAttnProcessor`: q, k, v
  of the local tokens (qk-norm, RoPE), yunchang's all-to-all to ``(B, T', H/ulysses, d)`` -- every token, some
  heads -- torch's SDPA with the padding masked out of the keys, and the all-to-all back. With ``ring > 1`` yunchang's
  ``LongContextAttention`` does the all-to-all and then passes k, v around the ring (CUDA only, and no padding: its
  kernels take no mask);
* after ``proj_out`` the outputs (``p*p*out_channels`` wide, ~40x narrower than the hidden states) are gathered once,
  so every process returns the whole prediction and the sampler runs identically everywhere.

The step cache decides on the first block's output, which each process holds a slice of:
:meth:`TokenShard.relative_change` all-reduces the sums of ``|change|`` and ``|previous|`` over the real tokens, so
every process computes the same global ratio and takes the same decision (a different decision would leave the
processes waiting in different collectives).

Enable with :func:`enable_sequence_parallel` once ``torch.distributed`` and yunchang's groups are set up
(``easyanimate.inference.distributed.setup_sequence_parallel`` does both).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F


class SequenceParallelError(ValueError):
    """A sequence-parallel setting that cannot work here; the message names the allowed values."""


@dataclass
class CommStats:
    """What one process sent and (with ``timing``) how long it spent in collectives. The all-to-all bytes are this
    process's share that leaves it (``(P-1)/P`` of each tensor); timing synchronises a CUDA device around each
    collective, so leave it off outside measurements."""

    timing: bool = False
    all_to_all_bytes: int = 0
    gather_bytes: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.all_to_all_bytes = self.gather_bytes = self.calls = 0
        self.seconds = 0.0


@dataclass(frozen=True)
class TokenShard:
    """Which tokens of one transformer call this process holds: ``tokens`` real tokens per row (frame-major,
    ``tokens_per_frame`` each), padded to ``padded`` (a multiple of the degree); this process has ``[start, stop)``
    of the padded sequence."""

    tokens: int
    padded: int
    start: int
    stop: int
    tokens_per_frame: int
    group: object = field(default=None, compare=False, repr=False)  # the processes that share the sequence

    @property
    def valid(self) -> int:
        """Real (not padding) tokens among this process's."""
        return max(0, min(self.stop, self.tokens) - self.start)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """This process's tokens of ``x`` ``(B, T, C)`` -> ``(B, stop - start, C)``, zero padding past ``tokens``."""
        if self.padded > self.tokens:
            x = F.pad(x, (0, 0, 0, self.padded - self.tokens))
        return x[:, self.start:self.stop].contiguous()

    def split_rows(self, table: torch.Tensor) -> torch.Tensor:
        """This process's rows of a per-token table ``(T, ...)`` (the RoPE cos / sin), zero rows past ``tokens``."""
        if self.padded > self.tokens:
            table = torch.cat([table, table.new_zeros(self.padded - self.tokens, *table.shape[1:])])
        return table[self.start:self.stop]

    def frame_index(self, device: torch.device | None = None) -> torch.Tensor:
        """The global latent frame of each of this process's tokens ``(stop - start,)``; padding tokens get the
        last frame (any valid row: their outputs are dropped)."""
        positions = torch.arange(self.start, self.stop, device=device).clamp(max=self.tokens - 1)
        return positions // self.tokens_per_frame

    def key_mask(self, device: torch.device) -> torch.Tensor | None:
        """``(1, 1, 1, padded)`` boolean SDPA mask that hides the padding keys, or None when there is none."""
        if self.padded == self.tokens:
            return None
        return (torch.arange(self.padded, device=device) < self.tokens).view(1, 1, 1, -1)

    def gather(self, local: torch.Tensor, stats: CommStats | None = None) -> torch.Tensor:
        """Every process's ``(B, stop - start, C)`` slice joined into ``(B, tokens, C)`` (padding dropped), on every
        process: the one gather at the end of the transformer."""
        local = local.contiguous()
        world = dist.get_world_size(self.group)
        parts = [torch.empty_like(local) for _ in range(world)]
        with _timed(stats, local.device):
            dist.all_gather(parts, local, group=self.group)
        if stats is not None:
            stats.gather_bytes += local.numel() * local.element_size() * (world - 1)
        return torch.cat(parts, dim=1)[:, :self.tokens]

    def relative_change(self, first: torch.Tensor, previous: torch.Tensor) -> float:
        """The step cache's measure over every process's real tokens: ``mean|first - previous| / mean|previous|``
        (as :func:`easyanimate.models.step_cache.relative_change`), from sums all-reduced in float64 so every process
        gets the same value."""
        n = self.valid
        sums = torch.stack([(first[:, :n] - previous[:, :n]).abs().sum(dtype=torch.float64),
                            previous[:, :n].abs().sum(dtype=torch.float64)])
        dist.all_reduce(sums, group=self.group)
        count = first.shape[0] * self.tokens * math.prod(first.shape[2:])
        change, scale = (sums / count).tolist()
        return change / max(scale, 1e-12)


class SequenceParallel:
    """The sequence-parallel state of one transformer: the degrees, this process's place, yunchang's groups, the
    shard of the running forward (set by :meth:`shard` before the blocks run; the attention processors read it) and
    :class:`CommStats`. A plain object, not a module: nothing of it goes into a state dict."""

    def __init__(self, ulysses_degree: int, ring_degree: int, *, rank: int, group, ulysses_group, ring_group):
        self.ulysses_degree, self.ring_degree = ulysses_degree, ring_degree
        self.degree = ulysses_degree * ring_degree
        self.rank, self.group = rank, group
        self.ulysses_group, self.ring_group = ulysses_group, ring_group
        self.current: TokenShard | None = None
        self.stats = CommStats()
        self._ring_attention = None

    def shard(self, tokens: int, tokens_per_frame: int) -> TokenShard:
        """This process's shard of a call with ``tokens`` tokens per row, made the current one. Ring attention
        cannot mask padding, so with ``ring_degree > 1`` ``tokens`` must divide evenly."""
        padded = -(-tokens // self.degree) * self.degree
        if padded != tokens and self.ring_degree > 1:
            raise SequenceParallelError(
                f"ring attention needs the token count to divide by ulysses x ring = {self.degree}, got {tokens} "
                f"tokens ({tokens // tokens_per_frame} latent frames x {tokens_per_frame} per frame); choose a size "
                f"whose (height/16) x (width/16) is a multiple of {self.degree}, or use --ulysses-degree alone")
        size = padded // self.degree
        self.current = TokenShard(tokens, padded, self.rank * size, (self.rank + 1) * size, tokens_per_frame,
                                  self.group)
        return self.current

    def all_to_all(self, x: torch.Tensor, scatter: int, gather: int) -> torch.Tensor:
        """yunchang's Ulysses all-to-all over the Ulysses group: ``scatter=2, gather=1`` takes ``(B, t, H, d)`` to
        ``(B, t * ulysses, H / ulysses, d)``; ``scatter=1, gather=2`` the other way."""
        from yunchang.comm.all_to_all import SeqAllToAll4D

        self.stats.all_to_all_bytes += x.numel() * x.element_size() * (self.ulysses_degree - 1) // self.ulysses_degree
        with _timed(self.stats, x.device):
            return SeqAllToAll4D.apply(self.ulysses_group, x.contiguous(), scatter, gather, False)

    def ring_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """yunchang's ``LongContextAttention`` (Ulysses all-to-all, then the ring) on ``(B, t, H, d)`` tensors."""
        if self._ring_attention is None:
            from yunchang import LongContextAttention

            self._ring_attention = LongContextAttention(ring_impl_type="basic",
                                                        attn_type=ring_attention_type(query.device, query.dtype))
        u = self.ulysses_degree
        ring_bytes = 2 * key.numel() * key.element_size() * (self.ring_degree - 1) // u  # k, v around the ring
        self.stats.all_to_all_bytes += 4 * query.numel() * query.element_size() * (u - 1) // u + ring_bytes
        with _timed(self.stats, query.device):
            return self._ring_attention(query, key, value)


class SequenceParallelAttnProcessor:
    """The self-attention (``attn1``) processor under sequence parallelism: diffusers' ``HunyuanAttnProcessor2_0``
    (qk LayerNorm, RoPE on q and k, SDPA) on this process's tokens, with the attention itself over every process's
    tokens (see the module docstring). ``image_rotary_emb`` holds this process's rows of the RoPE table."""

    def __init__(self, parallel: SequenceParallel):
        self.parallel = parallel

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("SequenceParallelAttnProcessor is for self-attention without a mask (attn1)")
        batch, heads = hidden_states.shape[0], attn.heads
        # Same steps and layout as HunyuanAttnProcessor2_0 up to the attention, so the per-token numbers match it.
        query, key, value = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = key.shape[-1] // heads
        query, key, value = (x.view(batch, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        # (B, H, t, d) -> yunchang's (B, t, H, d)
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        if self.parallel.ring_degree > 1:
            out = self.parallel.ring_attention(query, key, value)
        else:
            out = self._ulysses(query, key, value)
        out = out.reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor

    def _ulysses(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """All tokens for ``H / ulysses`` heads, SDPA with the padding keys masked, and back: ``(B, t, H, d)``."""
        parallel = self.parallel
        query, key, value = (parallel.all_to_all(x, 2, 1).transpose(1, 2) for x in (query, key, value))
        mask = parallel.current.key_mask(query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return parallel.all_to_all(out.transpose(1, 2), 1, 2)


def ring_attention_type(device: torch.device, dtype: torch.dtype):
    """yunchang's attention kernel for ring attention on ``device`` / ``dtype``; :class:`SequenceParallelError` where
    it has none that is correct: on a CPU its ring returns a zero log-sum-exp (wrong results) or calls CUDA-only
    kernels, and its CUDA kernels take fp16 / bf16 only."""
    from yunchang.globals import HAS_FLASH_ATTN
    from yunchang.kernels import AttnType

    check_ring_support(torch.device(device).type, dtype)
    return AttnType.FA if HAS_FLASH_ATTN else AttnType.TORCH_FLASH


def check_ring_support(device_type: str, dtype: torch.dtype | None) -> None:
    """:class:`SequenceParallelError` unless yunchang's ring attention works for this device type and dtype (None:
    not known yet, not checked)."""
    if device_type != "cuda":
        raise SequenceParallelError(
            "ring attention (ring degree > 1) needs CUDA GPUs: yunchang's ring on a CPU computes a zero log-sum-exp "
            "(wrong videos) or calls CUDA-only kernels; on CPUs use --ulysses-degree alone")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        raise SequenceParallelError(
            f"ring attention needs bfloat16 or float16 (yunchang's flash kernels), not {dtype}; use --dtype auto, "
            "bfloat16 or float16, or --ulysses-degree alone")


def check_heads(num_heads: int, ulysses_degree: int) -> None:
    """:class:`SequenceParallelError` unless the Ulysses degree divides the attention heads (each process attends
    with ``heads / ulysses`` of them), naming the degrees that do."""
    if num_heads % ulysses_degree:
        allowed = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise SequenceParallelError(
            f"the Ulysses degree must divide the transformer's {num_heads} attention heads, got {ulysses_degree}; "
            f"allowed: {allowed} (use --ring-degree for the rest on GPUs)")


def enable_sequence_parallel(transformer, ulysses_degree: int, ring_degree: int = 1, *,
                             group: dist.ProcessGroup | None = None) -> SequenceParallel:
    """Split ``transformer``'s tokens across the ``ulysses_degree x ring_degree`` processes of this launch (or of
    ``group``, e.g. a benchmark's sub-group of ranks): every block's ``attn1`` gets a
    :class:`SequenceParallelAttnProcessor` and ``transformer.sequence_parallel`` the state its forward uses. Needs
    ``torch.distributed`` initialised, exactly that many processes in the group and yunchang's groups set for them
    (``yunchang.set_seq_parallel_pg``); returns the state. Weights are untouched, so LoRA merges, fp8 storage and
    offload hooks work as without it."""
    from yunchang.globals import PROCESS_GROUP

    degree = ulysses_degree * ring_degree
    if not dist.is_initialized() or dist.get_world_size(group) != degree:
        raise SequenceParallelError(
            f"sequence parallel over {degree} processes needs torch.distributed initialised with {degree} processes "
            "(launch with torchrun --nproc_per_node N; see easyanimate.inference.distributed)")
    if PROCESS_GROUP.ULYSSES_PG is None:
        raise SequenceParallelError("yunchang's process groups are not set: call yunchang.set_seq_parallel_pg first")
    check_heads(int(transformer.config.num_attention_heads), ulysses_degree)
    group = dist.group.WORLD if group is None else group
    parallel = SequenceParallel(ulysses_degree, ring_degree, rank=dist.get_rank(group), group=group,
                                ulysses_group=PROCESS_GROUP.ULYSSES_PG, ring_group=PROCESS_GROUP.RING_PG)
    for block in transformer.blocks:
        block.attn1.set_processor(SequenceParallelAttnProcessor(parallel))
    transformer.sequence_parallel = parallel
    return parallel


def disable_sequence_parallel(transformer) -> None:
    """Back to one process holding every token (diffusers' Hunyuan processor on every ``attn1``)."""
    from diffusers.models.attention_processor import HunyuanAttnProcessor2_0

    for block in transformer.blocks:
        block.attn1.set_processor(HunyuanAttnProcessor2_0())
    transformer.sequence_parallel = None


class _timed:
    """Adds the seconds of the ``with`` body to ``stats.seconds`` when ``stats.timing`` (synchronising a CUDA
    device first and last, so the collective's own time is measured)."""

    def __init__(self, stats: CommStats | None, device: torch.device):
        self.stats, self.device = stats, device

    def __enter__(self):
        if self.stats is not None:
            self.stats.calls += 1
            if self.stats.timing:
                self._sync()
                self.began = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.stats is not None and self.stats.timing:
            self._sync()
            self.stats.seconds += time.perf_counter() - self.began
        return False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
