"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1, configured by TF_CONFIG.

Both workers run ``training/train.py --strategy multiworker`` with the same run and
export directories (standing in for a shared volume), under both oneDNN settings:

1. one epoch with a checkpoint every 5 steps, exported;
2. a relaunch for a second epoch, both workers SIGKILLed at global step 23
   (``KERAS_ALEXNET_CRASH_AT``, `keras_alexnet.faults`), 3 steps after a checkpoint;
3. the same relaunch again: it resumes from the chief's committed ``ckpt-20``.

Every launch must end with identical weights on all workers; only the chief leaves
checkpoints, history rows, TensorBoard logs and the export.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
from _subprocess import ONEDNN_SETTINGS

from keras_alexnet.faults import ENV_VAR

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 15  # 480 images / (16 per replica x 2 workers)
CRASH_STEP = STEPS + 8  # epoch 2, step 8: three steps after ckpt-20

WORKER = (
    "import json, os, sys\n"
    "print('PID', os.getpid(), flush=True)\n"
    "from training import train\n"
    "summary = train.main(sys.argv[1:])\n"
    "print('SUMMARY' + json.dumps(summary))\n"
)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch_cluster(argv, workers=2, timeout=300, onednn=None, crash_at=None):
    """Runs ``workers`` processes of ``train.main(argv)``; returns, per worker, its summary
    (``None`` when it was killed at ``crash_at``), stdout and pid.

    ``onednn`` ("0"/"1") sets ``TF_ENABLE_ONEDNN_OPTS`` for the workers; ``crash_at`` sets
    ``KERAS_ALEXNET_CRASH_AT`` for all of them, so they die at the same point.
    """
    hosts = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    procs = []
    for index in range(workers):
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        env.update(TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}))
        if onednn is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = onednn
        if crash_at is not None:
            env[ENV_VAR] = crash_at
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, *argv], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            if crash_at is None:
                assert proc.returncode == 0, err[-3000:]
                line = [x for x in out.splitlines() if x.startswith("SUMMARY")][-1]
                summary = json.loads(line[len("SUMMARY"):])
            else:
                assert proc.returncode == -9, (proc.returncode, err[-3000:])
                assert f"{ENV_VAR}={crash_at}: killing" in err
                summary = None
            results.append((summary, out, proc.pid))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.fixture(scope="module", params=ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def cluster_runs(shapes_data_dir, tmp_path_factory, request):
    base = tmp_path_factory.mktemp("multiworker")
    argv = ["--preset", "smoke", "--data-dir", shapes_data_dir, "--strategy", "multiworker",
            "--run-dir", str(base / "run"), "--export-dir", str(base / "models"), "--quiet",
            "--checkpoint-every", "5"]
    first = launch_cluster(argv + ["--epochs", "1"], onednn=request.param)
    snapshot = sorted(p.name for p in (base / "run").iterdir())
    first_state = json.loads((base / "run" / "state.json").read_text())
    # Relaunched for a second epoch (no export: it costs seconds), killed mid-epoch...
    again = argv + ["--epochs", "2", "--no-export"]
    killed = launch_cluster(again, onednn=request.param, crash_at=f"step:{CRASH_STEP}")
    killed_state = json.loads((base / "run" / "state.json").read_text())
    # ... and relaunched with the same command: it resumes and finishes.
    second = launch_cluster(again, onednn=request.param)
    return dict(base=base, first=first, snapshot=snapshot, first_state=first_state,
                killed=killed, killed_state=killed_state, second=second)


@pytest.mark.slow
def test_workers_end_with_identical_weights(cluster_runs):
    for results in (cluster_runs["first"], cluster_runs["second"]):
        digests = {summary["weights_sha256"] for summary, _, _ in results}
        assert len(digests) == 1
        assert results[0][0]["val_top1"] == results[1][0]["val_top1"]  # aggregated metrics
        assert results[0][0]["val_loss"] == results[1][0]["val_loss"]


@pytest.mark.slow
def test_the_committed_checkpoint_is_the_final_weights(cluster_runs):
    from keras_alexnet.training import loop
    from keras_alexnet.training.run_dir import RunDirectory

    run = RunDirectory(cluster_runs["base"] / "run")
    digest = cluster_runs["second"][0][0]["weights_sha256"]
    assert loop.weights_digest(run.load_model()) == digest  # loads on one device


@pytest.mark.slow
def test_only_the_chief_writes_checkpoints_and_the_export(cluster_runs):
    base, first = cluster_runs["base"], cluster_runs["first"]
    assert cluster_runs["snapshot"] == ["checkpoints", "config.json", "curves.png",
                                        "export.json", "filters.png", "history.csv", "logs",
                                        "state.json"]
    assert sorted(p.name for p in (base / "models").iterdir()) == ["1"]
    assert first[0][0]["export_path"] == str(base / "models" / "1")
    assert first[1][0]["export_path"] is None
    state = cluster_runs["first_state"]
    # 15 steps: checkpoints at 5 and 10, the epoch end at 15; the newest two are kept.
    assert (state["epoch"], state["global_step"], state["global_batch"]) == (1, STEPS, 32)
    assert state["checkpoints"] == ["ckpt-10", f"ckpt-{STEPS}"]
    names = sorted(p.name for p in (base / "run" / "checkpoints").iterdir())
    assert not [name for name in names if name.startswith(".worker")]  # temp dirs removed
    assert names == sorted(f"{c}.{ext}" for c in ("ckpt-25", "ckpt-30")
                           for ext in ("index", "data-00000-of-00001"))
    state = json.loads((base / "run" / "state.json").read_text())
    assert state["checkpoints"] == ["ckpt-25", "ckpt-30"] and state["epoch"] == 2


def _event_files(base, split):
    """``{pid: [paths]}`` of the TensorBoard event files under ``logs/<split>``."""
    by_pid = {}
    for path in (base / "run" / "logs" / split).glob("events.out.tfevents.*"):
        pid = int(re.search(r"\.(\d+)\.\d+\.v2$", path.name).group(1))
        by_pid.setdefault(pid, []).append(path)
    return by_pid


def _scalars(paths):
    """``{tag: {step: value}}`` of the scalars in event files (the epoch pictures, image
    summaries, are not scalars)."""
    import tensorflow as tf

    values = {}
    for path in paths:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.ndim:
                    continue
                number = float(array)
                values.setdefault(value.tag, {})[event.step] = number
    return values


@pytest.mark.slow
def test_the_chief_writes_tensorboard_logs(cluster_runs):
    base = cluster_runs["base"]
    chiefs = {results[0][2] for results in (cluster_runs["first"], cluster_runs["killed"],
                                            cluster_runs["second"])}
    finished = {cluster_runs["first"][0][2], cluster_runs["second"][0][2]}
    for split in ("train", "validation"):
        by_pid = _event_files(base, split)
        assert set(by_pid) <= chiefs, (split, by_pid)  # no other worker wrote logs
        assert finished <= set(by_pid), (split, by_pid)
    validation = _scalars(sum(_event_files(base, "validation").values(), []))
    for tag in ("epoch_loss", "epoch_top1", "epoch_top5"):
        assert sorted(validation[tag]) == [1, 2], tag  # one value per epoch
    history = [line.split(",") for line in
               (base / "run" / "history.csv").read_text().splitlines()[1:]]
    for epoch, row in enumerate(history):
        assert validation["epoch_loss"][epoch + 1] == pytest.approx(float(row[5]), rel=1e-6)
    train = _scalars(sum(_event_files(base, "train").values(), []))
    assert {"batch_loss", "epoch_loss", "epoch_lr"} <= set(train)
    assert sorted(train["epoch_loss"]) == [1, 2]


@pytest.mark.slow
def test_a_killed_cluster_resumes_from_the_committed_mid_epoch_checkpoint(cluster_runs):
    base, state = cluster_runs["base"], cluster_runs["killed_state"]
    # Killed at step 23: the newest commit is the mid-epoch checkpoint of step 20.
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 5, 20)
    assert state["checkpoints"] == [f"ckpt-{STEPS}", "ckpt-20"]
    for _, log, _ in cluster_runs["second"]:
        assert f"from ckpt-20 (epoch 2, step 5 of {STEPS})" in log, log[-2000:]
    rows = (base / "run" / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,lr,top1,top5,val_loss")
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]  # once each
    assert json.loads((base / "run" / "state.json").read_text())["global_step"] == 2 * STEPS
