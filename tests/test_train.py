"""Training runs end to end: learning, the CLI, resume after interruption, export."""

import dataclasses
import json

import pytest

from keras_alexnet import trainer
from keras_alexnet.training.config import PRESETS, TrainConfig
from training import train


def smoke_config(data_dir, **overrides):
    return dataclasses.replace(PRESETS["smoke"], data_dir=data_dir, **overrides)


def test_short_run_learns_far_above_chance(shapes_data_dir, tmp_path):
    config = smoke_config(shapes_data_dir, width=0.25, epochs=8)
    summary = trainer.run(config, tmp_path / "run", tmp_path / "models", verbose=0)
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
            "--quiet"]
    original = trainer.AtomicCheckpoint.on_epoch_end

    def crash_after_second_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(trainer.AtomicCheckpoint, "on_epoch_end", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["epoch"] == 2
    assert not (tmp_path / "models").exists()  # nothing exported from an unfinished run
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["epoch_0001.keras", "epoch_0002.keras"]  # no temporary files

    monkeypatch.setattr(trainer.AtomicCheckpoint, "on_epoch_end", original)
    seen = []
    real_fit = trainer.keras.Model.fit

    def recording_fit(self, *args, **kwargs):
        seen.append(kwargs["initial_epoch"])
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(trainer.keras.Model, "fit", recording_fit)
    summary = train.main(argv)
    assert seen == [2]
    rows = (tmp_path / "run" / "history.csv").read_text().splitlines()[1:]
    assert [row.split(",")[0] for row in rows] == ["0", "1", "2"]
    assert summary["export_path"].endswith("1")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "epoch_0002.keras", "epoch_0003.keras"]  # keeps the newest two


def test_resuming_with_a_different_configuration_is_refused(shapes_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(smoke_config(shapes_data_dir, width=0.5).to_json())
    with pytest.raises(ValueError, match="width: 0.5 -> 0.125"):
        trainer.run(smoke_config(shapes_data_dir), run_dir, tmp_path / "models", verbose=0)


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    """The paper's schedule: lr / 10 when validation top-1 stops improving, 3 times at most."""
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="mse")
    schedule = trainer.PlateauSchedule(max_drops=3, patience=2)
    schedule.set_model(model)
    val_top1 = [0.1, 0.2, 0.2, 0.15, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    lrs = []
    for epoch, value in enumerate(val_top1):
        logs = {"val_top1": value}
        schedule.on_epoch_end(epoch, logs)
        lrs.append(float(model.optimizer.learning_rate.numpy()))
        assert logs["lr"] == pytest.approx(lrs[-2] if epoch else 0.01)  # logged before a drop
    # Drops after 2 epochs without a new best (epochs 3, 6, 8); never a fourth.
    assert lrs == pytest.approx([0.01] * 3 + [1e-3] * 3 + [1e-4] * 2 + [1e-5] * 5, rel=1e-6)
    assert schedule.get_state() == {"best": 0.3, "wait": 4, "drops": 3}
    resumed = trainer.PlateauSchedule(max_drops=3, patience=2)
    resumed.set_state(schedule.get_state())
    assert resumed.get_state() == schedule.get_state()
