"""Event-to-frame integration with SpikingJelly's fixed-frame-number semantics.

`split_by='number'` (the reference's setting): with N events and T frames, di = N // T; frame j
holds events [j*di, (j+1)*di) and the last frame also takes the remainder, up to N.
`split_by='time'`: dt = (t[N-1] - t[0]) // T; frame j holds events with
t[0] + j*dt <= t < t[0] + (j+1)*dt, the last frame everything from t[0] + (T-1)*dt on. (Where
SpikingJelly fails on an empty time window, this gives an empty frame.)

Each frame counts events per (row y, column x, polarity), channels-last `[T, H, W, 2]` with channel
0 = polarity 0 (OFF), channel 1 = polarity 1 (ON), as raw float counts: no binarising, no scaling.
"""
from __future__ import annotations

import numpy as np

from spikingformer_jax.data.events import Events

SPLIT_MODES = ('number', 'time')


def frame_boundaries(t: np.ndarray, num_frames: int, split_by: str = 'number') -> np.ndarray:
  """Event index boundaries [num_frames + 1]: frame j is events[bounds[j]:bounds[j + 1]]."""
  n = int(t.shape[0])
  if num_frames < 1:
    raise ValueError(f'num_frames = {num_frames}: expected at least 1 frame.')
  if split_by == 'number':
    bounds = np.arange(num_frames + 1, dtype=np.int64) * (n // num_frames)
  elif split_by == 'time':
    if n == 0:
      bounds = np.zeros(num_frames + 1, np.int64)
    else:
      dt = (int(t[-1]) - int(t[0])) // num_frames
      edges = int(t[0]) + dt * np.arange(num_frames + 1, dtype=np.int64)
      bounds = np.searchsorted(t, edges, side='left').astype(np.int64)
  else:
    raise ValueError(f'split_by = {split_by!r}: expected one of {SPLIT_MODES}.')
  bounds[0], bounds[-1] = 0, n
  return bounds


def integrate(events: Events, num_frames: int, height: int, width: int,
              split_by: str = 'number') -> np.ndarray:
  """Event counts `[num_frames, height, width, 2]` float32 (see the module docstring)."""
  if len(events) and (events.x.min() < 0 or events.x.max() >= width or events.y.min() < 0
                      or events.y.max() >= height or events.p.max() > 1):
    raise ValueError(f'Events reach x in [{events.x.min()}, {events.x.max()}], y in [{events.y.min()}, '
                     f'{events.y.max()}], p up to {events.p.max()}: expected a {width}x{height} sensor '
                     f'with polarity 0/1.')
  bounds = frame_boundaries(events.t, num_frames, split_by)
  frame_of_event = np.repeat(np.arange(num_frames), np.diff(bounds))
  flat = ((frame_of_event * height + events.y.astype(np.int64)) * width
          + events.x.astype(np.int64)) * 2 + events.p.astype(np.int64)
  counts = np.bincount(flat, minlength=num_frames * height * width * 2)
  return counts.reshape(num_frames, height, width, 2).astype(np.float32)
