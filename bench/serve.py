"""The serving sections: end-to-end load through the embedded server, and warm-up.

`serving_section` starts two ``python -m serving.server`` processes on the run's export
(`bench.serving_load.Server`), one plain and one with server-side batching
(``--enable_batching`` with serving/batching.config), both with gRPC and REST. For each
batch size and number of concurrent clients it drives, in turn, gRPC and REST at each
server, and the same SavedModel in-process (`bench.sides_tf.SavedModelThreads`: the same
JPEG photos, as many threads as clients), each for the same window (``--serving-seconds``,
longer where `ROUNDS` rounds of every client's request take longer), ``--reps`` times
round. Clients are threads of this process, each with its own channel or
keep-alive connection, sending ``serving_default`` requests back to back after one
untimed request; they share the CPU with the server, as a load generator on the same
host does. Throughput is images/s; latencies are pooled over the repetitions.

`warmup_section` measures what the export's warm-up file buys: a fresh server on a copy
of the version with ``assets.extra/tf_serving_warmup_requests`` and on one without it;
once GetModelStatus says AVAILABLE (no request before), the first request's latency
against the median of the steady state after it.
"""

import base64
import functools
import http.client
import json
import os
import pathlib
import shutil
import statistics
import threading
import time

from bench.context import rounded
from bench.inputs import photo_summary, photos
from bench.serving_load import Server, percentile
from bench.workers import Side, WorkerError, drop, measure, summary

REPO = pathlib.Path(__file__).resolve().parents[1]
WARMUP_FILE = pathlib.Path("assets.extra") / "tf_serving_warmup_requests"
BATCHING_FLAGS = ("--enable_batching",
                  f"--batching_parameters_file={REPO / 'serving' / 'batching.config'}")
STEADY_WARM = 3  # requests after the first that are not counted in the steady state
ROUNDS = 5  # the serving window holds at least this many rounds of every client's request


def _grpc_client(address, request):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    channel = grpc.insecure_channel(address, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return (lambda: stub.Predict(request, timeout=120)), channel.close


def _rest_client(port, body):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call():
        connection.request("POST", "/v1/models/alexnet:predict", body,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")

    return call, connection.close


def drive(make_client, clients, seconds):
    """``clients`` threads, each with its own ``make_client()`` (``(call, close)``), one
    untimed call each, then calls back to back for ``seconds`` from a common start, taken
    once every client's untimed call has returned (so it is not in the window).

    Returns ``{"requests", "failures", "errors", "seconds", "latencies_ms"}``: the timed
    requests, and the seconds from the common start to the last one's end.
    """
    start = [0.0]

    def set_start():  # run by the last thread to reach the barrier
        start[0] = time.perf_counter()

    barrier = threading.Barrier(clients + 1, action=set_start, timeout=600)
    lock = threading.Lock()
    latencies, errors, ends = [], [], []

    def client():
        try:
            call, close = make_client()
        except Exception as error:
            with lock:
                errors.append(f"{type(error).__name__}: {str(error)[:120]}")
            barrier.wait()
            return
        try:
            try:
                call()
            except Exception as error:  # counted below; the others go on
                with lock:
                    errors.append(f"{type(error).__name__}: {str(error)[:120]}")
            barrier.wait()
            mine, deadline = [], start[0] + seconds
            while time.perf_counter() < deadline:
                begin = time.perf_counter()
                try:
                    call()
                    mine.append(1000 * (time.perf_counter() - begin))
                except Exception as error:
                    with lock:
                        errors.append(f"{type(error).__name__}: {str(error)[:120]}")
            with lock:
                latencies.extend(mine)
                ends.append(time.perf_counter())
        finally:
            close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(seconds + 300)
    elapsed = (max(ends) if ends else time.perf_counter()) - start[0]
    return {"requests": len(latencies), "failures": len(errors),
            "errors": sorted(set(errors))[:5], "seconds": elapsed, "latencies_ms": latencies}


def _start_servers(ctx):
    base = ctx.model["base_path"]
    servers = {}
    for batching in (False, True):
        flags = BATCHING_FLAGS if batching else ()
        servers[batching] = Server(base, ctx.workdir, *flags, rest=True, env=ctx.env).start()
    for server in servers.values():
        server.wait_until_available()
    return servers


def serving_section(ctx):
    """gRPC and REST img/s, p50/p99 latency at each ``--serving-batches`` x
    ``--serving-clients``, with and without server-side batching, and the ratio to the
    in-process SavedModel on the same inputs."""
    from serving.client import build_predict_request

    args, records = ctx.args, []
    servers = _start_servers(ctx)
    try:
        combos = [(b, c) for b in args.serving_batches for c in args.serving_clients]
        inproc = {combo: Side(f"in-process b{combo[0]} c{combo[1]}", "tf",
                              "bench.sides_tf:SavedModelThreads",
                              {"path": ctx.model["version_dir"], "batch": combo[0],
                               "clients": combo[1]}) for combo in combos}
        measure(ctx.pool, list(inproc.values()), reps=0, seconds=0, keep=True)  # setup only
        windows = {combo: _window(ctx, side) for combo, side in inproc.items()}
        served = {}  # (protocol, batching, batch, clients) -> list of drive() results
        for _ in range(args.reps):
            for batch, clients in combos:
                seconds = windows[(batch, clients)]
                images = photos(batch)
                request = build_predict_request(images, model="alexnet")
                body = json.dumps({"signature_name": "serving_default", "instances": [
                    {"b64": base64.b64encode(x).decode()} for x in images]}).encode()
                for protocol in ("grpc", "rest"):
                    for batching, server in servers.items():
                        make = (functools.partial(_grpc_client, server.address, request)
                                if protocol == "grpc"
                                else functools.partial(_rest_client, server.rest_port, body))
                        result = drive(make, clients, seconds)
                        served.setdefault((protocol, batching, batch, clients), []).append(result)
                side = inproc[(batch, clients)]
                if side.ok:
                    try:
                        run = ctx.pool.get("tf").request(
                            120 + 20 * seconds, op="run", side=side.name, seconds=seconds)
                        side.runs.append(run)
                        side.rates.append(run["items"] / run["seconds"])
                    except WorkerError as error:
                        side.status = f"failed: {error}"
        drop(ctx.pool, list(inproc.values()))
        for (batch, clients), side in inproc.items():
            records.append(_load_record(ctx, "in-process SavedModel", "in-process", None, batch,
                                        clients, side.runs, side.status, side.rates, None,
                                        window_s=rounded(windows[(batch, clients)])))
            for protocol in ("grpc", "rest"):
                for batching in (False, True):
                    runs = served.get((protocol, batching, batch, clients), [])
                    rates = [batch * r["requests"] / r["seconds"] for r in runs]
                    ratio = (statistics.median(a / b for a, b in zip(rates, side.rates))
                             if side.ok and side.rates and rates and all(rates) else None)
                    failures = sum(r["failures"] for r in runs)
                    status = "ok" if runs and sum(r["requests"] for r in runs) else \
                        f"failed: no request answered ({_errors(runs)})"
                    records.append(_load_record(
                        ctx, f"{protocol} {'batching' if batching else 'no batching'}",
                        protocol, batching, batch, clients, runs, status, rates, ratio,
                        failed_requests=failures, errors=_errors(runs),
                        window_s=rounded(windows[(batch, clients)]),
                        server_flags=list(BATCHING_FLAGS if batching else ())))
    finally:
        for server in servers.values():
            server.terminate(30)
    return records


def _window(ctx, side):
    """The seconds each side of one batch x clients combination is timed for: at least
    ``--serving-seconds`` and at least `ROUNDS` rounds of every client's request, a round
    timed on the in-process side (one call from each of its threads at once). A window
    of fewer rounds would be mostly the tail, where clients finish one by one."""
    seconds = ctx.args.serving_seconds
    if not side.ok:
        return seconds
    try:
        probe = ctx.pool.get("tf").request(600, op="run", side=side.name, seconds=1e-3)
    except WorkerError as error:
        side.status = f"failed: {error}"
        return seconds
    return max(seconds, ROUNDS * probe["seconds"])


def _errors(runs):
    return sorted({e for r in runs for e in r.get("errors", [])})[:5]


def _load_record(ctx, name, protocol, batching, batch, clients, runs, status, rates, ratio,
                 **fields):
    latencies = [x for r in runs for x in r.get("latencies_ms", [])]
    stats = summary(rates)
    return ctx.record(
        "serving", name, status, protocol=protocol, server_batching=batching, batch=batch,
        clients=clients, dtype="float32", signature="serving_default", inputs=photo_summary(),
        unit="img/s", value=rounded(stats["median"]), min=rounded(stats["min"]),
        max=rounded(stats["max"]), reps=len(rates), per_rep=[rounded(r) for r in rates],
        requests=len(latencies), p50_ms=rounded(percentile(latencies, 50)),
        p99_ms=rounded(percentile(latencies, 99)), vs_in_process=rounded(ratio), **fields)


def _copy_version(source, base, keep_warmup):
    """A copy of the version directory (hard links, except the file we delete)."""
    target = pathlib.Path(base) / "1"
    shutil.copytree(source, target, copy_function=os.link)
    if not keep_warmup:
        (target / WARMUP_FILE).unlink()
    return target


def _first_and_steady(server, request, steady):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=30)  # connect before timing
        begin = time.perf_counter()
        stub.Predict(request, timeout=300)
        first = 1000 * (time.perf_counter() - begin)
        times = []
        for i in range(STEADY_WARM + steady):
            begin = time.perf_counter()
            stub.Predict(request, timeout=300)
            if i >= STEADY_WARM:
                times.append(1000 * (time.perf_counter() - begin))
    return first, statistics.median(times)


def warmup_section(ctx):
    """First request / steady state after a fresh server loads the export, with and
    without its warm-up file, alternately ``--warmup-trials`` times (batch 1,
    serving_default)."""
    from serving.client import build_predict_request

    args = ctx.args
    request = build_predict_request(photos(1), model="alexnet")
    trials = {True: [], False: []}
    errors = {True: [], False: []}
    for rep in range(args.warmup_trials):
        for keep in (True, False):
            base = ctx.workdir / f"warmup-{'with' if keep else 'without'}-{rep}" / "alexnet"
            _copy_version(ctx.model["version_dir"], base, keep)
            server = Server(base, ctx.workdir, env=ctx.env).start()
            try:
                load_s = server.wait_until_available()
                first, steady = _first_and_steady(server, request, args.warmup_requests)
                trials[keep].append({"load_s": load_s, "first_ms": first, "steady_ms": steady})
            except Exception as error:  # recorded; the other trials go on
                errors[keep].append(f"{type(error).__name__}: {str(error)[:200]}")
            finally:
                server.terminate(30)
                shutil.rmtree(base.parent, ignore_errors=True)
    records = []
    for keep in (True, False):
        runs = trials[keep]
        status = "ok" if runs else f"failed: {errors[keep][:1]}"
        ratios = [r["first_ms"] / r["steady_ms"] for r in runs]
        records.append(ctx.record(
            "warmup", "with warm-up file" if keep else "warm-up file removed", status,
            warmup_file=keep, batch=1, signature="serving_default", dtype="float32",
            unit="first / steady", value=rounded(statistics.median(ratios)) if ratios else None,
            min=rounded(min(ratios)) if ratios else None,
            max=rounded(max(ratios)) if ratios else None, reps=len(runs),
            first_ms=rounded(statistics.median(r["first_ms"] for r in runs)) if runs else None,
            steady_ms=rounded(statistics.median(r["steady_ms"] for r in runs)) if runs else None,
            load_s=rounded(statistics.median(r["load_s"] for r in runs)) if runs else None,
            steady_requests=args.warmup_requests, trials=runs, errors=errors[keep]))
    return records
