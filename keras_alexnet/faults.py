"""Fault injection for the crash-safety tests: SIGKILL this process at a named point.

The exact-resume promise (RELIABILITY.md) is that a run killed at any moment and rerun
with the same command ends as if it had never stopped. The tests show it by killing
real training processes at the moments that matter, deterministically:

    KERAS_ALEXNET_CRASH_AT=step:7          after training step 7 (1-based, global)
    KERAS_ALEXNET_CRASH_AT=checkpoint:8    a checkpoint's files written, not committed
    KERAS_ALEXNET_CRASH_AT=export          a SavedModel version staged, not renamed

`crash_point` is a no-op (one dictionary lookup) when the variable is unset. The kill is
a real ``SIGKILL``: no ``finally`` block, ``atexit`` hook or buffered write runs.
"""

import os
import signal
import sys

ENV_VAR = "KERAS_ALEXNET_CRASH_AT"


def crash_point(name, step=None):
    """Kills the process with SIGKILL if ``KERAS_ALEXNET_CRASH_AT`` names this point
    (``name``, or ``name:step`` for the given ``step``)."""
    wanted = os.environ.get(ENV_VAR)
    if not wanted:
        return
    point = name if step is None else f"{name}:{int(step)}"
    if wanted == point:
        print(f"{ENV_VAR}={wanted}: killing this process (SIGKILL).", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
