"""Dataset registry and grain loaders: name -> source, augmentation settings, sharded batches.

Augmentation settings come from the dataset's preset, overridden by any key set in
`config.data.augment` (keys: enabled, randaug, hflip, reprob, image_size, crop_pct, mean, std,
interpolation, snn_augment; see README.md). Randomness comes from grain's per-record rng, which is
derived from the loader seed and the record's position in the global stream (batching.py), so batches
depend on neither the worker nor the process count.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import grain
import numpy as np
from PIL import Image, ImageOps

from spikingformer_jax import paths
from spikingformer_jax.data import augment as aug_lib
from spikingformer_jax.data import batching
from spikingformer_jax.data import sources

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ImageAugment:
  enabled: bool = True
  image_size: int = 0  # 0: keep the stored size; else train: centre square -> size, eval: resize + crop
  crop_pct: float = 1.0
  randaug: str = ''  # timm string, '' = off
  hflip: float = 0.0
  reprob: float = 0.0
  mean: tuple = (0.0,)
  std: tuple = (1.0,)
  pixel_max: float = 255.0  # images are divided by this before mean/std
  interpolation: str = 'bicubic'


@dataclasses.dataclass(frozen=True)
class EventAugment:
  enabled: bool = True
  hflip: float = 0.0
  snn_augment: bool = False


CIFAR_AUGMENT = dict(randaug='rand-m9-n1-mstd0.4-inc1', hflip=0.5, reprob=0.25, mean=CIFAR_MEAN, std=CIFAR_STD)
IMAGENET_AUGMENT = dict(image_size=224, randaug='rand-m9-mstd0.5-inc1', hflip=0.5, reprob=0.25,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
DIGITS_AUGMENT = dict(pixel_max=16.0)  # [0, 1] floats; digits are not mirror-symmetric: no flips.
DVS_AUGMENT = dict(hflip=0.5, snn_augment=True)
NMNIST_AUGMENT = dict()  # the reference trains nothing on N-MNIST; no geometric augmentation.


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  kind: str  # 'image' | 'events'
  num_classes: int | None
  augment: dict
  open: Callable[[Any, str], Any]  # (data_cfg, split) -> source
  split_aliases: dict = dataclasses.field(default_factory=dict)


def _T(cfg) -> int:
  return int(cfg.get('T', 16))


def _split_by(cfg) -> str:
  return cfg.get('split_by', 'number')


def _tfds(name, num_classes):
  return lambda cfg, split: sources.TfdsSource(name, split, cfg.data_dir, num_classes)


def _prepared(name, num_classes):
  return lambda cfg, split: sources.PreparedFramesSource(
      cfg.data_dir, split, _T(cfg), num_classes, _split_by(cfg), dataset=name)


def _nmnist(cfg, split):
  if (sources.prepared_dir(cfg.data_dir, split, _T(cfg), _split_by(cfg)) / sources.INDEX_FILE).is_file():
    return sources.PreparedFramesSource(cfg.data_dir, split, _T(cfg), 10, _split_by(cfg), 'nmnist')
  return sources.NmnistBinSource(cfg.data_dir, split, _T(cfg), _split_by(cfg))


def _nmnist_sample(cfg, split):
  folder = pathlib.Path(cfg.data_dir or paths.shared_data_dir('nmnist'))
  return sources.PackedEventsSource(folder / f'{split}.npz', _T(cfg), (34, 34), 10, _split_by(cfg))


def _npz(num_classes, default_dir=None):
  def open_npz(cfg, split):
    data_dir = cfg.data_dir or (default_dir() if default_dir else '')
    if not data_dir:
      raise sources.DataError('config.data.data_dir is empty: the npz source needs a folder with '
                              '<split>.npz files.')
    return sources.load_npz_images(data_dir, split, num_classes or cfg.get('num_classes', 0) or None)
  return open_npz


DATASETS = {
    'digits': DatasetSpec('image', 10, DIGITS_AUGMENT, lambda cfg, split: sources.load_digits_split(split)),
    'npz': DatasetSpec('image', None, CIFAR_AUGMENT, _npz(None)),
    'cifar10_sample': DatasetSpec('image', 10, CIFAR_AUGMENT, _npz(10, lambda: paths.shared_data_dir('cifar10'))),
    'cifar10': DatasetSpec('image', 10, CIFAR_AUGMENT, _tfds('cifar10', 10)),
    'cifar100': DatasetSpec('image', 100, CIFAR_AUGMENT, _tfds('cifar100', 100)),
    'imagenet2012': DatasetSpec('image', 1000, IMAGENET_AUGMENT, _tfds('imagenet2012', 1000),
                                split_aliases={'test': 'validation'}),  # tfds' test split is unlabelled
    'nmnist': DatasetSpec('events', 10, NMNIST_AUGMENT, _nmnist),
    'nmnist_sample': DatasetSpec('events', 10, NMNIST_AUGMENT, _nmnist_sample),
    'dvs128_gesture': DatasetSpec('events', 11, DVS_AUGMENT, _prepared('dvs128_gesture', 11)),
    'cifar10_dvs': DatasetSpec('events', 10, DVS_AUGMENT, _prepared('cifar10_dvs', 10)),
}


def get_spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise ValueError(f'config.data.name = {name!r}: unknown dataset; expected one of {sorted(DATASETS)}.')
  return DATASETS[name]


def open_source(data_cfg, split: str):
  spec = get_spec(data_cfg.name)
  return spec.open(data_cfg, spec.split_aliases.get(split, split))


def open_split(data_cfg, split: str, max_examples: int = -1):
  """(records, source): the split's source and its records as a grain MapDataset, the first `max_examples`
  when positive (their labels, where the source has them: `source.labels[:len(records)]`)."""
  source = open_source(data_cfg, split)
  return batching.records(source, max_examples), source


def augment_settings(data_cfg):
  """The preset of the dataset, overridden by config.data.augment; unknown keys are errors."""
  spec = get_spec(data_cfg.name)
  cls = ImageAugment if spec.kind == 'image' else EventAugment
  known = {f.name for f in dataclasses.fields(cls)}
  overrides = data_cfg.get('augment', None) or {}
  overrides = overrides.to_dict() if hasattr(overrides, 'to_dict') else dict(overrides)
  unknown = set(overrides) - known
  if unknown:
    raise ValueError(f'config.data.augment has keys {sorted(unknown)} that {data_cfg.name!r} ({spec.kind}) '
                     f'does not use; known: {sorted(known)}.')
  values = {**spec.augment, **overrides}
  return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class ImagePreprocess(grain.transforms.RandomMap):
  """uint8 image -> normalised float32 [H, W, C] (timm's train or eval transform)."""

  def __init__(self, settings: ImageAugment, train: bool):
    self.settings, self.train = settings, train
    self.randaug = aug_lib.parse_randaug(settings.randaug) if settings.randaug else None
    self.interpolation = aug_lib.INTERPOLATIONS[settings.interpolation]
    self.fill = tuple(min(255, round(255 * m)) for m in np.broadcast_to(settings.mean, (3,)))

  def random_map(self, element, rng: np.random.Generator):
    s = self.settings
    image = element['image']
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    augment = self.train and s.enabled
    if s.image_size:
      img = (aug_lib.center_square_resize(img, s.image_size, self.interpolation) if self.train else
             aug_lib.resize_center_crop(img, s.image_size, s.crop_pct, self.interpolation))
    if augment and s.hflip and rng.random() < s.hflip:
      img = ImageOps.mirror(img)
    if augment and self.randaug:
      img = aug_lib.rand_augment(img, rng, self.randaug, self.interpolation, self.fill)
    x = np.asarray(img).reshape(img.size[1], img.size[0], -1)
    x = aug_lib.normalize(x, s.mean, s.std, s.pixel_max)
    if augment and s.reprob:
      x = aug_lib.random_erasing(x, rng, s.reprob)
    return _output(element, x)


class FramesPreprocess(grain.transforms.RandomMap):
  """Event frames [T, H, W, 2] float32 counts; train: flip, then SNNAugmentWide on all T frames."""

  def __init__(self, settings: EventAugment, train: bool):
    self.settings, self.train = settings, train

  def random_map(self, element, rng: np.random.Generator):
    s = self.settings
    x = np.asarray(element['image'], np.float32)
    if self.train and s.enabled:
      if s.hflip and rng.random() < s.hflip:
        x = aug_lib.hflip(x)
      if s.snn_augment:
        x = aug_lib.snn_augment_wide(x, rng)
    return _output(element, np.ascontiguousarray(x, np.float32))


def _output(element, image):
  out = {'image': image, 'label': np.int32(element['label'])}
  if 'mask' in element:
    out['mask'] = np.float32(element['mask'])
  return out


def preprocess_for(data_cfg, train: bool):
  settings = augment_settings(data_cfg)
  return (ImagePreprocess if isinstance(settings, ImageAugment) else FramesPreprocess)(settings, train)


def make_loader(data_cfg, split: str, *, batch_size: int, train: bool, seed: int,
                process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
  """A grain IterDataset of per-process batches (see spikingformer_jax.data.make_loader)."""
  max_examples = data_cfg.get('max_train_examples' if train else 'max_eval_examples', -1)
  ds, _ = open_split(data_cfg, split, max_examples)
  if len(ds) < (batch_size if train else 1):
    raise sources.DataError(f'{data_cfg.name}[{split}] has {len(ds)} examples: too few for '
                            f'{f"one batch of {batch_size}" if train else "an evaluation"}.')
  ds = batching.epochs(ds, train=train, seed=seed, num_epochs=num_epochs, batch_size=batch_size)
  ds = ds.random_map(preprocess_for(data_cfg, train), seed=seed)
  ds = batching.process_batches(ds, batch_size=batch_size, process_index=process_index, process_count=process_count)
  return batching.iterate(ds, data_cfg)


def example_shape(data_cfg, source) -> tuple:
  settings = augment_settings(data_cfg)
  shape = tuple(np.shape(source[0]['image']))
  if isinstance(settings, ImageAugment) and settings.image_size:
    return (settings.image_size, settings.image_size, shape[-1])
  return shape
