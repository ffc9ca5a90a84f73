"""The paper's experiments (training/experiments.py): arms, measures, tables, resume."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from keras_alexnet import preprocessing
from keras_alexnet.training import experiments
from keras_alexnet.training.run_dir import RunDirectory
from training import experiments as cli


def tiny_base(data_dir, **overrides):
    values = dict(dataset="alexnet_shapes/tiny", data_dir=data_dir, image_size=67,
                  width=0.125, epochs=1, batch_size=32)
    return dataclasses.replace(experiments.SMALL, **{**values, **overrides})


def test_each_experiment_varies_only_what_it_compares():
    base = experiments.SMALL
    changed = {}
    for name, experiment in experiments.EXPERIMENTS.items():
        arms = experiments.variants(experiment, base, members=3)
        assert len(arms) == (3 if name == "ensemble" else 2)
        fields = set()
        for _, config in arms:
            diff = {k for k, v in dataclasses.asdict(config).items()
                    if v != getattr(base, k)}
            fields |= diff
        changed[name] = fields
    assert changed == {"relu-vs-tanh": {"activation"}, "lrn": {"use_lrn"},
                       "overlapping-pool": {"pool_size", "pool_stride"},
                       "dropout": {"dropout_rate"}, "augmentation": {"augment"},
                       "ensemble": {"seed"}}


def test_steps_to_a_training_error_and_top_k_error_by_hand():
    history = [{"epoch": 0, "top1": 0.5}, {"epoch": 1, "top1": 0.74},
               {"epoch": 2, "top1": 0.75}, {"epoch": 3, "top1": 0.9}]
    assert experiments.steps_to_error(history, 0.25, 15) == 45  # end of epoch 3 (1-based)
    assert experiments.steps_to_error(history, 0.05, 15) is None
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.4, 0.4, 0.2]])
    labels = np.array([1, 2, 0, 1])
    # top-1: rows 0 (1) hit, 1 (0) miss, 2 (2) miss, 3 (tie 0/1: 0 first) miss.
    assert experiments.top_k_error(probs, labels, 1) == pytest.approx(0.75)
    # top-2: row 0 {1,2} hit, row 1 {0,2} hit, row 2 {2,1} miss, row 3 {0,1} hit.
    assert experiments.top_k_error(probs, labels, 2) == pytest.approx(0.25)


@pytest.mark.slow
def test_an_experiment_trains_both_arms_writes_its_table_and_resumes(shapes_data_dir,
                                                                     tmp_path):
    base = tiny_base(shapes_data_dir)
    result = experiments.run("lrn", base, tmp_path, verbose=0)
    assert [row["variant"] for row in result["rows"]] == ["lrn", "no-lrn"]
    for row in result["rows"]:
        history = RunDirectory(tmp_path / row["variant"]).read_history()
        assert row["val_top1_error"] == pytest.approx(1 - history[-1]["val_top1"])
        assert row["train_top1_error"] == pytest.approx(1 - history[-1]["top1"])
        assert row["gap_top1"] == pytest.approx(history[-1]["top1"] - history[-1]["val_top1"])
        assert row["steps"] == 480 // 32
    no_lrn = RunDirectory(tmp_path / "no-lrn").read_config()
    assert (no_lrn.use_lrn, RunDirectory(tmp_path / "lrn").read_config().use_lrn) == (False,
                                                                                    True)
    table = (tmp_path / "results.md").read_text()
    assert "| no-lrn | 1 | 15 |" in table and "Sec. 3.3" in table
    assert json.loads((tmp_path / "results.json").read_text())["rows"][1]["variant"] == "no-lrn"
    with Image.open(tmp_path / "plot.png") as png:
        assert png.format == "PNG" and png.size == (800, 450)
    # A rerun resumes the finished arms: nothing trains again, the same table comes back.
    states = [RunDirectory(tmp_path / a).read_state() for a in ("lrn", "no-lrn")]
    again = experiments.run("lrn", base, tmp_path, verbose=0)
    assert [RunDirectory(tmp_path / a).read_state() for a in ("lrn", "no-lrn")] == states
    assert [r["val_top1_error"] for r in again["rows"]] == \
        [r["val_top1_error"] for r in result["rows"]]


@pytest.mark.slow
def test_ensemble_row_is_the_averaged_softmax_of_the_members(shapes_data_dir, tmp_path):
    base = tiny_base(shapes_data_dir, epochs=2)
    result = experiments.run("ensemble", base, tmp_path, members=2, verbose=0)
    assert [r["variant"] for r in result["rows"]] == ["seed-2012", "seed-2013", "average of 2"]
    # Independently: each member on the validation images, one at a time, through the
    # shared evaluation preprocessing; then the mean of the softmaxes in NumPy.
    from keras_alexnet import datasets

    source = datasets.load("alexnet_shapes/tiny", data_dir=shapes_data_dir)
    images = list(source.validation.as_numpy_iterator())
    pixels = np.stack([preprocessing.eval_from_bytes(b, 67).numpy() for b, _ in images])
    labels = np.array([label for _, label in images])
    probs = []
    for arm in ("seed-2012", "seed-2013"):
        logits = RunDirectory(tmp_path / arm).load_model()(pixels, training=False).numpy()
        e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
        member = e / e.sum(axis=1, keepdims=True)
        probs.append(member)
        row = next(r for r in result["rows"] if r["variant"] == arm)
        assert row["val_top1_error"] == pytest.approx(
            float(np.mean(member.argmax(axis=1) != labels)), abs=1e-9)
    average = (probs[0] + probs[1]) / 2
    want = float(np.mean(average.argmax(axis=1) != labels))
    assert result["rows"][-1]["val_top1_error"] == pytest.approx(want, abs=1e-9)
    assert not np.array_equal(probs[0], probs[1])  # the seeds made different members


def test_cli_refuses_bad_flags_and_a_run_dir_of_another_configuration(shapes_data_dir,
                                                                      tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ensemble", "--members", "1", "--run-dir", str(tmp_path / "e")])
    assert exit_info.value.code == 2
    assert "--members must be at least 2" in capsys.readouterr().err
    # An arm directory holding another run: refused before any arm trains.
    other = tmp_path / "x" / "no-lrn"
    other.mkdir(parents=True)
    (other / "config.json").write_text(tiny_base(shapes_data_dir, width=0.5).to_json())
    argv = ["lrn", "--dataset", "alexnet_shapes/tiny", "--data-dir", shapes_data_dir,
            "--image-size", "67", "--width", "0.125", "--epochs", "1",
            "--run-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "different configuration" in capsys.readouterr().err
    assert not (tmp_path / "x" / "lrn").exists() and not (tmp_path / "x" / "results.md").exists()
