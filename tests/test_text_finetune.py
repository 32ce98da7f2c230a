"""Fine-tuning Spikingformer-Text from an MLM checkpoint through the trainer's `init_from`."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import shared_path
from experiments import glue as glue_config, pretrain_mlm
from spikingformer_jax import checkpoint, evaluate_only, sharding, train
from spikingformer_jax.text import data, glue


def _rte_corpus(directory):
  """RTE's training sentences, one per line: real text from the fine-tuning task's own domain."""
  rte = glue.read_glue_tsv('rte', str(shared_path('data', 'glue')), 'train')
  directory.mkdir()
  (directory / 'rte.txt').write_text('\n'.join(rte.text_a + rte.text_b) + '\n', encoding='utf-8')
  return directory


def _create_state(config):
  ctx, example = train.make_context(config, data.dataset_info(config.data))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _ = train.create_state(ctx, mesh, example, jax.random.PRNGKey(0), config.init_from)
  return jax.device_get(state['params'])


def test_glue_fine_tune_starts_from_the_mlm_backbone(tmp_path):
  """MLM pretraining, then RTE with a new head and the cross-segment match embedding switched on."""
  pre = pretrain_mlm.get_config(f'variant=tiny,corpus={_rte_corpus(tmp_path / "corpus")},runlocal')
  pre.total_steps, pre.checkpoint.async_save = 4, False
  pre.mesh.data = 1
  train.train_and_evaluate(pre, tmp_path / 'mlm', devices=jax.devices()[:1])
  pretrained = traverse_util.flatten_dict(checkpoint.load_variables(tmp_path / 'mlm')['params'])

  ft = glue_config.get_config('task=rte,variant=tiny,runlocal')
  ft.init_from, ft.mesh.data, ft.checkpoint.async_save = str(tmp_path / 'mlm'), 1, False
  ft.model.overrides.cross_segment_match = True
  tuned = traverse_util.flatten_dict(_create_state(ft))
  new = {path for path in tuned if path[0] in ('head', 'match_embed')}
  assert {path[0] for path in new} == {'head', 'match_embed'}
  assert tuned[('head', 'kernel')].shape == (64, 2)
  for path, value in tuned.items():  # every backbone variable is the pretrained one; the MLM head is gone
    if path not in new:
      np.testing.assert_array_equal(value, pretrained[path])
  assert set(pretrained) - set(tuned) == {p for p in pretrained if p[0] == 'mlm_head'} != set()

  ft.total_steps = 6
  summary = train.train_and_evaluate(ft, tmp_path / 'rte', devices=jax.devices()[:1])
  assert summary['completed'] and summary['final']['num_examples'] == 222
  assert np.isfinite(summary['final']['accuracy'])
  # Evaluating needs the whole model: the MLM checkpoint alone is refused, naming what it lacks.
  ft.mesh.data = -1  # --mode=eval runs on every device
  with pytest.raises(ValueError, match='missing in checkpoint: params/match_embed'):
    evaluate_only.run(ft, tmp_path / 'empty')
