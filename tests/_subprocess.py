"""Runs a Python snippet in a fresh interpreter (for logical devices or a clean TF runtime)."""

import json
import subprocess
import sys


def run_script(script, *args, timeout=300):
    """Runs ``script`` with ``args`` and returns the JSON it printed after ``RESULT``.

    The child needs a fresh process because logical CPU devices and collective ops can
    only be configured before TensorFlow's runtime starts.
    """
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])
