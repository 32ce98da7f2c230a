"""BatchNorm: forward and running statistics against NumPy (PyTorch's semantics), the custom backward
against autodiff of a plain implementation, masks, and the one-tensor residual."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from spikingformer_jax import batchnorm


def _numpy_batch_norm(x, scale, bias, mask, eps=1e-5):
  """PyTorch BatchNorm in training mode, over the masked positions; returns y, mean, unbiased var."""
  x = x.astype(np.float64)
  flat = x.reshape(-1, x.shape[-1])
  keep = np.ones(len(flat), bool) if mask is None else np.broadcast_to(mask, x.shape[:-1] + (1,)).reshape(-1)
  sel = flat[keep]
  mean, var = sel.mean(0), sel.var(0)
  y = (x - mean) / np.sqrt(var + eps) * scale + bias
  return y, mean, var * len(sel) / (len(sel) - 1)


def _plain(x, scale, bias, mask, eps=1e-5):
  """The same normalisation written for autodiff (reference for the custom backward)."""
  m = jnp.ones(x.shape[:-1] + (1,), bool) if mask is None else jnp.broadcast_to(mask, x.shape[:-1] + (1,))
  n = m.sum()
  mean = jnp.where(m, x, 0).sum(tuple(range(x.ndim - 1))) / n
  var = jnp.where(m, (x - mean) ** 2, 0).sum(tuple(range(x.ndim - 1))) / n
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize('masked', [False, True])
def test_forward_and_running_stats_match_pytorch_semantics(masked):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, size=(4, 3, 5, 6)).astype(np.float32)
  mask = (rng.uniform(size=(1, 3, 5, 1)) < 0.7) if masked else None
  bn = batchnorm.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), x, mask)
  params = {'scale': jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32), 'bias': jnp.asarray(rng.normal(size=6), jnp.float32)}
  stats = {'mean': jnp.full(6, 0.5), 'var': jnp.full(6, 2.0)}
  y, updates = bn.apply({'params': params, 'batch_stats': stats}, x, mask, mutable=['batch_stats'])
  want_y, mean, unbiased = _numpy_batch_norm(x, np.asarray(params['scale']), np.asarray(params['bias']), mask)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.9 * 0.5 + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 * 2.0 + 0.1 * unbiased, rtol=1e-5)
  assert set(variables['params']) == {'scale', 'bias'} and set(variables['batch_stats']) == {'mean', 'var'}
  eval_y = batchnorm.BatchNorm(use_running_average=True).apply({'params': params, 'batch_stats': stats}, x)
  np.testing.assert_allclose(eval_y, (x - 0.5) / np.sqrt(2.0 + 1e-5) * params['scale'] + params['bias'], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('masked', [False, True])
def test_backward_equals_autodiff_including_statistics_cotangents(masked):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 3, 7, 5)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(1, 3, 7, 1)) < 0.6) if masked else None
  scale, bias = jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32), jnp.asarray(rng.normal(size=5), jnp.float32)
  w_y = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  w_mean, w_var = jnp.asarray(rng.normal(size=5), jnp.float32), jnp.asarray(rng.normal(size=5), jnp.float32)

  def objective(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias)[:3]
      return jnp.sum(w_y * y ** 2) + jnp.sum(w_mean * mean) + jnp.sum(w_var * var)
    return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

  ours = objective(lambda x, s, b: batchnorm.batch_norm_train(x, s, b, mask, 1e-5))
  want = objective(lambda x, s, b: _plain(x, s, b, mask))
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 6, 3)).astype(np.float64)
  w = rng.normal(size=x.shape)
  with jax.enable_x64():
    f = lambda x: jnp.sum(w * jnp.tanh(batchnorm.batch_norm_train(x, jnp.ones(3), jnp.zeros(3), None, 1e-5)[0]))
    grad = np.asarray(jax.grad(f)(jnp.asarray(x)))
    eps, fd = 1e-6, np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      d = np.zeros_like(x)
      d[idx] = eps
      fd[idx] = (f(jnp.asarray(x + d)) - f(jnp.asarray(x - d))) / (2 * eps)
  np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_saves_only_its_input():
  x = jnp.ones((4, 8, 16, 32))
  residuals = saved_residuals(lambda x: jnp.sum(batchnorm.batch_norm_train(x, jnp.ones(32), jnp.zeros(32), None, 1e-5)[0]
                                                ** 2), x)
  big = [aval.shape for aval, _ in residuals if aval.size >= x.size]
  assert len(big) <= 2, big  # the input and the squared function's own residual (its input y)


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 16, 4)), jnp.bfloat16)
  y, mean, var, _ = batchnorm.batch_norm_train(x, jnp.ones(4), jnp.zeros(4), None, 1e-5)
  assert y.dtype == jnp.bfloat16 and mean.dtype == jnp.float32 and var.dtype == jnp.float32
  grad = jax.grad(lambda x: jnp.sum(batchnorm.batch_norm_train(x, jnp.ones(4), jnp.zeros(4), None, 1e-5)[0].astype(
      jnp.float32) * jnp.arange(4.0)))(x)
  assert grad.dtype == jnp.bfloat16



def test_repeats_count_every_copy_in_the_running_variance():
  """x standing for T identical copies: the statistics of the copies, unbiased over all T * n positions."""
  rng = np.random.default_rng(3)
  x = rng.normal(1.0, 2.0, size=(3, 4, 4, 5)).astype(np.float32)
  copies = np.broadcast_to(x[None], (4,) + x.shape)
  bn = batchnorm.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, once = bn.apply(variables, x, repeats=4, mutable=['batch_stats'])
  y_copies, every = bn.apply(variables, copies, mutable=['batch_stats'])
  want_y, mean, unbiased = _numpy_batch_norm(copies, 1.0, 0.0, None)
  np.testing.assert_allclose(y, want_y[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(once['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(once['batch_stats']['var'], 0.9 + 0.1 * unbiased, rtol=1e-6)
  np.testing.assert_allclose(once['batch_stats']['var'], every['batch_stats']['var'], rtol=1e-6)
