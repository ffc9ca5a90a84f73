"""The paper's experiments as runs of the one training loop: what each compares and how
its result is measured.

Each experiment trains the variants it compares from one base `TrainConfig` (the same
model builder and input pipeline as every run; a variant differs only in the fields it
names), each in its own resumable run directory ``<run_dir>/<variant>``, and reports:

* ``relu-vs-tanh`` (Sec. 3.1, Figure 1: "a four-layer convolutional neural network with
  ReLUs reaches a 25 % training error rate on CIFAR-10 six times faster than an
  equivalent network with tanh neurons"): the training steps each activation takes to
  reach a training error of ``threshold`` (the running top-1 error of an epoch, measured
  at epoch ends, so steps are multiples of the epoch's), and their ratio;
* ``lrn`` (Sec. 3.3: LRN lowers the top-1/top-5 error by 1.4 / 1.2 %), ``overlapping-pool``
  (Sec. 3.4: 3x3/2 pooling lowers them by 0.4 / 0.3 % against 2x2/2, which gives maps of
  the same size), ``augmentation`` (Sec. 4.1: without it the network over-fits
  substantially): final training and validation errors of each variant;
* ``dropout`` (Sec. 4.2: without dropout the network over-fits substantially; dropout
  roughly doubles the iterations needed to converge): the same, with the gap between
  validation and training error;
* ``ensemble`` (Sec. 6: averaging the predictions of five CNNs gives 16.4 % top-5 error
  against 18.2 % for one): ``members`` runs differing only in their seed, each member's
  validation top-1/top-5 error and those of their averaged softmax.

Errors are fractions; "validation" is the dataset's validation split, centre crop.
"""

import csv
import dataclasses
import io
import json
import math
import pathlib

import numpy as np

from keras_alexnet import files, paper
from keras_alexnet.training.config import TrainConfig
from keras_alexnet.training.run_dir import RunDirectory

# The settings every experiment starts from (``small`` here, ``paper`` with --preset
# paper): the paper's architecture, at a width and input size that train in about a
# minute per variant on a 2-core CPU, with SGD and momentum as in the paper.
SMALL = TrainConfig(
    dataset="alexnet_shapes",
    image_size=99,
    width=0.25,
    initializer="he",
    input_scale=1.0 / 64.0,
    optimizer="sgd",
    learning_rate=0.01,
    weight_decay=paper.WEIGHT_DECAY,
    lr_drops=0,
    batch_size=32,
    epochs=10,
    checkpoint_every=0,
)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One of the paper's comparisons.

    Attributes:
        name: the command-line name.
        claim: the paper's claim, with its section.
        variants: ``(label, TrainConfig overrides)`` of each arm; the first is the paper's.
        defaults: overrides of the base configuration for this experiment's default run
            (e.g. a smaller training set for the over-fitting experiments); flags win.
        kind: ``"threshold"`` (steps to a training error), ``"final"`` (errors at the
            end) or ``"ensemble"`` (members and their average).
    """

    name: str
    claim: str
    variants: tuple
    defaults: dict = dataclasses.field(default_factory=dict)
    kind: str = "final"


EXPERIMENTS = {e.name: e for e in (
    Experiment(
        "relu-vs-tanh",
        "Sec. 3.1, Figure 1: with ReLUs a CNN reaches 25 % training error six times "
        "faster than with tanh units.",
        (("relu", {"activation": "relu"}), ("tanh", {"activation": "tanh"})),
        defaults={"dropout_rate": 0.0}, kind="threshold"),
    Experiment(
        "lrn",
        "Sec. 3.3: local response normalisation lowers the top-1 and top-5 error rates "
        "by 1.4 % and 1.2 %.",
        (("lrn", {"use_lrn": True}), ("no-lrn", {"use_lrn": False}))),
    Experiment(
        "overlapping-pool",
        "Sec. 3.4: overlapping 3x3/2 pooling lowers the top-1 and top-5 error rates by "
        "0.4 % and 0.3 % against non-overlapping 2x2/2 pooling (same map sizes), and "
        "over-fits slightly less.",
        (("overlapping-3x3-s2", {"pool_size": 3, "pool_stride": 2}),
         ("non-overlapping-2x2-s2", {"pool_size": 2, "pool_stride": 2}))),
    Experiment(
        "dropout",
        "Sec. 4.2: without dropout the network over-fits substantially; dropout roughly "
        "doubles the number of iterations needed to converge.",
        (("dropout-0.5", {"dropout_rate": 0.5}), ("no-dropout", {"dropout_rate": 0.0})),
        defaults={"dataset": "alexnet_shapes/tiny", "width": 0.5, "epochs": 30}),
    Experiment(
        "augmentation",
        "Sec. 4.1: without data augmentation (random crops, flips, PCA colour noise) the "
        "network suffers from substantial over-fitting.",
        (("augmented", {"augment": True}), ("no-augmentation", {"augment": False})),
        defaults={"dataset": "alexnet_shapes/tiny", "width": 0.5, "epochs": 30}),
    Experiment(
        "ensemble",
        "Sec. 6: averaging the predictions of five similar CNNs gives a top-5 error of "
        "16.4 % against 18.2 % for one.",
        (), kind="ensemble"),
)}


def variants(experiment, base, members=3):
    """``[(label, TrainConfig)]`` of an experiment's arms from the ``base`` configuration
    (the experiment's `defaults` already applied by the caller)."""
    if experiment.kind == "ensemble":
        if members < 2:
            raise ValueError(f"An ensemble needs at least 2 members. Received: {members}")
        arms = [(f"seed-{base.seed + i}", {"seed": base.seed + i}) for i in range(members)]
    else:
        arms = list(experiment.variants)
    return [(label, dataclasses.replace(base, **overrides)) for label, overrides in arms]


def steps_to_error(history, threshold, steps_per_epoch):
    """Training steps until the epoch whose running training top-1 error is first at or
    below ``threshold`` ends, or ``None`` when no epoch reached it."""
    for row in history:
        if 1.0 - row["top1"] <= threshold:
            return (int(row["epoch"]) + 1) * steps_per_epoch
    return None


def _errors(row):
    """Final errors of a history row and the over-fitting gap (validation minus training
    top-1 error: positive when the network fits its training images better)."""
    return {"train_top1_error": 1.0 - row["top1"], "train_top5_error": 1.0 - row["top5"],
            "val_top1_error": 1.0 - row["val_top1"], "val_top5_error": 1.0 - row["val_top5"],
            "gap_top1": row["top1"] - row["val_top1"]}


def top_k_error(probabilities, labels, k):
    """The fraction of ``labels`` outside the ``k`` most probable classes (ties: the
    lower class index first)."""
    top = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return 1.0 - float((top == labels[:, None]).any(axis=1).mean())


def check_run_dirs(run_dir, arms):
    """Refuses, before anything trains, an arm whose run directory holds a run of another
    configuration (each arm resumes its own run otherwise)."""
    for label, config in arms:
        RunDirectory(pathlib.Path(run_dir) / label).check_resumable(config)


def run(name, base, run_dir, *, members=3, threshold=0.25, verbose=2, train=None):
    """Trains every arm of experiment ``name`` (resuming finished or interrupted arms)
    and writes ``results.csv``, ``results.md``, ``results.json`` and ``plot.png`` into
    ``run_dir``. Returns the result dict (``rows``: one per arm, and for ensembles one
    for the average).

    ``base`` is the configuration before the experiment's `Experiment.defaults`
    (callers apply those below their own flags); ``train`` is the training function
    (default `keras_alexnet.training.loop.train`).
    """
    from keras_alexnet.training import loop  # TensorFlow: imported when work starts

    experiment = EXPERIMENTS[name]
    train = train or loop.train
    run_dir = pathlib.Path(run_dir)
    arms = variants(experiment, base, members)
    check_run_dirs(run_dir, arms)
    rows, curves = [], {}
    for label, config in arms:
        arm_dir = run_dir / label
        summary = train(config, str(arm_dir), do_export=False, verbose=verbose)
        seconds = _add_training_time(arm_dir, summary["seconds"])
        history = RunDirectory(arm_dir).read_history()
        state = RunDirectory(arm_dir).read_state()
        steps_per_epoch = state.global_step // max(len(history), 1)
        row = {"variant": label, "epochs": len(history), "steps": state.global_step,
               **_errors(history[-1]), "minutes": seconds / 60}
        if experiment.kind == "threshold":
            row["steps_to_threshold"] = steps_to_error(history, threshold, steps_per_epoch)
        rows.append(row)
        curves[label] = history
    result = {"experiment": name, "claim": experiment.claim, "rows": rows,
              "config": _describe(base, arms)}
    if experiment.kind == "threshold":
        result["threshold"] = threshold
        first, second = (r["steps_to_threshold"] for r in rows)
        result["ratio"] = (second / first) if first and second else None
    if experiment.kind == "ensemble":
        rows.append(_ensemble_row(run_dir, arms))
    write_results(run_dir, result, curves)
    return result


TIME_FILE = "experiment_seconds.json"


def _add_training_time(arm_dir, seconds):
    """Adds this call's wall time to the arm's total (over interruptions and resumes) in
    ``<arm>/experiment_seconds.json`` and returns the total. A rerun of a finished arm
    adds only its check, so the table keeps the time the training took."""
    path = pathlib.Path(arm_dir) / TIME_FILE
    try:
        total = float(json.loads(path.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        total = 0.0
    total += float(seconds)
    files.atomic_write(path, json.dumps({"seconds": total}))
    return total


def _ensemble_row(run_dir, arms):
    """The averaged softmax of the members on the validation split (centre crop)."""
    from keras_alexnet.training import evaluation, loop

    source, mean = loop.load_data(arms[0][1])
    probabilities, labels = [], None
    for label, config in arms:
        model = RunDirectory(pathlib.Path(run_dir) / label).load_model()
        probs, labels = evaluation.predict_split(
            evaluation.keras_predictor(model), source.validation,
            image_size=config.image_size, mean=mean, resize=config.resize)
        probabilities.append(probs)
    average = np.mean(probabilities, axis=0)
    return {"variant": f"average of {len(arms)}", "epochs": None, "steps": None,
            "train_top1_error": None, "train_top5_error": None,
            "val_top1_error": top_k_error(average, labels, 1),
            "val_top5_error": top_k_error(average, labels, min(5, average.shape[1])),
            "gap_top1": None, "minutes": None}


def _describe(base, arms):
    """What the table was measured on: the base configuration's essentials and what each
    arm changes."""
    keys = ("dataset", "image_size", "width", "towers", "optimizer", "learning_rate",
            "momentum", "weight_decay", "batch_size", "epochs", "dropout_rate", "use_lrn",
            "augment", "initializer", "seed")
    described = {k: getattr(arms[0][1], k) for k in keys}
    described["arms"] = {label: {k: v for k, v in dataclasses.asdict(config).items()
                                 if v != getattr(arms[0][1], k)}
                         for label, config in arms}
    return described


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(result):
    """The result as a markdown table with the claim and the configuration above it."""
    columns = ["variant", "epochs", "steps"]
    if "threshold" in result:
        columns.append("steps_to_threshold")
    columns += ["train_top1_error", "val_top1_error", "gap_top1", "val_top5_error", "minutes"]
    config = result["config"]
    lines = [f"# {result['experiment']}", "", f"Paper: {result['claim']}", "",
             "Configuration: " + ", ".join(f"{k} {v}" for k, v in config.items()
                                           if k != "arms"), ""]
    headers = {"gap_top1": "val - train top1 error", "steps_to_threshold":
               f"steps to {result.get('threshold', 0):.0%} train error"}
    lines.append("| " + " | ".join(headers.get(c, c.replace("_", " ")) for c in columns)
                 + " |")
    lines.append("|" + "---|" * len(columns))
    for row in result["rows"]:
        cells = []
        for c in columns:
            value = row.get(c)
            if c.endswith("_error") and value is not None:
                cells.append(f"{value:.2%}")
            elif c == "gap_top1" and value is not None:
                cells.append(f"{value * 100:+.2f} pts")
            elif c == "minutes" and value is not None:
                cells.append(f"{value:.1f}")
            elif c == "steps_to_threshold" and value is None and row.get("epochs"):
                cells.append("not reached")
            else:
                cells.append(_cell(value))
        lines.append("| " + " | ".join(cells) + " |")
    if "threshold" in result:
        ratio = result.get("ratio")
        lines += ["", f"Steps to {result['threshold']:.0%} training error, "
                      f"{result['rows'][1]['variant']} / {result['rows'][0]['variant']}: "
                  + (f"{ratio:.2f}x" if ratio else "not measurable (a variant did not reach "
                                                   "it; train longer with --epochs)")]
    return "\n".join(lines) + "\n"


def comparison_figure(curves, title, threshold=None):
    """Training (dashed) and validation (solid) top-1 error of each arm against epochs;
    the ``threshold`` as a horizontal line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for index, (label, history) in enumerate(curves.items()):
        epochs = [int(r["epoch"]) + 1 for r in history]
        colour = f"C{index}"
        axes.plot(epochs, [1 - r["top1"] for r in history], "--", color=colour,
                  label=f"{label} (training)")
        axes.plot(epochs, [1 - r["val_top1"] for r in history], "-", color=colour,
                  label=f"{label} (validation)")
    if threshold is not None:
        axes.axhline(threshold, color="grey", linewidth=0.8)
    axes.set_xlabel("epoch")
    axes.set_ylabel("top-1 error")
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def write_results(run_dir, result, curves):
    """``results.csv`` / ``results.md`` / ``results.json`` / ``plot.png``, each atomically."""
    run_dir = pathlib.Path(run_dir)
    buffer = io.StringIO()
    fields = sorted({k for row in result["rows"] for k in row},
                    key=lambda k: (k != "variant", k))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    files.atomic_write(run_dir / "results.csv", buffer.getvalue())
    files.atomic_write(run_dir / "results.md", markdown_table(result))
    files.atomic_write(run_dir / "results.json",
                       json.dumps(result, indent=1, default=_json_default))
    figure = comparison_figure(curves, result["experiment"], result.get("threshold"))
    files.atomic_write(run_dir / "plot.png", _png(figure))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
