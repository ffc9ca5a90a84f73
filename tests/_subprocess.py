"""Runs a Python snippet in a fresh interpreter (for logical devices or a clean TF runtime)."""

import json
import os
import subprocess
import sys

# TensorFlow's oneDNN CPU kernels are on by default only on some x86 CPUs (AVX-512), and
# they behave differently from the Eigen kernels on edge cases (zero-sized batches), so
# the strategy tests run under both settings on every machine.
ONEDNN_SETTINGS = ("0", "1")


def run_script(script, *args, timeout=300, onednn=None):
    """Runs ``script`` with ``args`` and returns the JSON it printed after ``RESULT``.

    The child needs a fresh process because logical CPU devices and collective ops can
    only be configured before TensorFlow's runtime starts. ``onednn`` ("0" or "1") sets
    ``TF_ENABLE_ONEDNN_OPTS`` for the child; ``None`` leaves the machine's default.
    """
    env = dict(os.environ)
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def own_onednn():
    """This process's oneDNN setting (``"0"``/``"1"``), or ``None`` when TensorFlow does not
    say; a test comparing under a setting can then reuse this process for its own."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:
        return None
    return "1" if _pywrap_util_port.IsMklEnabled() else "0"
