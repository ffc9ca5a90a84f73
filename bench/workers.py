"""The runner's side of `bench.worker`: worker processes, and alternating measurement.

`Pool` starts one `Worker` per kind on first use (`KINDS`: the process's flags) and
restarts one that died or was killed. `measure` sets up a list of `Side` s (each in
its worker), then times them in turn, A B C A B C ..., ``reps`` times, so that drift in
the machine's speed (other jobs, thermal limits) reaches every side alike; a side whose
setup or run fails (or does not answer in time: a ``torch.compile`` that takes too long)
is recorded as ``failed: <reason>`` and the others go on.
"""

import dataclasses
import json
import os
import pathlib
import queue
import signal
import statistics
import subprocess
import sys
import threading

REPO = pathlib.Path(__file__).resolve().parents[1]

# Kind of worker -> extra flags. TensorFlow with a CPU split into 2 logical devices is its
# own process (the split must precede the runtime's start); torch.compile has its own so
# that a compile past its time box can be killed without losing the eager sides.
KINDS = {
    "tf": [],
    "tf_split2": ["--cpu-devices", "2"],
    "torch": [],
    "torch_compile": [],
    "ort": [],
}


class WorkerError(RuntimeError):
    """A request failed: the side's error, a timeout or a dead worker."""


class Worker:
    """``python -m bench.worker`` in its own session (killed as a process group, which
    takes torch.compile's compiler subprocesses with it); stderr goes to ``log_path``."""

    def __init__(self, kind, log_path, env, threads):
        self.kind, self.log_path = kind, pathlib.Path(log_path)
        self._log = open(self.log_path, "ab")
        command = [sys.executable, "-m", "bench.worker", *KINDS[kind], "--threads", str(threads)]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, start_new_session=True)
        self._answers = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self._answers.put(line)
        self._answers.put(None)

    def alive(self):
        return self.process.poll() is None

    def log_tail(self, lines=8):
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])[-800:]

    def request(self, timeout, **message):
        """Sends one request; returns the answer without ``ok``, or raises `WorkerError`
        (after killing the worker when it did not answer within ``timeout`` s)."""
        if not self.alive():
            raise WorkerError(f"{self.kind} worker exited ({self.process.returncode}): "
                              f"{self.log_tail()}")
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise WorkerError(f"{self.kind} worker gone ({error}): {self.log_tail()}") from None
        try:
            line = self._answers.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"no answer within {timeout:g} s (worker killed)") from None
        if line is None:
            self.process.wait(10)
            raise WorkerError(f"{self.kind} worker exited ({self.process.returncode}): "
                              f"{self.log_tail()}")
        answer = json.loads(line)
        if not answer.pop("ok"):
            raise WorkerError(answer["error"])
        return answer

    def kill(self):
        if self.alive():
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def close(self):
        try:
            if self.alive():
                self.request(30, op="quit")
                self.process.wait(30)
        except (WorkerError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
            self._log.close()


class Pool:
    """One live `Worker` per kind, started on demand with ``env`` and ``threads``."""

    def __init__(self, workdir, env, threads):
        self.workdir, self.env, self.threads = pathlib.Path(workdir), env, threads
        self.workers = {}

    def get(self, kind):
        worker = self.workers.get(kind)
        if worker is None or not worker.alive():
            if worker is not None:
                worker.close()
            worker = Worker(kind, self.workdir / f"worker-{kind}.log", self.env, self.threads)
            self.workers[kind] = worker
        return worker

    def close(self, *kinds):
        for kind in kinds or list(self.workers):
            worker = self.workers.pop(kind, None)
            if worker is not None:
                worker.close()


@dataclasses.dataclass
class Side:
    """One side of a comparison: ``factory(**spec)`` built in a ``kind`` worker.

    ``fields`` go into its record (framework, dtype, strategy, ...). After `measure`,
    ``rates`` holds items/s per repetition, ``cpu_rates`` items per CPU-second of the
    worker, ``status`` ``"ok"`` or ``"failed: <reason>"``.
    """

    name: str
    kind: str
    factory: str
    spec: dict
    fields: dict = dataclasses.field(default_factory=dict)
    setup_timeout: float = 900.0
    status: str = "ok"
    info: dict = dataclasses.field(default_factory=dict)
    setup_s: float = None
    rates: list = dataclasses.field(default_factory=list)
    cpu_rates: list = dataclasses.field(default_factory=list)
    runs: list = dataclasses.field(default_factory=list)

    @property
    def ok(self):
        return self.status == "ok"


def measure(pool, sides, reps, seconds, run_timeout=None, keep=False):
    """Sets up ``sides``, times them alternately ``reps`` times for ``seconds`` each,
    and drops them (unless ``keep``). Fills in each side's results; returns ``sides``."""
    run_timeout = run_timeout or 120 + 20 * seconds
    for side in sides:
        if not side.ok:  # failed before it started (a missing input file)
            continue
        try:
            answer = pool.get(side.kind).request(side.setup_timeout, op="setup", side=side.name,
                                                 factory=side.factory, spec=side.spec)
            side.info, side.setup_s = answer["info"], answer["setup_s"]
        except WorkerError as error:
            side.status = f"failed: {error}"
    for _ in range(reps):
        for side in sides:
            if not side.ok:
                continue
            try:
                run = pool.get(side.kind).request(run_timeout, op="run", side=side.name,
                                                  seconds=seconds)
            except WorkerError as error:
                side.status = f"failed: {error}"
                continue
            side.runs.append(run)
            side.rates.append(run["items"] / run["seconds"])
            side.cpu_rates.append(run["items"] / max(run["cpu_seconds"], 1e-9))
    if not keep:
        drop(pool, sides)
    return sides


def drop(pool, sides):
    for side in sides:
        worker = pool.workers.get(side.kind)
        if worker is not None and worker.alive():
            try:
                worker.request(120, op="drop", side=side.name)
            except WorkerError:
                pass


def summary(values):
    """``{"median", "min", "max"}`` of a list of numbers (``None`` for an empty one)."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired_ratio(side, other):
    """Median over repetitions of ``side``'s rate over ``other``'s in the same repetition
    (measured back to back), or ``None`` when either failed."""
    if not (side.ok and other.ok and side.rates and other.rates):
        return None
    return statistics.median(a / b for a, b in zip(side.rates, other.rates))
