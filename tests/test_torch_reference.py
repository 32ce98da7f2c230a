"""The benchmark's PyTorch Spikingformer (benchmarks/torch_reference.py) computes the reference's function.

It loads the reference's own state_dict from the parity dump strictly and must reproduce its logits and
every LIF's spikes; its built-in LIF must match a NumPy BPTT of SpikingJelly's equations.
"""
import numpy as np
import pytest

from conftest import shared_path

torch = pytest.importorskip('torch')

from benchmarks import torch_reference  # noqa: E402  (needs torch)


def _reference_model(dump):
  model = torch_reference.Spikingformer(num_classes=10, dim=128, depth=2, heads=8, T=4, lif='builtin')
  state = {k[2:]: torch.from_numpy(dump[k]) for k in dump.files if k.startswith('w/')}
  state = {k: v.long() if k.endswith('num_batches_tracked') else v for k, v in state.items()}
  model.load_state_dict(state, strict=True)  # Every reference key, norm1/norm2 included, and no other.
  return model.eval()


def test_matches_reference_logits_and_spikes():
  dump = np.load(shared_path('reference', 'parity', 'ref_cifar_2-128.npz'))
  model = _reference_model(dump)
  spikes = {}
  for name, module in model.named_modules():
    if isinstance(module, torch_reference.TorchLIF):
      module.register_forward_hook(lambda m, i, o, name=name: spikes.__setitem__(name, o.numpy()))
  with torch.no_grad():
    logits = model(torch.from_numpy(dump['x'])).numpy()
  np.testing.assert_allclose(logits, dump['logits'], rtol=1e-5, atol=1e-5 * np.abs(dump['logits']).max())
  expected = sorted(k[4:] for k in dump.files if k.startswith('spk/'))
  assert sorted(spikes) == expected
  for name in expected:
    shape = tuple(dump[f'shape/{name}'])
    want = np.unpackbits(dump[f'spk/{name}'])[:np.prod(shape)].reshape(shape)
    got = spikes[name]
    assert got.shape == shape, name
    assert np.mean(got != want) < 1e-4, f'{name}: {np.sum(got != want)} spikes differ'


def _numpy_lif_bptt(x, g, tau=2.0, v_th=1.0, alpha=4.0):
  """Spikes and d<spikes, g>/dx of SpikingJelly's hard-reset LIF with detach_reset (its MultiStepLIFNode)."""
  v, hs, ss = np.zeros_like(x[0]), [], []
  for x_t in x:
    h = v + (x_t - v) / tau
    s = (h >= v_th).astype(x.dtype)
    v = h * (1 - s)
    hs.append(h)
    ss.append(s)
  grad_x, grad_h_next = np.zeros_like(x), np.zeros_like(x[0])
  for t in reversed(range(len(x))):
    sg = 1 / (1 + np.exp(-alpha * (hs[t] - v_th)))
    grad_h = g[t] * alpha * sg * (1 - sg) + grad_h_next * (1 - 1 / tau) * (1 - ss[t])
    grad_x[t] = grad_h / tau
    grad_h_next = grad_h
  return np.stack(ss), grad_x


def test_builtin_lif_matches_numpy_bptt():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((5, 3, 7)) + 1.0).astype(np.float64)
  g = rng.standard_normal(x.shape)
  xt = torch.from_numpy(x).requires_grad_(True)
  spikes = torch_reference.TorchLIF(tau=2.0)(xt)
  spikes.backward(torch.from_numpy(g))
  want_spikes, want_grad = _numpy_lif_bptt(x, g)
  assert 0 < want_spikes.mean() < 1
  np.testing.assert_array_equal(spikes.detach().numpy(), want_spikes)
  np.testing.assert_allclose(xt.grad.numpy(), want_grad, rtol=1e-12, atol=1e-12)


def test_unknown_lif_kind_is_rejected():
  with pytest.raises(ValueError, match="Unknown LIF kind 'cupy'"):
    torch_reference.make_lif('cupy', 2.0)
