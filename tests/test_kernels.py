"""The CPU kernels (spikingformer_jax.kernels): products, their gradients and the LIF BPTT against NumPy float64,
the flax adapters' fall-backs, a model and its training step with and without them, the build's errors."""
import collections
import functools
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from spikingformer_jax import configs, kernels, models, neurons, registry, train
from spikingformer_jax.analysis import flops
from spikingformer_jax.kernels import build

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'experiments'))
import digits  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _kernels_built():
  if build.compiler() is None:
    pytest.skip('no C++ compiler here ($CXX, c++, g++, clang++): the spike kernels cannot be built')
  build.load()  # With a compiler, a failing build is a test failure, not a skip.


def _sparse(rng, shape, density, binary=True):
  values = np.ones(shape) if binary else rng.normal(size=shape)
  return np.where(rng.uniform(size=shape) < density, values, 0.0).astype(np.float32)


def _conv3x3_numpy(a, w):
  """SAME 3x3 stride-1 convolution in float64 loops over taps (NHWC, HWIO)."""
  b, h, wd, _ = a.shape
  padded = np.pad(a.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, wd, w.shape[3]))
  for dy in range(3):
    for dx in range(3):
      out += padded[:, dy:dy + h, dx:dx + wd, :] @ w[dy, dx].astype(np.float64)
  return out


# Shapes cover output widths below, at and above the tiles (128 floats; 256 with AVX-512), widths that are not a
# multiple of 16, an all-zero operand, a dense one, non-binary (real-valued) sparse values, and no rows at all.
MATMUL_CASES = [(64, 37, 77, 0.2, True), (300, 130, 260, 0.1, True), (5, 16, 128, 0.5, False),
                (33, 48, 7, 0.0, True), (20, 19, 145, 1.0, False), (0, 16, 20, 0.5, True),
                (40, 24, 256, 0.3, True), (17, 40, 519, 0.2, False)]


@pytest.mark.parametrize('m,k,n,density,binary', MATMUL_CASES)
def test_spike_matmul_and_its_gradients_equal_numpy(m, k, n, density, binary):
  rng = np.random.default_rng(m + k + n)
  a, w, g = _sparse(rng, (m, k), density, binary), rng.normal(size=(k, n)).astype(np.float32), \
      rng.normal(size=(m, n)).astype(np.float32)
  y, pullback = jax.vjp(kernels.spike_matmul, jnp.asarray(a), jnp.asarray(w))
  grad_a, grad_w = pullback(jnp.asarray(g))
  a64, w64, g64 = (x.astype(np.float64) for x in (a, w, g))
  np.testing.assert_allclose(np.asarray(y), a64 @ w64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_w), a64.T @ g64, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(grad_a), g64 @ w64.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('b,h,w_,c,o,density', [(2, 5, 7, 3, 20, 0.4), (1, 8, 8, 33, 150, 0.1),
                                                 (3, 4, 4, 16, 16, 0.0), (1, 6, 5, 8, 300, 0.2)])
def test_spike_conv3x3_and_its_gradients_equal_numpy(b, h, w_, c, o, density):
  rng = np.random.default_rng(b * h + c)
  a, w = _sparse(rng, (b, h, w_, c), density), rng.normal(size=(3, 3, c, o)).astype(np.float32)
  y = kernels.spike_conv3x3(jnp.asarray(a), jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(y), _conv3x3_numpy(a, w), rtol=1e-5, atol=1e-5)
  # Gradients of sum(y * r) for a fixed r: by linearity, the gradient in w is the numpy conv's gradient,
  # which is the sum over taps of shifted input patches times r.
  r = rng.normal(size=y.shape).astype(np.float32)
  grad_a, grad_w = jax.grad(lambda a_, w__: (kernels.spike_conv3x3(a_, w__) * r).sum(), (0, 1))(
      jnp.asarray(a), jnp.asarray(w))
  padded = np.pad(a.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want_w = np.stack([np.stack([np.einsum('bhwc,bhwo->co', padded[:, dy:dy + h, dx:dx + w_], r)
                               for dx in range(3)]) for dy in range(3)])
  np.testing.assert_allclose(np.asarray(grad_w), want_w, rtol=1e-5, atol=1e-4)
  eps = 1.0  # f is linear in a, so a unit central difference is exact up to rounding.
  flat = np.flatnonzero(rng.uniform(size=a.size) < 0.05)[:5]
  for i in flat:
    e = np.zeros(a.size, np.float64)
    e[i] = eps
    e = e.reshape(a.shape)
    diff = ((_conv3x3_numpy(a + e, w) - _conv3x3_numpy(a - e, w)) * r).sum() / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad_a).ravel()[i], diff, rtol=1e-4, atol=1e-4)


def _integers(rng, shape, density):
  """Sparse integer counts in [-128, 127], the ends included."""
  values = rng.choice([-128, -3, -1, 1, 2, 3, 127], size=shape)
  return np.where(rng.uniform(size=shape) < density, values, 0).astype(np.float32)


def _custom_call_operands(fn, *args) -> list[str]:
  return [line for line in jax.jit(fn).lower(*args).as_text().splitlines() if 'custom_call @' in line]


@pytest.mark.parametrize('m,k,n,density', [(64, 37, 77, 0.2), (300, 130, 260, 0.1), (20, 19, 145, 1.0),
                                           (0, 16, 20, 0.5)])
def test_integer_operands_go_to_the_kernels_as_int8_with_the_same_products_and_gradients(m, k, n, density):
  """integer_a: a matmul of counts in [-128, 127] and its gradients equal NumPy's; the kernels read int8."""
  rng = np.random.default_rng(m + k + n)
  a, w, g = _integers(rng, (m, k), density), rng.normal(size=(k, n)).astype(np.float32), \
      rng.normal(size=(m, n)).astype(np.float32)
  matmul = lambda a_, w_: kernels.spike_matmul(a_, w_, True)
  y, pullback = jax.vjp(matmul, jnp.asarray(a), jnp.asarray(w))
  grad_a, grad_w = pullback(jnp.asarray(g))
  a64, w64, g64 = (x.astype(np.float64) for x in (a, w, g))
  np.testing.assert_allclose(np.asarray(y), a64 @ w64, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(grad_w), a64.T @ g64, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(np.asarray(grad_a), g64 @ w64.T, rtol=1e-5, atol=1e-4)
  forward_and_back = lambda a_, w_: (lambda y_, pull: (y_, pull(jnp.asarray(g))))(*jax.vjp(matmul, a_, w_))
  calls = _custom_call_operands(forward_and_back, a, w)
  assert len(calls) == 2 and all(f'tensor<{m}x{k}xi8>' in line for line in calls), calls


def test_integer_conv_operand_goes_to_the_kernels_as_int8_with_the_same_products_and_gradients():
  rng = np.random.default_rng(7)
  a, w = _integers(rng, (2, 6, 5, 9), 0.3), rng.normal(size=(3, 3, 9, 20)).astype(np.float32)
  r = rng.normal(size=(2, 6, 5, 20)).astype(np.float32)
  loss = lambda integer: (lambda a_, w_: (kernels.spike_conv3x3(a_, w_, integer) * r).sum())
  np.testing.assert_allclose(np.asarray(kernels.spike_conv3x3(jnp.asarray(a), jnp.asarray(w), True)),
                             _conv3x3_numpy(a, w), rtol=1e-5, atol=1e-3)
  for got, want in zip(jax.grad(loss(True), (0, 1))(jnp.asarray(a), jnp.asarray(w)),
                       jax.grad(loss(False), (0, 1))(jnp.asarray(a), jnp.asarray(w))):  # float path: tested above
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-3)
  calls = _custom_call_operands(jax.value_and_grad(loss(True), (0, 1)), a, w)
  assert len(calls) == 2 and all('tensor<2x8x7x9xi8>' in line for line in calls), calls


@pytest.mark.parametrize('cflags', ['-mno-avx512f', '-mno-avx512f -mno-avx2 -mno-fma'])
def test_the_avx2_and_portable_builds_pass_the_product_tests(cflags):
  """The kernels built without AVX-512 (the AVX2 + FMA paths) and without either (the portable loops), as on CPUs
  that lack them: the product tests above, float32 and int8 operands, in a process of their own."""
  if build.load().SpikeKernelsVectorized() < 2:
    pytest.skip('this CPU has no AVX-512: the default build already tests the narrower paths')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(pathlib.Path(__file__)),
       '-k', 'equal_numpy or integer'], capture_output=True, text=True, cwd=REPO, timeout=900,
      env=dict(os.environ, SPIKINGFORMER_KERNEL_CFLAGS=cflags, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


LIF_CASES = [(tau, v_th, v_reset, decay_input, shape) for (tau, v_th), v_reset, decay_input, shape in zip(
    [(2.0, 1.0), (1.5, 0.5), (2.0, 0.5), (3.0, 1.0)], [0.0, None, -0.2, 0.0], [True, True, False, False],
    [(4, 3, 17), (6, 1300), (1, 5), (16, 2, 2, 300)])]


@pytest.mark.parametrize('tau,v_th,v_reset,decay_input,shape', LIF_CASES)
def test_lif_backward_kernel_equals_numpy(tau, v_th, v_reset, decay_input, shape):
  """The kernel's BPTT against test_neurons' NumPy LIF (float64), across reset modes, T and block remainders."""
  from test_neurons import np_lif  # noqa: PLC0415
  rng = np.random.default_rng(len(shape) + shape[-1])
  x = rng.normal(0.6, 1.0, size=shape).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  cfg = neurons.LIFConfig(tau=tau, v_threshold=v_th, v_reset=v_reset, decay_input=decay_input, cpu_kernel=True)
  spikes, vjp = jax.vjp(lambda v: neurons.lif(v, cfg), jnp.asarray(x))
  want_spikes, want_grad = np_lif(x, tau, v_th, v_reset, decay_input, True, g)
  np.testing.assert_array_equal(np.asarray(spikes), want_spikes)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want_grad, atol=1e-6, rtol=1e-5)
  assert _has_custom_call(jax.grad(lambda v: (neurons.lif(v, cfg) * g).sum()), jnp.asarray(x))


def test_lif_backward_kernel_only_where_it_applies():
  x = jnp.ones((4, 8))
  grad = lambda cfg: jax.grad(lambda v: neurons.lif(v, cfg).sum())
  assert not _has_custom_call(grad(neurons.LIFConfig()), x)  # not asked for
  assert not _has_custom_call(grad(neurons.LIFConfig(surrogate='atan', cpu_kernel=True)), x)  # no kernel for atan
  assert not _has_custom_call(grad(neurons.LIFConfig(cpu_kernel=True)), x.astype(jnp.bfloat16))


def _has_custom_call(fn, *args) -> bool:
  return 'custom_call' in jax.jit(fn).lower(*args).as_text()


def test_adapters_use_the_kernels_only_where_they_apply():
  x = jnp.asarray(_sparse(np.random.default_rng(0), (2, 3, 10), 0.3))
  w = jnp.ones((10, 4))
  dense = (((2,), (0,)), ((), ()))
  assert _has_custom_call(lambda x, w: kernels.dot_general(x, w, dense), x, w)
  batched = (((2,), (1,)), ((0,), (0,)))  # a batch dimension: not Dense's contraction
  wb = jnp.ones((2, 10, 4))
  assert not _has_custom_call(lambda x, w: kernels.dot_general(x, w, batched), x, wb)
  np.testing.assert_allclose(kernels.dot_general(x, wb, batched), jax.lax.dot_general(x, wb, batched))
  assert not _has_custom_call(lambda x, w: kernels.dot_general(x, w, dense), x.astype(jnp.bfloat16),
                              w.astype(jnp.bfloat16))

  img = jnp.asarray(_sparse(np.random.default_rng(1), (1, 6, 6, 4), 0.3))
  k3 = jnp.ones((3, 3, 4, 5))
  nhwc = jax.lax.conv_dimension_numbers(img.shape, k3.shape, ('NHWC', 'HWIO', 'NHWC'))
  conv = lambda stride, pad: (lambda x, k: kernels.conv_general_dilated(x, k, stride, pad, dimension_numbers=nhwc))
  assert _has_custom_call(conv((1, 1), ((1, 1), (1, 1))), img, k3)
  assert _has_custom_call(conv((1, 1), 'SAME'), img, k3)
  for stride, pad in (((2, 2), ((1, 1), (1, 1))), ((1, 1), 'VALID')):
    assert not _has_custom_call(conv(stride, pad), img, k3)
    np.testing.assert_allclose(conv(stride, pad)(img, k3), jax.lax.conv_general_dilated(
        img, k3, stride, pad, dimension_numbers=nhwc), rtol=1e-6)
  k2 = jnp.ones((2, 2, 4, 5))
  nhwc2 = jax.lax.conv_dimension_numbers(img.shape, k2.shape, ('NHWC', 'HWIO', 'NHWC'))
  assert not _has_custom_call(lambda x, k: kernels.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=nhwc2), img, k2)


def test_model_with_spike_kernels_trains_like_the_xla_model():
  """Same parameters and forward spikes; gradients, and three SGD steps' losses and parameters, agree."""
  overrides = dict(depth=1, embed_dim=64, num_heads=4, T=2)
  plain = registry.get_model('spikingformer-cifar-4-384', **overrides)
  sparse = registry.get_model('spikingformer-cifar-4-384', spike_kernels=True, **overrides)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  labels = jnp.arange(4) % 10
  variables = models.init_variables(plain, jax.random.PRNGKey(1), images[:1])
  jax.tree.map(np.testing.assert_array_equal, variables, models.init_variables(sparse, jax.random.PRNGKey(1), images[:1]))

  def spikes(model):
    _, state = model.apply(variables, images, train=False, mutable=['spikes'])
    return traverse_util.flatten_dict(state['spikes'])

  spikes_plain, spikes_sparse = spikes(plain), spikes(sparse)
  for key, value in spikes_plain.items():
    np.testing.assert_array_equal(np.asarray(spikes_sparse[key][0]), np.asarray(value[0]), err_msg=str(key))
  lowered = jax.jit(lambda v, x: sparse.apply(v, x, train=True, mutable=['batch_stats'])).lower(variables, images)
  calls = collections.Counter(re.findall(r'custom_call @\w+?_(Spike\w+)\(', lowered.as_text()))
  # Every product of a spike operand: the stem's stages 1-4; the block's q, k, v, proj, mlp1 and mlp2.
  assert calls == {'SpikeConv3x3': 4, 'SpikeMatmul': 6}, calls

  def loss_and_grads(model, params, batch_stats):
    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, images, train=True,
                                    mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates['batch_stats']
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  # Plain SGD, whose update is linear in the gradient (Adam would magnify rounding in near-zero gradients).
  def run(model, steps=3, lr=0.1):
    params, batch_stats = variables['params'], variables['batch_stats']
    losses, first_grads = [], None
    step = jax.jit(functools.partial(loss_and_grads, model))
    for _ in range(steps):
      (loss, batch_stats), grads = step(params, batch_stats)
      first_grads = grads if first_grads is None else first_grads
      params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
      losses.append(float(loss))
    return params, losses, first_grads

  params_plain, losses_plain, grads_plain = run(plain)
  params_sparse, losses_sparse, grads_sparse = run(sparse)
  flat_plain, flat_sparse = traverse_util.flatten_dict(grads_plain), traverse_util.flatten_dict(grads_sparse)
  for path, g in flat_plain.items():  # The floor covers biases before a BatchNorm, whose gradient is 0 + rounding.
    atol = max(1e-4 * float(np.abs(g).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(flat_sparse[path]), np.asarray(g), atol=atol, err_msg=str(path))
  np.testing.assert_allclose(losses_sparse, losses_plain, rtol=1e-4)
  for (path, a), b in zip(traverse_util.flatten_dict(params_plain).items(),
                          traverse_util.flatten_dict(params_sparse).values()):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_trainer_refuses_spike_kernels_on_a_multi_device_cpu_mesh(tmp_path):
  config = digits.get_config('runlocal')
  config.model.overrides = {'embed_dim': 32, 'num_heads': 2}
  config.model.spike_kernels = True
  config.batch_size = 16
  with pytest.raises(configs.ConfigError, match='config.model.spike_kernels is for training on one CPU device, but the '
                                                'mesh has 8'):
    train.train_and_evaluate(config, tmp_path)
  assert not any(tmp_path.iterdir())  # refused before anything was written


def test_build_reports_a_missing_or_failing_compiler_and_leaves_no_library(tmp_path, monkeypatch):
  monkeypatch.setenv('SPIKINGFORMER_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  with pytest.raises(build.KernelBuildError, match='cannot run the C\\+\\+ compiler'):
    build.build_library()
  failing = tmp_path / 'failing-c++'
  failing.write_text('#!/bin/sh\necho "fake compiler: out of cheese" >&2\nexit 3\n')
  failing.chmod(0o755)
  monkeypatch.setenv('CXX', str(failing))
  with pytest.raises(build.KernelBuildError, match=r'(?s)failed \(exit 3\).*out of cheese'):
    build.build_library()
  assert not list((tmp_path / 'kernels').iterdir())  # no library and no partial file left behind


def test_build_compiles_once_and_reuses_the_cached_library(tmp_path, monkeypatch):
  monkeypatch.setenv('SPIKINGFORMER_JAX_CACHE', str(tmp_path))
  path = build.build_library()
  assert path.parent == tmp_path / 'kernels' and path.exists()
  mtime = path.stat().st_mtime_ns
  calls = []
  real_run = build.subprocess.run
  monkeypatch.setattr(build.subprocess, 'run', lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
  assert build.build_library() == path
  assert path.stat().st_mtime_ns == mtime
  assert all('-o' not in cmd for cmd in calls)  # only `--version` ran, no compilation
  assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_product_analysis_refuses_the_kernels_foreign_calls():
  model = registry.get_model('spikingformer-cifar-4-384', depth=1, embed_dim=32, num_heads=2, spike_kernels=True)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.PRNGKey(0), jnp.zeros(x.shape)))
  with pytest.raises(ValueError, match='tokenizer/stage1.*trace the model with spike_kernels=False'):
    flops.trace(lambda v, x_: model.apply(v, x_), variables, x)
