"""Spikingformer-Text: head shapes, spike-driven blocks, padding invariance, parameter counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikingformer_jax import layers, models, registry
from spikingformer_jax.text import model as text_model

SMALL = dict(embed_dim=32, depth=1, num_heads=2, T=2, vocab_size=97, max_len=32)
DEEP = dict(SMALL, depth=2)  # where block stacking matters


def _inputs(rng, lengths, width, vocab=97):
  """Random ids; positions past each length hold random garbage ids and mask 0."""
  b = len(lengths)
  ids = rng.integers(5, vocab, (b, width)).astype(np.int32)
  segs = (rng.random((b, width)) < 0.5).astype(np.int32)
  mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return jnp.asarray(ids), jnp.asarray(segs), jnp.asarray(mask)


@pytest.mark.parametrize('task,num_labels,expected', [
    ('classification', 3, (4, 3)), ('regression', 1, (4,)), ('mlm', 2, (4, 12, 97))])
def test_head_shapes(task, num_labels, expected):
  model = registry.get_model('spikingformer-text-tiny', task=task, num_labels=num_labels, **SMALL)
  variables = text_model.init_variables(model, jax.random.PRNGKey(0))
  out = model.apply(variables, *_inputs(np.random.default_rng(0), [12, 5, 9, 1], 12), train=False)
  assert out.shape == expected and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


def test_blocks_are_spike_driven():
  """Every Dense inside the blocks sees 0/1 inputs; every sown spike tensor is 0/1."""
  model = registry.get_model('spikingformer-text-tiny', **DEEP)
  variables = text_model.init_variables(model, jax.random.PRNGKey(1))
  dense_inputs = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == '__call__':
      dense_inputs['/'.join(context.module.path)] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, state = model.apply(variables, *_inputs(np.random.default_rng(1), [16, 7, 11], 16), train=True,
                           mutable=['batch_stats', layers.SPIKES])
  block_dense = {k: v for k, v in dense_inputs.items() if k.startswith('block_')}
  # Per block: q, k, v, proj, mlp1, mlp2.
  assert len(block_dense) == 6 * DEEP['depth']
  for path, x in block_dense.items():
    assert np.isin(x, (0.0, 1.0)).all(), f'{path} input is not binary'
  spikes = jax.tree_util.tree_leaves(state[layers.SPIKES])
  assert len(spikes) == 7 * DEEP['depth']  # proj, q, k, v, attn, mlp1, mlp2 LIFs per block
  for s in spikes:
    assert np.isin(np.asarray(s), (0.0, 1.0)).all()
  rates = [float(np.asarray(s).mean()) for s in spikes]
  assert max(rates) > 0.01  # the network actually fires


def _trained_stats(model, variables, rng):
  """Running BatchNorm statistics moved away from their init by a few train-mode passes."""
  for _ in range(3):
    _, state = model.apply(variables, *_inputs(rng, [10, 4, 8], 10), train=True, mutable=['batch_stats'])
    variables = {'params': variables['params'], 'batch_stats': state['batch_stats']}
  return variables


@pytest.mark.parametrize('task,match', [('classification', False), ('mlm', False), ('classification', True)])
def test_padding_invariance(task, match):  # regression pools exactly like classification
  """Appending padding (with garbage ids) changes neither outputs nor BatchNorm statistics."""
  model = registry.get_model('spikingformer-text-tiny', task=task, num_labels=3,
                                    cross_segment_match=match, **DEEP)
  rng = np.random.default_rng(2)
  variables = _trained_stats(model, text_model.init_variables(model, jax.random.PRNGKey(2)), rng)
  lengths = [9, 3, 6, 9]
  ids, segs, mask = _inputs(rng, lengths, 9)
  extra = 7
  garbage = jnp.asarray(rng.integers(5, 97, (4, extra)), jnp.int32)
  ids_p = jnp.concatenate([ids, garbage], axis=1)
  segs_p = jnp.concatenate([segs, jnp.ones_like(garbage)], axis=1)
  mask_p = jnp.concatenate([mask, jnp.zeros_like(garbage)], axis=1)
  valid = np.asarray(mask, bool)

  def compare(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if task == 'mlm':
      a, b = a[valid], b[:, :9][valid]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  compare(model.apply(variables, ids, segs, mask, train=False),
          model.apply(variables, ids_p, segs_p, mask_p, train=False))
  out, st = model.apply(variables, ids, segs, mask, train=True, mutable=['batch_stats'])
  out_p, st_p = model.apply(variables, ids_p, segs_p, mask_p, train=True, mutable=['batch_stats'])
  compare(out, out_p)
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                         st['batch_stats'], st_p['batch_stats'])
  # The check has teeth: without the mask the padded batch gives different outputs.
  unmasked = model.apply(variables, ids_p, segs_p, jnp.ones_like(mask_p), train=False)
  assert not np.allclose(np.asarray(out_p if task != 'mlm' else out_p[:, :9]),
                         np.asarray(unmasked if task != 'mlm' else unmasked[:, :9]), atol=1e-3)


def _match_loops(ids, segs, mask):
  out = np.zeros(ids.shape, np.int32)
  for b in range(ids.shape[0]):
    for i in range(ids.shape[1]):
      if mask[b, i]:
        out[b, i] = any(mask[b, j] and segs[b, j] != segs[b, i] and ids[b, j] == ids[b, i]
                        for j in range(ids.shape[1]))
  return out


def test_cross_segment_match_feature():
  # [CLS] the cat sat [SEP] a cat [SEP] <pad: 'the'>: 'cat' and [SEP] occur in both segments, the padded
  # 'the' must not count, 'a' and 'sat' occur in one segment only.
  ids = np.array([[101, 7, 8, 9, 102, 5, 8, 102, 7]], np.int32)
  segs = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1]], np.int32)
  mask = np.array([[1, 1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
  expected = [[0, 0, 1, 0, 1, 0, 1, 1, 0]]
  np.testing.assert_array_equal(text_model.cross_segment_match(ids, segs, mask), expected)
  np.testing.assert_array_equal(text_model.cross_segment_match(ids, np.zeros_like(segs), mask), 0 * mask)
  ids, segs, mask = (np.asarray(a) for a in _inputs(np.random.default_rng(5), [20, 13, 1, 7], 20, vocab=12))
  found = np.asarray(text_model.cross_segment_match(ids, segs, mask))
  np.testing.assert_array_equal(found, _match_loops(ids, segs, mask))
  assert 0 < found.sum() < mask.sum()
  # In the model: one (2, D) embedding, and the feature reaches the logits.
  model = registry.get_model('spikingformer-text-tiny', cross_segment_match=True, **SMALL)
  variables = text_model.init_variables(model, jax.random.PRNGKey(0))
  table = variables['params']['match_embed']['embedding']
  assert table.shape == (2, SMALL['embed_dim'])
  swapped = {'params': dict(variables['params'], match_embed={'embedding': table[::-1]}),
             'batch_stats': variables['batch_stats']}
  assert not np.allclose(model.apply(variables, ids, segs, mask), model.apply(swapped, ids, segs, mask))


def test_tied_and_untied_mlm_heads():
  tied = registry.get_model('spikingformer-text-tiny', task='mlm', **SMALL)
  untied = registry.get_model('spikingformer-text-tiny', task='mlm', tie_embeddings=False, **SMALL)
  p_tied = text_model.init_variables(tied, jax.random.PRNGKey(0))['params']
  p_untied = text_model.init_variables(untied, jax.random.PRNGKey(0))['params']
  assert 'decoder' not in p_tied['mlm_head']
  assert p_untied['mlm_head']['decoder']['kernel'].shape == (32, 97)
  assert models.count_params(p_untied) - models.count_params(p_tied) == 32 * 97
  # Tying: moving the embedding row of a token absent from the input changes exactly that token's logit
  # (through the decoder), and leaves the untied model's outputs alone.
  ids, segs, mask = _inputs(np.random.default_rng(3), [6, 6], 6)
  ids = jnp.where(ids == 6, 7, ids)
  for model, is_tied in ((tied, True), (untied, False)):
    variables = text_model.init_variables(model, jax.random.PRNGKey(0))
    base = np.asarray(model.apply(variables, ids, segs, mask))
    bumped = jax.tree_util.tree_map(lambda x: x, variables)
    table = variables['params']['token_embed']['embedding']
    delta = jnp.asarray(np.random.default_rng(4).normal(size=table.shape[1]), jnp.float32)  # not constant:
    bumped['params']['token_embed']['embedding'] = table.at[6].add(delta)  # LayerNorm output sums to 0
    out = np.asarray(model.apply(bumped, ids, segs, mask))
    others = np.arange(97) != 6
    np.testing.assert_allclose(out[..., others], base[..., others], rtol=1e-6, atol=1e-6)
    assert (np.abs(out[..., 6] - base[..., 6]).min() > 1e-3) == is_tied


def test_bert_base_shaped_parameter_count():
  """12-768: closed-form count (embeddings + 12 spiking blocks + LayerNorm + head), from shapes only."""
  v, d, h, n_pos, layers_n, k = 30522, 768, 3072, 512, 12, 2
  block = 3 * (d * d + 2 * d) + (d * d + d + 2 * d) + (d * h + h + 2 * h) + (h * d + d + 2 * d)
  expected = v * d + n_pos * d + 2 * d + 2 * d + layers_n * block + d * k + k
  model = registry.get_model('spikingformer-text-12-768', num_classes=2)
  shapes = jax.eval_shape(lambda: text_model.init_variables(model, jax.random.PRNGKey(0)))
  assert models.count_params(shapes['params']) == expected
  assert model.num_heads == 12


def test_bad_overrides_are_rejected():
  with pytest.raises(ValueError, match='Unknown model override'):
    registry.get_model('spikingformer-text-tiny', num_layers=3)
  with pytest.raises(ValueError, match='task'):
    registry.get_model('spikingformer-text-tiny', task='ner')
  with pytest.raises(ValueError, match='Unknown model'):
    registry.get_model('spikingformer-text-99-1')
  model = registry.get_model('spikingformer-text-tiny', **dict(SMALL, max_len=8))
  variables = text_model.init_variables(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='max_len'):
    model.apply(variables, *text_model.dummy_inputs(1, 9))


def test_bfloat16_compute_keeps_float32_params():
  model = registry.get_model('spikingformer-text-tiny', dtype='bfloat16', **SMALL)
  variables = text_model.init_variables(model, jax.random.PRNGKey(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables['params']))
  out = model.apply(variables, *_inputs(np.random.default_rng(4), [5, 8], 8))
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
