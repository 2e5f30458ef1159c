"""LoRA: merge LoRA files into a pipeline's weights and take them out again, and train new ones.

**File format** (the original's, kohya style). For each adapted layer ``NAME`` a file holds
``NAME.lora_down.weight`` (rank x in), ``NAME.lora_up.weight`` (out x rank) and optionally ``NAME.alpha`` (a scalar;
absent means alpha = rank). ``NAME`` is a prefix plus the module path with dots turned into underscores:

* ``lora_unet_`` + ``_blocks_0_attn1_to_q`` for the transformer (its root module has an empty path, hence the
  double underscore);
* ``lora_te_`` + ``encoder_layer_0_attention_self_query`` for ``text_encoder`` (BERT);
* ``lora_te2_`` + ... for ``text_encoder_2`` (T5). This prefix is ours: the original trains no T5 LoRA, and its
  merge would send any ``lora_te*`` key to BERT.

PEFT / diffusers files (``<path>.lora_A.weight`` / ``<path>.lora_B.weight``, with an optional ``transformer.``,
``text_encoder.``, ``text_encoder_2.`` or ``base_model.model.`` prefix and optional ``<path>.alpha``) are read too.

**Merging** adds ``strength * alpha / rank * (up @ down)`` to each weight, computed in float32 and cast back to the
weight's dtype (1x1 conv weights are squeezed and re-expanded), like the original. The original resolves names by
trying underscore-joined pieces greedily; here every module path of the target model is turned into its underscore
form once and looked up, which resolves the same names and reports the ones that do not exist. Nothing is modified
unless *every* layer of the file resolves and fits.

**Unmerging** is exact: merging keeps a CPU copy of each weight it changes (in the weight's dtype), and
``unmerge_lora`` puts those copies back, newest merge first. Subtracting the delta again, as the original does,
leaves float rounding residue (large in bf16). The copies cost as much memory as the adapted weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from easyanimate.utils.weights import CheckpointError, read_weights_file

logger = logging.getLogger(__name__)

# prefix -> pipeline attribute. Longest prefixes first, so "lora_te2_..." is not read as "lora_te_" + "2_...".
PREFIXES = {"lora_unet": "transformer", "lora_te2": "text_encoder_2", "lora_te": "text_encoder"}
# Module classes whose Linear layers the original's text-encoder LoRA wraps.
TEXT_ENCODER_TARGETS = ("BertEncoder", "T5LayerSelfAttention", "T5LayerFF")
PEFT_PREFIXES = {
    "transformer.": "transformer",
    "text_encoder_2.": "text_encoder_2",
    "text_encoder.": "text_encoder",
    "base_model.model.": "transformer",
    "": "transformer",
}


# ------------------------------------------------------------------------------------------------ reading files


@dataclass
class LoRALayer:
    """One adapted layer of a LoRA file: ``delta W = alpha / rank * up @ down``."""

    component: str  # pipeline attribute: "transformer", "text_encoder" or "text_encoder_2"
    module_name: str  # the module path in underscore form ("blocks_0_attn1_to_q") or dotted (PEFT files)
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight update ``alpha / rank * up @ down`` as an ``(out, in)`` matrix in ``dtype`` on ``device``
        (strength not applied; 1x1 conv factors are flattened)."""
        down = self.down.to(device=device, dtype=dtype)
        up = self.up.to(device=device, dtype=dtype)
        return (self.alpha / self.rank) * (up.flatten(1) @ down.flatten(1))


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA file (``.safetensors``, or ``.bin``/``.pt`` without executing pickled code)."""
    return read_weights_file(path)


def parse_lora_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "LoRA file") -> list[LoRALayer]:
    """Group a LoRA state dict (original/kohya or PEFT format) into :class:`LoRALayer` entries."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for suffix in ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha"):
            if key.endswith("." + suffix):
                groups.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
                break
        else:
            raise CheckpointError(
                f"{source}: unrecognised key {key!r}; expected NAME.lora_down.weight / NAME.lora_up.weight / "
                "NAME.alpha (the original's format) or NAME.lora_A.weight / NAME.lora_B.weight (PEFT)"
            )
    if not groups:
        raise CheckpointError(f"{source} holds no LoRA weights")

    layers = []
    for name, parts in groups.items():
        down = parts.get("lora_down.weight", parts.get("lora_A.weight"))
        up = parts.get("lora_up.weight", parts.get("lora_B.weight"))
        if down is None or up is None:
            raise CheckpointError(f"{source}: layer {name!r} lacks its down/up (A/B) matrix")
        if down.shape[0] != up.shape[1]:
            raise CheckpointError(
                f"{source}: layer {name!r} has down {tuple(down.shape)} and up {tuple(up.shape)}, whose ranks differ"
            )
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        if "lora_down.weight" in parts:
            component, module_name = _split_kohya_name(name, source)
        else:
            component, module_name = next(
                (c, name[len(p):]) for p, c in PEFT_PREFIXES.items() if name.startswith(p)
            )
        layers.append(LoRALayer(component, module_name, down, up, alpha))
    return layers


def _split_kohya_name(name: str, source: str) -> tuple[str, str]:
    for prefix, component in PREFIXES.items():
        if name.startswith(prefix + "_"):
            return component, name[len(prefix) + 1:].lstrip("_")
    raise CheckpointError(f"{source}: layer {name!r} starts with none of {', '.join(p + '_' for p in PREFIXES)}")


# ------------------------------------------------------------------------------------------------ resolving names


def _module_index(root: nn.Module) -> dict[str, nn.Module | None]:
    """Every module of ``root`` by its dotted path and by its underscore form (None marks an ambiguous form)."""
    index: dict[str, nn.Module | None] = {}
    for path, module in root.named_modules():
        if not path:
            continue
        index[path] = module
        underscored = path.replace(".", "_")
        if underscored != path:
            index[underscored] = None if underscored in index and index[underscored] is not module else module
    return index


def _resolve(pipe, layers: list[LoRALayer], source: str, transformer_only: bool) -> list[tuple[LoRALayer, nn.Parameter]]:
    """Find each layer's weight; raise listing every layer that does not resolve or does not fit."""
    indexes: dict[str, dict] = {}
    resolved, problems = [], []
    for layer in layers:
        if transformer_only and layer.component != "transformer":
            continue
        root = getattr(pipe, layer.component, None)
        if root is None:
            problems.append(f"{layer.module_name}: the pipeline has no {layer.component}")
            continue
        if layer.component not in indexes:
            indexes[layer.component] = _module_index(root)
        module = indexes[layer.component].get(layer.module_name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, torch.Tensor):
            problems.append(f"{layer.component}.{layer.module_name}: no such layer with a weight")
            continue
        expected = (weight.shape[0], math.prod(weight.shape[1:]))
        if weight.ndim not in (2, 4) or (weight.ndim == 4 and weight.shape[2:] != (1, 1)):
            problems.append(f"{layer.component}.{layer.module_name}: weight {tuple(weight.shape)} is not linear/1x1")
        elif (layer.up.shape[0], layer.down.flatten(1).shape[1]) != expected:
            problems.append(
                f"{layer.component}.{layer.module_name}: LoRA gives {layer.up.shape[0]}x{layer.down.flatten(1).shape[1]}"
                f", the weight is {expected[0]}x{expected[1]}"
            )
        else:
            resolved.append((layer, weight))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... ({len(problems) - 20} more)" if len(problems) > 20 else "")
        raise CheckpointError(
            f"{source} does not fit this model ({len(problems)} of {len(layers)} layers); nothing was merged:\n  "
            + shown
        )
    return resolved


# ------------------------------------------------------------------------------------------------ merge / unmerge

# weight -> stack of (merge token, original weight on CPU). Weak keys: a dropped model takes its copies along.
# (WeakTensorKeyDictionary compares keys by identity; a plain WeakKeyDictionary would call Tensor.__eq__.)
_ORIGINALS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _token(path, strength: float) -> tuple:
    return (str(Path(path).resolve()) if path is not None else None, float(strength))


def _load_layers(path, state_dict) -> tuple[list[LoRALayer], str]:
    """The layers of ``state_dict``, or else of the file at ``path``, and how to name their source in messages."""
    if state_dict is None:
        if path is None:
            raise ValueError("give a LoRA file path or a state_dict")
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"LoRA file not found: {path}")
        state_dict = read_lora_file(path)
        _apply_peft_alpha(path, state_dict)
    source = f"LoRA file {path}" if path is not None else "LoRA state dict"
    return parse_lora_state_dict(state_dict, source), source


def _apply_peft_alpha(path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    """PEFT keeps alpha in ``adapter_config.json`` beside the weights; turn it into per-layer alpha entries."""
    config_file = path.parent / "adapter_config.json"
    if not config_file.is_file() or not any(k.endswith(".lora_A.weight") for k in state_dict):
        return
    alpha = json.loads(config_file.read_text()).get("lora_alpha")
    if alpha is None:
        return
    for key in [k for k in state_dict if k.endswith(".lora_A.weight")]:
        state_dict.setdefault(key[: -len(".lora_A.weight")] + ".alpha", torch.tensor(float(alpha)))


def _add_to_weight(weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> None:
    """``weight += delta`` computed in ``dtype`` and cast back. A weight stored in fp8 with a scale
    (:mod:`easyanimate.models.fp8`) is dequantized, added to and rounded back with that scale instead: a plain cast
    would add the delta to the unscaled fp8 values."""
    if weight.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
        from easyanimate.models.fp8 import add_to_fp8_weight

        add_to_fp8_weight(weight, delta)
        return
    weight.copy_((weight.to(dtype) + delta.view(weight.shape)).to(weight.dtype))


@torch.no_grad()
def merge_lora(
    pipe,
    path: str | os.PathLike | None,
    strength: float = 1.0,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    transformer_only: bool = False,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Merge a LoRA into ``pipe.transformer`` / ``pipe.text_encoder`` (/ ``pipe.text_encoder_2``) in place:
    ``W += strength * alpha / rank * up @ down``. ``pipe`` is any object with those attributes. Give the file
    ``path`` or an in-memory ``state_dict`` (then ``path`` only labels it for :func:`unmerge_lora`). The delta is
    computed in ``dtype`` on each weight's device. Returns the number of weights changed.

    Merge before enabling CPU offload: offload hooks move weights out of the modules.
    """
    layers, source = _load_layers(path, state_dict)
    resolved = _resolve(pipe, layers, source, transformer_only)
    token = _token(path, strength)
    for layer, weight in resolved:
        if weight.device.type == "meta":
            raise CheckpointError(f"{source}: weights are offloaded (meta device); merge LoRAs before enabling offload")
    for layer, weight in resolved:
        _ORIGINALS.setdefault(weight, []).append((token, weight.detach().to("cpu", copy=True)))
        _add_to_weight(weight, strength * layer.delta(dtype, weight.device), dtype)
    logger.info("merged %d LoRA layers from %s (strength %g)", len(resolved), source, strength)
    return len(resolved)


@torch.no_grad()
def unmerge_lora(
    pipe,
    path: str | os.PathLike | None,
    strength: float = 1.0,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    transformer_only: bool = False,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Undo :func:`merge_lora` with the same arguments. Weights whose latest merge was this one get their saved
    original back bit for bit; any other (a LoRA merged by other code) has the delta subtracted, as the original
    does. Returns the number of weights changed."""
    layers, source = _load_layers(path, state_dict)
    resolved = _resolve(pipe, layers, source, transformer_only)
    token = _token(path, strength)
    subtracted = 0
    for layer, weight in resolved:
        stack = _ORIGINALS.get(weight)
        if stack and stack[-1][0] == token:
            weight.copy_(stack.pop()[1])
            if not stack:
                del _ORIGINALS[weight]
        else:
            _add_to_weight(weight, -strength * layer.delta(dtype, weight.device), dtype)
            subtracted += 1
    if subtracted:
        logger.warning("%s: %d weights had no saved original for this merge; subtracted the delta instead "
                       "(inexact by float rounding)", source, subtracted)
    return len(resolved)


# ------------------------------------------------------------------------------------------------ training


class LoRAAdapter(nn.Module):
    """A trainable low-rank update next to one frozen Linear (or 1x1 Conv2d): ``y = base(x) + scale * up(down(x))``
    with ``scale = multiplier * alpha / rank``. ``down`` starts Kaiming-uniform (a = sqrt(5)) and ``up`` at zero, so
    training starts from the base model. It runs as a forward hook on the base layer, which keeps the base model's
    own modules and state-dict keys unchanged."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None, multiplier: float = 1.0):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha or rank)))  # saved as NAME.alpha
        self.multiplier = multiplier
        self.to(base.weight.device)  # float32 whatever the base dtype; the hook casts in and out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.multiplier * self.alpha / self.rank
        down = self.lora_down.weight
        return self.lora_up(self.lora_down(x.to(down.dtype))) * scale

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self(inputs[0]).to(output.dtype)


def _reads_weights_directly(module: nn.Module) -> bool:
    """Modules that pass their Linear children's weights to ``F.multi_head_attention_forward`` instead of calling
    them, so an adapter on those children would never run: ``nn.MultiheadAttention`` (the Resampler; the original
    skips its out_proj too) and diffusers' ``HunyuanDiTAttentionPool`` (the T5 pooler). The original does wrap the
    pooler's projections, but they never receive a gradient there, and merging them would change what training saw;
    so they get no adapter here."""
    return isinstance(module, nn.MultiheadAttention) or "AttentionPool" in type(module).__name__


def _lora_targets(root: nn.Module, prefix: str, target_classes: tuple[str, ...] | None) -> Iterable[tuple[str, nn.Module]]:
    """(file name, layer) for every Linear / 1x1 Conv2d under the target modules, named like the original:
    ``prefix + "." + module path + "." + child path`` with dots turned into underscores."""
    if target_classes is None:
        containers = [("", root)]
    else:
        containers = [(p, m) for p, m in root.named_modules() if type(m).__name__ in target_classes]
    seen = set()
    for container_path, container in containers:
        skip = {id(m) for owner in container.modules() if _reads_weights_directly(owner) for m in owner.modules()}
        for child_path, child in container.named_modules():
            if id(child) in skip or id(child) in seen:
                continue
            is_1x1 = isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, nn.Linear) or is_1x1:
                seen.add(id(child))
                yield f"{prefix}.{container_path}.{child_path}".replace(".", "_"), child


class LoRANetwork(nn.Module):
    """Trainable LoRA adapters on every Linear (and 1x1 Conv2d) of the transformer, and optionally of the text
    encoders, as the original's training network: rank and alpha shared by all layers; non-1x1 convolutions and
    layers whose forward never runs (see :func:`_reads_weights_directly`) skipped. Its ``state_dict()`` is already
    in the original's file format (``lora_unet__blocks_0_attn1_to_q.lora_down.weight`` ...), so :meth:`save` writes
    a file that :func:`merge_lora` applies. Raises ``ValueError`` for ``rank < 1``, for no adaptable layer, and when
    two layers would get the same file name.

    Use: ``network = LoRANetwork(transformer, rank=128, alpha=64); network.apply_to()``; optimise
    ``network.parameters()`` (or :meth:`param_groups`); ``network.save(path)``; ``network.remove()`` detaches.
    """

    def __init__(
        self,
        transformer: nn.Module,
        rank: int = 128,
        alpha: float | None = 64,
        *,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
        multiplier: float = 1.0,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha_value, self.multiplier = rank, alpha, multiplier
        self._bases: dict[str, nn.Module] = {}
        self._handles: list = []
        self._text_names: set[str] = set()
        targets = [("lora_unet", transformer, None)]
        if text_encoder is not None:
            targets.append(("lora_te", text_encoder, TEXT_ENCODER_TARGETS))
        if text_encoder_2 is not None:
            targets.append(("lora_te2", text_encoder_2, TEXT_ENCODER_TARGETS))
        for prefix, root, classes in targets:
            for name, layer in _lora_targets(root, prefix, classes):
                if name in self._bases:
                    raise ValueError(f"two layers map to the LoRA name {name!r}")
                self._bases[name] = layer
                self.add_module(name, LoRAAdapter(layer, rank, alpha, multiplier))
                if prefix != "lora_unet":
                    self._text_names.add(name)
        if not self._bases:
            raise ValueError("found no Linear layers to adapt")

    def apply_to(self) -> "LoRANetwork":
        """Attach the adapters to their layers (forward hooks). Idempotent."""
        if not self._handles:
            self._handles = [self._bases[n].register_forward_hook(a.hook) for n, a in self.named_children()]
        return self

    def remove(self) -> None:
        """Detach the adapters; the base model computes what it did before."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def detached(self):
        """Inside the block the base model runs without the adapters (the teacher of LCM distillation)."""
        attached = bool(self._handles)
        self.remove()
        try:
            yield self
        finally:
            if attached:
                self.apply_to()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for adapter in self.children():
            adapter.multiplier = multiplier

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups as the original: transformer adapters at ``lr``, text-encoder adapters at ``lr / 2``."""
        unet = [p for n, a in self.named_children() if n not in self._text_names for p in a.parameters()]
        text = [p for n, a in self.named_children() if n in self._text_names for p in a.parameters()]
        groups = [{"params": unet, "lr": lr}]
        if text:
            groups.append({"params": text, "lr": lr / 2})
        return groups

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
        """Write the adapters as a safetensors file in the original's format (via a temporary file + rename), with
        the ``sshs_model_hash`` / ``sshs_legacy_hash`` metadata the original adds (see
        :func:`additional_networks_hashes`)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        metadata = dict(metadata or {"format": "pt"})
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = additional_networks_hashes(state, metadata)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            save_file(state, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def additional_networks_hashes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """The two hashes that sd-webui-additional-networks shows for a LoRA file and that the original stores in its
    metadata, computed on the file as it is saved with only the ``ss_*`` metadata entries (hashes must not depend
    on themselves):

    * ``sshs_model_hash``: SHA-256 of everything after the header (the tensor bytes), full hex;
    * ``sshs_legacy_hash``: SHA-256 of the 64 KiB at byte offset 1 MiB of that file, first 8 hex digits (of
      nothing, for files under 1 MiB).
    """
    import hashlib

    from safetensors.torch import save

    blob = save(dict(state), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_length:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash
