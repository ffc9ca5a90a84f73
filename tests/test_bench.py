"""The benchmark runner (``python -m bench``): a --quick run end to end, its records and
tables, its refusals; the independent PyTorch AlexNet against the Keras model on the same
weights (both oneDNN settings); the FLOP count against the reference's figures.

No assertion is about speed: the runner's figures are checked for consistency with each
other (GFLOP/s = img/s x GFLOP per image, fractions of the matmul limit of the same run,
paired ratios) and for agreement between the frameworks' outputs.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest
from _subprocess import ONEDNN_SETTINGS, run_script

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not an installed package
SECTIONS = ("matmul", "train", "infer", "serving", "warmup", "pipeline")
QUICK = ["--quick", "--dtypes", "float32", "--compile-timeout", "1",
         "--serving-batches", "1", "4", "--serving-clients", "2"]


def _bench(*args, timeout=60):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run of every section (float32 training only; torch.compile given a
    1-second time box, so its sides exercise the time-out path without compiling)."""
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = _bench("--out", str(out), *QUICK, timeout=570)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, records, json.loads((out / "run.json").read_text())


def _close(a, b, rel=2e-3):
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.slow
def test_quick_run_records_carry_their_conditions(quick_run):
    _, records, header = quick_run
    assert {r["section"] for r in records} == set(SECTIONS)
    for r in records:
        assert r["onednn"] in ("0", "1") and r["threads"] >= 1 and r["quick"] is True
        assert r["dtype"] and r["unit"] and "value" in r
        if r["section"] != "matmul":
            assert r["batch"] >= 1
        machine = r["conditions"]
        assert machine["cpu_model"] and isinstance(machine["cpu_flags"], list)
        assert machine["cores"] >= 1 and machine["versions"]["tensorflow"]
        assert machine["versions"]["torch"] and machine["date"]
    assert header["model"]["parameters"] > 0 and header["image_size"] == 67


@pytest.mark.slow
def test_quick_run_every_side_ran_except_the_timed_out_compiles(quick_run):
    _, records, _ = quick_run
    compiled = [r for r in records if r.get("framework") == "torch.compile"]
    assert len(compiled) == 1 + 2  # training (float32) and inference at batch 1 and 8
    for r in compiled:  # the time box, not a crash of the run
        assert r["status"].startswith("failed: no answer within 1 s"), r["status"]
    others = [r for r in records if r.get("framework") != "torch.compile"]
    from bench.conditions import has_bf16

    skipped = [] if has_bf16(others[0]["conditions"]["cpu_flags"]) else [
        "skipped: the CPU has neither AVX512_BF16 nor AMX"]  # the bfloat16 matmul
    assert [r["status"] for r in others if r["status"] != "ok"] == skipped
    frameworks = {(r["section"], r.get("framework"), r.get("strategy")) for r in others}
    assert {("train", "keras", "default"), ("train", "keras", "mirrored --cpu-devices 2"),
            ("train", "keras", "towers --cpu-devices 2"), ("train", "torch eager", None),
            ("infer", "savedmodel", None), ("infer", "torch eager", None),
            ("infer", "onnxruntime", None)} <= frameworks
    serving = {(r["protocol"], r["server_batching"], r["batch"], r["clients"])
               for r in records if r["section"] == "serving"}
    assert serving == {(p, b, n, 2) for n in (1, 4) for p, b in
                       (("grpc", False), ("grpc", True), ("rest", False), ("rest", True),
                        ("in-process", None))}


@pytest.mark.slow
def test_quick_run_figures_are_consistent(quick_run):
    _, records, header = quick_run
    limits = {r["dtype"]: r["value"] for r in records
              if r["section"] == "matmul" and r.get("is_limit") and r["status"] == "ok"}
    assert "float32" in limits
    model = header["model"]
    for r in records:
        if r["section"] not in ("train", "infer") or r["status"] != "ok":
            continue
        flop = model["train_flop"] if r["section"] == "train" else model["forward_flop"]
        assert _close(r["gflop_per_item"], flop / 1e9)
        assert _close(r["gflop_per_s"], r["value"] * r["gflop_per_item"])
        assert r["limit_dtype"] == ("bfloat16" if "bfloat16" in r["dtype"]
                                    and "bfloat16" in limits else "float32")
        assert r["limit_gflop_per_s"] == limits[r["limit_dtype"]]
        assert _close(r["fraction_of_limit"], r["gflop_per_s"] / r["limit_gflop_per_s"], 1e-2)
        assert r["min"] <= r["value"] <= r["max"] and len(r["per_rep"]) == r["reps"] == 2
    assert model["train_flop"] == 3 * model["forward_flop"]
    # Serving ratios are paired: the median of per-repetition ratios to the in-process run.
    served = [r for r in records if r["section"] == "serving"]
    for r in served:
        if r["protocol"] == "in-process":
            continue
        base = next(x for x in served if x["protocol"] == "in-process"
                    and (x["batch"], x["clients"]) == (r["batch"], r["clients"]))
        expected = statistics.median(a / b for a, b in zip(r["per_rep"], base["per_rep"]))
        assert _close(r["vs_in_process"], expected, 1e-2)
        assert r["p50_ms"] <= r["p99_ms"] and r["requests"] > 0
        assert r["window_s"] >= 0.5 and r["window_s"] == base["window_s"]  # --serving-seconds
    for r in (x for x in records if x["section"] == "warmup"):
        assert r["reps"] == 1 and _close(r["value"], r["first_ms"] / r["steady_ms"], 1e-2)


@pytest.mark.slow
def test_quick_run_frameworks_agree_on_the_same_weights(quick_run):
    """Every pixel-input side computes the SavedModel's probabilities (apples to apples)."""
    _, records, _ = quick_run
    checked = [r for r in records if r["section"] == "infer" and r["status"] == "ok"
               and r["input"] == "pixels"]
    assert {r["framework"] for r in checked} == {"torch eager", "onnxruntime"}
    for r in checked:
        assert r["max_abs_diff_vs_savedmodel"] < 1e-5, r
    bf16 = [r for r in records if r["section"] == "infer" and r["dtype"] == "bfloat16"]
    assert len(bf16) == 2 and all(r["status"] == "ok" for r in bf16)  # batch 1 and 8
    for r in bf16:  # the weights rounded to bfloat16 and computed in it: close, not equal
        assert 0 < r["max_abs_diff_vs_savedmodel"] < 0.05, r
        top5 = r["top5_vs_float32"]
        assert top5["photos"] == 8  # tests/data/images
        assert top5["same_order"] <= top5["same_top5"] <= top5["photos"]
        assert 0 <= top5["same_top1"] <= top5["photos"] and top5["min_gap"] >= 0
        assert r["vs_float32"] > 0


def _table_rows(text, title):
    """The rows (lists of cells) of the table under ``## title``, header first."""
    lines = text.split(f"## {title}\n", 1)[1].strip().split("\n\n")[0].splitlines()
    assert lines[1].replace("|", "").replace("-", "") == ""  # the separator row
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line[1:4] != "---"]


@pytest.mark.slow
def test_quick_run_markdown_has_one_row_per_record(quick_run):
    from bench.report import SECTION_TITLES, cell

    out, records, header = quick_run
    text = (out / "results.md").read_text()
    assert header["command"] in text and header["machine"]["cpu_model"] in text
    assert "--quick" in text
    for section, title in SECTION_TITLES.items():
        rows = _table_rows(text, title)
        mine = [r for r in records if r["section"] == section]
        assert len(rows) == 1 + len(mine), section
        assert {len(row) for row in rows} == {len(rows[0])}, section
        assert rows[0][-1] == "status"
        assert [row[-1] for row in rows[1:]] == [cell(r["status"]) for r in mine]


@pytest.mark.parametrize("args, message", [
    (["--image-size", "32"], "--image-size must be at least 67"),
    (["--reps", "0"], "--reps must be positive"),
    (["--batch", "7"], "--batch must be even"),
    (["--pipeline-folder", "/nonexistent"], "--pipeline-folder is not a folder"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "out"
    proc = _bench("--out", str(out), "--quick", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and message in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_out_must_be_a_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    proc = _bench("--out", str(target), "--quick")
    assert proc.returncode == 2 and "--out must be a folder" in proc.stderr
    assert target.read_text() == "x"


_EQUIVALENCE = r"""
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import keras_alexnet
from bench import torch_alexnet

torch.set_num_threads(1)
results = {}
# 99 px: pool5 is 2x2, so fc6's row order (towers, then h, w, c) matters. He init makes
# the LRN denominators far from k, so a wrong alpha or window would show.
for towers in (2, 1):
    model = keras_alexnet.alexnet(num_classes=7, image_size=99, width=0.25, towers=towers,
                                  initializer="he", seed=3)
    x = (50 * np.random.default_rng(0).normal(size=(3, 99, 99, 3))).astype("float32")
    keras_logits = np.asarray(model(x, training=False))
    net = torch_alexnet.from_keras(model)
    nchw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        torch_logits = net(nchw).numpy()
        scale = float(np.abs(keras_logits).max())
        entry = {"diff": float(np.abs(keras_logits - torch_logits).max()), "scale": scale}
        if towers == 2:  # the conventions the module must get right, each broken on purpose
            net.norm1.norm.alpha = net.norm2.norm.alpha = 1e-4  # paper alpha, not alpha * n
            entry["alpha_not_times_n"] = float(np.abs(keras_logits - net(nchw).numpy()).max())
            net = torch_alexnet.from_keras(model)
            net.norm1.towers = net.norm2.towers = 1  # one LRN across both towers
            entry["lrn_across_towers"] = float(np.abs(keras_logits - net(nchw).numpy()).max())
    results[towers] = entry
print("RESULT" + json.dumps(results))
"""


@pytest.mark.slow
@pytest.mark.parametrize("onednn", ONEDNN_SETTINGS)
def test_torch_alexnet_computes_the_keras_model(onednn):
    results = run_script(_EQUIVALENCE, str(REPO), onednn=onednn)
    for towers in ("2", "1"):
        entry = results[towers]
        assert entry["scale"] > 10  # the logits are not all near zero
        assert entry["diff"] <= 1e-5 * entry["scale"], entry
    # The same comparison detects either convention mistake by far.
    assert results["2"]["alpha_not_times_n"] > 1e-2 * results["2"]["scale"]
    assert results["2"]["lrn_across_towers"] > 1e-3 * results["2"]["scale"]


@pytest.mark.slow
def test_flops_from_layer_shapes_match_the_reference():
    """/work/shared/reference/alexnet.md section 6: 724.4 M MAC (1.449 GFLOP) forward for
    the paper's model at 227, 1,135 M without groups, 714 M for torchvision's."""
    import keras_alexnet
    from bench import flops

    paper = keras_alexnet.alexnet()
    macs = flops.forward_macs(paper)
    assert round(sum(macs.values()) / 1e6, 1) == 724.4
    assert round(flops.forward_flops(paper) / 1e9, 3) == 1.449
    assert round((macs["conv1_a"] + macs["conv1_b"]) / 1e6, 1) == 105.4
    assert round((macs["fc6_a"] + macs["fc6_b"]) / 1e6, 1) == 37.7
    assert flops.train_flops(paper) == 3 * flops.forward_flops(paper)
    del paper
    single = flops.forward_macs(keras_alexnet.alexnet("single_tower"))
    assert round(sum(single.values()) / 1e6) == 1135
    torchvision = flops.forward_macs(keras_alexnet.alexnet("torchvision"))
    assert round(sum(torchvision.values()) / 1e6) == 714


def test_drive_times_a_window_that_starts_after_every_untimed_call():
    """The serving load's window opens once each client's untimed first call is back:
    first calls slower than the whole window (a batch of 32 with 16 clients) must not
    eat it, and the seconds counted must not include them."""
    import threading
    import time

    from bench.serve import drive

    lock, calls = threading.Lock(), []

    def make_client():
        first = [True]

        def call():
            with lock:
                calls.append(time.perf_counter())
            time.sleep(0.6 if first[0] else 0.01)
            first[0] = False

        return call, lambda: None

    result = drive(make_client, clients=4, seconds=0.3)
    assert result["failures"] == 0 and result["errors"] == []
    # about 0.3 s / 10 ms = 30 timed calls per client; the untimed ones are not counted
    assert 4 * 10 <= result["requests"] == len(result["latencies_ms"]) <= len(calls) - 4
    assert 0.3 <= result["seconds"] < 0.6  # the window, not the untimed 0.6 s calls
    assert all(ms < 500 for ms in result["latencies_ms"])


@pytest.mark.slow
def test_profile_step_accounts_for_every_op(tmp_path):
    """``python -m bench.profile_step`` on a tiny model: every convolution and dense
    layer's kernels are found, with the FLOP of its shapes, and the kinds of work add up
    to the op time."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.profile_step", "--image-size", "67", "--width", "0.125",
         "--num-classes", "10", "--batch", "4", "--warmup", "1", "--timed", "1",
         "--steps", "1", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "profile.json").read_text())
    summary = result["summary"]
    kinds = {k["kind"]: k for k in summary["kinds"]}
    for kind in ("conv forward", "conv grad inputs", "conv grad weights", "dense forward",
                 "dense backward", "LRN", "max pooling", "ReLU", "weight decay gradient",
                 "optimizer update"):
        assert kinds[kind]["ms_per_step"] > 0, kind
    assert _close(sum(k["ms_per_step"] for k in kinds.values()), summary["op_ms_per_step"], 2e-2)
    assert _close(sum(k["share_of_op_time"] for k in kinds.values()), 1.0, 1e-2)
    layers = {(r["layer"], r["kind"]): r for r in summary["layers"]}
    towers = [f"conv{i}_{t}" for i in range(1, 6) for t in "ab"]
    assert {layer for layer, _ in layers} == {*towers, "fc6_a", "fc6_b", "fc7_a", "fc7_b",
                                              "fc8"}
    assert ("conv1_a", "conv grad inputs") not in layers  # the images need no gradient
    # conv1 at 67x67, width 0.125: 6 filters per tower, 15x15 outputs, 11x11x3 inputs
    assert layers[("conv1_a", "conv forward")]["gflop_per_step"] == round(
        2 * 15 * 15 * 6 * 11 * 11 * 3 * 4 / 1e9, 6)
    assert all(r["ms_per_step"] > 0 for r in layers.values())
    assert "| kind of work |" in (tmp_path / "profile.md").read_text()


@pytest.mark.slow
def test_prepare_writes_the_inference_artefacts_only_for_the_infer_section(tmp_path):
    """The bfloat16 export, its top-5 check and the ONNX conversion serve the infer
    section alone: without it, `prepare` writes only the float32 export and the PyTorch
    weights, and says so in its facts; with it, both are written and the top-5 check
    counts every photo (within a tiny model's rounding)."""
    script = f"""
import json, pathlib, sys
sys.path.insert(0, {str(REPO)!r})
from bench import sides_tf
from bench.inputs import PHOTOS
out = {{}}
for sides in (False, True):
    work = pathlib.Path({str(tmp_path)!r}) / str(sides)
    work.mkdir()
    facts = sides_tf.prepare(str(work), 67, 0.125, 10, inference_sides=sides)
    out[str(sides)] = dict(facts, files=sorted(
        str(p.relative_to(work)) for p in work.rglob("*") if p.parent == work
        or p.parent.parent == work / "models"), photos=len(PHOTOS))
print("RESULT" + json.dumps(out))
"""
    result = run_script(script)
    without, with_ = result["False"], result["True"]
    assert without["bf16_version_dir"] is None and without["bf16_top5"] is None
    assert without["onnx"] is None and without["onnx_error"] is None
    assert "model.onnx" not in without["files"]
    assert without["files"] == ["models", "models/alexnet/1", "torch_state.npz"]
    assert pathlib.Path(without["version_dir"]).is_dir()
    assert pathlib.Path(with_["bf16_version_dir"]).is_dir() and with_["bf16_error"] is None
    assert "models/alexnet-bf16/1" in with_["files"]
    assert (with_["onnx"] is not None) != (with_["onnx_error"] is not None)
    top5 = with_["bf16_top5"]
    assert top5["photos"] == with_["photos"] > 0
    assert 0 <= top5["same_order"] <= top5["same_top5"] <= top5["photos"]
