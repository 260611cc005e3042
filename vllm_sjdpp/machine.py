"""What this machine computes natively, read from /proc/cpuinfo: for the dtype a float32 checkpoint
is served in on a CPU (`patches.model_config`) and for reports that name the machine (the demo)."""

from __future__ import annotations

import platform

# /proc/cpuinfo feature names of the instructions that compute bf16 natively.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FEATURES = ("bf16",)


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text; empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def cpu_features(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags ("flags" on x86, "Features" on aarch64) from /proc/cpuinfo's text;
    empty where it cannot be read."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return set(value.split())
    return set()


def native_bf16(machine: str | None = None, features: set[str] | None = None) -> bool | None:
    """Whether this CPU computes bf16 natively: True, False, or None where it cannot tell (another
    architecture, or no /proc/cpuinfo: vLLM's own choice then stands)."""
    machine = (machine or platform.machine()).lower()
    features = cpu_features() if features is None else features
    if not features:
        return None
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return any(f in features for f in X86_BF16_FLAGS)
    if machine in ("aarch64", "arm64"):
        return any(f in features for f in ARM_BF16_FEATURES)
    return None


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name ("model name" on x86), else the architecture."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "model name" and value.strip():
            return value.strip()
    return platform.machine()
