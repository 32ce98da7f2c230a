"""Readers for raw event-camera recordings: N-MNIST `.bin`, AEDAT 3.1 (DVS128 Gesture) and the
jAER AEDAT 2.0 files of CIFAR10-DVS. Each returns an `Events` record of equal-length arrays.

Layouts (learnt from the datasets' documentation and the SpikingJelly/tonic readers):
- N-MNIST `.bin`: 5 bytes per event, big-endian bit fields: byte0 = x, byte1 = y, bit 7 of byte2 =
  polarity (1 = ON), the remaining 23 bits of bytes 2-4 = timestamp in µs. A record with y == 240
  is not an event but a timestamp-overflow marker: every later timestamp gets +2**13 (the
  dataset authors' reader); markers are removed, everything else is kept.
- AEDAT 3.1: ASCII header lines starting with '#' up to `#!END-HEADER\\r\\n`, then packets of a
  28-byte little-endian header (int16 eventType, int16 eventSource, int32 eventSize, int32
  eventTSOffset, int32 eventTSOverflow, int32 eventCapacity, int32 eventNumber, int32 eventValid)
  followed by eventCapacity * eventSize bytes. Polarity events (type 1, size 8) are a uint32
  (bit 0 valid mark, bit 1 polarity, bits 2-16 y, bits 17-31 x) and an int32 timestamp (µs) whose
  full value is `timestamp | eventTSOverflow << 31`. Other packet types (special events, frames,
  IMU) carry no polarity events and are skipped. Like SpikingJelly (the reference), every
  polarity event in a packet is kept, whatever its valid mark.
- CIFAR10-DVS (AEDAT 2.0): '#' header lines, then big-endian (uint32 address, uint32 timestamp)
  pairs. x = (address & 0xFE) >> 1, y = (address & 0x7F00) >> 8, p = address & 1; SpikingJelly then
  remaps x' = 127 - y, y' = 127 - x, p' = 1 - p, which `read_cifar10_dvs` does too.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np


class EventFormatError(ValueError):
  """A recording or label file does not have the documented layout."""


@dataclasses.dataclass(frozen=True)
class Events:
  """Time-ordered events: t (int64 µs), x, y (int32 pixel column/row), p (uint8, 0 = OFF, 1 = ON)."""
  t: np.ndarray
  x: np.ndarray
  y: np.ndarray
  p: np.ndarray

  def __len__(self):
    return int(self.t.shape[0])

  def select(self, index) -> 'Events':
    return Events(self.t[index], self.x[index], self.y[index], self.p[index])


def _events(t, x, y, p) -> Events:
  return Events(np.asarray(t, np.int64), np.asarray(x, np.int32), np.asarray(y, np.int32),
                np.asarray(p, np.uint8))


def check_sensor_bounds(events: Events, width: int, height: int, path) -> Events:
  """Raises if any event lies outside a width x height sensor (a sign of a wrong reader)."""
  if len(events):
    bad = (events.x < 0) | (events.x >= width) | (events.y < 0) | (events.y >= height)
    if bad.any():
      i = int(np.argmax(bad))
      raise EventFormatError(
          f'{path}: event {i} at (x={events.x[i]}, y={events.y[i]}) lies outside the expected '
          f'{width}x{height} sensor; is this the right dataset/format?')
  return events


def _read_bytes(path) -> bytes:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Event file {path} does not exist.')
  with open(path, 'rb') as f:
    return f.read()


NMNIST_OVERFLOW_Y = 240
NMNIST_OVERFLOW_STEP = 2 ** 13


def read_nmnist_bin(path) -> Events:
  """Decodes one N-MNIST (or N-Caltech101) `.bin` recording."""
  raw = np.frombuffer(_read_bytes(path), np.uint8)
  if raw.size % 5:
    raise EventFormatError(f'{path}: {raw.size} bytes is not a multiple of the 5-byte N-MNIST event '
                           f'(truncated file?).')
  raw = raw.reshape(-1, 5).astype(np.int64)
  x, y = raw[:, 0], raw[:, 1]
  p = raw[:, 2] >> 7
  t = ((raw[:, 2] & 0x7F) << 16) | (raw[:, 3] << 8) | raw[:, 4]
  overflow = y == NMNIST_OVERFLOW_Y
  if overflow.any():
    t = t + NMNIST_OVERFLOW_STEP * np.cumsum(overflow)
    keep = ~overflow
    x, y, p, t = x[keep], y[keep], p[keep], t[keep]
  return check_sensor_bounds(_events(t, x, y, p), 34, 34, path)


def _split_header(data: bytes, path, magic: bytes) -> int:
  """Returns the offset of the binary body after the '#' header lines; checks the magic line."""
  if not data.startswith(magic):
    first = data[:20]
    raise EventFormatError(f'{path}: expected an event file starting with {magic!r}, found {first!r}.')
  offset = 0
  while offset < len(data) and data[offset:offset + 1] == b'#':
    end = data.find(b'\n', offset)
    if end < 0:
      raise EventFormatError(f'{path}: header line at byte {offset} never ends (truncated file?).')
    line = data[offset:end + 1]
    offset = end + 1
    if line.startswith(b'#!END-HEADER'):
      break
  return offset


AEDAT3_PACKET_HEADER = struct.Struct('<hhiiiiii')
AEDAT3_POLARITY_EVENT = 1


def read_aedat31(path) -> Events:
  """Decodes the polarity events of an AEDAT 3.1 file (DVS128 Gesture recordings)."""
  data = _read_bytes(path)
  offset = _split_header(data, path, b'#!AER-DAT3')
  chunks = []
  while offset < len(data):
    if offset + AEDAT3_PACKET_HEADER.size > len(data):
      raise EventFormatError(f'{path}: packet header at byte {offset} has only {len(data) - offset} of '
                             f'{AEDAT3_PACKET_HEADER.size} bytes (truncated file?).')
    (e_type, _, e_size, _, ts_overflow, capacity, _, _) = AEDAT3_PACKET_HEADER.unpack_from(data, offset)
    offset += AEDAT3_PACKET_HEADER.size
    length = capacity * e_size
    if e_size <= 0 or capacity < 0 or offset + length > len(data):
      raise EventFormatError(
          f'{path}: packet at byte {offset - AEDAT3_PACKET_HEADER.size} declares {capacity} events of '
          f'{e_size} bytes but only {len(data) - offset} bytes remain (truncated file?).')
    if e_type == AEDAT3_POLARITY_EVENT:
      if e_size != 8:
        raise EventFormatError(f'{path}: polarity packet with eventSize {e_size}; AEDAT 3.1 polarity '
                               f'events are 8 bytes.')
      words = np.frombuffer(data, '<u4', count=2 * capacity, offset=offset).reshape(-1, 2)
      address = words[:, 0].astype(np.int64)
      t = words[:, 1].astype(np.int64) | (np.int64(ts_overflow) << 31)
      chunks.append((t, (address >> 17) & 0x7FFF, (address >> 2) & 0x7FFF, (address >> 1) & 1))
    offset += length
  if not chunks:
    return _events(*(np.zeros(0, np.int64) for _ in range(4)))
  return check_sensor_bounds(_events(*(np.concatenate(c) for c in zip(*chunks))), 128, 128, path)


def read_cifar10_dvs(path) -> Events:
  """Decodes one CIFAR10-DVS `.aedat` recording, with the reference's axis/polarity remap."""
  data = _read_bytes(path)
  offset = _split_header(data, path, b'#!AER-DAT')
  body = len(data) - offset
  if body % 8:
    raise EventFormatError(f'{path}: event body of {body} bytes is not a multiple of the 8-byte '
                           f'(address, timestamp) AEDAT 2.0 event (truncated file?).')
  words = np.frombuffer(data, '>u4', offset=offset).reshape(-1, 2).astype(np.int64)
  address, t = words[:, 0], words[:, 1]
  x = (address & 0xFE) >> 1
  y = (address & 0x7F00) >> 8
  p = address & 1
  return check_sensor_bounds(_events(t, 127 - y, 127 - x, 1 - p), 128, 128, path)


GESTURE_CLASSES = 11


def read_gesture_labels(path) -> np.ndarray:
  """Reads a DVS128 Gesture `*_labels.csv`: rows (label 0..10, start µs, end µs), label = class - 1."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Label file {path} does not exist (expected next to its .aedat).')
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines or not lines[0].lower().startswith('class'):
    raise EventFormatError(f'{path}: expected a header "class,startTime_usec,endTime_usec".')
  rows = []
  for number, line in enumerate(lines[1:], start=2):
    fields = line.split(',')
    try:
      cls, start, end = (int(v) for v in fields)
    except ValueError:
      raise EventFormatError(f'{path} line {number}: expected 3 integers "class,start,end", got {line!r}.')
    if not 1 <= cls <= GESTURE_CLASSES:
      raise EventFormatError(f'{path} line {number}: class {cls} is outside 1..{GESTURE_CLASSES}.')
    if end <= start:
      raise EventFormatError(f'{path} line {number}: end time {end} is not after start time {start}.')
    rows.append((cls - 1, start, end))
  return np.asarray(rows, np.int64).reshape(-1, 3)


def split_gesture_trial(events: Events, labels: np.ndarray) -> list[tuple[Events, int]]:
  """Cuts one recording into its labelled gestures: events with start <= t < end (as SpikingJelly)."""
  return [(events.select((events.t >= start) & (events.t < end)), int(label))
          for label, start, end in labels]
