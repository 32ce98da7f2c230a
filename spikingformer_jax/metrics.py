"""Evaluation metrics (accuracy in NumPy; F1, MCC, Pearson and Spearman from scikit-learn and scipy), and
the official metric set of each text task.

Every function takes an optional `mask` (1 = count the example) so the padded rows of the last eval
batch drop out. The trainer gathers logits/labels/mask on the host and calls `task_metrics`.
"""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as sklearn_metrics

# task -> (metric names, the primary one). GLUE's official metrics; other datasets use accuracy.
_TASK_METRICS = {
    'cola': ('matthews',),
    'mrpc': ('f1', 'accuracy'),
    'qqp': ('f1', 'accuracy'),
    'stsb': ('pearson', 'spearman'),
    'mlm': ('mlm_accuracy',),
}


def _masked(values: np.ndarray, mask) -> np.ndarray:
  values = np.asarray(values)
  if mask is None:
    return values
  mask = np.asarray(mask)
  if mask.shape != values.shape[:mask.ndim]:
    raise ValueError(f'mask shape {mask.shape} does not match the leading axes of {values.shape}.')
  return values[mask.astype(bool)]


def _predictions(predictions_or_logits, labels) -> np.ndarray:
  """Class ids: argmax over the last axis when given logits (one more axis than labels)."""
  p = np.asarray(predictions_or_logits)
  if p.ndim == np.ndim(labels) + 1:
    return p.argmax(axis=-1)
  if p.shape != np.shape(labels):
    raise ValueError(f'predictions {p.shape} must be logits [..., K] or class ids shaped like the labels '
                     f'{np.shape(labels)}.')
  return p


def accuracy(predictions_or_logits, labels, mask=None) -> float:
  labels = np.asarray(labels)
  hits = _predictions(predictions_or_logits, labels) == labels
  return float(_masked(hits, mask).mean())


def top_k_accuracy(logits, labels, k: int, mask=None) -> float:
  """Fraction of examples whose label is among the k largest logits (ties count in favour)."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  label_logit = np.take_along_axis(logits, labels[..., None], axis=-1)
  hits = (logits > label_logit).sum(axis=-1) < k
  return float(_masked(hits, mask).mean())


def _class_ids(predictions_or_logits, labels, mask) -> tuple[np.ndarray, np.ndarray]:
  """(predicted, true) class ids of the examples with mask 1."""
  labels = np.asarray(labels)
  return _masked(_predictions(predictions_or_logits, labels), mask), _masked(labels, mask)


def f1(predictions_or_logits, labels, mask=None, positive: int = 1) -> float:
  """Binary F1 of class `positive` (GLUE MRPC/QQP); 0 when there are no true or predicted positives."""
  pred, true = _class_ids(predictions_or_logits, labels, mask)
  return float(sklearn_metrics.f1_score(true == positive, pred == positive, zero_division=0.0))


def matthews_corrcoef(predictions_or_logits, labels, mask=None) -> float:
  """Multi-class Matthews correlation (Gorodkin's R_K; the binary MCC for two classes); 0 if undefined."""
  pred, true = _class_ids(predictions_or_logits, labels, mask)
  return float(sklearn_metrics.matthews_corrcoef(true, pred))


def _correlation(statistic, predictions, labels, mask) -> float:
  """scipy's correlation `statistic` of the masked values; 0 when either side is constant (undefined)."""
  x = _masked(np.asarray(predictions, np.float64), mask)
  y = _masked(np.asarray(labels, np.float64), mask)
  if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return 0.0
  return float(statistic(x, y).statistic)


def pearson(predictions, labels, mask=None) -> float:
  return _correlation(stats.pearsonr, predictions, labels, mask)


def spearman(predictions, labels, mask=None) -> float:
  """Spearman's rank correlation (ties share their mean rank)."""
  return _correlation(stats.spearmanr, predictions, labels, mask)


_FUNCTIONS = {'accuracy': accuracy, 'f1': f1, 'matthews': matthews_corrcoef, 'pearson': pearson,
              'spearman': spearman}


def task_metric_names(task_name: str) -> tuple[str, ...]:
  """Metric names of a task ('glue/cola', 'cola', 'sst5', 'mlm', ...); the first is the primary one."""
  task = task_name.split('/', 1)[1] if task_name.startswith('glue/') else task_name
  if task == 'mlm_text':
    task = 'mlm'
  return _TASK_METRICS.get(task, ('accuracy',))


def task_metrics(task_name: str, predictions_or_logits, labels, mask=None) -> dict[str, float]:
  """The official metrics of `task_name` over the examples with mask 1.

  Classification: logits [B, K] or class ids [B]. STS-B: scores [B] (or [B, 1]). MLM: logits
  [B, L, V] or predicted ids [B, L], targets [B, L], and `mask` = the MLM weights [B, L].
  """
  names = task_metric_names(task_name)
  if names == ('mlm_accuracy',):
    return {'mlm_accuracy': accuracy(predictions_or_logits, labels, mask)}
  if 'pearson' in names:
    scores = np.asarray(predictions_or_logits)
    scores = scores.reshape(scores.shape[0]) if scores.ndim == 2 and scores.shape[1] == 1 else scores
    return {name: _FUNCTIONS[name](scores, labels, mask) for name in names}
  return {name: _FUNCTIONS[name](predictions_or_logits, labels, mask) for name in names}
