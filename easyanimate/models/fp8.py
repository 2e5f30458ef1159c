"""fp8 weight storage: the transformer's large Linear weights kept as ``float8_e4m3fn`` and upcast per layer.

:func:`enable_fp8_weights` replaces every large ``nn.Linear`` of a model by an :class:`Fp8Linear` that stores its
weight in one byte per element with one float32 scale per output channel (``weight_scale``), and dequantizes it to
the layer's original dtype inside each forward (``weight.to(dtype) * scale``). Biases, norms, convolutions,
embeddings and the fixed tables stay as they were, so the stored bytes of the released V4 transformer fall by 48.6 %
against bf16 while every forward computes in the original dtype. This is the original's
``model_cpu_offload_and_qfloat8`` memory mode (which used optimum-quanto's qfloat8) done with plain torch.

Why per-channel scales: a scale maps each weight row's largest magnitude near the top of fp8's range (to 224, half
its largest value 448: see :data:`FP8_HEADROOM`), so rows of small weights keep fp8's 3 mantissa bits instead of
sliding into its subnormals. One scale per row costs 4 bytes per
row (0.3 % of a 1408-wide row) and measured better than one scale per tensor on the trained demo model (weight error
and transformer-output error; see ``benchmarks/bench_fp8.py`` and the README).

Kept in the original dtype: the final ``proj_out`` (its error lands on the prediction unfiltered; 45 k weights at
the released size) and the Linear layers of modules that read their children's weights instead of calling them
(``nn.MultiheadAttention`` in the CLIP Resampler, the T5 attention pool), which would otherwise get fp8 values
without their scale.

LoRA: :func:`add_to_fp8_weight` adds a LoRA delta to a stored weight (dequantize, add in float32, round back with
the *same* scale, so that restoring the saved fp8 bytes undoes the merge bit for bit); ``easyanimate.lora`` calls
it for fp8 weights. The scales leave a factor 2 of headroom (:data:`FP8_HEADROOM`) for what a LoRA adds.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

logger = logging.getLogger(__name__)

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)  # None on torch < 2.1
FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
# A row's largest weight is stored at FP8_MAX / FP8_HEADROOM, so that a LoRA merged later may grow it up to 2x without
# saturating. fp8's precision is relative (3 mantissa bits) over its whole normal range, so this costs only the
# bottom binade: weights below 2^-14 of their row's largest become subnormal instead of those below 2^-15.
FP8_HEADROOM = 2.0
GRANULARITIES = ("channel", "tensor")
# Linear layers below this many weights stay as they are: the bytes saved would be nil.
DEFAULT_MIN_ELEMENTS = 1024
DEFAULT_SKIP = ("proj_out",)  # module paths kept in the original dtype (see the module docstring)

# fp8 weight -> weakref to its Fp8Linear, so a LoRA merge that holds only the weight finds the scale.
_OWNERS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


class Fp8Unavailable(RuntimeError):
    """fp8 storage cannot run with this torch or on this device; the message names what to use instead."""


def check_fp8_support(device: torch.device | str | None = None) -> None:
    """Raise :class:`Fp8Unavailable` unless this torch has ``float8_e4m3fn`` and ``device`` (default: the CPU) can
    cast to and from it (the only fp8 operations used: no fp8 matmul is needed, so any CUDA GPU will do)."""
    fix = ("use memory mode model_cpu_offload (bf16 weights) or sequential_cpu_offload (least GPU memory) instead")
    if FP8_DTYPE is None:
        raise Fp8Unavailable(f"fp8 weights need torch >= 2.1 (float8_e4m3fn); this is torch {torch.__version__}: "
                             f"upgrade torch, or {fix}")
    device = torch.device(device or "cpu")
    try:
        probe = torch.tensor([1.5, -3.0], device=device).to(FP8_DTYPE).to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise Fp8Unavailable(f"fp8 weights are not supported on {device} by torch {torch.__version__} ({exc}); "
                             f"{fix}") from exc
    if probe.tolist() != [1.5, -3.0]:
        raise Fp8Unavailable(f"fp8 casts on {device} are wrong ({probe.tolist()} for [1.5, -3.0]); {fix}")


def fp8_scale(weight: torch.Tensor, granularity: str = "channel") -> torch.Tensor:
    """float32 scale(s) that map ``weight``'s largest magnitude (per output row, or over the whole tensor) to
    ``FP8_MAX / FP8_HEADROOM`` (224): shape ``(out,)`` per channel, ``(1,)`` per tensor. An all-zero row gets scale 1
    (any scale stores zeros exactly; 0 would divide by zero)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    magnitude = weight.detach().abs().float()
    amax = magnitude.amax(dim=1) if granularity == "channel" else magnitude.amax().reshape(1)
    return torch.where(amax > 0, amax * (FP8_HEADROOM / FP8_MAX), torch.ones_like(amax))


def quantize_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``weight / scale`` rounded to nearest ``float8_e4m3fn``, computed in float32; values beyond the range
    saturate at +-448 (fp8 e4m3fn has no infinity: an unclamped overflow would become NaN)."""
    scaled = weight.detach().float() / scale.reshape(-1, 1)
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * scale`` in ``dtype``. fp8 values are exact in bf16, fp16 and fp32, so the only rounding is of the
    product (and of the scale to ``dtype``)."""
    return weight.to(dtype) * scale.to(dtype).reshape(-1, 1)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose ``weight`` is stored as ``float8_e4m3fn`` (a frozen Parameter of the same shape, so
    state-dict keys, LoRA names and ``isinstance(m, nn.Linear)`` stay as they were) with a float32 buffer
    ``weight_scale`` (one per output row, or one). ``forward(x)`` equals ``F.linear(x, W, bias)`` with ``W`` the
    dequantized weight in ``compute_dtype`` (the dtype the weight had before), so inputs and outputs keep the dtypes
    of the layer it replaced. Inference only: the weight takes no gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, compute_dtype=torch.float32,
                 granularity: str = "channel", device=None):
        nn.Module.__init__(self)  # skip nn.Linear's allocation of a full-precision weight
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        bias_value = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_value)
        rows = out_features if granularity == "channel" else 1
        self.register_buffer("weight_scale", torch.ones(rows, dtype=torch.float32, device=device))
        _OWNERS[self.weight] = weakref.ref(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "channel",
                    work_device: torch.device | str | None = None) -> "Fp8Linear":
        """The fp8 copy of ``linear`` (its bias object is shared, not copied), on the device of ``linear``;
        ``work_device`` (e.g. the GPU while the model waits on the CPU) computes the scale and rounding there."""
        home = linear.weight.device
        weight = linear.weight.detach().to(work_device or home)
        layer = cls(linear.in_features, linear.out_features, bias=False, compute_dtype=weight.dtype,
                    granularity=granularity, device="meta")
        scale = fp8_scale(weight, granularity)
        layer.weight = nn.Parameter(quantize_fp8(weight, scale).to(home), requires_grad=False)
        layer.weight_scale = scale.to(home)
        layer.bias = linear.bias
        _OWNERS[layer.weight] = weakref.ref(layer)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as the layer computes with it: ``(out, in)`` in ``compute_dtype``."""
        return dequantize_fp8(self.weight, self.weight_scale, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        granularity = "channel" if self.weight_scale.numel() == self.out_features and self.out_features > 1 else (
            "tensor")
        return f"{super().extra_repr()}, fp8 e4m3fn per {granularity}, compute {self.compute_dtype}"


@torch.no_grad()
def add_to_fp8_weight(weight: torch.Tensor, delta: torch.Tensor) -> int:
    """``weight += delta`` for the fp8 weight of an :class:`Fp8Linear` (a LoRA merge): dequantized, added in float32
    and rounded back with the layer's unchanged scale, so that copying the saved fp8 bytes back undoes it exactly.
    Only an entry pushed beyond twice its row's largest weight (:data:`FP8_HEADROOM`) saturates; returns how many
    did (their error is their excess). Raises ``ValueError`` for an fp8 tensor no Fp8Linear owns (its scale
    is unknown)."""
    ref = _OWNERS.get(weight)
    layer = ref() if ref is not None else None
    if layer is None or layer.weight is not weight:
        raise ValueError("this float8 weight belongs to no Fp8Linear, so its scale is unknown; merge LoRAs into "
                         "the model before easyanimate.models.fp8.enable_fp8_weights")
    scale = layer.weight_scale.to(weight.device).reshape(-1, 1)
    merged = weight.float() * scale + delta.to(weight.device, torch.float32).reshape(weight.shape)
    saturated = int((merged.abs() > FP8_MAX * scale).sum())
    weight.copy_(quantize_fp8(merged, scale))
    if saturated:
        logger.info("fp8 LoRA merge: %d weights beyond their row's fp8 range saturated", saturated)
    return saturated


def is_fp8(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is stored in a float8 dtype."""
    return tensor.dtype in {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


@dataclass
class Fp8Report:
    """What :func:`enable_fp8_weights` changed: layers converted, their weights, and the model's stored bytes
    (parameters and buffers) before and after."""

    layers: int
    elements: int
    bytes_before: int
    bytes_after: int

    @property
    def saved_fraction(self) -> float:
        return 1 - self.bytes_after / self.bytes_before if self.bytes_before else 0.0


def stored_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (each tensor once), whatever device they are on (meta too)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _weight_reading_modules(model: nn.Module) -> set[int]:
    """ids of the modules under a parent that reads its children's weights directly (``nn.MultiheadAttention``,
    diffusers' ``HunyuanDiTAttentionPool``) instead of calling them: an Fp8Linear there would hand fp8 values
    without their scale to ``F.multi_head_attention_forward``."""
    inside = set()
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) or "AttentionPool" in type(module).__name__:
            inside.update(id(m) for m in module.modules())
    return inside


def fp8_targets(model: nn.Module, min_elements: int = DEFAULT_MIN_ELEMENTS,
                skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Module paths of the Linear layers :func:`enable_fp8_weights` converts: plain ``nn.Linear`` with at least
    ``min_elements`` weights, not named in ``skip`` and not read directly by a parent."""
    excluded = _weight_reading_modules(model)
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and id(module) not in excluded and name not in skip
            and module.weight.numel() >= min_elements]


@torch.no_grad()
def enable_fp8_weights(model: nn.Module, granularity: str = "channel", *,
                       min_elements: int = DEFAULT_MIN_ELEMENTS, skip: tuple[str, ...] = DEFAULT_SKIP,
                       work_device: torch.device | str | None = None) -> Fp8Report:
    """Store ``model``'s large Linear weights in fp8 (see the module docstring), in place; returns an
    :class:`Fp8Report`. ``work_device`` computes the conversion there, one layer at a time (a GPU is much faster than
    a CPU at it); the weights stay where they are.

    Call it after the model has its final weights and dtype (a later ``model.to(dtype)`` would cast the fp8 weights
    back) and before CPU offload hooks (``enable_model_cpu_offload`` moves the model whole, which is fine after;
    sequential offload swaps weights for meta tensors). LoRAs may be merged before or after (see
    :func:`add_to_fp8_weight`). Already converted layers are left alone, so calling it twice changes nothing.
    Raises :class:`Fp8Unavailable` when this torch has no fp8 dtype.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    devices = {p.device for p in model.parameters()} | ({torch.device(work_device)} if work_device else set())
    for device in devices or {torch.device("cpu")}:
        if device.type != "meta":
            check_fp8_support(device)
    if FP8_DTYPE is None:
        check_fp8_support()
    before = stored_bytes(model)
    names = fp8_targets(model, min_elements, skip)
    elements = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        elements += linear.weight.numel()
        setattr(parent, child, Fp8Linear.from_linear(linear, granularity, work_device))
    report = Fp8Report(len(names), elements, before, stored_bytes(model))
    logger.info("fp8 weights: %d Linear layers (%d weights), %.1f %% fewer stored bytes", report.layers,
                report.elements, 100 * report.saved_fraction)
    return report
