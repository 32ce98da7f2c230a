"""Event readers on real N-MNIST files and on AEDAT files written here in the documented layouts."""
import struct

import numpy as np
import pytest
from conftest import shared_path

from spikingformer_jax.data import events


def test_nmnist_reader_matches_staged_npz():
  raw = shared_path('data', 'nmnist', 'raw_bin')
  staged = np.load(shared_path('data', 'nmnist', 'train.npz'))
  rows = [line.split(',') for line in (raw / 'labels.csv').read_text().split()[1:]]
  assert len(rows) == 10
  for name, label in rows:
    ev = events.read_nmnist_bin(raw / name)
    i = int(np.flatnonzero(staged['sample_ids'] == int(name.removesuffix('.bin')))[0])
    s, e = staged['offsets'][i], staged['offsets'][i + 1]
    assert staged['labels'][i] == int(label)
    assert len(ev) == e - s == (raw / name).stat().st_size // 5
    for key in 'txyp':
      np.testing.assert_array_equal(getattr(ev, key), staged[key][s:e].astype(np.int64), err_msg=key)
    assert np.all(np.diff(ev.t) >= 0)


def _nmnist_bytes(x, y, p, t):
  return b''.join(bytes([xi, yi, (pi << 7) | (ti >> 16), (ti >> 8) & 255, ti & 255])
                  for xi, yi, pi, ti in zip(x, y, p, t))


def test_nmnist_overflow_markers_shift_later_timestamps(tmp_path):
  path = tmp_path / 'a.bin'
  path.write_bytes(_nmnist_bytes([1, 0, 2], [3, 240, 4], [1, 0, 0], [100, 0, 50]))
  ev = events.read_nmnist_bin(path)
  np.testing.assert_array_equal(ev.x, [1, 2])
  np.testing.assert_array_equal(ev.t, [100, 50 + 2 ** 13])
  np.testing.assert_array_equal(ev.p, [1, 0])


def test_nmnist_truncated_and_out_of_sensor(tmp_path):
  path = tmp_path / 'cut.bin'
  path.write_bytes(_nmnist_bytes([1, 2], [3, 4], [1, 0], [5, 6])[:-2])
  with pytest.raises(events.EventFormatError, match=r'cut\.bin.*multiple of the 5-byte'):
    events.read_nmnist_bin(path)
  path = tmp_path / 'wide.bin'
  path.write_bytes(_nmnist_bytes([40], [3], [1], [5]))
  with pytest.raises(events.EventFormatError, match=r'wide\.bin.*outside the expected 34x34'):
    events.read_nmnist_bin(path)
  with pytest.raises(FileNotFoundError, match='nothing.bin'):
    events.read_nmnist_bin(tmp_path / 'nothing.bin')


def write_aedat31(path, packets, header=b'#!AER-DAT3.1\r\n#Format: RAW\r\n#!END-HEADER\r\n'):
  """packets: list of (type, ts_overflow, [(x, y, p, t, valid)]) in the AEDAT 3.1 layout."""
  body = b''
  for e_type, overflow, evs in packets:
    size = 8
    body += struct.pack('<hhiiiiii', e_type, 1, size, 4, overflow, len(evs), len(evs), len(evs))
    for x, y, p, t, valid in evs:
      body += struct.pack('<Ii', (x << 17) | (y << 2) | (p << 1) | valid, t)
  path.write_bytes(header + body)


def test_aedat31_reader(tmp_path):
  path = tmp_path / 'user01_led.aedat'
  write_aedat31(path, [
      (1, 0, [(0, 0, 1, 10, 1), (127, 5, 0, 20, 1)]),
      (2, 0, [(3, 3, 0, 99, 1)]),  # a non-polarity packet (special events): skipped
      (1, 1, [(64, 127, 1, 7, 0)]),  # overflow 1: t = 7 + 2**31; the invalid mark is kept, as in SpikingJelly
  ])
  ev = events.read_aedat31(path)
  np.testing.assert_array_equal(ev.x, [0, 127, 64])
  np.testing.assert_array_equal(ev.y, [0, 5, 127])
  np.testing.assert_array_equal(ev.p, [1, 0, 1])
  np.testing.assert_array_equal(ev.t, [10, 20, 7 + 2 ** 31])


def test_aedat31_errors(tmp_path):
  path = tmp_path / 'cut.aedat'
  write_aedat31(path, [(1, 0, [(1, 1, 1, 1, 1), (2, 2, 0, 2, 1)])])
  path.write_bytes(path.read_bytes()[:-3])
  with pytest.raises(events.EventFormatError, match=r'cut\.aedat.*declares 2 events of 8 bytes'):
    events.read_aedat31(path)
  wrong = tmp_path / 'v2.aedat'
  wrong.write_bytes(b'#!AER-DAT2.0\r\n' + b'\0' * 8)
  with pytest.raises(events.EventFormatError, match=r"v2\.aedat.*starting with b'#!AER-DAT3'"):
    events.read_aedat31(wrong)


def test_gesture_labels_and_split(tmp_path):
  csv = tmp_path / 'user01_led_labels.csv'
  csv.write_text('class,startTime_usec,endTime_usec\n3,10,20\n11,20,35\n')
  labels = events.read_gesture_labels(csv)
  np.testing.assert_array_equal(labels, [[2, 10, 20], [10, 20, 35]])
  ev = events.Events(np.array([5, 10, 19, 20, 34, 35]), np.arange(6), np.arange(6), np.zeros(6, np.uint8))
  (first, l1), (second, l2) = events.split_gesture_trial(ev, labels)
  assert (l1, l2) == (2, 10)
  np.testing.assert_array_equal(first.t, [10, 19])
  np.testing.assert_array_equal(second.t, [20, 34])
  csv.write_text('class,startTime_usec,endTime_usec\n12,10,20\n')
  with pytest.raises(events.EventFormatError, match=r'labels\.csv line 2: class 12 is outside 1\.\.11'):
    events.read_gesture_labels(csv)


def write_cifar10_dvs(path, x, y, p, t, header=b'#!AER-DAT2.0\r\n# This is a raw AE data file\r\n'):
  address = (np.asarray(y) << 8) | (np.asarray(x) << 1) | np.asarray(p)
  body = np.stack([address, t], axis=1).astype('>u4').tobytes()
  path.write_bytes(header + body)


def test_cifar10_dvs_reader_remaps_axes_and_polarity(tmp_path):
  path = tmp_path / 'cifar10_cat_0.aedat'
  x, y, p, t = [0, 127, 10], [5, 0, 100], [1, 0, 0], [3, 4, 9]
  write_cifar10_dvs(path, x, y, p, t)
  ev = events.read_cifar10_dvs(path)
  np.testing.assert_array_equal(ev.x, 127 - np.array(y))
  np.testing.assert_array_equal(ev.y, 127 - np.array(x))
  np.testing.assert_array_equal(ev.p, 1 - np.array(p))
  np.testing.assert_array_equal(ev.t, t)
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(events.EventFormatError, match=r'cifar10_cat_0\.aedat.*not a multiple of the 8-byte'):
    events.read_cifar10_dvs(path)
  path.write_bytes(b'\x00\x01garbage')
  with pytest.raises(events.EventFormatError, match=r"starting with b'#!AER-DAT'"):
    events.read_cifar10_dvs(path)
