"""Random-access data sources (grain's `__len__` / `__getitem__` protocol) that validate what they read.

Every source yields dicts `{'image': array, 'label': int}`: uint8 `[H, W, C]` images, or float32
`[T, H, W, 2]` event-count frames. Bad input raises `DataError` naming the file and the expectation.
"""
from __future__ import annotations

import json
import os
import pathlib
import zipfile

import numpy as np

from spikingformer_jax.data import events as events_lib
from spikingformer_jax.data import frames as frames_lib


class DataError(ValueError):
  """A dataset file or directory does not hold what the source expects."""


def require_dir(path, what: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise DataError(f'{what}: directory {path} does not exist.')
  return path


def check_labels(labels, num_classes: int | None, origin) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{origin}: labels have shape {labels.shape} and dtype {labels.dtype}; expected a 1-D '
                    'integer array.')
  if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
    bad = int(np.flatnonzero((labels < 0) | (labels >= (num_classes or np.inf)))[0])
    raise DataError(f'{origin}: label {labels[bad]} (example {bad}) is out of range; expected 0..'
                    f'{"" if num_classes is None else num_classes - 1}.')
  return labels.astype(np.int64)


def check_image(image, origin, channels=(1, 3), shape=None) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] not in channels or image.dtype != np.uint8:
    raise DataError(f'{origin}: image of shape {image.shape} and dtype {image.dtype}; expected uint8 '
                    f'[H, W, C] with C in {channels}.')
  if shape is not None and image.shape != tuple(shape):
    raise DataError(f'{origin}: image of shape {image.shape}; expected {tuple(shape)}.')
  return image


class ArraySource:
  """In-memory uint8 images [N, H, W, C] with integer labels."""

  def __init__(self, images, labels, num_classes: int | None, origin: str):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
      raise DataError(f'{origin}: images have shape {images.shape} and dtype {images.dtype}; expected '
                      'uint8 [N, H, W, C] with C = 1 or 3.')
    self.labels = check_labels(labels, num_classes, origin)
    if len(self.labels) != len(images):
      raise DataError(f'{origin}: {len(images)} images but {len(self.labels)} labels.')
    self.images = images
    self.origin = origin

  def __repr__(self):
    return f'ArraySource({self.origin!r}, examples={len(self)})'

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {'image': self.images[index], 'label': int(self.labels[index])}


def load_npz_images(data_dir, split: str, num_classes: int | None) -> ArraySource:
  """`<data_dir>/<split>.npz` with keys images/labels (or x/y)."""
  path = require_dir(data_dir, 'npz image source') / f'{split}.npz'
  if not path.is_file():
    raise DataError(f'npz image source: {path} does not exist (expected <data_dir>/<split>.npz with '
                    'keys images/labels or x/y).')
  try:
    with np.load(path, allow_pickle=False) as f:
      keys = ('images', 'labels') if 'images' in f.files else ('x', 'y')
      if not set(keys) <= set(f.files):
        raise DataError(f'{path}: has keys {f.files}; expected images/labels or x/y.')
      images, labels = f[keys[0]], f[keys[1]]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f'{path}: not a readable .npz file ({e}).') from e
  return ArraySource(images, labels, num_classes, str(path))


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits_split(split: str) -> ArraySource:
  """scikit-learn's 1,797 8x8 digits as uint8 0..16 [N, 8, 8, 1]; a fixed stratified 80/20 split."""
  from sklearn import datasets, model_selection  # pylint: disable=import-outside-toplevel
  digits = datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]
  train, test = model_selection.train_test_split(
      np.arange(len(images)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED,
      stratify=digits.target)
  if split not in ('train', 'test'):
    raise DataError(f'digits: unknown split {split!r}; expected "train" or "test".')
  index = np.sort(train if split == 'train' else test)
  return ArraySource(images[index], digits.target[index], 10, f'sklearn load_digits[{split}]')


class TfdsSource:
  """`tfds.data_source` (ArrayRecord, random access, no TensorFlow) over a prepared TFDS dataset."""

  def __init__(self, name: str, split: str, data_dir: str | None, num_classes: int):
    self.name, self.split, self.data_dir, self.num_classes = name, split, data_dir or None, num_classes
    self._source = None
    len(self)  # open now, so a missing dataset fails at construction

  def __repr__(self):
    return f'TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})'

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      try:
        self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                        download=False)
      except Exception as e:  # tfds raises assorted types for "not prepared"
        raise DataError(
            f'tfds dataset {self.name!r} split {self.split!r} is not readable under data_dir='
            f'{self.data_dir or "~/tensorflow_datasets"} ({type(e).__name__}: {e}). Prepare it once with '
            f'`tfds build {self.name} --data_dir=<dir>` (see spikingformer_jax/data/README.md).') from e
    return self._source

  def __len__(self):
    return len(self._open())

  def __getitem__(self, index):
    record = self._open()[index]
    origin = f'tfds {self.name}[{self.split}] record {index}'
    label = int(record['label'])
    if not 0 <= label < self.num_classes:
      raise DataError(f'{origin}: label {label} is out of range; expected 0..{self.num_classes - 1}.')
    return {'image': check_image(record['image'], origin, channels=(3,)), 'label': label}

  def __getstate__(self):
    return {**self.__dict__, '_source': None}


class NmnistBinSource:
  """Raw N-MNIST: `<data_dir>/<Train|Test>/<digit>/*.bin`, integrated into frames on access."""

  def __init__(self, data_dir, split: str, num_frames: int, split_by: str = 'number'):
    folder = {'train': 'Train', 'test': 'Test'}.get(split, split)
    root = require_dir(pathlib.Path(data_dir) / folder, f'N-MNIST raw split {split!r}')
    self.files, self.labels = [], []
    for digit_dir in sorted(p for p in root.iterdir() if p.is_dir()):
      if not digit_dir.name.isdigit() or not 0 <= int(digit_dir.name) <= 9:
        raise DataError(f'{digit_dir}: expected digit folders 0..9 under {root}.')
      for path in sorted(digit_dir.glob('*.bin')):
        self.files.append(str(path))
        self.labels.append(int(digit_dir.name))
    if not self.files:
      raise DataError(f'{root}: no <digit>/*.bin recordings found.')
    self.num_frames, self.split_by, self.root = num_frames, split_by, root

  def __repr__(self):
    return f'NmnistBinSource({str(self.root)!r}, T={self.num_frames}, split_by={self.split_by!r})'

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index):
    ev = events_lib.read_nmnist_bin(self.files[index])
    return {'image': frames_lib.integrate(ev, self.num_frames, 34, 34, self.split_by),
            'label': self.labels[index]}


class PackedEventsSource:
  """Events of many samples concatenated (the staged N-MNIST npz): t, x, y, p, offsets, labels."""

  def __init__(self, path, num_frames: int, sensor_hw, num_classes: int, split_by: str = 'number'):
    path = pathlib.Path(path)
    if not path.is_file():
      raise DataError(f'packed events: {path} does not exist.')
    with np.load(path, allow_pickle=False) as f:
      missing = {'t', 'x', 'y', 'p', 'offsets', 'labels'} - set(f.files)
      if missing:
        raise DataError(f'{path}: missing keys {sorted(missing)}; expected t, x, y, p, offsets, labels.')
      self.t, self.x, self.y, self.p = (f[k] for k in ('t', 'x', 'y', 'p'))
      self.offsets = f['offsets'].astype(np.int64)
      self.labels = check_labels(f['labels'], num_classes, str(path))
    if (len(self.offsets) != len(self.labels) + 1 or self.offsets[0] != 0
        or self.offsets[-1] != len(self.t) or np.any(np.diff(self.offsets) < 0)):
      raise DataError(f'{path}: offsets must rise from 0 to the event count {len(self.t)} with one entry '
                      f'per sample plus one ({len(self.labels) + 1}); got {len(self.offsets)} entries.')
    self.num_frames, self.hw, self.split_by, self.origin = num_frames, tuple(sensor_hw), split_by, str(path)

  def __repr__(self):
    return f'PackedEventsSource({self.origin!r}, T={self.num_frames}, split_by={self.split_by!r})'

  def __len__(self):
    return len(self.labels)

  def events(self, index) -> events_lib.Events:
    s = slice(self.offsets[index], self.offsets[index + 1])
    return events_lib.Events(self.t[s].astype(np.int64), self.x[s].astype(np.int32),
                             self.y[s].astype(np.int32), self.p[s].astype(np.uint8))

  def __getitem__(self, index):
    return {'image': frames_lib.integrate(self.events(index), self.num_frames, *self.hw, self.split_by),
            'label': int(self.labels[index])}


def prepared_dir(root, split: str, num_frames: int, split_by: str = 'number') -> pathlib.Path:
  return pathlib.Path(root) / f'{split}-T{num_frames}-{split_by}'


INDEX_FILE = 'index.json'


class PreparedFramesSource:
  """Frames written by `python -m spikingformer_jax.data.prepare`: npz shards + index.json.

  Each shard holds `frames_<j>` (uint16 counts [T, H, W, 2], compressed) and `labels`; npz members
  load individually, so reading one example decompresses one example.
  """

  def __init__(self, root, split: str, num_frames: int, num_classes: int, split_by: str = 'number',
               dataset: str = ''):
    folder = prepared_dir(root, split, num_frames, split_by)
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
      raise DataError(
          f'{index_path} does not exist: prepared frames for split {split!r}, T={num_frames}, '
          f'split_by={split_by!r} are missing. Create them once with `python -m '
          f'spikingformer_jax.data.prepare --dataset={dataset or "<name>"} --raw_dir=<raw> '
          f'--out_dir={root} --T={num_frames}`.')
    index = json.loads(index_path.read_text())
    self.shape = (num_frames, index['height'], index['width'], 2)
    self.shards, self.starts, labels = [], [0], []
    for shard in index['shards']:
      self.shards.append(str(folder / shard['file']))
      self.starts.append(self.starts[-1] + shard['count'])
      labels.extend(shard['labels'])
    self.labels = check_labels(np.asarray(labels, np.int64), num_classes, str(index_path))
    if len(self.labels) != self.starts[-1]:
      raise DataError(f'{index_path}: shard counts sum to {self.starts[-1]} but {len(self.labels)} labels.')
    self._open = {}
    self.folder = folder

  def __repr__(self):
    return f'PreparedFramesSource({str(self.folder)!r}, examples={len(self)})'

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, index):
    shard = int(np.searchsorted(self.starts, index, side='right')) - 1
    path = self.shards[shard]
    key = f'frames_{index - self.starts[shard]}'
    if not os.path.isfile(path):
      raise DataError(f'{path}: prepared shard is missing.')
    try:
      if path not in self._open:
        self._open[path] = np.load(path, allow_pickle=False)
      frames = self._open[path][key]
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise DataError(f'{path}: cannot read {key} ({e}); the shard is truncated or was not written by '
                      'spikingformer_jax.data.prepare.') from e
    if frames.shape != self.shape:
      raise DataError(f'{path}: {key} has shape {frames.shape}; expected {self.shape}.')
    return {'image': frames.astype(np.float32), 'label': int(self.labels[index])}

  def __getstate__(self):
    return {**self.__dict__, '_open': {}}
