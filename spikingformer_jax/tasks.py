"""Tasks: what differs between image/event classification, text classification, text regression (STS-B) and
masked-language-model pretraining, one object per kind.

`get_task(config)` returns the task of a config. It owns the data pipeline, builds the model for the dataset,
gives the example inputs that initialise the model and the model inputs of a batch, the training loss, what the
evaluation step returns and the metrics of a gathered evaluation. Whether a config is about text is decided
once, by `is_text` (its dataset; `configs.validate` checks that the model reads that kind of input). The trainer
keeps the steps and the loop; `--mode=eval`, energy and the suite take the model and the data from here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import chex
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

from spikingformer_jax import configs, data, metrics, registry
from spikingformer_jax.text import model as text_model

TEXT_INPUTS = ('input_ids', 'segment_ids', 'attention_mask')


def is_text(config) -> bool:
  """Whether `config` trains on text: its dataset is glue/<task>, a sentence set or mlm_text."""
  from spikingformer_jax.text import data as text_data  # noqa: PLC0415 (keeps tokenizers optional)
  return text_data.is_text_dataset(config.data.name)


def _build_model(config, **fields):
  """The registered model config.model.name with the config's model fields, then `fields`, then
  config.model.overrides, which may not set any of the others again."""
  fields = dict(T=config.model.T, dtype=config.model.dtype, remat=config.model.remat,
                spike_kernels=config.model.spike_kernels, **fields)
  repeated = sorted(set(fields) & set(config.model.overrides))
  if repeated:
    raise configs.ConfigError(
        f'config.model.overrides sets {", ".join(repeated)}, which the config already sets (config.model.T, '
        f'.dtype, .remat, .spike_kernels, .num_classes, or the dataset for the text sizes): set each field in '
        f'one place.')
  return registry.get_model(config.model.name, **fields, **dict(config.model.overrides))


@dataclasses.dataclass(frozen=True)
class _Classification:
  """Logits into classes: cross-entropy on (smoothed or mixed) target distributions; loss, top-1/5 and the
  official metrics of config.data.task_name."""
  config: Any
  mixes_inputs: ClassVar[bool] = False  # mixup/cutmix on device (config.mixup)
  soft_targets: ClassVar[bool] = True  # the loss takes target distributions (label smoothing, mixup)

  def loss(self, outputs, batch, soft_targets):
    """(mean loss, per-example correctness) of a (micro)batch."""
    logits = outputs.astype(jnp.float32)
    chex.assert_equal_shape([logits, soft_targets])  # [B, classes]
    loss = jnp.mean(optax.softmax_cross_entropy(logits, soft_targets))
    return loss, (jnp.argmax(outputs, -1) == batch['label']).astype(jnp.float32)

  def eval_output(self, outputs):
    """What the evaluation step returns for the host to gather: the logits."""
    return outputs

  def eval_mask(self, batch):
    """1 for what the metrics count: the real examples of a padded batch."""
    return batch['mask']

  def metrics(self, out: np.ndarray, lab: np.ndarray, mask: np.ndarray) -> dict:
    nll = -np.take_along_axis(special.log_softmax(out, -1), lab[:, None].astype(np.int64), -1)[:, 0]
    result = {'loss': float((nll * mask).sum() / mask.sum()), 'top1': metrics.accuracy(out, lab, mask)}
    if out.shape[-1] >= 5:
      result['top5'] = metrics.top_k_accuracy(out, lab, 5, mask)
    if self.config.data.get('task_name', ''):
      result.update(metrics.task_metrics(self.config.data.task_name, out, lab, mask))
    return dict(result, num_examples=float(mask.sum()))


@dataclasses.dataclass(frozen=True)
class ImageClassification(_Classification):
  """Images `[B, H, W, C]` or event frames `[B, T, H, W, 2]` into classes."""
  mixes_inputs: ClassVar[bool] = True

  @property
  def data_module(self):
    return data

  def build_model(self, info):
    config = self.config
    if config.model.num_classes != info.num_classes:
      raise configs.ConfigError(f'config.model.num_classes = {config.model.num_classes}, but dataset '
                                f'{config.data.name!r} has {info.num_classes} classes.')
    if len(info.example_shape) == 4 and info.example_shape[0] != config.model.T:
      raise configs.ConfigError(f'config.model.T = {config.model.T}, but the event frames have '
                                f'{info.example_shape[0]} time steps (config.data.T).')
    return _build_model(config, num_classes=config.model.num_classes)

  def example_inputs(self, info) -> tuple:
    return registry.image_example(info.example_shape)

  def model_inputs(self, batch) -> tuple:
    return (batch['image'],)


class _TextInputs:
  """Token sequences `[B, L]` (ids, segment ids, attention mask) into Spikingformer-Text."""
  config: Any

  @property
  def data_module(self):
    from spikingformer_jax.text import data as text_data  # noqa: PLC0415
    return text_data

  def num_labels(self) -> int:
    return self.config.model.num_classes

  def build_model(self, info):
    return _build_model(self.config, vocab_size=info.vocab_size, num_labels=self.num_labels(), task=self.config.task)

  def example_inputs(self, info) -> tuple:
    del info
    return text_model.dummy_inputs(1, int(self.config.data.get('max_len', 128)))

  def model_inputs(self, batch) -> tuple:
    return tuple(batch[k] for k in TEXT_INPUTS)


@dataclasses.dataclass(frozen=True)
class TextClassification(_TextInputs, _Classification):
  """A sentence or a GLUE sentence pair into classes."""


@dataclasses.dataclass(frozen=True)
class TextRegression(_TextInputs, _Classification):
  """A GLUE sentence pair to one score (STS-B): mean squared error; Pearson and Spearman."""
  soft_targets: ClassVar[bool] = False

  def num_labels(self) -> int:
    return 1

  def loss(self, outputs, batch, soft_targets=None):
    del soft_targets
    pred = outputs.reshape(-1).astype(jnp.float32)
    chex.assert_equal_shape([pred, batch['label']])  # [B] against [B], never broadcast to [B, B]
    return jnp.mean(jnp.square(pred - batch['label'])), jnp.zeros_like(pred)

  def metrics(self, out, lab, mask) -> dict:
    task_name = self.config.data.get('task_name', '')
    scores = out.reshape(len(out), -1).squeeze(-1)
    result = metrics.task_metrics(task_name, scores, lab, mask) if task_name else {}
    return dict(result, num_examples=float(mask.sum()))


@dataclasses.dataclass(frozen=True)
class MaskedLanguageModel(_TextInputs, _Classification):
  """Masked-token prediction over the vocabulary (pretraining): accuracy on the masked positions."""
  soft_targets: ClassVar[bool] = False

  def loss(self, outputs, batch, soft_targets=None):
    del soft_targets
    logits, w = outputs.astype(jnp.float32), batch['mlm_weights']
    chex.assert_equal_shape([logits[..., 0], batch['label'], w])  # [B, L] positions
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    correct = (jnp.argmax(outputs, -1) == batch['label']) * w
    return jnp.sum(ce * w) / jnp.maximum(w.sum(), 1.0), correct.sum(-1) / jnp.maximum(w.sum(-1), 1.0)

  def eval_output(self, outputs):
    """Predicted ids instead of [B, L, vocab] logits, so the host gathers little."""
    return jnp.argmax(outputs, -1).astype(jnp.int32)

  def eval_mask(self, batch):
    """The masked positions of the real examples."""
    return batch['mlm_weights'] * batch['mask'][:, None]

  def metrics(self, out, lab, mask) -> dict:
    return {'mlm_accuracy': metrics.accuracy(out, lab, mask), 'num_masked_tokens': float(mask.sum())}


Task = ImageClassification | TextClassification | TextRegression | MaskedLanguageModel
_TEXT_TASKS = {'classification': TextClassification, 'regression': TextRegression, 'mlm': MaskedLanguageModel}


def get_task(config) -> Task:
  """The task of `config`: by its dataset (text or not) and config.task."""
  if not is_text(config):
    if config.task != 'classification':
      raise configs.ConfigError(f'config.task = {config.task!r}: image and event datasets are classified '
                                "(config.task = 'classification').")
    return ImageClassification(config)
  return _TEXT_TASKS[config.task](config)

