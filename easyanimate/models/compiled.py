"""Compiled transformer blocks: regional ``torch.compile`` of the V4 transformer.

:func:`compile_blocks` compiles each :class:`~easyanimate.models.transformer.HunyuanDiTBlock3D` (``module.compile``,
``fullgraph``) instead of the whole model. All blocks run the same code, and torch's dynamo treats their weights as
inputs, so the compiled graph is shared: the first call compiles two graphs (the first half's blocks, and the second
half's blocks that take a long skip) and every later step, later call of the same size and later LoRA merge (an
in-place weight change) reuses them. A new frame count or size compiles once more, with dynamic shapes, after which
other sizes reuse that. The embedding, patchify and output layers stay eager: they run once per step and are small.

Compiling the blocks composes with fp8 weights (:mod:`easyanimate.models.fp8`: the upcast is traced into the block's
graph), model CPU offload (the hook moves the whole model before the blocks run) and step caching (which calls the
blocks one range at a time). It does not compose with sequential CPU offload, whose hooks replace every layer's
weights inside the forward: :func:`check_compile_support` refuses that combination.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch
from torch import nn


DEFAULT_BACKEND = "inductor"  # what compile_blocks uses unless told otherwise


class CompileUnavailable(RuntimeError):
    """torch.compile cannot run here; the message says what to do instead."""


def _has_cpp_compiler() -> bool:
    """Inductor builds C++ kernels for the CPU with the compiler named by $CXX, else the first found of these."""
    return any(shutil.which(name) for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")))


def check_compile_support(device: torch.device | str | None = None, backend: str = "inductor",
                          memory_mode: str | None = None) -> None:
    """Raise :class:`CompileUnavailable` naming the fix unless blocks can be compiled with ``backend`` for
    ``device`` (default: the CPU): torch.compile must exist and support this Python; inductor needs Triton on a
    CUDA GPU and a C++ compiler on the CPU; ``memory_mode`` must not be sequential CPU offload."""
    instead = "run without compile (the same results, each step slower)"
    if memory_mode == "sequential_cpu_offload":
        raise CompileUnavailable("compiled blocks do not work with memory mode sequential_cpu_offload (its hooks swap "
                                 "every layer's weights inside the forward); use model_cpu_offload_and_fp8 for a "
                                 f"small GPU, or {instead}")
    if not hasattr(torch, "compile"):
        raise CompileUnavailable(f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0); {instead}")
    import torch._dynamo as dynamo

    if not dynamo.is_dynamo_supported():
        raise CompileUnavailable(f"torch.compile does not support Python {sys.version.split()[0]} on this platform "
                                 f"with torch {torch.__version__}; {instead}")
    if backend != "inductor":
        return
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileUnavailable(f"compiling for {device} needs the triton package (pip install triton) for "
                                     f"torch {torch.__version__}; or {instead}")
    elif device.type == "cpu" and not _has_cpp_compiler():
        raise CompileUnavailable(f"compiling for the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); "
                                 f"install one, or {instead}")
    elif device.type not in ("cpu", "cuda"):
        raise CompileUnavailable(f"compiled blocks are supported on CPU and CUDA devices, not {device.type}; {instead}")


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformer (its ``blocks`` list); ``ValueError`` for a model without one."""
    blocks = getattr(transformer, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"{type(transformer).__name__} has no 'blocks' list to compile")
    return list(blocks)


def compile_blocks(transformer: nn.Module, *, backend=None, mode: str | None = None,
                   fullgraph: bool = True, dynamic: bool | None = None) -> int:
    """Compile every block of ``transformer`` in place (``block.compile(...)``; the arguments are torch.compile's,
    ``backend`` None meaning :data:`DEFAULT_BACKEND`); returns the number of blocks. Nothing compiles until the
    first forward. Compiling twice replaces the earlier settings. ``backend`` may be a callable (tests count
    compilations with one). ``fullgraph``: a block that cannot be traced whole is an error, not a silent split."""
    blocks = transformer_blocks(transformer)
    for block in blocks:
        block.compile(backend=backend or DEFAULT_BACKEND, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    return len(blocks)


def blocks_are_compiled(transformer: nn.Module) -> bool:
    """Whether :func:`compile_blocks` has been applied to every block."""
    return all(getattr(block, "_compiled_call_impl", None) is not None for block in transformer_blocks(transformer))
