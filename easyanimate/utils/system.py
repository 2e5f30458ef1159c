"""Facts about the machine: what benchmarks print beside their figures, and what the CPU dtype is chosen from."""

from __future__ import annotations

import platform
from pathlib import Path

# The x86 instructions that multiply bf16 matrices in hardware (Intel AMX tiles; AVX-512 BF16 on Intel Cooper Lake
# and later, AMD Zen 4 and later). Without them oneDNN emulates bf16 and a bf16 matmul is far slower than fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo(field: str) -> str | None:
    """The value of ``field`` for the first processor in /proc/cpuinfo (Linux); None where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows: timings on these machines
    depend on it (bf16 is ~100x slower than fp32 on an AMD EPYC without bf16 instructions, faster on one with them
    and on an Intel Xeon with AMX)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The instruction-set flags the Linux kernel reports for this CPU (/proc/cpuinfo); empty elsewhere."""
    return set((_cpuinfo("flags") or "").split())


def cpu_native_bf16() -> str | None:
    """The first of :data:`NATIVE_BF16_FLAGS` this CPU has, else None."""
    flags = cpu_flags()
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)
