"""Load test of the embedded server: concurrent clients while versions come and go.

    python bench/serving_load.py                        # RELIABILITY.md: 16 clients, 60 s
    python bench/serving_load.py --clients 4 --seconds 10 --export-every 3   # quick

Starts ``python -m serving.server`` on 127.0.0.1 over a tiny AlexNet export (67x67,
width 0.125, 6 classes), then runs ``--clients`` threads that each send gRPC Predict
requests of ``--batch`` JPEG photos (``serving_default``, no client retries) for
``--seconds``. Meanwhile a new version is exported every ``--export-every`` seconds
with `keras_alexnet.export.export_saved_model` (the real export: staging folder and
rename), and half-way one *broken* version appears (a ``saved_model.pb`` of junk and no
``variables/``), renamed in like a real one. At the end it sends SIGTERM while the
clients are still running and measures how long the server takes to exit.

``--copy`` delivers the new versions by copying version 1 in (staging folder, rename)
instead, for a steady cadence when exporting takes longer than ``--export-every`` on a
saturated CPU (on 2 cores with 16 clients a tiny export takes about 15 s).

Prints one JSON object: requests, failed requests (any non-OK status before SIGTERM),
latency p50/p99, versions exported and versions that served a request, what
GetModelStatus reported for the broken version, the server's peak RSS, the shutdown
time and exit code. Traffic goes only to 127.0.0.1; every loop is bounded in time.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parent.parent
PHOTOS = sorted((REPO / "tests" / "data" / "images").glob("*"))
CLASS_NAMES = ["circle", "ring", "square", "triangle", "star", "cross"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Server:
    """``python -m serving.server`` on 127.0.0.1 over ``base`` (model ``alexnet``), its
    output in ``<workdir>/server-<port>.log``; ``rest=True`` opens a REST port too.

    ``env`` (default: this process's) is the server's environment, with TensorFlow's
    logs quietened and no GPU.
    """

    def __init__(self, base, workdir, *flags, rest=False, env=None, model_name="alexnet"):
        self.port, self.rest_port = free_port(), free_port() if rest else 0
        self.address, self.model_name = f"127.0.0.1:{self.port}", model_name
        self.log_path = pathlib.Path(workdir) / f"server-{self.port}.log"
        self.flags = [f"--port={self.port}", f"--rest_api_port={self.rest_port}",
                      "--bind_address=127.0.0.1", f"--model_name={model_name}",
                      f"--model_base_path={base}", *flags]
        self.env = dict(os.environ if env is None else env, CUDA_VISIBLE_DEVICES="-1")
        self.env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.process = None

    def start(self):
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serving.server", *self.flags], cwd=REPO, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        return self

    def log(self):
        return self.log_path.read_text(errors="replace")[-3000:]

    def _check_running(self, what):
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited ({self.process.returncode}) {what}:\n{self.log()}")

    def wait_until_answering(self, request, timeout=120):
        """Sends ``request`` until it succeeds (bounded); raises RuntimeError otherwise."""
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while True:
                try:
                    return stub.Predict(request, timeout=10)
                except grpc.RpcError:
                    self._check_running("before answering")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"server not ready:\n{self.log()}") from None
                    time.sleep(0.5)

    def wait_until_available(self, timeout=300, poll=0.05):
        """Polls GetModelStatus (no Predict: the first request is the caller's) until a
        version is AVAILABLE; returns the seconds since `start`."""
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model_name
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = model_service_pb2_grpc.ModelServiceStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.GetModelStatus(request, timeout=5)
                    if any(v.state == available for v in status.model_version_status):
                        return time.monotonic() - self.started
                except grpc.RpcError:
                    pass
                self._check_running("before its model was AVAILABLE")
                time.sleep(poll)
        raise RuntimeError(f"no version AVAILABLE within {timeout} s:\n{self.log()}")

    def terminate(self, timeout=60):
        """SIGTERM, then waits; returns the exit code, or a note when it had to be killed."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                code = f"killed after {timeout} s"
        self._log.close()
        return code


def export_tiny(base, seed):
    import keras_alexnet
    from keras_alexnet.export import export_saved_model

    model = keras_alexnet.alexnet(num_classes=len(CLASS_NAMES), image_size=67, width=0.125,
                                  seed=seed)
    return export_saved_model(model, base, CLASS_NAMES)


def write_broken_version(base):
    from keras_alexnet.files import list_versions

    version = list_versions(base)[-1] + 1
    staging = base / f".tmp-broken-{version}"
    staging.mkdir()
    (staging / "saved_model.pb").write_bytes(b"this is not a SavedModel")
    os.rename(staging, base / str(version))
    return version


def copy_version(base):
    """A new version as a deployment tool would deliver it: copied whole, then renamed."""
    from keras_alexnet.files import list_versions

    version = list_versions(base)[-1] + 1
    staging = base / f".tmp-copy-{version}"
    shutil.copytree(base / "1", staging)
    os.rename(staging, base / str(version))
    return base / str(version)


def exporter(base, seconds, every, copy=False):
    """Runs in a child process: a real export every ``every`` s, one broken version half-way.

    A process of its own, so that exporting competes with the server for CPU, as a
    trainer on the same machine would, but not for the load generator's GIL.
    """
    import keras_alexnet.export  # noqa: F401  (TensorFlow's start-up, before the clock)

    base = pathlib.Path(base)
    print("READY", flush=True)
    sys.stdin.readline()  # "GO": the clients are running
    begin = time.monotonic()
    exported, broken, seed, tick = [], None, 1, 1
    while time.monotonic() - begin + 0.5 < seconds:
        time.sleep(max(0.0, begin + tick * every - time.monotonic()))
        if time.monotonic() - begin >= seconds:
            break
        if broken is None and time.monotonic() - begin >= seconds / 2:
            broken = write_broken_version(base)
        else:
            exported.append(int((copy_version(base) if copy else export_tiny(base, seed)).name))
            seed += 1
        tick = int((time.monotonic() - begin) // every) + 1
    print("EXPORTED" + json.dumps({"exported": exported, "broken": broken}), flush=True)


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--export-every", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=1, help="images per request")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--copy", action="store_true",
                        help="deliver new versions by copying version 1 (staging + rename) "
                             "instead of exporting: a steady cadence on a busy CPU")
    parser.add_argument("--exporter", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.exporter:
        exporter(args.exporter[0], float(args.exporter[1]), float(args.exporter[2]),
                 copy=args.exporter[3] == "1")
        return 0

    import grpc
    from tensorflow_serving.apis import (
        get_model_status_pb2,
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    from serving.client import build_predict_request

    work = pathlib.Path(tempfile.mkdtemp(prefix="alexnet-load-"))
    base = work / "models" / "alexnet"
    export_tiny(base, seed=0)
    server = Server(base, work, "--file_system_poll_wait_seconds=1",
                    "--max_num_load_retries=2", "--load_retry_interval_micros=2000000",
                    "--shutdown_grace_seconds=10").start()
    address = server.address
    child = subprocess.Popen(
        [sys.executable, __file__, "--exporter", str(base), str(args.seconds),
         str(args.export_every), str(int(args.copy))],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    images = [p.read_bytes() for p in PHOTOS[: args.batch]] * (
        1 + args.batch // max(1, len(PHOTOS)))
    request = build_predict_request(images[: args.batch], model="alexnet")

    channel = grpc.insecure_channel(address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        server.wait_until_answering(request)
    except RuntimeError as error:  # nothing of the run is left behind: server, exporter, files
        channel.close()
        child.kill()
        child.wait()
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(str(error)) from None

    stop = threading.Event()
    sigterm_at = [None]
    lock = threading.Lock()
    latencies, failures, after_sigterm, served = [], [], [], set()
    peak_rss = [rss_mb(server.process.pid)]

    def client():
        with grpc.insecure_channel(address) as ch:
            s = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    response = s.Predict(request, timeout=30)
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        served.add(response.model_spec.version.value)
                except grpc.RpcError as e:
                    with lock:
                        target = failures if sigterm_at[0] is None else after_sigterm
                        target.append(f"{e.code().name}: {(e.details() or '')[:120]}")
                    if sigterm_at[0] is not None:
                        return

    def watch_rss():
        while not stop.is_set() and server.process.poll() is None:
            peak_rss[0] = max(peak_rss[0], rss_mb(server.process.pid))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    threads.append(threading.Thread(target=watch_rss, daemon=True))
    for t in threads:
        t.start()
    assert child.stdout.readline().strip() == "READY"
    child.stdin.write("GO\n")
    child.stdin.flush()
    begin = time.monotonic()
    while time.monotonic() - begin < args.seconds:
        time.sleep(0.2)
    out, _ = child.communicate(timeout=120)
    record = json.loads([x for x in out.splitlines() if x.startswith("EXPORTED")][-1][8:])
    exported, broken = [1] + record["exported"], record["broken"]
    measured_requests = len(latencies)
    measured_failures = list(failures)

    status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "alexnet"
    statuses = {s.version: (get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                            s.status.error_message[:160])
                for s in status_stub.GetModelStatus(status_request, timeout=10)
                .model_version_status}
    waited = time.monotonic()  # bounded wait for the newest good version to serve
    latest = stub.Predict(request, timeout=30).model_spec.version.value
    while latest != exported[-1] and time.monotonic() - waited < 60:
        time.sleep(0.25)
        latest = stub.Predict(request, timeout=30).model_spec.version.value
    newest_after_s = round(time.monotonic() - waited, 2)

    sigterm_at[0] = time.monotonic()
    code = server.terminate(60)
    shutdown_s = time.monotonic() - sigterm_at[0]
    stop.set()
    for t in threads:
        t.join(10)
    channel.close()

    result = {
        "clients": args.clients, "seconds": args.seconds, "batch": args.batch,
        "new_versions_by": "copy + rename" if args.copy else "export_saved_model",
        "requests": measured_requests, "failed_requests": len(measured_failures),
        "failures": sorted(set(measured_failures))[:10],
        "throughput_rps": round(measured_requests / args.seconds, 1),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1),
        "versions_exported": exported, "broken_version": broken,
        "broken_version_status": statuses.get(broken),
        "versions_served": sorted(served), "latest_served_after_run": latest,
        "newest_version_served_within_s_after_run": newest_after_s,
        "peak_server_rss_mb": round(peak_rss[0]),
        "shutdown_seconds_under_load": round(shutdown_s, 2), "exit_code": code,
        "errors_after_sigterm": sorted(set(e.split(":")[0] for e in after_sigterm)),
        "cpu": next((line.split(":", 1)[1].strip() for line in
                     pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "unknown"),
        "cores": os.cpu_count(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from keras_alexnet import files

        files.atomic_write(pathlib.Path(args.out), text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if not measured_failures and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
