"""Training runs end to end: learning, the CLI, resume after interruption, export."""

import dataclasses
import json

import pytest

from keras_alexnet.training import loop
from keras_alexnet.training.config import PRESETS, TrainConfig
from keras_alexnet.training.run_dir import RunDirectory
from keras_alexnet.training.schedule import PlateauSchedule
from training import train


def smoke_config(data_dir, **overrides):
    return dataclasses.replace(PRESETS["smoke"], data_dir=data_dir, **overrides)


def test_short_run_learns_far_above_chance(shapes_data_dir, tmp_path):
    config = smoke_config(shapes_data_dir, width=0.25, epochs=8)
    summary = loop.train(config, tmp_path / "run", tmp_path / "models", verbose=0)
    # 10 balanced classes: chance is 10% top-1 and 50% top-5 (this run reaches ~50% / 99%).
    assert summary["val_top1"] >= 0.3, summary
    assert summary["val_top5"] >= 0.8, summary
    assert (tmp_path / "models" / "1" / "saved_model.pb").exists()
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert history[0].split(",") == ["epoch", "loss", "lr", "top1", "top5", "val_loss",
                                     "val_top1", "val_top5"]
    assert len(history) == 1 + 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == 0.25
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--preset", "--dataset", "--data-dir", "--epochs", "--batch-size",
                 "--learning-rate", "--run-dir", "--seed", "--export-dir"):
        assert flag in text


def test_cli_overrides_preset():
    args = train.build_parser().parse_args(
        ["--preset", "paper", "--epochs", "3", "--batch-size", "8", "--learning-rate", "0.1"])
    config = train.resolve_config(args)
    assert (config.epochs, config.batch_size, config.learning_rate) == (3, 8, 0.1)
    assert (config.optimizer, config.momentum, config.weight_decay) == ("sgd", 0.9, 5e-4)
    assert config.initializer == "paper" and config.lr_drops == 3
    assert PRESETS["paper"] == TrainConfig()


def test_interrupted_run_resumes_where_it_stopped(shapes_data_dir, tmp_path, monkeypatch):
    argv = ["--preset", "smoke", "--data-dir", shapes_data_dir, "--epochs", "3",
            "--run-dir", str(tmp_path / "run"), "--export-dir", str(tmp_path / "models"),
            "--checkpoint-every", "0", "--quiet"]
    original = RunDirectory.save

    def interrupt_after_second_epoch(self, checkpoint, state, keep, **kwargs):
        committed = original(self, checkpoint, state, keep, **kwargs)
        if committed.epoch == 2:
            raise KeyboardInterrupt("simulated interruption")
        return committed

    monkeypatch.setattr(RunDirectory, "save", interrupt_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (state["epoch"], state["step"], state["global_step"]) == (2, 0, 60)
    assert not (tmp_path / "models").exists()  # nothing exported from an unfinished run
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["ckpt-30.data-00000-of-00001", "ckpt-30.index",
                           "ckpt-60.data-00000-of-00001", "ckpt-60.index"]

    monkeypatch.setattr(RunDirectory, "save", original)
    summary = train.main(argv)
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["0", "1", "2"]
    assert summary["export_path"].endswith("1")
    assert json.loads((tmp_path / "run" / "state.json").read_text())["checkpoints"] == [
        "ckpt-60", "ckpt-90"]  # keeps the newest two
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "ckpt-60.data-00000-of-00001", "ckpt-60.index",
        "ckpt-90.data-00000-of-00001", "ckpt-90.index"]


def test_resuming_with_a_different_configuration_is_refused(shapes_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(smoke_config(shapes_data_dir, width=0.5).to_json())
    with pytest.raises(ValueError, match="width: 0.5 -> 0.125"):
        loop.train(smoke_config(shapes_data_dir), run_dir, tmp_path / "models", verbose=0)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]  # nothing written


def test_old_run_directories_are_refused_with_a_clear_error(shapes_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text(smoke_config(shapes_data_dir).to_json())
    (run_dir / "checkpoints" / "epoch_0001.keras").write_bytes(b"old")
    with pytest.raises(ValueError, match="older release.*new --run-dir"):
        loop.train(smoke_config(shapes_data_dir), run_dir, tmp_path / "models", verbose=0)


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    """The paper's schedule: lr / 10 when validation top-1 stops improving, 3 times at most."""
    schedule = PlateauSchedule(max_drops=3, patience=2)
    val_top1 = [0.1, 0.2, 0.2, 0.15, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    lr, lrs = 0.01, []
    for value in val_top1:
        lr = schedule.update(value, lr)
        lrs.append(lr)
    # Drops after 2 epochs without a new best (epochs 3, 6, 8); never a fourth.
    assert lrs == pytest.approx([0.01] * 3 + [1e-3] * 3 + [1e-4] * 2 + [1e-5] * 5, rel=1e-9)
    assert schedule.get_state() == {"best": 0.3, "wait": 4, "drops": 3}


def test_plateau_schedule_resumed_from_its_state_continues_the_same_way():
    """A schedule restored mid-plateau makes the decisions the uninterrupted one makes."""
    values = [0.5, 0.4, 0.45, 0.6, 0.55, 0.58, 0.59, 0.7, 0.6, 0.6, 0.6]
    uninterrupted, lr, expected = PlateauSchedule(max_drops=2, patience=2), 1.0, []
    for value in values:
        lr = uninterrupted.update(value, lr)
        expected.append(lr)
    first = PlateauSchedule(max_drops=2, patience=2)
    lr, actual = 1.0, []
    for value in values[:5]:  # stop in the middle of a plateau (wait == 2)
        lr = first.update(value, lr)
        actual.append(lr)
    saved = json.loads(json.dumps(first.get_state()))  # as state.json stores it
    assert saved["wait"] == 1 and saved["drops"] == 1
    resumed = PlateauSchedule(max_drops=2, patience=2)
    resumed.set_state(saved)
    for value in values[5:]:
        lr = resumed.update(value, lr)
        actual.append(lr)
    assert actual == expected
    assert expected == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1] + [0.01] * 6, rel=1e-12)


def test_resuming_with_another_global_batch_is_refused_before_writing(shapes_data_dir,
                                                                     tmp_path):
    """More or fewer replicas would change every batch (and the skip to the saved step)."""
    config = smoke_config(shapes_data_dir)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(config.to_json())
    state = {"epoch": 1, "step": 0, "global_step": 15, "num_classes": 10,
             "global_batch": 32, "checkpoints": ["ckpt-15"]}
    (run_dir / "state.json").write_text(json.dumps(state))
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(ValueError, match="global batch of 32.*global batch of 16"):
        loop.train(config, run_dir, tmp_path / "models", verbose=0)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
