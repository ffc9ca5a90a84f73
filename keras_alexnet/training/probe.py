"""Linear probes on frozen AlexNet features, and their export as a SavedModel.

A linear probe measures how linearly separable a layer's features are for a new set of
classes (DeCAF, Donahue et al. 2014: logistic regression and linear SVMs on fc6/fc7):

1. features of the training and validation images (`keras_alexnet.features.extract`);
2. per-feature standardisation (scikit-learn's ``StandardScaler``, fit on training);
3. a multinomial ``LogisticRegression`` (lbfgs) or a one-vs-rest ``LinearSVC``;
4. top-1 / top-k error of the validation images, ranking classes by the classifier's
   ``decision_function`` (`top_k_errors`).

`LinearProbe.folded` folds the scaler into the classifier's weights
(``W' = W / sigma``, ``b' = b - W mu / sigma``), so `probe_model` is the frozen network
up to the feature layer followed by one ``Dense`` named ``probe`` whose logits equal the
probe's `LinearProbe.scores` (to float32 rounding: `LinearProbe.folded_deviation`);
`keras_alexnet.export.export_saved_model` serves it like any classifier (and its
``features`` signature returns the probed layer).
"""

import dataclasses
import warnings

import keras
import numpy as np

from keras_alexnet import features as feature_layers
from keras_alexnet import preprocessing

CLASSIFIERS = ("logistic", "svm")
PROBE_LAYER = "probe"
DEFAULT_MAX_ITER = 2000


@dataclasses.dataclass
class LinearProbe:
    """A fitted scaler and linear classifier over ``num_classes`` classes.

    Attributes:
        scaler: the fitted ``sklearn.preprocessing.StandardScaler``.
        classifier: the fitted ``LogisticRegression`` or ``LinearSVC``.
        kind: ``"logistic"`` or ``"svm"``.
        C: the inverse regularisation strength it was fit with.
        num_classes: the number of classes (labels ``0 .. num_classes - 1``).
        converged: whether the solver converged within its iterations.
    """

    scaler: object
    classifier: object
    kind: str
    C: float
    num_classes: int
    converged: bool = True

    def _weights(self):
        """``(W [K, D], b [K])`` of the classifier on standardised features, float64.

        With two classes scikit-learn keeps one score ``s`` (positive: class 1); it
        becomes the logits ``[-s / 2, s / 2]``, whose difference is ``s`` and whose
        softmax is the logistic regression's ``predict_proba``.
        """
        coef = np.asarray(self.classifier.coef_, np.float64)
        intercept = np.asarray(self.classifier.intercept_, np.float64).reshape(-1)
        if self.num_classes == 2:
            coef = np.concatenate([-coef, coef]) / 2.0
            intercept = np.concatenate([-intercept, intercept]) / 2.0
        return coef, intercept

    def scores(self, features):
        """The classifier's ``decision_function`` as ``[N, num_classes]`` (float64);
        two classes as ``[-s / 2, s / 2]`` (see `_weights`)."""
        scores = self.classifier.decision_function(self.scaler.transform(features))
        scores = np.asarray(scores, np.float64)
        if scores.ndim == 1:
            scores = np.stack([-scores, scores], axis=1) / 2.0
        return scores

    def folded(self):
        """``(kernel float32 [D, K], bias float32 [K])`` with the scaler folded in:
        ``features @ kernel + bias`` equals `scores` on raw (unscaled) features."""
        coef, intercept = self._weights()
        mu = np.asarray(self.scaler.mean_, np.float64)
        sigma = np.asarray(self.scaler.scale_, np.float64)  # 1 for constant features
        kernel = coef / sigma
        bias = intercept - kernel @ mu
        return kernel.T.astype(np.float32), bias.astype(np.float32)

    def folded_deviation(self, features):
        """How far the folded float32 head strays from `scores` on ``features``: the
        largest absolute difference relative to the largest score.

        Folding is exact in real arithmetic, but in float32 the products ``x W / sigma``
        and the bias cancel where a feature hardly varies (``mu`` many ``sigma`` away
        from 0, as in an untrained network with biases of 1); a trained AlexNet's sparse
        ReLU features give about 1e-7.
        """
        kernel, bias = self.folded()
        logits = np.asarray(features, np.float32) @ kernel + bias  # float32, as the Dense
        reference = self.scores(features)
        scale = max(float(np.abs(reference).max()), 1e-12)
        return float(np.abs(logits.astype(np.float64) - reference).max() / scale)


def fit(features, labels, num_classes, classifier="logistic", C=1.0, max_iter=DEFAULT_MAX_ITER,
        seed=0):
    """Standardises ``features`` and fits a linear ``classifier`` (`CLASSIFIERS`).

    Args:
        features: ``[N, D]`` training features.
        labels: ``[N]`` integer labels in ``0 .. num_classes - 1``; every class needs
            at least one training example.
        num_classes: the number of classes.
        classifier: ``"logistic"`` (multinomial logistic regression, lbfgs) or
            ``"svm"`` (one-vs-rest linear SVM, squared hinge).
        C: inverse regularisation strength (scikit-learn's ``C``).
        max_iter: the solver's iteration limit.
        seed: the solver's random state (LinearSVC's coordinate descent).

    Returns:
        A `LinearProbe`.

    Raises:
        ValueError: for an unknown classifier, ``C <= 0``, fewer than 2 classes, or a
            class without training examples.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier not in CLASSIFIERS:
        raise ValueError(f"`classifier` must be one of {CLASSIFIERS}. Received: {classifier!r}")
    if not C > 0:
        raise ValueError(f"`C` must be positive. Received: C={C!r}")
    if num_classes < 2:
        raise ValueError(f"A probe needs at least 2 classes. Received: {num_classes}")
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"Classes {missing[:10]} have no training images; every class needs "
                         "at least one.")
    outside = sorted(set(labels.tolist()) - set(range(num_classes)))
    if outside:
        raise ValueError(f"Labels {outside[:10]} are outside 0..{num_classes - 1}.")
    scaler = StandardScaler().fit(features)
    scaled = scaler.transform(features)
    if classifier == "logistic":
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed)
    else:
        model = LinearSVC(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(scaled, labels)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return LinearProbe(scaler, model, classifier, float(C), int(num_classes), converged)


def top_k_errors(scores, labels, k=5):
    """``(top-1 error, top-k error, k)`` of ``scores [N, K]`` against ``labels [N]``.

    ``k`` is capped at the number of classes (with fewer than ``k`` classes the top-k
    error is 0). Ties rank the lower class index first. An empty set gives NaN errors.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels, np.int64)
    k = int(min(k, scores.shape[1]))
    if len(labels) == 0:
        return float("nan"), float("nan"), k
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top1 = float(np.mean(ranked[:, 0] != labels))
    topk = float(np.mean(~np.any(ranked == labels[:, None], axis=1)))
    return top1, topk, k


def probe_model(model, layer, kernel, bias, name=None):
    """The frozen network up to ``layer`` followed by ``Dense(K, name="probe")``.

    ``kernel [D, K]`` and ``bias [K]`` are `LinearProbe.folded`'s. The result shares the
    source model's layers (and weights) up to the feature layer and returns float32
    logits; its layer names are the source's, so the feature layers stay findable.

    Raises:
        ValueError: for an unknown layer, a model without it, or weights of another size.
    """
    extractor_outputs = feature_layers.feature_extractor(model, layer).outputs[0]
    kernel = np.asarray(kernel, np.float32)
    bias = np.asarray(bias, np.float32)
    dim = int(extractor_outputs.shape[-1])
    if kernel.ndim != 2 or kernel.shape[0] != dim or bias.shape != (kernel.shape[1],):
        raise ValueError(f"The probe weights {kernel.shape}, {bias.shape} do not fit the {dim} "
                         f"features of {layer}.")
    head = keras.layers.Dense(kernel.shape[1], name=PROBE_LAYER, dtype="float32")
    logits = head(extractor_outputs)
    head.set_weights([kernel, bias])
    return keras.Model(model.inputs, logits, name=name or f"{model.name}_{layer}_probe")


def parse_mean(text):
    """A ``--mean`` argument: ``"imagenet"``, ``"image"``, a ``.npy`` path or ``R,G,B``.

    Raises:
        ValueError: for anything else.
    """
    if text in (None, "imagenet", "image") or text.endswith(".npy"):
        return text
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"--mean must be 'imagenet', 'image', R,G,B or a .npy file. "
                         f"Received: {text!r}")
    return values


def model_mean(loaded, override=None, data_dir=None):
    """The mean (a float32 array) to preprocess images for a `model_source.LoadedModel`.

    ``override`` (see `parse_mean`) wins over what the model records. ``"image"`` (the
    per-pixel mean image of the model's own training data) is computed, or read from its
    cache, from the training run's dataset.

    Raises:
        ValueError: for ``"image"`` without a known training dataset, or a bad mean.
    """
    mean = parse_mean(override) if isinstance(override, str) else override
    if mean is None:
        mean = loaded.mean
    if isinstance(mean, str) and mean == "image":
        config = loaded.run_config or {}
        if not config.get("dataset"):
            raise ValueError("The per-pixel mean image ('image') needs the model's training "
                             "dataset, which only a training run records; pass --mean.")
        from keras_alexnet import datasets
        from keras_alexnet.training import mean_image

        source = datasets.load(config["dataset"], data_dir=data_dir or config.get("data_dir"),
                               manual_dir=config.get("manual_dir"),
                               val_split=config.get("val_split"))
        mean = mean_image.compute_or_load(source, data_dir or config.get("data_dir"),
                                          loaded.image_size)
    return preprocessing.resolve_mean(mean, loaded.image_size, loaded.resize)
