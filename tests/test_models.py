"""The model family: registry, exact parameter counts, spike-drivenness, jit/grad, reference parity."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import shared_path
from jax._src.ad_checkpoint import saved_residuals

from spikingformer_jax import layers, models, registry
from spikingformer_jax.analysis import audit
from spikingformer_jax.porting import torch_mapping
from spikingformer_jax.kernels import build

# The reference models' parameter counts minus their unused LayerNorms (which our blocks do not create).
EXACT_COUNTS = {
    'spikingformer-8-384': 16_816_024,
    'spikingformer-8-512': 29_689_384,
    'spikingformer-8-768': 66_338_632,
    'spikingformer-cifar-4-256': 4_152_106,
    'spikingformer-cifar-2-384': 5_762_746,
    'spikingformer-cifar-4-384': 9_320_122,
    'spikingformer-dvs-2-256': 2_566_666,
}


@pytest.mark.parametrize('name', sorted(EXACT_COUNTS))
def test_parameter_counts_equal_the_reference(name):
  assert registry.param_count(name) == EXACT_COUNTS[name]
  # The baselines have identical counts (SPS+RPE convs == the 5 tokenizer convs), except that the CIFAR
  # Spikformer's q/k/v Linears carry biases (3 * dim per block).
  assert registry.param_count(name.replace('spikingformer', 'spikingformer-cml', 1)) == EXACT_COUNTS[name]
  spec = registry.get_spec(name)
  qkv_biases = 3 * spec.kwargs['embed_dim'] * spec.kwargs['depth'] if '-cifar-' in name else 0
  assert registry.param_count(name.replace('spikingformer', 'spikformer', 1)) == EXACT_COUNTS[name] + qkv_biases


def reference_cifar_spikformer_count(depth, dim, classes, mlp_ratio=4):
  """Parameters of ZK-Zhou/spikformer cifar10/model.py, layer by layer: (with, without) the unused LayerNorms."""
  conv = lambda cin, cout: cin * cout * 9  # 3x3, bias=False
  linear = lambda cin, cout: cin * cout + cout  # nn.Linear with bias
  bn = lambda c: 2 * c  # weight and bias (running stats are buffers)
  widths = [3, dim // 8, dim // 4, dim // 2, dim]
  sps = sum(conv(a, b) + bn(b) for a, b in zip(widths, widths[1:])) + conv(dim, dim) + bn(dim)  # + rpe
  hidden = int(dim * mlp_ratio)
  ssa = 4 * (linear(dim, dim) + bn(dim))  # q, k, v, proj
  mlp = linear(dim, hidden) + bn(hidden) + linear(hidden, dim) + bn(dim)
  norms = 2 * 2 * dim  # norm1, norm2: LayerNorm weight and bias, never used in forward
  with_norms = sps + depth * (ssa + mlp + norms) + linear(dim, classes)
  return with_norms, with_norms - depth * norms


def test_cifar_spikformer_count_equals_the_reference_code():
  with_norms, without_norms = reference_cifar_spikformer_count(4, 384, 10)
  assert round(without_norms / 1e6, 2) == 9.32  # The paper's 9.32M for Spikformer-4-384 on CIFAR-10.
  assert registry.param_count('spikformer-cifar-4-384') == without_norms
  assert registry.param_count('spikformer-cifar-2-384', num_classes=100) == reference_cifar_spikformer_count(2, 384,
                                                                                                          100)[1]


def test_class_count_overrides_match_reference_counts():
  assert registry.param_count('spikingformer-cifar-4-384', num_classes=100) == 9_354_772
  assert registry.param_count('spikingformer-dvs-2-256', num_classes=11) == 2_566_923


@pytest.mark.parametrize('name', registry.names(registry.VISION))
def test_every_registered_model_has_the_right_output_shape(name):
  spec = registry.get_spec(name)
  model = spec.build()
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                       models.abstract_variables(model, (2,) + spec.input_shape),
                       jax.ShapeDtypeStruct((2,) + spec.input_shape, jnp.float32))
  assert out.shape == (2, model.num_classes)


def _small(name, **kw):
  kw = dict(dict(depth=1, embed_dim=32, num_heads=4), **kw)
  return registry.get_model(name, **kw)


def _record_linear_inputs(model, variables, x):
  """(module path, input) of every conv and dense call, captured by Flax method interception."""
  seen = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Conv, nn.Dense)) and context.method_name == '__call__':
      seen.append(('/'.join(context.module.path), np.asarray(args[0])))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):  # Train mode: batch statistics make every layer fire.
    model.apply(variables, x, train=True, mutable=['batch_stats'])
  return seen


def _is_binary(a):
  return bool(np.all((a == 0) | (a == 1)))


@pytest.mark.parametrize('name,expect_spike_driven', [('spikingformer-cifar-4-384', True),
                                                      ('spikingformer-cml-cifar-4-384', True),
                                                      ('spikingformer-8-384', True),
                                                      ('spikformer-cifar-4-384', False)])
def test_block_inputs_are_spikes_only_for_spikingformer(name, expect_spike_driven):
  spec = registry.get_spec(name)
  model = _small(name)
  shape = (2, 64, 64, 3) if spec.input_shape[0] == 224 else (2, 16, 16, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  variables = models.init_variables(model, jax.random.PRNGKey(1), x)
  seen = _record_linear_inputs(model, variables, x)
  non_binary = [p for p, a in seen if not _is_binary(a)]
  block_non_binary = [p for p in non_binary if p.startswith('block_')]
  if expect_spike_driven:
    # Only the stem conv (analog image) and the head (float stream) multiply non-spikes.
    assert non_binary == ['tokenizer/stage0/conv', 'head'], non_binary
  else:
    assert block_non_binary, 'Spikformer blocks should see integer-valued (non-spike) inputs'
    assert any('q_conv' in p for p in block_non_binary) and any('mlp1_conv' in p for p in block_non_binary)


def test_jit_and_grad_run_and_batch_stats_update():
  model = _small('spikingformer-cifar-4-384')
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = models.init_variables(model, jax.random.PRNGKey(1), x)

  @jax.jit
  def loss_and_grad(params, batch_stats):
    def loss(p):
      logits, new_state = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                                      mutable=['batch_stats'])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), new_state
    return jax.value_and_grad(loss, has_aux=True)(params)

  (loss, new_state), grads = loss_and_grad(variables['params'], variables['batch_stats'])
  assert np.isfinite(float(loss))
  grad_norms = jax.tree_util.tree_map(lambda g: float(jnp.abs(g).sum()), grads)
  assert all(np.isfinite(v) for v in jax.tree_util.tree_leaves(grad_norms))
  # Surrogate gradients reach the first conv through every LIF in between.
  assert grad_norms['tokenizer']['stage0']['conv']['kernel'] > 0
  old = variables['batch_stats']['tokenizer']['stage0']['bn']['mean']
  assert not np.allclose(np.asarray(new_state['batch_stats']['tokenizer']['stage0']['bn']['mean']), np.asarray(old))


def test_bfloat16_compute_keeps_float32_params_and_remat_matches():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  m32 = _small('spikingformer-cifar-4-384')
  variables = models.init_variables(m32, jax.random.PRNGKey(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  mbf = _small('spikingformer-cifar-4-384', dtype=jnp.bfloat16)
  assert jax.jit(mbf.apply)(variables, x).dtype == jnp.float32  # Compiles on every backend; float32 logits.
  mre = _small('spikingformer-cifar-4-384', remat=True)
  g = lambda m: jax.jit(jax.grad(lambda p: m.apply({**variables, 'params': p}, x).sum()))(variables['params'])
  for a, b in zip(jax.tree_util.tree_leaves(g(m32)), jax.tree_util.tree_leaves(g(mre))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _loss_grads_stats(model, variables, x):
  def loss(p):
    logits, state = model.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats', 'spikes'])
    return jnp.sum(jnp.sin(logits)), state
  (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return value, grads, state


def test_repeat_over_time_is_a_broadcast_whose_gradient_sums_the_steps_without_a_reduce():
  """Values: x at every step; gradient: the sum over T of the cotangent (NumPy), as adds, not XLA's reduce."""
  x = np.random.RandomState(0).randn(3, 5, 4).astype(np.float32)
  g = np.random.RandomState(1).randn(4, 3, 5, 4).astype(np.float32)
  grad = jax.jit(lambda a, ct: jax.vjp(lambda b: layers.repeat_over_time(b, 4), a)[1](ct)[0])
  y = layers.repeat_over_time(jnp.asarray(x), 4)
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(x, (4, 3, 5, 4)))
  np.testing.assert_allclose(np.asarray(grad(x, g)), g.sum(0), rtol=1e-6, atol=1e-6)
  assert ' reduce(' not in grad.lower(x, g).compile().as_text()


def test_stem_once_equals_the_stem_at_every_step():
  """A static image's stem conv + BatchNorm computed once equals T copies: outputs, statistics, gradients."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 16, 16, 3))
  once = _small('spikingformer-cifar-4-384')
  every = _small('spikingformer-cifar-4-384', stem_once=False)
  variables = models.init_variables(once, jax.random.PRNGKey(1), x)
  value_once, grads_once, state_once = _loss_grads_stats(once, variables, x)
  value_every, grads_every, state_every = _loss_grads_stats(every, variables, x)
  np.testing.assert_allclose(value_once, value_every, rtol=1e-5)
  spikes = lambda s: jax.tree_util.tree_leaves(s['spikes'])
  assert all(np.array_equal(a, b) for a, b in zip(spikes(state_once), spikes(state_every)))
  for a, b in zip(jax.tree_util.tree_leaves(state_once['batch_stats']),
                  jax.tree_util.tree_leaves(state_every['batch_stats'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(grads_once), jax.tree_util.tree_leaves(grads_every)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
  stem = lambda m: [p for p in audit.audit(m, (1, 16, 16, 3)).products if p.location == 'tokenizer/stage0/conv']
  assert stem(once)[0].macs == stem(every)[0].macs  # analysis counts the stem as the reference computes it


def test_remat_saves_only_int8_spikes_and_product_outputs():
  """With remat, the backward pass keeps each product's output and its spike input as int8, nothing else
  of activation size."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  plain = _small('spikingformer-cifar-4-384', dtype=jnp.bfloat16)
  rematted = _small('spikingformer-cifar-4-384', dtype=jnp.bfloat16, remat=True)
  variables = models.init_variables(plain, jax.random.PRNGKey(1), x)

  def residuals(model):
    def loss(p):
      return model.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])[0].sum()
    return [(a, why) for a, why in saved_residuals(loss, variables['params']) if 'from the argument' not in why]

  kept = residuals(rematted)
  activations = [(a, why) for a, why in kept if a.size >= 2 * 16 * 16]  # not per-example vectors
  named = {(str(a.dtype), why.split(' from ')[0]) for a, why in activations if 'named' in why}
  assert named == {('int8', "named 'spike_operand'"), ('bfloat16', "named 'product_out'")}, activations
  # and BatchNorm's per-channel statistics, so recomputing a BatchNorm output is one elementwise pass.
  assert any("named 'batchnorm_statistics'" in why for _, why in kept)
  # Besides them, only the rematerialised units' inputs: the image, and the residual stream into the block.
  boundaries = sorted(a.shape for a, why in activations if 'named' not in why)
  assert boundaries == [(2, 16, 16, 3), (4, 2, 16, 32)], activations
  kept_bytes = sum(a.size * a.dtype.itemsize for a, _ in kept)
  plain_bytes = sum(a.size * a.dtype.itemsize for a, _ in residuals(plain))
  assert kept_bytes < 0.5 * plain_bytes, (kept_bytes, plain_bytes)


def test_pytorch_default_initialisation_bounds():
  model = _small('spikingformer-cifar-4-384')
  v = models.init_variables(model, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  k = np.asarray(v['tokenizer']['stage1']['conv']['kernel'])  # HWIO, fan_in = 3*3*4
  assert np.abs(k).max() <= 1 / np.sqrt(9 * 4) and np.abs(k).max() > 0.8 / np.sqrt(9 * 4)
  head = np.asarray(v['head']['kernel'])
  assert np.abs(head).max() <= 0.04 + 1e-6 and abs(head.std() - 0.0176) < 0.006  # trunc_normal(0.02) at ±2σ
  assert np.all(np.asarray(v['head']['bias']) == 0)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='Unknown model'):
    registry.get_model('spikingformer-9-999')
  with pytest.raises(ValueError, match='Unknown model override'):
    registry.get_model('spikingformer-tiny', depht=2)
  m = registry.get_model('spikingformer-dvs-2-256')
  with pytest.raises(ValueError, match='time steps'):
    jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 128, 128, 2))))


# ---- Parity with the reference PyTorch model --------------------------------------------------------

PARITY = [('ref_cifar_2-128.npz', 'spikingformer-cifar-4-384', dict(depth=2, embed_dim=128, num_heads=8)),
          ('ref_imagenet_1-64.npz', 'spikingformer-8-384', dict(depth=1, embed_dim=64, num_heads=8))]


@pytest.mark.parametrize('spike_kernels', [False, True], ids=['xla', 'spike_kernels'])
@pytest.mark.parametrize('filename,name,overrides', PARITY)
def test_identical_spikes_and_logits_to_the_reference(filename, name, overrides, spike_kernels):
  if spike_kernels:
    if build.compiler() is None:
      pytest.skip('no C++ compiler here: the spike kernels cannot be built')
    build.load()  # With a compiler, a failing build fails the test instead of testing XLA's products.
  ref = np.load(shared_path('reference', 'parity', filename))
  state_dict = {k[2:]: ref[k] for k in ref.files if k.startswith('w/')}
  model = registry.get_model(name, spike_kernels=spike_kernels, **overrides)
  x = jnp.asarray(ref['x'].transpose(0, 2, 3, 1))
  expected = traverse_util.flatten_dict(models.abstract_variables(model, x.shape))
  variables = torch_mapping.torch_to_flax(state_dict, model, {k: v.shape for k, v in expected.items()})
  logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['spikes']))(variables, x)
  np.testing.assert_allclose(np.asarray(logits), ref['logits'], rtol=1e-5, atol=1e-5 * np.abs(ref['logits']).max())
  names = torch_mapping.reference_lif_names(model)
  ours = {names[p[:-1]]: np.asarray(v[0]) for p, v in traverse_util.flatten_dict(state['spikes']).items()}
  ref_names = [k[4:] for k in ref.files if k.startswith('spk/')]
  assert sorted(ours) == sorted(ref_names)
  total = 0
  for name_ in ref_names:
    shape = tuple(ref[f'shape/{name_}'])
    want = np.unpackbits(ref[f'spk/{name_}'])[:np.prod(shape)].reshape(shape)
    got = torch_mapping.spikes_to_reference_layout(ours[name_], shape)
    np.testing.assert_array_equal(got.astype(np.uint8), want, err_msg=name_)
    total += want.size
  assert total > 100_000
