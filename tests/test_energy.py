"""Energy / SOPs / firing rates against closed forms computed here from the layer shapes and sown spikes."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikingformer_jax import models, registry
from spikingformer_jax.analysis import energy, flops

E_MAC, E_AC = 4.6, 0.9


def lively_variables(model, input_shape, gain=8.0, seed=0):
  """Random variables built from the shapes alone (no init compile), BatchNorm scales = gain.

  Kernels are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's default; with the gain every LIF
  fires sometimes, so each rate is a non-trivial number.
  """
  shapes = models.abstract_variables(model, (1,) + tuple(input_shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    if name == 'scale':
      return np.full(leaf.shape, gain, np.float32)
    if name == 'var':
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)  # biases, BatchNorm shifts and means
  return jax.tree_util.tree_map_with_path(fill, shapes)


forward = lambda model: jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['spikes']))


def max_pool_np(s):
  """MaxPool2d(3, stride 2, padding 1) over H, W of [T, B, H, W, C]."""
  t, b, h, w, c = s.shape
  padded = np.pad(s, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  windows = [padded[:, :, i:i + 2 * ho:2, j:j + 2 * wo:2] for i in range(3) for j in range(3)]
  return np.max(windows, axis=0)


def hand_energy(model, spikes, image_shape):
  """(SOPs, MACs, mJ) per example of a Spikingformer from its sown spikes, by the paper's formulas."""
  T, D, heads, K = model.T, model.embed_dim, model.num_heads, model.num_classes
  widths = (D // 8, D // 4, D // 2, D, D)
  H, W, C = image_shape
  rate = lambda a: float(np.mean(a))
  tok = spikes['tokenizer']
  macs = T * H * W * 9 * C * widths[0] + D * K  # stem conv on the analog image, and the head
  sops = 0.0
  for k in range(1, 5):
    s = np.asarray(tok[f'lif{k}']['out'][0])
    if model.pool[k - 1]:
      s = max_pool_np(s)
    h, w = s.shape[2:4]
    sops += rate(s) * T * h * w * 9 * widths[k - 1] * widths[k]
  n, d = h * w, D // heads
  for i in range(model.depth):
    attn, mlp = spikes[f'block_{i}']['attn'], spikes[f'block_{i}']['mlp']
    r = {name: rate(attn[f'{name}_lif']['out'][0]) for name in ('proj', 'q', 'k', 'v', 'attn')}
    sops += 3 * r['proj'] * T * n * D * D  # q, k, v convs read the pre-activation spikes
    if n > d:  # (K^T V) first, then Q (K^T V)
      sops += (min(r['k'], r['v']) + r['q']) * T * heads * n * d * d
    else:  # (Q K^T) first, then (Q K^T) V
      sops += (min(r['q'], r['k']) + r['v']) * T * heads * n * n * d
    sops += r['attn'] * T * n * D * D
    sops += rate(mlp['mlp1_lif']['out'][0]) * T * n * D * 4 * D
    sops += rate(mlp['mlp2_lif']['out'][0]) * T * n * 4 * D * D
  return sops, macs, (E_MAC * macs + E_AC * sops) * 1e-9


CASES = {
    # K^T V first: N = 64 tokens > d = 8.
    'kv_first': ('spikingformer-cifar-4-384', dict(depth=1, embed_dim=32, num_heads=4), (32, 32, 3)),
    # Q K^T first: N = 16 tokens <= d = 16.
    'qk_first': ('spikingformer-tiny', {}, (8, 8, 1)),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def measured(request):
  name, overrides, shape = CASES[request.param]
  model = registry.get_model(name, **overrides)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6,) + shape))
  variables = lively_variables(model, shape)
  garbage = 50.0 * np.ones((2,) + shape, np.float32)  # padded examples that would change every rate
  batches = [dict(image=x[:3]),
             dict(image=np.concatenate([garbage[:1], x[3:], garbage[1:]]), mask=np.array([0, 1, 1, 1, 0]))]
  measurement = energy.measure(model, variables, batches)
  _, state = forward(model)(variables, jnp.asarray(x))
  return model, shape, measurement, jax.device_get(state['spikes'])


def test_energy_equals_hand_computation(measured):
  model, shape, m, spikes = measured
  lif_rates = [float(np.mean(a)) for a in jax.tree_util.tree_leaves(spikes)]
  assert all(0.0 < r < 1.0 for r in lif_rates), 'every LIF must fire sometimes for this test to bite'
  report = energy.report_from_measurement(m)
  sops, macs, mj = hand_energy(model, spikes, shape)
  assert m.num_examples == 6
  assert report.sops == pytest.approx(sops, rel=1e-5)
  assert report.macs == pytest.approx(macs, rel=1e-9)
  assert report.energy_mj == pytest.approx(mj, rel=1e-5)
  assert [l.location for l in report.layers if l.spike_rate is None] == ['tokenizer/stage0/conv', 'head']
  assert sum(b['energy_mj'] for b in report.per_block().values()) == pytest.approx(report.energy_mj)


def test_firing_rates_are_the_sown_spike_means(measured):
  model, _, m, spikes = measured
  rates = energy.rates_from_measurement(m)
  attn = spikes['block_0']['attn']
  assert rates['tokenizer/lif1'] == pytest.approx(np.mean(spikes['tokenizer']['lif1']['out'][0]), rel=1e-5)
  assert rates['block_0/attn/q_lif'] == pytest.approx(np.mean(attn['q_lif']['out'][0]), rel=1e-5)
  # A conv input is the LIF output it reads (max-pooled where the stage pools).
  pooled = max_pool_np(np.asarray(spikes['tokenizer']['lif4']['out'][0]))
  assert rates['tokenizer/stage4/conv:input'] == pytest.approx(np.mean(pooled), rel=1e-5)
  assert rates['block_0/attn/proj_conv/dense:input'] == pytest.approx(np.mean(attn['attn_lif']['out'][0]), rel=1e-5)
  assert 'tokenizer/stage0/conv:input' not in rates and not any(k.startswith('head') for k in rates)
  assert all(0.0 <= r <= 1.0 for r in rates.values())
  # LIFs are listed in program order.
  lifs = [k for k in rates if ':' not in k]
  assert lifs[:5] == ['tokenizer/lif1', 'tokenizer/lif2', 'tokenizer/lif3', 'tokenizer/lif4', 'block_0/attn/proj_lif']


def test_training_mode_rates_use_each_batch_statistics():
  """train=True: every batch is normalised with its own real examples' BatchNorm statistics (masked ones
  excluded), so the SOPs are the example-weighted mean of per-batch hand computations in training mode."""
  name, overrides, shape = CASES['kv_first']
  model = registry.get_model(name, **overrides)
  variables = lively_variables(model, shape, gain=1.0)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (6,) + shape))
  garbage = 50.0 * np.ones((1,) + shape, np.float32)
  batches = [dict(image=x[:2]), dict(image=np.concatenate([x[2:], garbage]), mask=np.array([1, 1, 1, 1, 0]))]
  report = energy.report_from_measurement(energy.measure(model, variables, batches, train=True))
  train_forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['spikes', 'batch_stats']))
  spikes = [jax.device_get(train_forward(variables, jnp.asarray(part))[1]['spikes']) for part in (x[:2], x[2:])]
  expected_sops = (2 * hand_energy(model, spikes[0], shape)[0] + 4 * hand_energy(model, spikes[1], shape)[0]) / 6
  assert report.sops == pytest.approx(expected_sops, rel=1e-5)
  inference = energy.report_from_measurement(energy.measure(model, variables, batches))
  assert abs(inference.sops - report.sops) > 0.05 * report.sops  # the running statistics give other rates
  q_rates = [np.mean(s['block_0']['attn']['q_lif']['out'][0]) for s in spikes]
  q_rate = (2 * q_rates[0] + 4 * q_rates[1]) / 6
  assert report.lif_rates['block_0/attn/q_lif'] == pytest.approx(q_rate, rel=1e-5)


def test_report_json_and_plot(measured, tmp_path):
  _, _, m, _ = measured
  report = energy.report_from_measurement(m)
  json_path, png_path = energy.write(report, tmp_path / 'out')
  saved = json.loads(json_path.read_text())
  assert saved['totals']['energy_mj'] == pytest.approx(report.energy_mj)
  assert saved['totals']['sops'] == pytest.approx(report.sops)
  assert [l['location'] for l in saved['layers']] == [l.location for l in report.layers]
  assert set(saved['per_block']) == {'tokenizer', 'block_0', 'head'}
  assert png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'head' in report.table() and 'MAC' in report.table()


@pytest.mark.parametrize('mj, text', [(13.659, '13.66 mJ'), (2.0725e-3, '2.073 µJ'), (4.6e-5, '46 nJ'),
                                      (3.105e-7, '310.5 pJ'), (9e-10, '0.9 pJ'), (4.6e-9, '4.6 pJ'),
                                      (1234.5, '1234 mJ'), (0.0, '0 pJ')])
def test_energy_is_printed_in_the_unit_it_fills(mj, text):
  assert energy.format_energy(mj) == text


def test_table_of_a_small_model_uses_small_units(measured):
  _, _, m, _ = measured
  report = energy.report_from_measurement(m)
  assert report.energy_mj < 1.0, 'the tiny model must spend under a mJ for this test to bite'
  total = report.table().splitlines()[-len(report.lif_rates) - 2]
  unit, size = energy.energy_unit(report.energy_mj)
  assert unit in ('nJ', 'pJ', 'µJ') and total.endswith(f'{report.energy_mj / size:.4g} {unit}')
  assert 'mJ' not in report.table()


def test_spikformer_integer_residual_is_counted_as_mac():
  model = registry.get_model('spikformer-cifar-4-384', depth=1, embed_dim=32, num_heads=4)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3)))
  variables = lively_variables(model, (32, 32, 3))
  _, state = forward(model)(variables, jnp.asarray(x))
  tok = state['spikes']['tokenizer']
  residual = np.asarray(tok['lif4']['out'][0]) + max_pool_np(np.asarray(tok['lif3']['out'][0]))
  assert residual.max() == 2.0, 'the SEW residual must hold a 2 for this test to bite'
  report = energy.energy_report(model, variables, [dict(image=x)])
  by_location = {l.location: l for l in report.layers}
  for name in ('attn/q_conv/dense', 'attn/k_conv/dense', 'attn/v_conv/dense', 'mlp/mlp1_conv/dense'):
    layer = by_location[f'block_0/{name}']
    assert layer.spike_rate is None and layer.macs == layer.flops
  assert by_location['block_0/mlp/mlp2_conv/dense'].spike_rate == pytest.approx(
      np.mean(state['spikes']['block_0']['mlp']['mlp1_lif']['out'][0]), rel=1e-5)
  assert by_location['block_0/attn/q_conv/dense'].operand_means[0] == pytest.approx(residual.mean(), rel=1e-5)


def test_reference_8_768_energy_from_logged_rates():
  """The 8-768 FLOP table (traced, nothing run) with the firing rates the reference logs for it."""
  model = models.per_step_stem(registry.get_model('spikingformer-8-768'))  # the stem conv at each of T steps
  variables = models.abstract_variables(model, (1, 224, 224, 3))
  products = flops.model_trace(model, variables, (1, 224, 224, 3)).products
  depth = 8
  stem = {'stage1': 0.198, 'stage2': 0.132, 'stage3': 0.121, 'stage4': 0.130}

  def logged_rate(location):
    parts = location.split('/')
    if location in ('tokenizer/stage0/conv', 'head'):
      return None
    if parts[0] == 'tokenizer':
      return stem[parts[1]]
    i = int(parts[0].split('_')[1])
    f = i / (depth - 1)
    rates = {'q_conv': 0.148 if i == 0 else 0.29,  # the log: 14.8% in block 0, 27-31% after
             'k_conv': 0.148 if i == 0 else 0.29, 'v_conv': 0.148 if i == 0 else 0.29,
             'kv': min(0.03, 0.055),  # min(fr_k, fr_v): k 0.022-0.038, v 0.04-0.07
             'q_kv': 0.09,  # fr_q: 0.05-0.135
             'proj_conv': 0.265 + (0.072 - 0.265) * f,  # 26.5% -> 7.2%
             'mlp1_conv': 0.27,  # 23-31%
             'mlp2_conv': 0.023 * (0.003 / 0.023) ** f}  # 2.3% -> 0.3%
    return rates[parts[2]]

  layers = tuple(energy.layer_energy(p, logged_rate(p.location)) for p in products)
  report = energy.Report(layers, {}, 1)
  # Closed forms of the two MACs: stem conv 3->96 at 224x224 over T=4, head 768x1000.
  assert report.macs == 4 * 224 * 224 * 9 * 3 * 96 + 768 * 1000
  # The reference log: 12.514 G SOPs, 13.659 mJ. The logged rates are ranges, so allow 10%.
  assert report.sops / 1e9 == pytest.approx(12.514, rel=0.10)
  assert report.energy_mj == pytest.approx(13.659, rel=0.10)


def test_bad_inputs_are_rejected():
  product = flops.Product(0, 'x', 'dot_general', 10, (flops.Operand((1,), True, True),) * 2, False)
  with pytest.raises(ValueError, match='not in \\[0, 1\\]'):
    energy.layer_energy(product, 1.5)
  model = registry.get_model('spikingformer-tiny')
  with pytest.raises(ValueError, match='"image"'):
    energy.measure(model, {}, [dict(pixels=np.zeros((1, 8, 8, 1)))])
  with pytest.raises(ValueError, match='mask shape'):
    energy.measure(model, {}, [dict(image=np.zeros((2, 8, 8, 1)), mask=np.ones(3))])
  with pytest.raises(ValueError, match='No examples'):
    energy.measure(model, {}, [dict(image=np.zeros((2, 8, 8, 1)), mask=np.zeros(2))])


def test_cli_on_digits(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[1]
  out = tmp_path / 'energy'
  result = subprocess.run(
      [sys.executable, '-m', 'spikingformer_jax.analysis.energy', f'--config={repo / "experiments" / "digits.py"}',
       '--batches=2', '--batch_size=16', f'--out={out}'],
      capture_output=True, text=True, timeout=300, cwd=repo,
      env=dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tokenizer/stage0/conv' in result.stdout
  saved = json.loads((out / 'energy.json').read_text())
  assert saved['num_examples'] == 32
  assert [l['location'] for l in saved['layers'] if not l['spike_driven']] == ['tokenizer/stage0/conv', 'head']
  assert all(0.0 <= r <= 1.0 for r in saved['lif_firing_rates'].values())
  assert len(saved['lif_firing_rates']) == 11  # 4 tokenizer LIFs + 7 in the one block
  assert (out / 'energy.png').stat().st_size > 1000


def test_run_measures_a_config_that_trains_with_the_spike_kernels():
  """The `cpu` configs train with the kernels, whose foreign calls the trace cannot read: `run` measures the
  same parameters through XLA's products instead, and reports what the config without the kernels reports."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'experiments'))
  import digits  # noqa: PLC0415
  config = digits.get_config('runlocal')
  config.model.spike_kernels = True
  with_kernels = energy.run(config, num_batches=1, batch_size=8)
  assert config.model.spike_kernels  # the caller's config is left as it was
  config.model.spike_kernels = False
  without = energy.run(config, num_batches=1, batch_size=8)
  assert with_kernels.table() == without.table()


# ---- text models ----------------------------------------------------------------------------------

from spikingformer_jax.text import model as text_model  # noqa: E402

TEXT = dict(depth=1, embed_dim=32, num_heads=4, vocab_size=40, max_len=16, T=2, num_labels=3)


def lively_text_variables(model, gain=8.0, seed=0):
  """As lively_variables, with random embeddings (BatchNorm and LayerNorm scales = gain)."""
  shapes = jax.eval_shape(lambda: text_model.init_variables(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('embedding', 'pos_embed'):
      return rng.normal(size=leaf.shape).astype(np.float32)
    if name == 'kernel':
      return rng.uniform(-1, 1, leaf.shape).astype(np.float32) / np.sqrt(leaf.shape[0])
    return np.full(leaf.shape, {'scale': gain, 'var': 1.0}.get(name, 0.0), np.float32)  # biases, shifts: 0
  return jax.tree_util.tree_map_with_path(fill, shapes)


def text_batch(ids, lengths, length, pad_rng):
  """Right-padded batch of `length` tokens; padded positions hold random ids (they must not matter)."""
  b = len(lengths)
  input_ids = pad_rng.integers(1, TEXT['vocab_size'], (b, length)).astype(np.int32)
  mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  for i, n in enumerate(lengths):
    input_ids[i, :n] = ids[i, :n]
  return dict(input_ids=input_ids, segment_ids=np.zeros_like(input_ids), attention_mask=mask)


def real_token_rate(spikes, mask):
  """Mean of [T, B, N, D] spikes over the positions where mask [B, N] is 1."""
  s = np.asarray(spikes, np.float64)
  return float((s * mask[None, :, :, None]).sum() / (mask.sum() * s.shape[0] * s.shape[-1]))


@pytest.fixture(scope='module')
def text_measured():
  model = registry.get_model('spikingformer-text-tiny', **TEXT)
  variables = lively_text_variables(model)
  rng = np.random.default_rng(3)
  ids = rng.integers(1, TEXT['vocab_size'], (5, 12)).astype(np.int32)
  lengths = [12, 7, 3, 9, 5]
  full = text_batch(ids, lengths, 12, np.random.default_rng(4))
  # Two batches; the second also holds a padded example (mask 0) of garbage ids.
  second = {k: np.concatenate([v[2:], v[:1]]) for k, v in full.items()}
  second['mask'] = np.array([1, 1, 1, 0])
  m = energy.measure(model, variables, [{k: v[:2] for k, v in full.items()}, second])
  _, state = jax.jit(lambda v, *x: model.apply(v, *x, train=False, mutable=['spikes']))(
      variables, full['input_ids'], full['segment_ids'], full['attention_mask'])
  return model, variables, ids, lengths, m, jax.device_get(state['spikes']), full['attention_mask']


def test_text_energy_equals_hand_computation(text_measured):
  model, _, _, _, m, spikes, mask = text_measured
  T, N, D, H, K = model.T, mask.shape[1], model.embed_dim, model.num_heads, model.num_labels
  d = D // H
  attn, mlp = spikes['block_0']['attn'], spikes['block_0']['mlp']
  r = {name: real_token_rate(attn[f'{name}_lif']['out'][0], mask) for name in ('proj', 'q', 'k', 'v', 'attn')}
  r1, r2 = (real_token_rate(mlp[f'mlp{i}_lif']['out'][0], mask) for i in (1, 2))
  assert all(0.0 < x < 1.0 for x in (*r.values(), r1, r2)), 'every LIF must fire sometimes for this test to bite'
  assert N > d  # K^T V first
  sops = (3 * r['proj'] * T * N * D * D + (min(r['k'], r['v']) + r['q']) * T * H * N * d * d
          + r['attn'] * T * N * D * D + r1 * T * N * D * 4 * D + r2 * T * N * 4 * D * D)
  report = energy.report_from_measurement(m)
  assert m.num_examples == 5
  assert report.sops == pytest.approx(sops, rel=1e-5)
  # No MAC for the embedding lookup or LayerNorm: the head is the only one.
  assert [l.location for l in report.layers if l.spike_rate is None] == ['head']
  assert report.macs == D * K
  assert report.energy_mj == pytest.approx((E_MAC * D * K + E_AC * sops) * 1e-9, rel=1e-5)
  assert report.lif_rates['block_0/attn/q_lif'] == pytest.approx(r['q'], rel=1e-5)
  assert report.lif_rates['block_0/mlp/mlp2_lif'] == pytest.approx(r2, rel=1e-5)


def test_text_padding_does_not_change_rates(text_measured):
  model, variables, ids, lengths, m, spikes, mask = text_measured
  # Padded positions fire at another rate than real ones, so counting them would change the rates.
  lifs = jax.tree_util.tree_leaves(spikes)
  assert max(abs(np.mean(s) - real_token_rate(s, mask)) for s in lifs) > 1e-3
  # The same examples padded to 16 tokens with other ids, in one batch: the same rates.
  longer = energy.measure(model, variables, [text_batch(ids, lengths, 16, np.random.default_rng(9))])
  rates, longer_rates = energy.rates_from_measurement(m), energy.rates_from_measurement(longer)
  assert set(rates) == set(longer_rates) and len(rates) > 7
  for name, rate in rates.items():
    assert longer_rates[name] == pytest.approx(rate, rel=1e-5, abs=1e-7), name


def test_text_bad_inputs_are_rejected(text_measured):
  model, variables, ids, lengths, _, _, _ = text_measured
  batch = text_batch(ids, lengths, 12, np.random.default_rng(0))
  with pytest.raises(ValueError, match='attention_mask must hold only 0'):
    energy.measure(model, variables, [dict(batch, attention_mask=2 * batch['attention_mask'])])
  with pytest.raises(ValueError, match='dynamic_padding'):
    energy.measure(model, variables, [batch, text_batch(ids, lengths, 16, np.random.default_rng(0))])


def test_text_config_energy_run(tmp_path):
  from conftest import shared_path
  shared_path('data', 'glue', 'SST-2')
  import importlib.util
  repo = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location('glue_config', repo / 'experiments' / 'glue.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('task=sst2,runlocal')
  report = energy.run(config, num_batches=1, batch_size=8, out_dir=str(tmp_path))
  saved = json.loads((tmp_path / 'energy.json').read_text())
  assert saved['num_examples'] == 8 == report.num_examples
  assert [l['location'] for l in saved['layers'] if not l['spike_driven']] == ['head']
  assert len(saved['lif_firing_rates']) == 7 * 2  # 7 LIFs in each of the 2 blocks
  assert all(0.0 <= r <= 1.0 for r in saved['lif_firing_rates'].values())
