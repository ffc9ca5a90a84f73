"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1, configured by TF_CONFIG.

Both workers run ``training/train.py --strategy multiworker`` with the same run and
export directories (standing in for a shared volume). They must end with identical
weights; only the chief may leave checkpoints and an export; a relaunch resumes from
the chief's committed checkpoint.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from _subprocess import ONEDNN_SETTINGS

REPO = pathlib.Path(__file__).resolve().parent.parent

WORKER = (
    "import json, sys\n"
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


def launch_cluster(argv, workers=2, timeout=300, onednn=None):
    """Runs ``workers`` processes of ``train.main(argv)``; returns their summaries/logs.

    ``onednn`` ("0"/"1") sets ``TF_ENABLE_ONEDNN_OPTS`` for the workers.
    """
    hosts = [f"127.0.0.1:{port}" for port in free_ports(workers)]
    procs = []
    for index in range(workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})}
        if onednn is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = onednn
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, *argv], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-3000:]
            line = [x for x in out.splitlines() if x.startswith("SUMMARY")][-1]
            results.append((json.loads(line[len("SUMMARY"):]), out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.fixture(scope="module", params=ONEDNN_SETTINGS, ids=lambda v: f"onednn{v}")
def cluster_runs(shapes_data_dir, tmp_path_factory, request):
    base = tmp_path_factory.mktemp("multiworker")
    argv = ["--preset", "smoke", "--data-dir", shapes_data_dir, "--strategy", "multiworker",
            "--run-dir", str(base / "run"), "--export-dir", str(base / "models"), "--quiet"]
    first = launch_cluster(argv + ["--epochs", "1"], onednn=request.param)
    snapshot = sorted(p.name for p in (base / "run").iterdir())
    # A restarted cluster with one more epoch (no export this time: it costs seconds).
    second = launch_cluster(argv + ["--epochs", "2", "--no-export"], onednn=request.param)
    return base, first, snapshot, second


@pytest.mark.slow
def test_workers_end_with_identical_weights(cluster_runs):
    _, first, _, second = cluster_runs
    for results in (first, second):
        digests = {summary["weights_sha256"] for summary, _ in results}
        assert len(digests) == 1
        assert results[0][0]["val_top1"] == results[1][0]["val_top1"]  # aggregated metrics


@pytest.mark.slow
def test_only_the_chief_writes_checkpoints_and_the_export(cluster_runs):
    base, first, snapshot, second = cluster_runs
    assert snapshot == ["checkpoints", "config.json", "export.json", "history.csv", "logs",
                        "state.json"]
    assert sorted(p.name for p in (base / "models").iterdir()) == ["1"]
    assert first[0][0]["export_path"] and first[1][0]["export_path"] is None
    files = sorted(p.name for p in (base / "run" / "checkpoints").iterdir())
    assert not [name for name in files if name.startswith(".worker")]  # temp dirs removed
    # 480 images / global batch 32 = 15 steps: the epoch-end checkpoint, committed.
    assert "ckpt-15.index" in files
    assert json.loads((base / "run" / "state.json").read_text())["global_batch"] == 32


@pytest.mark.slow
def test_the_chief_writes_tensorboard_logs(cluster_runs):
    base = cluster_runs[0]
    for split in ("train", "validation"):
        assert list((base / "run" / "logs" / split).glob("events.out.tfevents*")), split


@pytest.mark.slow
def test_restarted_cluster_resumes_from_the_committed_checkpoint(cluster_runs):
    base, _, _, second = cluster_runs
    for _, log in second:
        assert "Resuming" in log and "(epoch 2, step 0 of 15)" in log, log[-2000:]
    rows = (base / "run" / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,lr,top1,top5,val_loss")
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]
    assert json.loads((base / "run" / "state.json").read_text())["epoch"] == 2
