import numpy as np
import pytest
from sklearn import metrics as skm

from qanac.diagnostics import UsageError
from qanac.metrics import classification_metrics, plot_confusion_matrices, recall_drops


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 5, 300))
    y_pred[y_pred == 4] = 3  # class 4 never predicted: precision undefined -> 0
    ours = classification_metrics(y_true, y_pred, 5)
    assert ours["top1"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert ours["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=range(5), zero_division=0)
    for i in range(5):
        row = ours["per_class"][str(i)]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert np.array_equal(ours["confusion_matrix"], skm.confusion_matrix(y_true, y_pred, labels=range(5)))


def test_absent_class_counts_in_macro_f1_not_in_balanced_accuracy():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 1])
    ours = classification_metrics(y_true, y_pred, 3, ["a", "b", "c"])
    assert ours["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert ours["macro_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0))


def test_recall_drops_flags_only_beyond_threshold():
    y_true = np.array([0] * 10 + [1] * 10 + [2] * 10)
    reference = classification_metrics(y_true, y_true, 3)
    worse = y_true.copy()
    worse[:3] = 1   # class 0 recall 1.0 -> 0.7
    worse[10] = 2   # class 1 recall 1.0 -> 0.9
    flagged = recall_drops(reference, classification_metrics(y_true, worse, 3), threshold=0.15)
    assert [f["class"] for f in flagged] == ["0"]
    assert flagged[0]["drop"] == pytest.approx(0.3)
    assert recall_drops(reference, reference) == []


def test_plot_writes_png(tmp_path):
    cm = np.array([[5, 1], [2, 7]])
    path = plot_confusion_matrices(cm, cm.T, ["x", "y"], tmp_path / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_labels():
    with pytest.raises(UsageError):
        classification_metrics(np.array([0, 5]), np.array([0, 1]), 3)
    with pytest.raises(UsageError):
        classification_metrics(np.array([0, 1]), np.array([0]), 3)
