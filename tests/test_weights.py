"""Weights checkpoints: exact round trip, atomic save, refusal to overwrite, clear load errors."""
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from etils import epath
from flax import traverse_util

from spikingformer_jax import models, registry
from spikingformer_jax.porting import weights

# After a failed read, Orbax's asyncio loop reports a callback on a closed loop when it is garbage
# collected (in whichever test that happens); harmless.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

MODEL = 'spikingformer-tiny'
OVERRIDES = {'embed_dim': 32, 'num_heads': 4, 'num_classes': 3}


@pytest.fixture(scope='module')
def variables():
  """Random (not initial) values everywhere, so a mixed-up leaf cannot pass unnoticed."""
  model = registry.get_model(MODEL, **OVERRIDES)
  abstract = models.abstract_variables(model, (1, 8, 8, 1))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def save(directory, variables, **kwargs):
  return weights.save_weights(directory, variables, model_name=MODEL, model_overrides=OVERRIDES,
                              source='unit test', **kwargs)


def leftovers(parent):
  return sorted(p.name for p in pathlib.Path(parent).iterdir())


def test_round_trip_is_exact_and_rebuilds_the_model(tmp_path, variables):
  save(tmp_path / 'w', variables)
  loaded, meta = weights.load_weights(tmp_path / 'w')
  assert meta['model_name'] == MODEL and meta['model_overrides'] == OVERRIDES and meta['source'] == 'unit test'
  flat_in, flat_out = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(loaded)
  assert flat_in.keys() == flat_out.keys()
  for k in flat_in:
    assert isinstance(flat_out[k], np.ndarray) and flat_out[k].dtype == np.float32
    np.testing.assert_array_equal(flat_out[k], flat_in[k])
  model = weights.build_model_from_meta(meta)
  assert (model.embed_dim, model.num_heads, model.num_classes) == (32, 4, 3)
  logits = jax.jit(model.apply)(loaded, np.zeros((2, 8, 8, 1), np.float32))
  assert logits.shape == (2, 3)
  assert leftovers(tmp_path) == ['w'] and weights.is_weights_checkpoint(tmp_path / 'w')


def test_save_refuses_variables_that_do_not_fit_the_model(tmp_path, variables):
  bad = jax.tree.map(lambda a: a, variables)
  bad['params']['head']['kernel'] = np.zeros((32, 5), np.float32)
  with pytest.raises(weights.WeightsError, match=r'params/head/kernel has shape \(32, 5\), the model expects '
                                                   r'\(32, 3\)'):
    save(tmp_path / 'w', bad)
  with pytest.raises(weights.WeightsError, match='exactly the collections'):
    save(tmp_path / 'w', {'params': variables['params']})
  with pytest.raises(weights.WeightsError, match='JSON values'):
    weights.save_weights(tmp_path / 'w', variables, model_name=MODEL, model_overrides={'dtype': np.float16},
                         source='x')
  assert leftovers(tmp_path) == []


@pytest.mark.parametrize('fail_at', ['orbax', 'metadata'])
def test_failed_save_leaves_nothing(tmp_path, variables, monkeypatch, fail_at):
  def boom(*args, **kwargs):
    raise RuntimeError('disk full')
  if fail_at == 'orbax':
    monkeypatch.setattr(weights.ocp.StandardCheckpointer, 'save', boom)
  else:  # After the Orbax checkpoint is complete, while writing the metadata.
    monkeypatch.setattr(type(epath.Path(tmp_path)), 'write_text', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    save(tmp_path / 'w', variables)
  assert leftovers(tmp_path) == []


def test_overwrite_only_when_asked_and_only_weights(tmp_path, variables, monkeypatch):
  target = tmp_path / 'w'
  save(target, variables)
  doubled = jax.tree.map(lambda a: 2 * a, variables)
  with pytest.raises(weights.WeightsError, match='already exists.*overwrite=True'):
    save(target, doubled)

  def boom(*args, **kwargs):
    raise RuntimeError('interrupted')
  with monkeypatch.context() as m:  # A failed overwrite keeps the old checkpoint.
    m.setattr(weights.ocp.StandardCheckpointer, 'save', boom)
    with pytest.raises(RuntimeError):
      save(target, doubled, overwrite=True)
  np.testing.assert_array_equal(weights.load_weights(target)[0]['params']['head']['bias'],
                                variables['params']['head']['bias'])

  save(target, doubled, overwrite=True)
  np.testing.assert_array_equal(weights.load_weights(target)[0]['params']['head']['bias'],
                                doubled['params']['head']['bias'])
  assert leftovers(tmp_path) == ['w']

  other = tmp_path / 'my_data'
  other.mkdir()
  (other / 'keep.txt').write_text('precious')
  with pytest.raises(weights.WeightsError, match='not a weights checkpoint'):
    save(other, variables, overwrite=True)
  assert (other / 'keep.txt').read_text() == 'precious'


@pytest.fixture
def saved(tmp_path, variables):
  save(tmp_path / 'w', variables)
  return tmp_path / 'w'


def test_load_missing_directory(tmp_path):
  with pytest.raises(weights.WeightsError, match='does not exist'):
    weights.load_weights(tmp_path / 'nope')


def test_load_half_written_directory(saved):
  (saved / weights.COMMIT_FILE).unlink()
  with pytest.raises(weights.WeightsError, match=r'no COMMITTED marker.*did not finish.*variables'):
    weights.load_weights(saved)
  assert not weights.is_weights_checkpoint(saved)


@pytest.mark.parametrize('content, message', [
    ('{"format": "spikingformer-jax-weig', 'not valid JSON'),
    ('[1, 2]', 'expected a JSON object'),
    (None, 'field \'model_name\' should be a str'),
    ({'model_name': 'unknown-model'}, "unknown model_name 'unknown-model'"),
    ({'model_overrides': {'widht': 3}}, r"Cannot build model 'spikingformer-tiny' .*Unknown model override.*widht"),
])
def test_load_corrupt_metadata(saved, content, message):
  meta_path = saved / weights.META_FILE
  meta = json.loads(meta_path.read_text())
  if content is None:
    del meta['model_name']
    content = json.dumps(meta)
  elif isinstance(content, dict):
    content = json.dumps({**meta, **content})
  meta_path.write_text(content)
  with pytest.raises(weights.WeightsError, match=message):
    weights.load_weights(saved)


def test_load_metadata_that_disagrees_with_the_variables(saved):
  meta_path = saved / weights.META_FILE
  meta = json.loads(meta_path.read_text())
  meta['model_overrides']['num_classes'] = 7
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(weights.WeightsError, match=r'params/head/kernel has shape \(32, 3\), the model expects '
                                                   r'\(32, 7\)'):
    weights.load_weights(saved)


def _truncate_files(root, keep=lambda p: False):
  for path in root.rglob('*'):
    if path.is_file() and not keep(path):
      path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def test_load_damaged_array_data(saved):
  data = saved / weights.VARIABLES_DIR / 'ocdbt.process_0' / 'd'
  assert any(data.iterdir())  # Orbax's OCDBT layout: the tensors live here.
  _truncate_files(data)
  with pytest.raises(weights.WeightsError, match='could not read the variables/ Orbax checkpoint.*OUT_OF_RANGE'):
    weights.load_weights(saved)


def test_load_damaged_or_missing_orbax_checkpoint(saved):
  variables_dir = saved / weights.VARIABLES_DIR
  _truncate_files(variables_dir, keep=lambda p: p.name in ('_CHECKPOINT_METADATA', 'commit_success.txt'))
  with pytest.raises(weights.WeightsError, match='no readable array metadata'):
    weights.load_weights(saved)
  shutil.rmtree(variables_dir)
  with pytest.raises(weights.WeightsError, match='variables/ Orbax checkpoint is missing'):
    weights.load_weights(saved)
