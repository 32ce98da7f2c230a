"""Metrics against hand-computed values and scipy/scikit-learn as independent references."""
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from spikingformer_jax import metrics


def test_hand_computed_binary_values():
  labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
  preds = np.array([1, 1, 0, 0, 0, 1, 1, 1])
  # tp=3 fp=2 fn=1 tn=2
  assert metrics.accuracy(preds, labels) == pytest.approx(5 / 8)
  assert metrics.f1(preds, labels) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
  mcc = (3 * 2 - 2 * 1) / np.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1))
  assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(mcc)


def test_logits_are_argmaxed_and_mask_drops_rows():
  logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 9.0]])
  labels = np.array([0, 1, 1, 0])
  assert metrics.accuracy(logits, labels) == pytest.approx(0.5)
  assert metrics.accuracy(logits, labels, mask=np.array([1, 1, 0, 0])) == pytest.approx(1.0)


def test_top_k():
  logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
  labels = np.array([2, 1, 0])
  assert metrics.top_k_accuracy(logits, labels, 1) == pytest.approx(0.0)
  assert metrics.top_k_accuracy(logits, labels, 2) == pytest.approx(2 / 3)  # row 1: tie at 0.05 counts
  assert metrics.top_k_accuracy(logits, labels, 3) == pytest.approx(1.0)


def test_against_sklearn_and_scipy():
  rng = np.random.default_rng(0)
  y3, p3 = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
  p3[:200] = y3[:200]
  assert metrics.matthews_corrcoef(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3), abs=1e-12)
  y2, p2 = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
  mask = rng.random(500) < 0.7
  assert metrics.f1(p2, y2, mask) == pytest.approx(skm.f1_score(y2[mask], p2[mask]), abs=1e-12)
  assert metrics.matthews_corrcoef(p2, y2, mask) == pytest.approx(skm.matthews_corrcoef(y2[mask], p2[mask]), abs=1e-12)
  scores = np.round(rng.uniform(0, 5, 300), 1)  # rounding creates ties for the rank test
  preds = np.round(scores + rng.normal(0, 1, 300), 1)
  assert metrics.pearson(preds, scores) == pytest.approx(stats.pearsonr(preds, scores)[0], abs=1e-12)
  assert metrics.spearman(preds, scores) == pytest.approx(stats.spearmanr(preds, scores)[0], abs=1e-12)


def test_degenerate_cases_are_zero_not_nan():
  assert metrics.matthews_corrcoef(np.ones(5, int), np.ones(5, int)) == 0.0
  assert metrics.f1(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0
  assert metrics.pearson(np.ones(4), np.arange(4.0)) == 0.0


def test_task_metrics_official_sets():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 64)
  logits = rng.normal(size=(64, 2))
  mask = np.ones(64)
  assert list(metrics.task_metrics('glue/cola', logits, labels, mask)) == ['matthews']
  assert list(metrics.task_metrics('glue/mrpc', logits, labels, mask)) == ['f1', 'accuracy']
  assert list(metrics.task_metrics('qqp', logits, labels, mask)) == ['f1', 'accuracy']
  for task in ('glue/sst2', 'glue/rte', 'glue/qnli', 'glue/mnli', 'sst5'):
    assert list(metrics.task_metrics(task, logits, labels, mask)) == ['accuracy']
  scores = rng.uniform(0, 5, 64)
  got = metrics.task_metrics('glue/stsb', scores[:, None] + 0.1, scores, mask)
  assert got == {'pearson': pytest.approx(1.0), 'spearman': pytest.approx(1.0)}
  mlm_logits = rng.normal(size=(2, 4, 7))
  targets = mlm_logits.argmax(-1)
  weights = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)
  targets[0, 1] = (targets[0, 1] + 1) % 7  # wrong, but weight 0
  targets[1, 3] = (targets[1, 3] + 1) % 7  # wrong with weight 1
  assert metrics.task_metrics('mlm', mlm_logits, targets, weights) == {'mlm_accuracy': pytest.approx(0.75)}


def test_mask_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='mask shape'):
    metrics.accuracy(np.zeros(4, int), np.zeros(4, int), mask=np.ones(3))
