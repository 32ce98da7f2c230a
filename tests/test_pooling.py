"""pooling.max_pool_3x3_s2: values and gradients against a NumPy MaxPool2d(3, 2, padding 1) that routes each
window's gradient to its first maximum in row-major order (PyTorch's rule), with ties (spike maps) and odd sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikingformer_jax import layers, pooling


def numpy_max_pool_and_vjp(x, g):
  n, h, w, c = x.shape
  ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
  y = np.empty((n, ho, wo, c), x.dtype)
  grad = np.zeros(x.shape, np.float64)
  for b in range(n):
    for i in range(ho):
      for j in range(wo):
        for ch in range(c):
          best, where = -np.inf, None
          for p in range(2 * i - 1, 2 * i + 2):
            for q in range(2 * j - 1, 2 * j + 2):
              if 0 <= p < h and 0 <= q < w and x[b, p, q, ch] > best:  # strict: the first maximum stays
                best, where = x[b, p, q, ch], (p, q)
          y[b, i, j, ch] = best
          grad[b, where[0], where[1], ch] += g[b, i, j, ch]
  return y, grad


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (3, 7, 9, 2), (1, 1, 1, 2), (2, 2, 3, 1), (1, 5, 4, 4)])
@pytest.mark.parametrize('binary', [True, False], ids=['spikes', 'floats'])
def test_values_and_gradient_equal_numpy(shape, binary):
  rng = np.random.default_rng(sum(shape) + binary)
  x = (rng.random(shape) < 0.3).astype(np.float32) if binary else rng.standard_normal(shape).astype(np.float32)
  y, vjp = jax.vjp(pooling.max_pool_3x3_s2, jnp.asarray(x))
  g = rng.standard_normal(y.shape).astype(np.float32)
  want_y, want_grad = numpy_max_pool_and_vjp(x, g)
  np.testing.assert_array_equal(np.asarray(y), want_y)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), want_grad, rtol=1e-6, atol=1e-6)


def test_equals_flax_max_pool_and_its_xla_gradient_in_the_time_fold():
  """layers.max_pool on `[T, B, H, W, C]` spikes: the same values and gradients either way, under jit."""
  rng = np.random.default_rng(0)
  x = jnp.asarray((rng.random((4, 3, 16, 16, 8)) < 0.2).astype(np.float32))
  g = jnp.asarray(rng.standard_normal((4, 3, 8, 8, 8)).astype(np.float32))
  grads = [jax.jit(jax.vjp(lambda v: layers.max_pool(v, scatter_free), x)[1])(g)[0] for scatter_free in (False, True)]
  np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(layers.max_pool(x, True)), np.asarray(
      jax.vmap(lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))(x)))


def test_neither_pass_has_select_and_scatter_or_reduce_window():
  x = jnp.ones((2, 16, 16, 4))
  hlo = jax.jit(jax.grad(lambda v: jnp.sum(pooling.max_pool_3x3_s2(v) ** 2))).lower(x).as_text()
  assert 'scatter' not in hlo and 'reduce_window' not in hlo
  reference = jax.jit(jax.grad(lambda v: jnp.sum(nn.max_pool(v, (3, 3), (2, 2), ((1, 1), (1, 1))) ** 2)))
  assert 'select_and_scatter' in reference.lower(x).as_text()


def test_a_nan_spreads_to_every_window_holding_it_as_in_flax():
  x = np.zeros((1, 6, 6, 1), np.float32)
  x[0, 2, 3, 0] = np.nan
  want = nn.max_pool(jnp.asarray(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  got = pooling.max_pool_3x3_s2(jnp.asarray(x))
  np.testing.assert_array_equal(np.isnan(np.asarray(got)), np.isnan(np.asarray(want)))
  assert np.isnan(np.asarray(want)).sum() == 2  # input (2, 3) lies in output row 1's windows of columns 1 and 2
