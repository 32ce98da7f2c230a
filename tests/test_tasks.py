"""The task layer: which task a config is, and each task's loss (optax's cross-entropies, MSE) and shape checks."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from experiments import digits
from spikingformer_jax import configs, data, tasks
from spikingformer_jax.text import data as text_data


def _task(kind):
  """The task of a config of kind `kind` on a dataset of that kind."""
  config = configs.base_config()
  config.task = kind
  config.data.name = {'classification': 'digits', 'regression': 'glue/stsb', 'mlm': 'mlm_text'}[kind]
  return tasks.get_task(config)


def test_the_dataset_decides_text_and_config_task_the_kind():
  assert type(_task('classification')) is tasks.ImageClassification
  assert type(_task('regression')) is tasks.TextRegression
  assert type(_task('mlm')) is tasks.MaskedLanguageModel
  sst = configs.base_config()
  sst.data.name = 'sst5'
  assert type(tasks.get_task(sst)) is tasks.TextClassification
  assert tasks.get_task(sst).data_module is text_data and _task('classification').data_module is data
  image = digits.get_config()
  image.task = 'regression'
  with pytest.raises(configs.ConfigError, match="config.task = 'regression': image and event datasets are "
                                                'classified'):
    tasks.get_task(image)


def test_classification_is_the_soft_target_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 3)).astype(np.float32)
  labels = np.array([0, 2, 1, 2])
  soft = np.full((4, 3), 0.05, np.float32)
  soft[np.arange(4), labels] = 0.9
  loss, correct = _task('classification').loss(jnp.asarray(logits), {'label': jnp.asarray(labels)}, jnp.asarray(soft))
  expected = -(soft * special.log_softmax(logits.astype(np.float64), -1)).sum(-1).mean()
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  np.testing.assert_array_equal(np.asarray(correct), (logits.argmax(-1) == labels).astype(np.float32))
  with pytest.raises(AssertionError):  # targets for another number of classes
    _task('classification').loss(jnp.asarray(logits), {'label': jnp.asarray(labels)}, jnp.asarray(soft[:, :2]))


def test_mlm_averages_the_masked_positions_only():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (2, 5))
  weights = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], np.float32)
  loss, _ = _task('mlm').loss(jnp.asarray(logits), {'label': jnp.asarray(labels), 'mlm_weights': jnp.asarray(weights)})
  nll = -np.take_along_axis(special.log_softmax(logits.astype(np.float64), -1), labels[..., None], -1)[..., 0]
  assert float(loss) == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-6)


def test_regression_compares_one_score_per_example():
  scores = jnp.asarray([[1.0], [2.0], [4.0]])  # the model's [B, 1]
  loss, _ = _task('regression').loss(scores, {'label': jnp.asarray([1.5, 2.0, 3.0])})
  assert float(loss) == pytest.approx((0.25 + 0.0 + 1.0) / 3)
  with pytest.raises(AssertionError):  # [B] against [B, 1] labels would broadcast to a [B, B] difference
    _task('regression').loss(scores, {'label': jnp.asarray([[1.5], [2.0], [3.0]])})


def test_mlm_evaluates_predicted_ids_on_the_masked_positions_of_real_examples():
  task = _task('mlm')
  assert np.asarray(task.eval_output(jnp.asarray(np.eye(4)[None, [2, 0, 3]]))).tolist() == [[2, 0, 3]]
  batch = {'mlm_weights': np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), 'mask': np.array([1.0, 0.0])}
  np.testing.assert_array_equal(task.eval_mask(batch), [[1, 0, 1], [0, 0, 0]])
  got = task.metrics(np.array([[2, 0, 1]]), np.array([[2, 1, 3]]), np.array([[1.0, 0.0, 1.0]]))
  assert got == {'mlm_accuracy': 0.5, 'num_masked_tokens': 2.0}


def test_text_classification_adds_the_official_metrics_of_its_task():
  config = configs.base_config()
  config.data.name = config.data.task_name = 'glue/cola'
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
  labels, mask = np.array([0, 1, 0, 0]), np.array([1.0, 1.0, 1.0, 0.0])
  got = tasks.get_task(config).metrics(logits, labels, mask)
  assert set(got) == {'loss', 'top1', 'matthews', 'num_examples'} and got['num_examples'] == 3.0
  assert got['top1'] == pytest.approx(2 / 3) and got['matthews'] == pytest.approx(0.5)


@pytest.mark.parametrize('field', ['num_classes', 'T', 'spike_kernels'])
def test_model_overrides_may_not_repeat_a_field_the_config_sets(field):
  config = digits.get_config()
  info = data.dataset_info(config.data)
  config.model.overrides[field] = {'num_classes': 10, 'T': 2, 'spike_kernels': False}[field]
  with pytest.raises(configs.ConfigError, match=f'config.model.overrides sets {field}, which the config already'):
    tasks.get_task(config).build_model(info)
  del config.model.overrides[field]
  config.model.overrides.num_heads = 2
  assert tasks.get_task(config).build_model(info).num_heads == 2
