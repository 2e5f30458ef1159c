"""Facts about the machine that benchmarks print beside their figures."""

from __future__ import annotations

import platform
from pathlib import Path

# The x86 instructions that multiply bf16 matrices in hardware (Intel AMX tiles; AVX-512 BF16 on Intel Cooper Lake
# and later, AMD Zen 4 and later). Without them oneDNN emulates bf16 and a bf16 matmul is far slower than fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows: timings on these machines
    depend on it (bf16 is ~100x slower than fp32 on an AMD EPYC without bf16 instructions, faster on one with them
    and on an Intel Xeon with AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The instruction-set flags the Linux kernel reports for this CPU (/proc/cpuinfo); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> str | None:
    """The first of :data:`NATIVE_BF16_FLAGS` this CPU has (``flags`` default :func:`cpu_flags`), else None."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)
