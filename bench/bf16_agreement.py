"""Does computing in bfloat16 change a trained model's predictions?

The runner (`python -m bench`) times the bfloat16 export against float32 on its own model,
whose weights are untrained: its softmax is nearly flat (the gap between its 5th and 6th
probability is a few 1e-6, below bfloat16's rounding), so its top-5 on the photos says
nothing about what bfloat16 does to a model that has learned something. This script takes
a training run, builds its float32 model and the bfloat16 copy the runner exports
(`loop.inference_copy(model, "bfloat16")`: weights rounded to bfloat16, bfloat16
arithmetic, fc8, LRN and the softmax in float32), and compares their predictions on the
run's whole validation split (its own evaluation preprocessing) and on the real photos
of tests/data/images:

    python training/train.py --run-dir runs/demo                # a trained run (the Quickstart)
    python -m bench.bf16_agreement runs/demo --out /tmp/bf16.json

It prints and writes (``--out``, atomically) per image set: the images, top-1 and top-5
agreement (the same class first; the same top-5 set; the same order), each model's
accuracy where labels exist, the largest probability difference and the smallest gap
between float32's k-th and (k+1)-th probability (how close the ranking was to a tie).
"""

import argparse
import json
import pathlib

import numpy as np

from bench.inputs import PHOTOS, photos


def compare(first, second, labels=None, k=5):
    """Agreement of two ``[N, classes]`` probability arrays (``first`` is the reference).

    ``k`` is capped at ``classes - 1`` (the gap needs a (k+1)-th class). Returns a dict of
    plain numbers."""
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    k = min(k, first.shape[1] - 1)
    order_first = np.argsort(-first, axis=1, kind="stable")
    order_second = np.argsort(-second, axis=1, kind="stable")
    top_first, top_second = order_first[:, :k], order_second[:, :k]
    ranked = np.take_along_axis(first, order_first[:, :k + 1], axis=1)
    result = {
        "images": int(len(first)), "k": int(k),
        "same_top1": int(np.sum(top_first[:, 0] == top_second[:, 0])),
        "same_topk_set": int(sum(set(a) == set(b) for a, b in zip(top_first, top_second))),
        "same_topk_order": int(np.sum(np.all(top_first == top_second, axis=1))),
        "max_abs_probability_difference": float(np.abs(first - second).max()),
        "min_gap_top1": float(np.min(ranked[:, 0] - ranked[:, 1])),
        "min_gap_topk": float(np.min(ranked[:, k - 1] - ranked[:, k])),
    }
    if labels is not None:
        labels = np.asarray(labels)
        result["accuracy_top1"] = [float(np.mean(top_first[:, 0] == labels)),
                                   float(np.mean(top_second[:, 0] == labels))]
        result["accuracy_topk"] = [float(np.mean(np.any(top_first == labels[:, None], 1))),
                                   float(np.mean(np.any(top_second == labels[:, None], 1)))]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=pathlib.Path, help="a training run (its newest checkpoint)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", type=pathlib.Path, help="write the results here as JSON")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from keras_alexnet import files, preprocessing
    from keras_alexnet.training import evaluation, loop
    from keras_alexnet.training.run_dir import RunDirectory

    run = RunDirectory(args.run_dir)
    config = run.read_config()
    if config is None:
        parser.error(f"{args.run_dir} is not a training run (no config.json)")
    float32 = run.load_model()
    predictors = [evaluation.keras_predictor(m)
                  for m in (float32, loop.inference_copy(float32, "bfloat16"))]
    source, mean = loop.load_data(config)
    size, resize = config.image_size, config.resize

    # The evaluation's own centre-crop pass over the split, once per model (400 images of
    # the Quickstart's dataset decode in about a second).
    (first, labels), (second, _) = [
        evaluation.predict_split(predict, source.validation, image_size=size, mean=mean,
                                 resize=resize, batch_size=args.batch)
        for predict in predictors]
    results = {"run_dir": str(args.run_dir), "dataset": config.dataset,
               "classes": int(float32.output_shape[-1]), "image_size": size,
               "parameters": int(float32.count_params()),
               "validation": compare(first, second, labels)}

    pixels = tf.stack([preprocessing.eval_from_bytes(b, size, mean, resize)
                       for b in photos(len(PHOTOS))])
    results["photos"] = compare(*(predict(pixels).numpy() for predict in predictors))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        files.atomic_write(args.out, text + "\n")
    return results


if __name__ == "__main__":
    main()
