"""The machine and software a benchmark run measured, without importing TensorFlow.

Read from ``/proc/cpuinfo`` and ``/proc/meminfo``, the installed packages' metadata and
``git``; every record of a run carries them (`machine`), so a JSON line on its own says
what it was measured on.
"""

import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
# The CPU features that decide which kernels run: AVX2/AVX-512 widths, bf16 and AMX.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
         "amx_int8")
PACKAGES = ("tensorflow", "keras", "torch", "onnxruntime", "tf2onnx", "onnx", "numpy",
            "grpcio", "tensorflow-serving-api")


def cpu_flags(cpuinfo=None):
    """The `FLAGS` this CPU has (from the first ``flags`` line of /proc/cpuinfo)."""
    text = cpuinfo if cpuinfo is not None else _read("/proc/cpuinfo")
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [flag for flag in FLAGS if flag in have]
    return []


def has_bf16(flags):
    """Whether the CPU multiplies bfloat16 natively (AVX512_BF16 or AMX)."""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _read(path):
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return ""


def _cpu_model():
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _memory_gib():
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def versions():
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return commit + ("+uncommitted changes" if dirty.strip() else "") if commit else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine():
    """CPU model and flags, cores, memory, kernel, versions, commit, date."""
    flags = cpu_flags()
    return {
        "cpu_model": _cpu_model(), "cpu_flags": flags, "bf16_native": has_bf16(flags),
        "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(), "kernel": platform.release(), "versions": versions(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def load_average():
    return round(os.getloadavg()[0], 2)
