"""bench/bf16_agreement.py: float32 against bfloat16 predictions of a trained run."""

import numpy as np
import pytest

from bench import bf16_agreement
from training import train


def test_compare_counts_agreement_by_hand():
    # Row 0: identical. Row 1: 5th and 6th swapped (same top-1, top-5 set differs).
    # Row 2: 1st and 2nd swapped (top-1 differs, top-5 set the same, order differs).
    first = np.array([[.40, .20, .15, .10, .08, .07],
                      [.30, .25, .20, .12, .07, .06],
                      [.31, .30, .20, .10, .05, .04]])
    second = np.array([[.40, .20, .15, .10, .08, .07],
                       [.30, .25, .20, .12, .06, .07],
                       [.30, .31, .20, .10, .05, .04]])
    labels = np.array([0, 5, 1])
    got = bf16_agreement.compare(first, second, labels)
    assert got == {
        "images": 3, "k": 5, "same_top1": 2, "same_topk_set": 2, "same_topk_order": 1,
        "max_abs_probability_difference": pytest.approx(0.01),
        "min_gap_top1": pytest.approx(0.01), "min_gap_topk": pytest.approx(0.01),
        # top-1 hits: row 0 only / rows 0 and 2; top-5 hits: rows 0 and 2 / all three.
        "accuracy_top1": [pytest.approx(1 / 3), pytest.approx(2 / 3)],
        "accuracy_topk": [pytest.approx(2 / 3), pytest.approx(1.0)],
    }


def test_k_is_capped_below_the_number_of_classes():
    first = np.array([[.5, .3, .2]])
    got = bf16_agreement.compare(first, first[:, ::-1])
    assert (got["k"], got["same_top1"], got["same_topk_set"]) == (2, 0, 0)
    assert got["min_gap_topk"] == pytest.approx(0.1)


@pytest.mark.slow
def test_a_trained_run_is_compared_on_its_validation_split_and_the_photos(shapes_data_dir,
                                                                           tmp_path):
    run_dir = tmp_path / "run"
    train.main(["--preset", "smoke", "--data-dir", shapes_data_dir, "--epochs", "1",
                "--run-dir", str(run_dir), "--export-dir", str(tmp_path / "models"),
                "--quiet"])
    out = tmp_path / "bf16.json"
    results = bf16_agreement.main([str(run_dir), "--batch", "16", "--out", str(out)])
    assert out.is_file()
    validation, photos = results["validation"], results["photos"]
    assert results["classes"] == 10 and results["image_size"] == 67
    assert validation["images"] > 0 and validation["k"] == 5
    assert photos["images"] == len(bf16_agreement.PHOTOS) > 0
    # A copy that computes in bfloat16: close to float32, not bit-identical.
    for part in (validation, photos):
        assert 0 < part["max_abs_probability_difference"] < 0.05
        assert 0 <= part["same_topk_order"] <= part["same_topk_set"] <= part["images"]
    assert len(validation["accuracy_top1"]) == 2 and "accuracy_top1" not in photos
