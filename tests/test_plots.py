"""Pictures (issue 11): filter grids from the kernels, curves from the history, nearest
neighbours and confusion counts by hand, the run directory's epoch pictures and the
``alexnet-plot`` command."""

import csv
import dataclasses
import io
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_alexnet import plots
from keras_alexnet.model import alexnet
from keras_alexnet.training import loop, pictures
from keras_alexnet.training.config import PRESETS
from keras_alexnet.training.run_dir import HISTORY_FIELDS, RunDirectory
from training import plot

ROOT = pathlib.Path(__file__).resolve().parents[1]


def png_image(data):
    """The PNG decoded by PIL (an independent reader), after checking it is one."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def expected_cell(kernel, i):
    """Kernel ``i`` of ``[kh, kw, 3, N]`` min-max normalised to 0..255, by hand."""
    k = np.asarray(kernel, np.float64)[:, :, :, i]
    return np.rint((k - k.min()) / (k.max() - k.min()) * 255).astype(np.uint8)


def cell(mosaic, i, columns, side=11, pad=1):
    row, column = divmod(i, columns)
    top, left = pad + row * (side + pad), pad + column * (side + pad)
    return mosaic[top:top + side, left:left + side]


def tiny_model(**overrides):
    return alexnet(num_classes=10, image_size=67, width=0.125, seed=1, **overrides)


# Filters --------------------------------------------------------------------------------

def test_filter_tiles_normalise_each_kernel_on_its_own():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=[11, 11, 3, 5]) * np.array([1, 10, 0.01, 3, 100])
    kernel[..., 3] = 0.25  # a constant kernel: mid-grey
    tiles = plots.filter_tiles(kernel)
    assert tiles.shape == (5, 11, 11, 3)
    for i in (0, 1, 2, 4):
        k = kernel[:, :, :, i]
        np.testing.assert_allclose(tiles[i], (k - k.min()) / (k.max() - k.min()), atol=1e-12)
        assert tiles[i].min() == 0 and tiles[i].max() == 1
    assert np.all(tiles[3] == 0.5)
    with pytest.raises(ValueError, match="3, filters"):
        plots.filter_tiles(np.zeros([11, 11, 4, 2]))


def test_filter_grid_cells_are_the_kernels_and_each_tower_is_a_block():
    model = tiny_model()
    kernel_a = model.get_layer("conv1_a").kernel.numpy()
    kernel_b = model.get_layer("conv1_b").kernel.numpy()
    assert kernel_a.shape == kernel_b.shape == (11, 11, 3, 6)
    # Tower a, kernel 2: a known random pattern spanning 0..255, scaled and shifted.
    pattern = np.random.default_rng(1).integers(0, 256, [11, 11, 3]).astype(np.uint8)
    pattern[0, 0, 0], pattern[10, 10, 2] = 0, 255
    kernel_a[..., 2] = pattern.astype(np.float32) * 0.002 - 0.25
    # Tower b, kernel 4: red left half, blue right half, a darker middle column.
    halves = np.zeros([11, 11, 3])
    halves[:, :5, 0], halves[:, 6:, 2], halves[:, 5, :] = 1.0, 1.0, 0.2
    kernel_b[..., 4] = (3 * halves - 1).astype(np.float32)
    model.get_layer("conv1_a").kernel.assign(kernel_a)
    model.get_layer("conv1_b").kernel.assign(kernel_b)

    figure = plots.filter_grid(model, columns=4, pad=1)
    assert len(figure.axes) == 2
    assert figure.axes[0].get_title().startswith("tower a (GPU 1)")
    assert figure.axes[1].get_title().startswith("tower b (GPU 2)")
    block_a = np.asarray(figure.axes[0].images[0].get_array())
    block_b = np.asarray(figure.axes[1].images[0].get_array())
    assert block_a.dtype == np.uint8 and block_a.shape == (1 + 2 * 12, 1 + 4 * 12, 3)
    np.testing.assert_array_equal(cell(block_a, 2, 4), pattern)
    red_blue = np.zeros([11, 11, 3], np.uint8)
    red_blue[:, :5, 0], red_blue[:, 6:, 2], red_blue[:, 5, :] = 255, 255, 51
    np.testing.assert_array_equal(cell(block_b, 4, 4), red_blue)
    assert not np.array_equal(cell(block_a, 4, 4), red_blue)  # tower b's kernel is in b only
    for block, kernel in ((block_a, kernel_a), (block_b, kernel_b)):
        for i in range(6):
            np.testing.assert_array_equal(cell(block, i, 4), expected_cell(kernel, i))
    # The padding between the tiles is the white background.
    assert np.all(block_a[0] == 255) and np.all(block_a[:, 12] == 255)
    assert np.all(block_a[13:, 25:] == 255)  # row 2 holds only kernels 4 and 5


def test_grid_image_places_tiles_row_by_row():
    tiles = np.zeros([5, 2, 3, 3])
    for i in range(5):
        tiles[i] = i / 4
    mosaic = plots.grid_image(tiles, columns=3, pad=2, background=7)
    assert mosaic.shape == (2 + 2 * 4, 2 + 3 * 5, 3)
    assert np.all(mosaic[2:4, 7:10] == round(255 / 4))  # tile 1: row 0, column 1
    assert np.all(mosaic[6:8, 7:10] == 255)  # tile 4: row 1, column 1
    assert np.all(mosaic[6:8, 12:15] == 7)  # no tile 5: background


def test_torchvision_and_caffe_variants_build_filter_grids():
    torchvision = alexnet("torchvision", num_classes=10, image_size=67,
                          conv_filters=(64, 16, 16, 16, 16), seed=2)
    figure = plots.filter_grid(torchvision)
    assert len(figure.axes) == 1 and figure.axes[0].get_title().startswith("conv1: 64 kernels")
    block = np.asarray(figure.axes[0].images[0].get_array())
    assert block.shape == (1 + 4 * 12, 1 + 16 * 12, 3)  # 16 across, 4 rows
    kernel = torchvision.get_layer("conv1").kernel.numpy()
    np.testing.assert_array_equal(cell(block, 63, 16), expected_cell(kernel, 63))
    caffe = alexnet("caffe", num_classes=10, image_size=67, width=0.125, seed=3)
    titles = [axes.get_title() for axes in plots.filter_grid(caffe).axes]
    assert [t.split(":")[0] for t in titles] == ["tower a (GPU 1)", "tower b (GPU 2)"]
    with pytest.raises(ValueError, match="no conv1 layer"):
        import keras

        plots.filter_grid(keras.Sequential([keras.Input([4]), keras.layers.Dense(2)]))


def test_pngs_have_the_pixel_size_asked_for():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, [40 + 7 * i, 50, 3]).astype(np.uint8) for i in range(3)]
    figures = {
        (640, 360): plots.filter_grid(tiny_model(), size=(640, 360)),
        (500, 420): plots.prediction_grid(images, [["a", "b"], ["c", "d"], ["e", "f"]],
                                          [[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]],
                                          size=(500, 420)),
        (330, 250): plots.neighbour_grid(images[:2], [images[1:], images[:2]], size=(330, 250)),
        (450, 400): plots.confusion_matrix_figure([0, 1, 1], [0, 1, 0], ["x", "y"],
                                                  size=(450, 400)),
        (800, 600): plots.training_curves([{"epoch": 0, "loss": 1, "lr": 0.1, "top1": 0.5}]),
    }
    for size, figure in figures.items():
        data = plots.to_png(figure)
        assert png_image(data).size == size
        assert plots.png_size(data) == size
    default = plots.to_png(plots.filter_grid(tiny_model()))
    assert png_image(default).size[0] == 800
    with pytest.raises(ValueError, match="Not a PNG"):
        plots.png_size(b"GIF89a" + bytes(30))


# Curves ---------------------------------------------------------------------------------

def write_history(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


HISTORY = [
    {"epoch": 0, "loss": 2.5, "lr": 0.01, "top1": 0.10, "top5": 0.40, "val_loss": 2.4,
     "val_top1": 0.12, "val_top5": 0.45},
    {"epoch": 1, "loss": 2.0, "lr": 0.01, "top1": 0.30, "top5": 0.70, "val_loss": 2.1,
     "val_top1": 0.25, "val_top5": 0.66},
    {"epoch": 2, "loss": 1.5, "lr": 0.001, "top1": 0.55, "top5": 0.85, "val_loss": 1.9,
     "val_top1": 0.41, "val_top5": 0.80},
]


def test_curves_plot_errors_from_the_history_file(tmp_path):
    write_history(tmp_path / "history.csv", HISTORY)
    rows = RunDirectory(tmp_path).read_history()
    figure = plots.training_curves(rows, steps=[(20, 1.8), (10, 2.6), (30, 1.2)])
    loss, top1, top5, lr, batch = figure.axes
    column = {k: np.array([row[k] for row in HISTORY], np.float64) for k in HISTORY[0]}
    for axes in (loss, top1, top5, lr):
        np.testing.assert_array_equal(axes.lines[0].get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [2.5, 2.0, 1.5])
    np.testing.assert_allclose(loss.lines[1].get_ydata(), [2.4, 2.1, 1.9])
    np.testing.assert_allclose(top1.lines[0].get_ydata(), [0.90, 0.70, 0.45])
    np.testing.assert_allclose(top1.lines[1].get_ydata(), 1 - column["val_top1"])
    np.testing.assert_allclose(top5.lines[0].get_ydata(), [0.60, 0.30, 0.15])
    np.testing.assert_allclose(top5.lines[1].get_ydata(), [0.55, 0.34, 0.20])
    np.testing.assert_allclose(lr.lines[0].get_ydata(), [0.01, 0.01, 0.001])
    assert lr.get_yscale() == "log"
    np.testing.assert_array_equal(batch.lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_array_equal(batch.lines[0].get_ydata(), [2.6, 1.8, 1.2])
    assert [a.get_title() for a in figure.axes] == [
        "loss", "top-1 error", "top-5 error", "learning rate", "loss, running epoch mean"]


def test_curves_of_one_epoch_without_steps_and_of_none(tmp_path):
    figure = plots.training_curves(HISTORY[:1])
    assert len(figure.axes) == 4
    np.testing.assert_allclose(figure.axes[1].lines[0].get_ydata(), [0.9])
    assert png_image(plots.to_png(figure)).size == (800, 600)
    with pytest.raises(ValueError, match="empty"):
        plots.training_curves([])


def test_a_long_batch_loss_is_drawn_as_the_means_of_runs():
    steps = [(10 * i, float(i % 7)) for i in range(1, 10001)]
    line = plots.training_curves(HISTORY, steps).axes[4].lines[0]
    assert len(line.get_xdata()) == plots.MAX_CURVE_POINTS
    # 10,000 points in 2,000 runs of 5: each drawn point is the mean of its five.
    np.testing.assert_allclose(line.get_ydata()[:3], [np.mean([1, 2, 3, 4, 5]),
                                                      np.mean([6, 0, 1, 2, 3]),
                                                      np.mean([4, 5, 6, 0, 1])])
    assert line.get_xdata()[0] == 30


def test_read_scalars_follows_a_resumed_run_and_reads_growing_files(tmp_path):
    log_dir = tmp_path / "train"
    first = tf.summary.create_file_writer(str(log_dir))
    with first.as_default():
        for step, value in ((10, 3.0), (20, 2.0), (30, 1.0)):
            tf.summary.scalar("batch_loss", value, step=step)
            tf.summary.scalar("other", -value, step=step)
    first.flush()
    assert pictures.read_scalars(log_dir) == [(10, 3.0), (20, 2.0), (30, 1.0)]
    # A resumed run (restarted from step 10) starts a new file: steps 20 and 30 again.
    first.close()
    resumed = tf.summary.create_file_writer(str(log_dir), filename_suffix=".resumed")
    with resumed.as_default():
        for step, value in ((20, 2.5), (30, 1.5)):
            tf.summary.scalar("batch_loss", value, step=step)
    resumed.flush()
    assert pictures.read_scalars(log_dir) == [(10, 3.0), (20, 2.5), (30, 1.5)]
    with resumed.as_default():
        tf.summary.scalar("batch_loss", 0.5, step=40)
    resumed.flush()
    assert pictures.read_scalars(log_dir) == [(10, 3.0), (20, 2.5), (30, 1.5), (40, 0.5)]
    assert pictures.read_scalars(log_dir, "other") == [(10, -3.0), (20, -2.0), (30, -1.0)]
    assert pictures.read_scalars(tmp_path / "missing") == []


# Neighbours, predictions, confusion --------------------------------------------------------

def test_nearest_equals_brute_force_euclidean_distance():
    rng = np.random.default_rng(4)
    train = rng.normal(size=[300, 32]).astype(np.float32)
    queries = rng.normal(size=[9, 32]).astype(np.float32)
    distances = np.sqrt(((queries[:, None, :].astype(np.float64) - train[None]) ** 2).sum(-1))
    expected = np.argsort(distances, axis=1)[:, :6]
    np.testing.assert_array_equal(plots.nearest(queries, train, 6), expected)
    # A query equal to a training vector finds it first.
    assert plots.nearest(train[[17, 123]], train, 1).ravel().tolist() == [17, 123]
    with pytest.raises(ValueError, match="k"):
        plots.nearest(queries, train, 301)
    with pytest.raises(ValueError, match="same D"):
        plots.nearest(queries[:, :5], train, 1)


def test_neighbour_and_prediction_grids_lay_out_every_image():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, [20, 30, 3]).astype(np.uint8) for _ in range(8)]
    figure = plots.neighbour_grid(images[:2], [images[2:5], images[5:8]],
                                  query_titles=["cat", "dog"],
                                  neighbour_titles=[["a", "b", "c"], ["d", "e", "f"]])
    assert len(figure.axes) == 2 * 4
    np.testing.assert_array_equal(figure.axes[4].images[0].get_array(), images[1])
    np.testing.assert_array_equal(figure.axes[7].images[0].get_array(), images[7])
    assert figure.axes[4].get_title() == "query: dog"
    figure = plots.prediction_grid(images[:2], [["cat", "dog"], ["car", "bus"]],
                                   [[0.7, 0.2], [0.6, 0.3]])
    bars = figure.axes[3]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["car", "bus"]
    assert [round(p.get_width(), 6) for p in bars.patches] == [0.6, 0.3]
    assert bars.patches[0].get_y() > bars.patches[1].get_y()  # the most probable on top


def test_confusion_matrix_by_hand():
    labels = [0, 0, 1, 2, 2, 2, 1]
    predictions = [0, 1, 1, 2, 0, 2, 1]
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    np.testing.assert_array_equal(plots.confusion_matrix(labels, predictions, 3), expected)
    np.testing.assert_array_equal(plots.confusion_matrix(labels, predictions, 4)[:3, :3],
                                  expected)
    figure = plots.confusion_matrix_figure(labels, predictions, ["a", "b", "c"])
    np.testing.assert_allclose(figure.axes[0].images[0].get_array(),
                               [[0.5, 0.5, 0], [0, 1, 0], [1 / 3, 0, 2 / 3]])
    written = sorted(t.get_text() for t in figure.axes[0].texts)
    assert written == ["1", "1", "1", "2", "2"]
    assert "top-1 error 28.57%" in figure.axes[0].get_title()
    with pytest.raises(ValueError, match="0..2"):
        plots.confusion_matrix([0, 3], [0, 1], 3)


# The run directory's epoch pictures ----------------------------------------------------------

def test_a_failed_picture_is_a_warning_unless_strict(tmp_path, monkeypatch, capsys):
    run = RunDirectory(tmp_path)
    write_history(run.history_path, HISTORY)
    written = pictures.write_epoch_pictures(run, tiny_model(), strict=True)
    assert sorted(written) == ["curves.png", "filters.png"]
    assert png_image((tmp_path / "curves.png").read_bytes()).size == (800, 600)

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plots, "training_curves", broken)
    before = (tmp_path / "curves.png").read_bytes()
    assert pictures.write_epoch_pictures(run, tiny_model()) == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RuntimeError: no fonts today" in err
    assert "training goes on" in err
    assert (tmp_path / "curves.png").read_bytes() == before  # the old picture stays whole
    with pytest.raises(RuntimeError, match="no fonts"):
        pictures.write_epoch_pictures(run, tiny_model(), strict=True)


@pytest.fixture(scope="module")
def trained_run(shapes_data_dir, tmp_path_factory):
    """One smoke epoch: the run directory and its model saved as a .keras file."""
    base = tmp_path_factory.mktemp("plots")
    config = dataclasses.replace(PRESETS["smoke"], data_dir=shapes_data_dir, epochs=1)
    loop.train(config, base / "run", base / "models", verbose=0, do_export=False)
    RunDirectory(base / "run").load_model().save(base / "model.keras")
    return base / "run", base / "model.keras"


def image_summaries(log_dir):
    """``{tag: [(step, width, height, png bytes)]}`` of the image summaries in a log."""
    found = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    width, height, data = value.tensor.string_val[:3]
                    found.setdefault(value.tag, []).append(
                        (event.step, int(width), int(height), data))
    return found


@pytest.mark.slow
def test_training_leaves_filters_curves_and_their_image_summaries(trained_run):
    run_dir, _ = trained_run
    filters = png_image((run_dir / "filters.png").read_bytes())
    curves = png_image((run_dir / "curves.png").read_bytes())
    assert filters.size[0] == 800 and curves.size == (800, 600)
    assert not list(run_dir.glob(".tmp-*"))
    summaries = image_summaries(run_dir / "logs" / "train")
    assert sorted(summaries) == ["curves", "filters"]
    for tag, picture in (("filters", filters), ("curves", curves)):
        [(step, width, height, data)] = summaries[tag]
        assert step == 1 and (width, height) == picture.size
        assert png_image(data).size == picture.size
    # The curves' batch loss panel reads what the loop logged (steps 10, 20, 30).
    assert [s for s, _ in pictures.read_scalars(run_dir / "logs" / "train")] == [10, 20, 30]


# The command line ----------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_filters_and_curves_of_a_run(trained_run, tmp_path, capsys):
    run_dir, keras_file = trained_run
    (run_dir / "filters.png").unlink()
    summary = plot.main(["filters", str(run_dir)])  # default: the run's own file
    assert summary["out"] == str(run_dir / "filters.png")
    assert png_image((run_dir / "filters.png").read_bytes()).size == summary["size"]
    checkpoint = RunDirectory(run_dir).checkpoint_path()
    summary = plot.main(["filters", str(checkpoint), "--out", str(tmp_path / "sub" / "f.png")])
    assert png_image((tmp_path / "sub" / "f.png").read_bytes()).size == summary["size"]
    summary = plot.main(["filters", str(keras_file), "--out", str(tmp_path / "sub" / "f.png")])
    assert png_image((tmp_path / "sub" / "f.png").read_bytes()).size == summary["size"]
    plot.main(["curves", str(run_dir), "--out", str(tmp_path / "c.png")])
    assert png_image((tmp_path / "c.png").read_bytes()).size == (800, 600)
    assert "Wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_predictions_neighbours_and_confusion(trained_run, image_paths, tmp_path,
                                                  monkeypatch, shapes_data_dir):
    run_dir, keras_file = trained_run
    monkeypatch.chdir(tmp_path)  # the default --out: <command>.png here
    summary = plot.main(["predictions", str(run_dir), str(image_paths[0]),
                         str(image_paths[0].parent), "--max", "3"])
    assert summary["out"] == "predictions.png"
    assert png_image((tmp_path / "predictions.png").read_bytes()).size == (600, 300)
    plot.main(["predictions", str(keras_file), str(image_paths[1]), "--out", "k.png"])
    assert png_image((tmp_path / "k.png").read_bytes()).size == (200, 300)
    plot.main(["neighbours", str(run_dir), "--queries", "2", "--k", "3"])
    assert png_image((tmp_path / "neighbours.png").read_bytes()).size == (440, 260)
    plot.main(["confusion", str(keras_file), "--dataset", "alexnet_shapes/tiny",
               "--data-dir", shapes_data_dir, "--limit", "20"])
    assert png_image((tmp_path / "confusion.png").read_bytes()).size == (700, 600)


def test_cli_bad_inputs_exit_2_with_a_message_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "x.png"
    cases = [
        ["filters", str(tmp_path / "missing"), "--out", str(out)],
        ["curves", str(tmp_path), "--out", str(out)],  # no history.csv
        ["filters", str(tmp_path), "--out", str(out)],  # not a model
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "history.csv").write_text(",".join(HISTORY_FIELDS) + "\n")
    cases.append(["curves", str(tmp_path / "empty"), "--out", str(out)])
    for argv in cases:
        with pytest.raises(SystemExit) as info:
            plot.main(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, (argv, err)
        assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_cli_refuses_an_image_that_does_not_decode(trained_run, tmp_path, capsys):
    run_dir, _ = trained_run
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(SystemExit) as info:
        plot.main(["predictions", str(run_dir), str(bad), "--out", str(tmp_path / "p.png")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad} cannot be read or decoded as an image (")
    assert "Traceback" not in err and "{{" not in err
    assert not (tmp_path / "p.png").exists()


def test_the_command_exits_2_for_a_missing_model(tmp_path):
    """The installed entry point: a real exit status and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from training.plot import cli; sys.exit(cli())",
         "filters", str(tmp_path / "missing"), "--out", str(tmp_path / "f.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith(f"error: {tmp_path / 'missing'} does not exist")
    assert "Traceback" not in proc.stderr and not (tmp_path / "f.png").exists()
