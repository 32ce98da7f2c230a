"""The text experiment configs build, validate against the schema plus the text data keys, and load."""
import importlib.util
import pathlib

import pytest

from spikingformer_jax import configs, metrics, registry
from spikingformer_jax.text import data

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / 'experiments'


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _reference():
  ref = configs.base_config()
  ref.data.update(data.text_data_defaults())
  return ref


@pytest.mark.parametrize('task,kind,metric,classes', [
    ('cola', 'classification', 'matthews', 2), ('sst2', 'classification', 'accuracy', 2),
    ('mrpc', 'classification', 'f1', 2), ('stsb', 'regression', 'pearson', 1),
    ('qqp', 'classification', 'f1', 2), ('mnli', 'classification', 'accuracy', 3),
    ('qnli', 'classification', 'accuracy', 2), ('rte', 'classification', 'accuracy', 2),
    ('sst5', 'classification', 'accuracy', 5), ('waimai', 'classification', 'accuracy', 2)])
def test_glue_configs(task, kind, metric, classes):
  c = _load('glue').get_config(f'task={task},variant=12-768')
  configs.validate(c, _reference())
  assert (c.task, c.metric, c.model.num_classes) == (kind, metric, classes)
  assert data.is_text_dataset(c.data.name) and registry.get_spec(c.model.name).kind == registry.TEXT
  assert c.label_smoothing == 0.0 and c.mixup.mixup_alpha == 0.0
  assert c.metric in metrics.task_metric_names(c.data.task_name)[:1]
  if task == 'mnli':
    assert c.data.eval_split == 'validation_matched'


def test_runlocal_configs_and_bad_arguments():
  glue_cfg = _load('glue').get_config('task=rte,variant=12-768,runlocal')
  assert glue_cfg.model.name == 'spikingformer-text-tiny' and glue_cfg.total_steps > 0
  mlm_cfg = _load('pretrain_mlm').get_config('variant=tiny,corpus=/nonexistent,runlocal')
  configs.validate(mlm_cfg, _reference())
  assert mlm_cfg.task == 'mlm' and 'task' not in mlm_cfg.model.overrides  # the trainer passes task=
  with pytest.raises(ValueError, match='Unknown config argument'):
    _load('glue').get_config('tsk=rte')
  with pytest.raises(ValueError, match='variant'):
    _load('pretrain_mlm').get_config('variant=3-3')


def test_from_scratch_and_fine_tuning_recipes():
  glue_module = _load('glue')
  scratch = glue_module.get_config('task=sst2_sentence,variant=tiny')
  configs.validate(scratch, _reference())
  assert (scratch.data.name, scratch.data.task_name, scratch.metric, scratch.model.num_classes) == (
      'sst2', 'sst2', 'accuracy', 2)
  assert scratch.init_from == '' and scratch.optim.lr == 2e-3 and scratch.num_epochs == 3
  assert scratch.optim.warmup_epochs == 1 and scratch.optim.min_lr == 0.0
  assert not scratch.model.overrides.cross_segment_match  # one sentence: nothing to match
  assert scratch.data.word_dropout == 0.2
  assert glue_module.get_config('task=sst2_sentence,variant=8-768').optim.lr == 5e-4
  pairs = glue_module.get_config('task=rte,variant=tiny')
  assert pairs.model.overrides.cross_segment_match and pairs.num_epochs == 10
  tuned = glue_module.get_config('task=rte,variant=12-768,init_from=/ckpt/mlm')
  assert (tuned.init_from, tuned.optim.lr, tuned.optim.warmup_epochs) == ('/ckpt/mlm', 1e-4, 1)
  assert not tuned.model.overrides.cross_segment_match  # the pretrained backbone has no match embedding
  assert tuned.data.word_dropout == 0.0
  assert _load('pretrain_mlm').get_config('variant=tiny,corpus=/c').optim.lr == 2e-3
  with pytest.raises(ValueError, match='task='):
    glue_module.get_config('task=sst2_sentences')
