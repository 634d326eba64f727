"""The headline metrics file: the numbers `dvc exp show` and `dvc metrics diff` put first."""

from cyclemerge.headline import headline_metrics


def test_the_headline_holds_test_scores_per_method_and_the_alignment_quality_only():
    evaluation = {
        "merged": {"method": "C2M3 + gates + repair", "test_acc": 0.9, "test_loss": 0.3, "train_acc": 0.95},
        "ensemble": {"test_acc": 0.92, "test_loss": 0.25},
        "endpoints": {"model 0 (seed 1)": {"test_acc": 0.91, "test_loss": 0.3}, "mean": {"test_acc": 0.9, "test_loss": 0.31}},
        "methods": {"model 0 (seed 1)": {"test_acc": 0.91, "test_loss": 0.3, "train_acc": 1.0},
                    "endpoint mean": {"test_acc": 0.9, "test_loss": 0.31},
                    "ensemble (outputs)": {"test_acc": 0.92, "test_loss": 0.25},
                    "C2M3 uniform": {"test_acc": 0.5, "test_loss": 1.2, "train_acc": 0.5},
                    "C2M3 + gates + repair": {"test_acc": 0.9, "test_loss": 0.3}},
        "seconds": 12.0, "params_hash": "abc",
    }
    head = headline_metrics(evaluation, {"objective": 7.5, "cycle_error": 0.0, "seconds": 3.0, "iterations": 9})
    assert list(head) == ["merged", "ensemble", "endpoints_mean", "methods", "align"]
    assert head["merged"] == {"test_acc": 0.9, "test_loss": 0.3}
    assert head["methods"] == {"C2M3 uniform": {"test_acc": 0.5, "test_loss": 1.2}}
    assert head["align"] == {"objective": 7.5, "cycle_error": 0.0}
