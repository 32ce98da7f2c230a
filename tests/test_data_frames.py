"""Event-to-frame integration against a plain loop over events (SpikingJelly's split rules)."""
import numpy as np
import pytest
from conftest import shared_path

from spikingformer_jax.data import events, frames


def reference_frames(t, x, y, p, T, H, W, split_by):
  """Independent reference: explicit per-frame index ranges and a loop over events."""
  n = len(t)
  if split_by == 'number':
    di = n // T
    ranges = [(j * di, (j + 1) * di if j < T - 1 else n) for j in range(T)]
  else:
    dt = (t[-1] - t[0]) // T
    ranges = []
    for j in range(T):
      inside = [i for i in range(n) if t[0] + j * dt <= t[i] and (j == T - 1 or t[i] < t[0] + (j + 1) * dt)]
      ranges.append((min(inside), max(inside) + 1) if inside else (0, 0))
  out = np.zeros((T, H, W, 2))
  for j, (lo, hi) in enumerate(ranges):
    for i in range(lo, hi):
      out[j, y[i], x[i], p[i]] += 1
  return out


def random_events(rng, n, H, W):
  t = np.sort(rng.integers(0, 10_000, n))
  return events.Events(t, rng.integers(0, W, n).astype(np.int32), rng.integers(0, H, n).astype(np.int32),
                       rng.integers(0, 2, n).astype(np.uint8))


@pytest.mark.parametrize('n,T,split_by', [(1003, 16, 'number'), (10, 4, 'number'), (3, 4, 'number'),
                                          (500, 7, 'time'), (0, 3, 'number')])
def test_integrate_matches_reference(n, T, split_by):
  rng = np.random.default_rng(n + T)
  H, W = 6, 9
  ev = random_events(rng, n, H, W)
  got = frames.integrate(ev, T, H, W, split_by)
  assert got.shape == (T, H, W, 2) and got.dtype == np.float32
  want = reference_frames(ev.t, ev.x, ev.y, ev.p, T, H, W, split_by) if n else np.zeros((T, H, W, 2))
  np.testing.assert_array_equal(got, want)
  assert got.sum() == n


def test_number_split_puts_remainder_in_last_frame():
  ev = events.Events(np.arange(10), np.zeros(10, np.int32), np.zeros(10, np.int32), np.zeros(10, np.uint8))
  got = frames.integrate(ev, 4, 1, 1)
  np.testing.assert_array_equal(got[:, 0, 0, 0], [2, 2, 2, 4])


def test_real_nmnist_sample_frames():
  staged = np.load(shared_path('data', 'nmnist', 'test.npz'))
  o = staged['offsets']
  for i in (0, 7):
    s, e = o[i], o[i + 1]
    ev = events.Events(staged['t'][s:e].astype(np.int64), staged['x'][s:e].astype(np.int32),
                       staged['y'][s:e].astype(np.int32), staged['p'][s:e])
    got = frames.integrate(ev, 16, 34, 34)
    np.testing.assert_array_equal(got, reference_frames(ev.t, ev.x, ev.y, ev.p, 16, 34, 34, 'number'))
    np.testing.assert_array_equal(got.sum(axis=(1, 2, 3)), np.diff(np.r_[np.arange(16) * ((e - s) // 16), e - s]))


def test_out_of_sensor_events_are_rejected():
  ev = events.Events(np.arange(2), np.array([0, 9], np.int32), np.zeros(2, np.int32), np.zeros(2, np.uint8))
  with pytest.raises(ValueError, match='expected a 9x4 sensor'):
    frames.integrate(ev, 1, 4, 9)
  with pytest.raises(ValueError, match="split_by = 'space'"):
    frames.integrate(ev, 1, 4, 10, 'space')
