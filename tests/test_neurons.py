"""LIF / IF / PLIF and surrogate spike functions against an independent NumPy implementation."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spikingformer_jax import neurons, surrogates

jax.config.update('jax_enable_x64', False)


def np_sigmoid_grad(x, alpha):
  s = 1.0 / (1.0 + np.exp(-alpha * x))
  return alpha * s * (1.0 - s)


def np_lif(x, tau, v_th, v_reset, decay_input, detach_reset, g_spikes):
  """Forward spikes and BPTT gradients w.r.t. x, written from the equations."""
  x = x.astype(np.float64)
  decay = 1.0 / tau
  rest = 0.0 if v_reset is None else v_reset
  T = x.shape[0]
  v = np.full(x.shape[1:], rest)
  hs, ss = [], []
  for t in range(T):
    if decay_input:
      h = v + (x[t] - (v - rest)) * decay
    else:
      h = v - (v - rest) * decay + x[t]
    s = (h >= v_th).astype(np.float64)
    v = h * (1 - s) + rest * s if v_reset is not None else h - s * v_th
    hs.append(h)
    ss.append(s)
  # Backward.
  gx = np.zeros_like(x)
  gv = np.zeros(x.shape[1:])
  for t in reversed(range(T)):
    h, s = hs[t], ss[t]
    sg = np_sigmoid_grad(h - v_th, 4.0)
    if v_reset is not None:
      dv_dh = (1 - s) + (0 if detach_reset else (rest - h) * sg)
    else:
      dv_dh = 1 - (0 if detach_reset else v_th * sg)
    gh = g_spikes[t] * sg + gv * dv_dh
    gx[t] = gh * decay if decay_input else gh
    gv = gh * (1 - decay)
  return np.stack(ss), gx


# Every reset/decay/detach combination, each with two (tau, threshold) settings.
CASES = [(tau, v_th) + rest for rest in itertools.product([0.0, None, -0.2], [True, False], [True, False])
         for tau, v_th in ((2.0, 1.0), (1.5, 0.5))]


@pytest.mark.parametrize('tau,v_th,v_reset,decay_input,detach', CASES)
def test_lif_forward_and_backward_match_numpy(tau, v_th, v_reset, decay_input, detach):
  rng = np.random.default_rng(0)
  x = rng.normal(0.6, 1.0, size=(6, 3, 17)).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  cfg = neurons.LIFConfig(tau=tau, v_threshold=v_th, v_reset=v_reset, decay_input=decay_input,
                          detach_reset=detach)
  spikes, vjp = jax.vjp(lambda x: neurons.lif(x, cfg), jnp.asarray(x))
  ref_s, ref_gx = np_lif(x, tau, v_th, v_reset, decay_input, detach, g)
  np.testing.assert_array_equal(np.asarray(spikes), ref_s)
  np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), ref_gx, atol=1e-6, rtol=1e-5)
  assert 0 < ref_s.mean() < 1  # The case exercises both firing and silence.


def test_spikes_are_exactly_binary_in_both_dtypes():
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 1000)) * 3
  for dtype in (jnp.float32, jnp.bfloat16):
    s = neurons.lif(x.astype(dtype))
    assert s.dtype == dtype
    assert set(np.unique(np.asarray(s, np.float32))) <= {0.0, 1.0}


def test_unrolled_and_rolled_scans_agree():
  x = jax.random.normal(jax.random.PRNGKey(2), (5, 64)) + 0.8
  f = lambda cfg: jax.grad(lambda x: jnp.sum(neurons.lif(x, cfg) * jnp.arange(64.0)))(x)
  np.testing.assert_allclose(np.asarray(f(neurons.LIFConfig(unroll=True))),
                             np.asarray(f(neurons.LIFConfig(unroll=1))), rtol=1e-6)


@pytest.mark.parametrize('name,alpha', [('sigmoid', 4.0), ('sigmoid', 2.0), ('atan', 2.0), ('triangle', 1.0),
                                        ('triangle', 2.0), ('straight_through', 1.0)])
def test_surrogate_derivative_matches_closed_form(name, alpha):
  x = np.linspace(-3, 3, 601).astype(np.float32)
  got = np.asarray(jax.vmap(jax.grad(lambda v: surrogates.spike(v, name, alpha)))(jnp.asarray(x)))
  closed = {
      'sigmoid': np_sigmoid_grad(x, alpha),
      'atan': (alpha / 2) / (1 + (np.pi / 2 * alpha * x) ** 2),
      'triangle': alpha * np.maximum(0, 1 - alpha * np.abs(x)),
      'straight_through': np.ones_like(x),
  }[name]
  np.testing.assert_allclose(got, closed, rtol=1e-5, atol=1e-7)
  # Forward is the exact Heaviside with Θ(0) = 1.
  np.testing.assert_array_equal(np.asarray(surrogates.spike(jnp.asarray(x), name, alpha)), (x >= 0).astype(np.float32))


def test_sigmoid_surrogate_is_derivative_of_smooth_sigmoid():
  x = jnp.linspace(-2, 2, 41)
  smooth = jax.vmap(jax.grad(lambda v: jax.nn.sigmoid(4.0 * v)))(x)
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(surrogates.spike))(x)), np.asarray(smooth), rtol=1e-6)


def test_lif_saves_only_membrane_inputs_as_residuals():
  """The backward keeps one [T, ...] tensor of membrane inputs (H - V_th), not surrogate gradients."""
  x = jnp.ones((4, 8, 16))
  _, residuals = jax.vjp(lambda x: neurons.lif(x), x)
  leaves = [l for l in jax.tree_util.tree_leaves(residuals) if hasattr(l, 'shape') and l.size > 1]
  total = sum(l.size for l in leaves)
  # Membrane inputs (T x 8 x 16) plus the detached reset spikes; no third tensor per step.
  assert total <= 2 * x.size, [l.shape for l in leaves]


def test_unknown_surrogate_and_bad_tau_are_rejected():
  with pytest.raises(ValueError, match='Unknown surrogate'):
    neurons.LIFConfig(surrogate='nope')
  with pytest.raises(ValueError, match='tau must be > 1'):
    neurons.LIFConfig(tau=1.0)
