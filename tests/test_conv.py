"""layers.conv3x3 (custom_vjp: XLA forward and d/dx, shifted-matmul d/dkernel) against XLA and NumPy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikingformer_jax import layers


def xla_conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def np_conv(x, kernel):
  """Direct sum over the nine taps on a zero-padded float64 input."""
  n, h, w, _ = x.shape
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += padded[:, i:i + h, j:j + w, :] @ kernel[i, j].astype(np.float64)
  return out


def np_kernel_grad(x, g):
  n, h, w, _ = x.shape
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  g = g.astype(np.float64)
  return np.stack([np.stack([np.einsum('nhwc,nhwd->cd', padded[:, i:i + h, j:j + w, :], g)
                             for j in range(3)]) for i in range(3)])


def _data(shape, c_out, seed, spikes):
  rng = np.random.default_rng(seed)
  x = (rng.random(shape) < 0.3).astype(np.float32) if spikes else rng.standard_normal(shape).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, shape[-1], c_out)) * 0.2).astype(np.float32)
  g = rng.standard_normal(shape[:-1] + (c_out,)).astype(np.float32)
  return x, kernel, g


@pytest.mark.parametrize('shape,c_out,spikes', [((2, 8, 8, 4), 6, False), ((3, 7, 5, 3), 5, False),
                                                ((1, 1, 1, 2), 3, False), ((4, 9, 11, 5), 7, True)])
def test_forward_and_gradients_match_xla_and_numpy(shape, c_out, spikes):
  x, kernel, g = _data(shape, c_out, seed=sum(shape), spikes=spikes)
  y, vjp = jax.vjp(layers.conv3x3, jnp.asarray(x), jnp.asarray(kernel))
  grad_x, grad_k = vjp(jnp.asarray(g))
  ref_y, ref_vjp = jax.vjp(xla_conv, jnp.asarray(x), jnp.asarray(kernel))
  ref_gx, ref_gk = ref_vjp(jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_x), np.asarray(ref_gx), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_k), np.asarray(ref_gk), rtol=1e-5, atol=1e-5)
  # Independent of XLA: the kernel gradient is the correlation of the padded input with g.
  np.testing.assert_allclose(np.asarray(y), np_conv(x, kernel), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_k), np_kernel_grad(x, g), rtol=1e-5, atol=1e-4)
  assert grad_k.shape == kernel.shape and grad_x.shape == x.shape


def test_kernel_gradient_matches_finite_differences():
  x, kernel, g = _data((2, 5, 6, 3), 2, seed=7, spikes=False)
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  loss = lambda k: float(np.sum(np_conv(x64, k) * g64))
  grad_k = np.asarray(jax.grad(lambda k: jnp.sum(layers.conv3x3(jnp.asarray(x), k) * g))(jnp.asarray(kernel)))
  eps = 1e-3
  for index in [(0, 0, 0, 0), (1, 1, 2, 1), (2, 0, 1, 0), (0, 2, 2, 1)]:
    bump = np.zeros_like(kernel, dtype=np.float64)
    bump[index] = eps
    numeric = (loss(kernel + bump) - loss(kernel - bump)) / (2 * eps)
    np.testing.assert_allclose(grad_k[index], numeric, rtol=1e-4, atol=1e-4)


def test_bfloat16_keeps_dtypes_and_accumulates_kernel_grad_in_float32():
  x, kernel, g = _data((4, 6, 6, 8), 4, seed=3, spikes=True)
  xb, kb, gb = (jnp.asarray(a, jnp.bfloat16) for a in (x, kernel, g))
  y, vjp = jax.vjp(layers.conv3x3, xb, kb)
  grad_x, grad_k = vjp(gb)
  assert y.dtype == grad_x.dtype == grad_k.dtype == jnp.bfloat16
  # Spikes and bfloat16 values are exact in float32, so the only error is the final bfloat16 rounding.
  exact_gk = np_kernel_grad(x, np.asarray(gb, np.float32))
  np.testing.assert_allclose(np.asarray(grad_k, np.float32), exact_gk, rtol=2 ** -8, atol=1e-6)
  _, ref_vjp = jax.vjp(xla_conv, xb, kb)
  ref_gx, _ = ref_vjp(gb)
  np.testing.assert_allclose(np.asarray(grad_x, np.float32), np.asarray(ref_gx, np.float32), rtol=2e-2, atol=2e-2)


def test_conv3x3_module_has_nn_conv_parameters_and_output():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 7, 5))
  ours = layers.Conv3x3(4, param_dtype=jnp.float32)
  flax_conv = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=layers.conv_kernel_init)
  params = ours.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.PRNGKey(1), x))
  assert params['params']['kernel'].shape == (3, 3, 5, 4)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(flax_conv.apply(params, x)),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='Conv3x3 supports only'):
    layers.Conv3x3(4, strides=2).init(jax.random.PRNGKey(1), x)
