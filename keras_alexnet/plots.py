"""Pictures of a model and its training, as PNG bytes: the paper's figures and a few more.

* `filter_grid`: the conv1 kernels as RGB tiles, one block per tower: the paper's
  Figure 3 (48 kernels learned on GPU 1 above the 48 learned on GPU 2); one block for
  one-tower models (torchvision's 64). `filter_tiles` and `grid_image` are the NumPy
  steps under it.
* `training_curves`: loss, top-1 and top-5 error (1 - accuracy) and the learning rate
  per epoch from ``history.csv`` rows, and the logged batch loss against steps.
* `prediction_grid`: images with bars of their five most probable labels (Figure 4,
  left).
* `neighbour_grid`: query images and the training images nearest to them in fc7 space
  (Figure 4, right); `nearest` finds them.
* `confusion_matrix_figure`: a validation split's row-normalised confusion matrix;
  `confusion_matrix` counts it.

Every picture is a `matplotlib.figure.Figure` drawn on the Agg canvas, never pyplot's
global state, so that it can be made in any thread and on a server without a display;
`to_png` renders one to PNG bytes of exactly the figure's pixel size. Sizes are given in
pixels (``size=(width, height)``) at `DPI` dots per inch. This module takes arrays and
models and writes nothing: the run directory's pictures are written by
`keras_alexnet.training.pictures`, the files of ``alexnet-plot`` by ``training/plot.py``.
"""

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
# Kernels per row of a filter block: the paper's Figure 3 shows 16 across.
FILTER_COLUMNS = 16
TOWER_TITLES = ("tower a (GPU 1)", "tower b (GPU 2)")
# Batch-loss points drawn at most (more are averaged in runs): an 800-pixel figure shows
# no more, and ImageNet logs about 1000 an epoch.
MAX_CURVE_POINTS = 2000
_TRAIN, _VAL = "tab:blue", "tab:orange"


def new_figure(size):
    """An empty Agg ``Figure`` of ``size = (width, height)`` pixels at `DPI`."""
    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"`size` must be two positive pixel counts. Received: size={size!r}")
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def to_png(figure):
    """The figure rendered as PNG bytes, ``figure`` pixels wide and high (no cropping)."""
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    return buffer.getvalue()


def png_size(data):
    """``(width, height)`` read from a PNG's IHDR chunk.

    Raises:
        ValueError: when ``data`` does not start like a PNG file.
    """
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("Not a PNG file (no PNG signature and IHDR chunk).")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# conv1 filters ---------------------------------------------------------------------------

def filter_tiles(kernel):
    """conv1 kernels as images: ``[kh, kw, 3, N]`` -> ``float64 [N, kh, kw, 3]`` in [0, 1].

    Each kernel is contrast-normalised on its own: its minimum (over its rows, columns
    and colour channels) becomes 0 and its maximum 1, as in the paper's Figure 3. A
    constant kernel is shown mid-grey (0.5).

    Raises:
        ValueError: for a kernel that is not 4-D with 3 input channels.
    """
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError("`kernel` must be [height, width, 3, filters] (RGB input). "
                         f"Received: shape={kernel.shape}")
    tiles = np.transpose(kernel, (3, 0, 1, 2))
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    span = tiles.max(axis=(1, 2, 3), keepdims=True) - low
    flat = span == 0
    return np.where(flat, 0.5, (tiles - low) / np.where(flat, 1.0, span))


def grid_image(tiles, columns=FILTER_COLUMNS, pad=1, background=255):
    """The mosaic of ``tiles`` (``[N, h, w, 3]`` in [0, 1]) as ``uint8 [H, W, 3]``.

    Tile ``i`` sits in row ``i // columns``, column ``i % columns``: its top-left
    pixel is at ``(pad + row * (h + pad), pad + column * (w + pad))``; ``pad`` pixels of
    ``background`` separate and surround the tiles. Values are scaled by 255 and
    rounded. ``columns`` is capped at ``N``.
    """
    tiles = np.asarray(tiles, np.float64)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or len(tiles) == 0:
        raise ValueError(f"`tiles` must be [N >= 1, h, w, 3]. Received: shape={tiles.shape}")
    if columns < 1 or pad < 0:
        raise ValueError(f"`columns` must be >= 1 and `pad` >= 0. Received: columns={columns}, "
                         f"pad={pad}")
    count, height, width, _ = tiles.shape
    columns = min(int(columns), count)
    rows = math.ceil(count / columns)
    mosaic = np.full([pad + rows * (height + pad), pad + columns * (width + pad), 3],
                     background, np.uint8)
    pixels = np.rint(np.clip(tiles, 0.0, 1.0) * 255.0).astype(np.uint8)
    for i, tile in enumerate(pixels):
        top = pad + (i // columns) * (height + pad)
        left = pad + (i % columns) * (width + pad)
        mosaic[top:top + height, left:left + width] = tile
    return mosaic


def conv1_kernels(model):
    """``[(title, kernel [kh, kw, 3, N] float32)]``: one entry per tower of ``model``.

    Two-tower models (the paper, Caffe) give ``conv1_a`` and ``conv1_b`` titled by
    their GPU; one-tower models give ``conv1``. The values are the kernels as stored
    (mirrored variables are read as one array), whatever was folded into them.

    Raises:
        ValueError: when the model has neither ``conv1_a``/``conv1_b`` nor ``conv1``.
    """
    import keras

    names = {layer.name for layer in model.layers}
    if {"conv1_a", "conv1_b"} <= names:
        found = list(zip(TOWER_TITLES, ("conv1_a", "conv1_b")))
    elif "conv1" in names:
        found = [("conv1", "conv1")]
    else:
        raise ValueError(f"The model {model.name!r} has no conv1 layer "
                         "(conv1, or conv1_a and conv1_b): filters need an AlexNet of this "
                         "package.")
    return [(title, keras.ops.convert_to_numpy(model.get_layer(name).kernel))
            for title, name in found]


def filter_mosaics(blocks, columns=FILTER_COLUMNS, pad=1):
    """``[(title, uint8 mosaic)]`` for ``[(title, kernel)]`` blocks (`conv1_kernels`)."""
    return [(f"{title}: {kernel.shape[-1]} kernels {kernel.shape[0]}x{kernel.shape[1]}x3",
             grid_image(filter_tiles(kernel), columns, pad)) for title, kernel in blocks]


def filter_grid(model_or_blocks, columns=FILTER_COLUMNS, pad=1, width=800, size=None):
    """The conv1 kernels of a model as a figure: one block per tower, stacked.

    Args:
        model_or_blocks: an AlexNet, or ``[(title, kernel)]`` as `conv1_kernels` gives.
        columns: kernels per row of a block.
        pad: pixels between the tiles.
        width: the figure's width in pixels; its height follows the blocks' shape.
        size: ``(width, height)`` pixels, overriding ``width``.

    Returns:
        A ``Figure`` with one axes per block; ``axes.images[0]`` holds the block's
        `grid_image` mosaic, ``axes.get_title()`` names the tower.
    """
    blocks = (model_or_blocks if isinstance(model_or_blocks, (list, tuple))
              else conv1_kernels(model_or_blocks))
    mosaics = filter_mosaics(blocks, columns, pad)
    title_px, margin = 22, 6
    if size is None:
        inner = width - 2 * margin
        heights = [inner * m.shape[0] / m.shape[1] for _, m in mosaics]
        size = (width, int(round(sum(heights) + (title_px + margin) * len(mosaics) + margin)))
    figure = new_figure(size)
    fig_width, fig_height = (int(v) for v in size)
    # Each block gets a title strip and a share of the rest in proportion to its rows.
    spare = fig_height - (title_px + margin) * len(mosaics) - margin
    total_rows = sum(m.shape[0] for _, m in mosaics)
    top = fig_height - margin
    for title, mosaic in mosaics:
        height = max(1.0, spare * mosaic.shape[0] / total_rows)
        top -= title_px
        axes = figure.add_axes([margin / fig_width, (top - height) / fig_height,
                                1 - 2 * margin / fig_width, height / fig_height])
        axes.imshow(mosaic, interpolation="nearest")
        axes.set_title(title, fontsize=10)
        axes.set_axis_off()
        top -= height + margin
    return figure


# Training curves ---------------------------------------------------------------------------

def _column(rows, key):
    return np.asarray([float(row[key]) if row.get(key) not in (None, "") else np.nan
                       for row in rows], np.float64)


def training_curves(history_rows, steps=None, size=(800, 600)):
    """Loss, top-1 error, top-5 error and learning rate per epoch (and batch loss).

    Args:
        history_rows: ``history.csv`` rows (`RunDirectory.read_history`): dicts with
            ``epoch`` (0-based) and ``loss``, ``lr``, ``top1``, ``top5``, ``val_loss``,
            ``val_top1``, ``val_top5``; top1/top5 are accuracies, drawn as errors
            ``1 - accuracy``. Missing values are left out of the lines.
        steps: optional ``[(global_step, batch_loss)]`` (the ``batch_loss`` scalar of
            TensorBoard's ``logs/train``): one more panel, against steps (beyond
            `MAX_CURVE_POINTS` points, the means of consecutive runs of them).
        size: ``(width, height)`` pixels.

    Returns:
        A ``Figure`` whose axes are, in order: loss, top-1 error, top-5 error, learning
        rate (and batch loss). In each of the first three, ``lines[0]`` is training and
        ``lines[1]`` validation, against epochs counted from 1.

    Raises:
        ValueError: for an empty history.
    """
    rows = sorted(history_rows, key=lambda row: int(row["epoch"]))
    if not rows:
        raise ValueError("The training history is empty: no epoch has finished yet.")
    epochs = np.asarray([int(row["epoch"]) + 1 for row in rows])
    steps = sorted(steps or [])
    figure = new_figure(size)
    # A fixed layout: tight_layout would draw the figure once more to measure it.
    grid = figure.add_gridspec(2, 3 if steps else 2, left=0.08, right=0.98, bottom=0.08,
                               top=0.95, wspace=0.3, hspace=0.35)
    panels = [
        ("loss", "cross-entropy", _column(rows, "loss"), _column(rows, "val_loss")),
        ("top-1 error", "error", 1 - _column(rows, "top1"), 1 - _column(rows, "val_top1")),
        ("top-5 error", "error", 1 - _column(rows, "top5"), 1 - _column(rows, "val_top5")),
    ]
    places = [grid[0, 0], grid[0, 1], grid[1, 0]]
    for place, (title, ylabel, train, val) in zip(places, panels):
        axes = figure.add_subplot(place)
        axes.plot(epochs, train, "o-", color=_TRAIN, markersize=3, label="training")
        axes.plot(epochs, val, "o-", color=_VAL, markersize=3, label="validation")
        axes.set_title(title, fontsize=10)
        axes.set_ylabel(ylabel, fontsize=8)
        axes.legend(fontsize=7, loc="upper right")
    lr = _column(rows, "lr")
    axes = figure.add_subplot(grid[1, 1])
    axes.plot(epochs, lr, "o-", color="tab:green", markersize=3)
    if np.all(lr[np.isfinite(lr)] > 0) and np.isfinite(lr).any():
        axes.set_yscale("log")
    axes.set_title("learning rate", fontsize=10)
    for axes in figure.axes:
        axes.set_xlabel("epoch", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_xlim(0.5, epochs[-1] + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if steps:
        axes = figure.add_subplot(grid[:, 2])
        axes.plot(*_decimated(steps), "-", color=_TRAIN, linewidth=0.8)
        # The loop logs the epoch's running mean loss every 10 steps under this tag.
        axes.set_title("loss, running epoch mean", fontsize=10)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
    return figure


def _decimated(points, limit=MAX_CURVE_POINTS):
    """``(x, y)`` of ``points``, or of the means of consecutive runs of them when there
    are more than ``limit`` (a picture shows no more, and drawing them is slow)."""
    x, y = (np.asarray(v, np.float64) for v in zip(*points))
    if len(x) <= limit:
        return x, y
    bins = np.array_split(np.arange(len(x)), limit)
    return (np.asarray([x[b].mean() for b in bins]), np.asarray([y[b].mean() for b in bins]))


# Predictions and neighbours ----------------------------------------------------------------

def _short(text, length=22):
    text = str(text)
    return text if len(text) <= length else text[:length - 1] + "…"


def prediction_grid(images, top5_labels, top5_probs, columns=4, size=None, titles=None):
    """Each image above the bars of its most probable labels (the paper's Figure 4, left).

    Args:
        images: ``uint8 [H, W, 3]`` arrays (any sizes).
        top5_labels: per image, its labels, most probable first (any number, usually 5).
        top5_probs: per image, their probabilities.
        columns: images per row.
        size: ``(width, height)`` pixels (default 200 x 300 per image).
        titles: optional caption per image (a file name).

    Returns:
        A ``Figure`` with an image axes and a bar axes per image, in that order.
    """
    count = len(images)
    if count == 0 or len(top5_labels) != count or len(top5_probs) != count:
        raise ValueError("`images`, `top5_labels` and `top5_probs` must be equally long and "
                         f"not empty. Received: {count}, {len(top5_labels)}, {len(top5_probs)}")
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = new_figure(size or (200 * columns, 300 * rows))
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3, 2] * rows)
    for i, (image, labels, probs) in enumerate(zip(images, top5_labels, top5_probs)):
        row, column = divmod(i, columns)
        axes = figure.add_subplot(grid[2 * row, column])
        axes.imshow(np.asarray(image, np.uint8))
        axes.set_axis_off()
        if titles is not None:
            axes.set_title(_short(titles[i], 26), fontsize=7)
        bars = figure.add_subplot(grid[2 * row + 1, column])
        positions = np.arange(len(labels))[::-1]
        bars.barh(positions, np.asarray(probs, np.float64), color=_TRAIN, height=0.7)
        bars.set_yticks(positions, [_short(label) for label in labels], fontsize=7)
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=6)
    figure.tight_layout(pad=0.4, h_pad=0.2, w_pad=0.4)
    return figure


def nearest(query_features, train_features, k):
    """Indices ``int64 [Q, k]`` of the ``k`` training vectors nearest to each query.

    Euclidean distance (the paper's retrieval in the 4096-d fc7 space, Sec. 6.1),
    nearest first; equal distances keep the training order. Computed in float64 as
    ``|q|^2 - 2 q.t + |t|^2``, a chunk of queries at a time.

    Raises:
        ValueError: for mismatched dimensions or ``k`` outside ``1 .. len(train)``.
    """
    queries = np.asarray(query_features, np.float64)
    train = np.asarray(train_features, np.float64)
    if queries.ndim != 2 or train.ndim != 2 or queries.shape[1] != train.shape[1]:
        raise ValueError("Features must be [Q, D] and [N, D] with the same D. Received: "
                         f"{queries.shape}, {train.shape}")
    if not 1 <= k <= len(train):
        raise ValueError(f"`k` must be between 1 and the {len(train)} training vectors. "
                         f"Received: k={k}")
    train_sq = np.einsum("nd,nd->n", train, train)
    result = np.zeros([len(queries), k], np.int64)
    for start in range(0, len(queries), 256):
        chunk = queries[start:start + 256]
        distances = (np.einsum("qd,qd->q", chunk, chunk)[:, None] - 2.0 * chunk @ train.T
                     + train_sq[None, :])
        result[start:start + len(chunk)] = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return result


def neighbour_grid(query_images, neighbour_images, size=None, query_titles=None,
                   neighbour_titles=None):
    """Rows of a query image and its nearest training images (the paper's Figure 4, right).

    Args:
        query_images: ``Q`` ``uint8 [H, W, 3]`` images.
        neighbour_images: per query, its ``K`` neighbours, nearest first.
        size: ``(width, height)`` pixels (default 110 per image).
        query_titles, neighbour_titles: optional captions (labels), same layout.

    Returns:
        A ``Figure`` of ``Q x (K + 1)`` axes, row by row, the query first in each row.
    """
    count = len(query_images)
    if count == 0 or len(neighbour_images) != count:
        raise ValueError("`query_images` and `neighbour_images` must be equally long and not "
                         f"empty. Received: {count}, {len(neighbour_images)}")
    k = max(len(row) for row in neighbour_images)
    if k == 0:
        raise ValueError("Every query needs at least one neighbour.")
    figure = new_figure(size or (110 * (k + 1), 120 * count + 20))
    for row in range(count):
        cells = [query_images[row], *neighbour_images[row]]
        captions = [query_titles[row] if query_titles is not None else None,
                    *(neighbour_titles[row] if neighbour_titles is not None
                      else [None] * len(neighbour_images[row]))]
        for column, (image, caption) in enumerate(zip(cells, captions)):
            axes = figure.add_subplot(count, k + 1, row * (k + 1) + column + 1)
            axes.imshow(np.asarray(image, np.uint8))
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                for spine in axes.spines.values():
                    spine.set_color("tab:red")
                    spine.set_linewidth(2)
            label = "query" if column == 0 else f"{column}"
            if row == 0 or caption is not None:
                text = label if caption is None else f"{label}: {_short(caption, 14)}"
                axes.set_title(text, fontsize=7)
    figure.tight_layout(pad=0.3, h_pad=0.3, w_pad=0.2)
    return figure


# Confusion matrix --------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes):
    """Counts ``int64 [C, C]``: row = true label, column = predicted label.

    Raises:
        ValueError: for unequal lengths or labels outside ``0 .. num_classes - 1``.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    predictions = np.asarray(predictions, np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"`labels` and `predictions` differ in length: {labels.size} and "
                         f"{predictions.size}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"`{name}` must be in 0..{num_classes - 1}. Received: "
                             f"{values.min()}..{values.max()}")
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_figure(labels, predictions, class_names, size=None, annotate=None):
    """The confusion matrix of a split, each row divided by its count (a row of 1.0 on
    the diagonal is a class always recognised), with the counts written in the cells.

    Args:
        labels, predictions: true and predicted class indices.
        class_names: one name per class (their number is the matrix size).
        size: ``(width, height)`` pixels (default grows with the classes, 500-1200).
        annotate: write the counts in the cells (default: up to 30 classes).

    Returns:
        A ``Figure``; ``axes[0].images[0]`` holds the row-normalised matrix.
    """
    num_classes = len(class_names)
    counts = confusion_matrix(labels, predictions, num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    rates = counts / np.maximum(totals, 1)
    side = int(min(1200, max(500, 40 * num_classes + 200)))
    figure = new_figure(size or (side + 100, side))
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the row")
    annotate = num_classes <= 30 if annotate is None else annotate
    if annotate:
        for (row, column), count in np.ndenumerate(counts):
            if count:
                axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                          color="white" if rates[row, column] > 0.5 else "black")
    if num_classes <= 50:
        ticks = np.arange(num_classes)
        names = [_short(name, 16) for name in class_names]
        axes.set_xticks(ticks, names, rotation=90, fontsize=7)
        axes.set_yticks(ticks, names, fontsize=7)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set_title(f"{counts.sum()} images, top-1 error {1 - accuracy:.2%}", fontsize=10)
    axes.set_xlabel("predicted", fontsize=9)
    axes.set_ylabel("true", fontsize=9)
    figure.tight_layout(pad=0.5)
    return figure
