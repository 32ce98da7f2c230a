"""Convert a raw event-camera dataset once into integrated frame shards, so training never re-reads
events:

  python -m spikingformer_jax.data.prepare --dataset=dvs128_gesture --raw_dir=DvsGesture \\
      --out_dir=frames/dvs128_gesture --T=16

Writes `<out_dir>/<split>-T<T>-<split_by>/shard-NNNNN.npz` (members `frames_<j>`: uint16 counts
[T, H, W, 2], compressed; `labels`) and an `index.json` listing the shards, their labels and the
recording each example came from. The loaders read these with config.data.data_dir = out_dir.

Raw layouts and splits:
- dvs128_gesture: the extracted `DvsGesture/` folder: userNN_<light>.aedat (AEDAT 3.1),
  userNN_<light>_labels.csv, trials_to_train.txt, trials_to_test.txt (the official split). Each
  recording is cut into its labelled gestures (start <= t < end); label = class - 1.
- cifar10_dvs: the 10 class folders (airplane ... truck) of `cifar10_<class>_<i>.aedat`. As the
  reference (`split_to_train_test_set(0.9, random_split=False)`), each class's files in sorted
  (lexicographic) order give the first ceil(0.9 n) to train, the rest to test.
- nmnist: `Train/<digit>/*.bin` and `Test/<digit>/*.bin` (the original layout).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Iterator

import numpy as np

from spikingformer_jax.data import events as events_lib
from spikingformer_jax.data import frames as frames_lib
from spikingformer_jax.data import sources

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR10_DVS_TRAIN_FRACTION = 0.9
SENSOR_HW = {'dvs128_gesture': (128, 128), 'cifar10_dvs': (128, 128), 'nmnist': (34, 34)}

Sample = tuple[str, events_lib.Events, int]  # (origin, events, label)


def gesture_samples(raw_dir, split: str) -> Iterator[Sample]:
  raw_dir = sources.require_dir(raw_dir, 'DVS128 Gesture raw_dir')
  trials = raw_dir / f'trials_to_{split}.txt'
  if not trials.is_file():
    raise sources.DataError(f'{trials} does not exist; expected the official split files '
                            'trials_to_train.txt / trials_to_test.txt in the DvsGesture folder.')
  for name in trials.read_text().split():
    recording = raw_dir / name
    labels = events_lib.read_gesture_labels(recording.with_name(recording.stem + '_labels.csv'))
    for k, (ev, label) in enumerate(events_lib.split_gesture_trial(events_lib.read_aedat31(recording), labels)):
      yield f'{name}#{k}', ev, label


def cifar10_dvs_files(raw_dir, split: str) -> list[tuple[pathlib.Path, int]]:
  raw_dir = sources.require_dir(raw_dir, 'CIFAR10-DVS raw_dir')
  chosen = []
  for label, cls in enumerate(CIFAR10_CLASSES):
    files = sorted((sources.require_dir(raw_dir / cls, f'CIFAR10-DVS class {cls!r}')).glob('*.aedat'),
                   key=lambda p: p.name)
    if not files:
      raise sources.DataError(f'{raw_dir / cls}: no .aedat recordings found.')
    cut = math.ceil(len(files) * CIFAR10_DVS_TRAIN_FRACTION)
    chosen.extend((path, label) for path in (files[:cut] if split == 'train' else files[cut:]))
  return chosen


def cifar10_dvs_samples(raw_dir, split: str) -> Iterator[Sample]:
  for path, label in cifar10_dvs_files(raw_dir, split):
    yield path.name, events_lib.read_cifar10_dvs(path), label


def nmnist_samples(raw_dir, split: str) -> Iterator[Sample]:
  listing = sources.NmnistBinSource(raw_dir, split, num_frames=1)
  for path, label in zip(listing.files, listing.labels):
    yield path, events_lib.read_nmnist_bin(path), label


SAMPLES = {'dvs128_gesture': gesture_samples, 'cifar10_dvs': cifar10_dvs_samples, 'nmnist': nmnist_samples}


def write_split(samples, folder: pathlib.Path, num_frames: int, hw, split_by: str,
                shard_size: int) -> dict:
  """Integrates and writes one split; returns the index it saved."""
  folder.mkdir(parents=True, exist_ok=True)
  shards, buffer = [], []

  def flush():
    name = f'shard-{len(shards):05d}.npz'
    np.savez_compressed(folder / name, labels=np.asarray([b[2] for b in buffer], np.int64),
                        **{f'frames_{j}': b[1] for j, b in enumerate(buffer)})
    shards.append({'file': name, 'count': len(buffer), 'labels': [b[2] for b in buffer],
                   'origins': [b[0] for b in buffer]})
    buffer.clear()

  for origin, ev, label in samples:
    counts = frames_lib.integrate(ev, num_frames, *hw, split_by)
    if counts.max(initial=0) > np.iinfo(np.uint16).max:
      raise sources.DataError(f'{origin}: a pixel collects {int(counts.max())} events in one frame, more '
                              'than the uint16 frame files hold; use a larger T.')
    buffer.append((origin, counts.astype(np.uint16), int(label)))
    if len(buffer) == shard_size:
      flush()
  if buffer:
    flush()
  index = {'T': num_frames, 'height': hw[0], 'width': hw[1], 'split_by': split_by, 'shards': shards,
           'num_examples': sum(s['count'] for s in shards)}
  (folder / sources.INDEX_FILE).write_text(json.dumps(index))
  return index


def prepare(dataset: str, raw_dir, out_dir, num_frames: int, split_by: str = 'number',
            shard_size: int = 256, splits=('train', 'test')) -> dict:
  if dataset not in SAMPLES:
    raise ValueError(f'--dataset={dataset!r}: expected one of {sorted(SAMPLES)}.')
  if split_by not in frames_lib.SPLIT_MODES:
    raise ValueError(f'--split_by={split_by!r}: expected one of {frames_lib.SPLIT_MODES}.')
  counts = {}
  for split in splits:
    folder = sources.prepared_dir(out_dir, split, num_frames, split_by)
    index = write_split(SAMPLES[dataset](raw_dir, split), folder, num_frames, SENSOR_HW[dataset],
                        split_by, shard_size)
    counts[split] = index['num_examples']
    print(f'{dataset} {split}: {counts[split]} examples -> {folder}', flush=True)
  return counts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', required=True, choices=sorted(SAMPLES))
  parser.add_argument('--raw_dir', required=True)
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--T', type=int, default=16, help='frames per example')
  parser.add_argument('--split_by', default='number', choices=frames_lib.SPLIT_MODES)
  parser.add_argument('--shard_size', type=int, default=256)
  args = parser.parse_args(argv)
  prepare(args.dataset, args.raw_dir, args.out_dir, args.T, args.split_by, args.shard_size)


if __name__ == '__main__':
  main(sys.argv[1:])
