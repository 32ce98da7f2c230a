"""The training losses of each task (optax's cross-entropies, MSE) and their shape checks."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from spikingformer_jax import train


def _config(task):
  return ml_collections.ConfigDict({'task': task})


def test_classification_is_the_soft_target_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 2])
  soft = np.full((4, 3), 0.05, np.float32)
  soft[np.arange(4), labels] = 0.9
  loss, correct = train.task_loss(_config('classification'), jnp.asarray(logits), {'label': jnp.asarray(labels)},
                                  jnp.asarray(soft))
  expected = -(soft * special.log_softmax(logits.astype(np.float64), -1)).sum(-1).mean()
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  np.testing.assert_array_equal(np.asarray(correct), (logits.argmax(-1) == labels).astype(np.float32))
  with pytest.raises(AssertionError):  # targets for another number of classes
    train.task_loss(_config('classification'), jnp.asarray(logits), {'label': jnp.asarray(labels)},
                    jnp.asarray(soft[:, :2]))


def test_mlm_averages_the_masked_positions_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 5))
  weights = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], np.float32)
  loss, _ = train.task_loss(_config('mlm'), jnp.asarray(logits),
                            {'label': jnp.asarray(labels), 'mlm_weights': jnp.asarray(weights)})
  nll = -np.take_along_axis(special.log_softmax(logits.astype(np.float64), -1), labels[..., None], -1)[..., 0]
  assert float(loss) == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-6)


def test_regression_compares_one_score_per_example():
  scores = jnp.asarray([[1.0], [2.0], [4.0]])  # the model's [B, 1]
  loss, _ = train.task_loss(_config('regression'), scores, {'label': jnp.asarray([1.5, 2.0, 3.0])})
  assert float(loss) == pytest.approx((0.25 + 0.0 + 1.0) / 3)
  with pytest.raises(AssertionError):  # [B] against [B, 1] labels would broadcast to a [B, B] difference
    train.task_loss(_config('regression'), scores, {'label': jnp.asarray([[1.5], [2.0], [3.0]])})
