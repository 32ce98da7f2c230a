"""What the benchmark configs share: the `key=value,flag` argument string, model names, runlocal.

A config is selected as `--config=experiments/<benchmark>.py:<args>`, e.g.
`experiments/imagenet.py:variant=8-768,family=spikformer` or `experiments/cifar10.py:runlocal`.
`parse_args` types every value like its default and rejects unknown keys, so a typo in the
argument string fails before anything is built.

`runlocal` shrinks any vision config for a CPU run of a minute or two (`shrink_for_cpu`): one
block of width 32, a few dozen steps on a few hundred examples, and a real data sample where the
project has one (see each config's docstring for what it points at). `cpu` (CIFAR-10, ImageNet,
N-MNIST) cuts the recipe to a wall-time budget on the real sample, evaluated on its held-out split
(`cpu_budget`).
"""
from __future__ import annotations

import os
import pathlib
import tempfile

import ml_collections
import numpy as np

from spikingformer_jax import paths, registry

FAMILIES = ('spikingformer', 'spikingformer-cml', 'spikformer')


def parse_args(arg: str, **defaults) -> ml_collections.ConfigDict:
  """'variant=8-768,T=4,runlocal' -> ConfigDict typed like `defaults`; bare words are True flags.

  Every benchmark also accepts `runlocal` (default False). Unknown keys and values that do not fit
  the default's type raise ValueError naming the key.
  """
  defaults = dict(defaults)
  defaults.setdefault('runlocal', False)
  values = dict(defaults)
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    key, has_value, raw = part.partition('=')
    key, raw = key.strip(), raw.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}.')
    values[key] = _typed(key, raw if has_value else None, defaults[key])
  return ml_collections.ConfigDict(values)


def _typed(key: str, raw: str | None, default):
  if isinstance(default, bool):
    if raw is None or raw.lower() in ('1', 'true', 'yes'):
      return True
    if raw.lower() in ('0', 'false', 'no'):
      return False
    raise ValueError(f'Config argument {key}={raw!r}: expected a boolean (true/false).')
  if raw is None:
    raise ValueError(f'Config argument {key!r} needs a value ({key}=...).')
  try:
    return type(default)(raw)
  except ValueError:
    raise ValueError(f'Config argument {key}={raw!r}: expected {type(default).__name__}.') from None


def text_lr_from_scratch(variant: str) -> float:
  """AdamW's peak rate for Spikingformer-Text trained from random weights (GLUE from scratch, MLM pretraining).

  The tiny model (2 x 64): 2e-3, measured on sentence-level SST-2 (1e-4, a BERT fine-tuning rate, leaves it
  near the majority rate). Widths of 256 and more: the vision recipe's 5e-4.
  """
  return 2e-3 if variant == 'tiny' else 5e-4


def model_name(family: str, tag: str, variant: str) -> str:
  """('spikformer', 'cifar', '4-384') -> 'spikformer-cifar-4-384', checked against the registry."""
  if family not in FAMILIES:
    raise ValueError(f'family={family!r}: expected one of {FAMILIES}.')
  name = '-'.join(p for p in (family, tag, variant) if p)
  if name not in registry.MODELS:
    prefix = '-'.join(p for p in (family, tag) if p) + '-'
    sizes = sorted(n[len(prefix):] for n in registry.MODELS if n.startswith(prefix) and
                   n[len(prefix):].replace('-', '').isdigit())
    raise ValueError(f'variant={variant!r}: {name!r} is not a registered model; sizes for {family!r}: {sizes}.')
  return name


def embed_dim(variant: str) -> int:
  return int(variant.split('-')[1])


def shrink_for_cpu(c: ml_collections.ConfigDict, *, steps: int = 20, batch: int = 8, train_examples: int = 256,
                   eval_examples: int = 64) -> ml_collections.ConfigDict:
  """The runlocal overrides shared by the vision configs: a 1-block, 32-wide model and a few steps.

  No warmup (there are only a few steps); the cosine spans about the run. Mixup, augmentation and
  label smoothing stay as in the recipe, so the smoke run exercises the same code paths.
  """
  c.model.overrides.depth = 1
  c.model.overrides.embed_dim = 32
  c.model.overrides.num_heads = 2
  c.model.dtype = 'float32'
  c.batch_size = batch
  c.eval_batch_size = 2 * batch
  c.data.max_train_examples = train_examples
  c.data.max_eval_examples = eval_examples
  c.total_steps = steps
  c.num_epochs = max(1, steps * batch // train_examples)
  c.optim.warmup_epochs = 0
  c.log_every_steps = max(1, steps // 4)
  c.checkpoint.every_steps = steps
  c.checkpoint.async_save = False
  c.progress_bar = False
  return c


def cpu_budget(c: ml_collections.ConfigDict, *, minutes: float, batch: int) -> ml_collections.ConfigDict:
  """The `cpu` overrides shared by the vision configs: the recipe cut to `minutes` of wall time on a CPU.

  AdamW with the recipe's cosine from its peak rate to its min_lr, spread over the wall-time budget
  (`time_budget_minutes`: the clock ends the run, and the trainer reads the schedule at the fraction of the
  budget spent), no warmup; the recipe's weight decay and label smoothing, horizontal flips as the only
  augmentation (no RandAugment, random erasing, SNN augmentation or mixup), the sparse spike kernels
  (one CPU device), and one evaluation, at the end.
  """
  c.batch_size = batch
  c.time_budget_minutes = minutes
  c.num_epochs = 10_000  # an upper bound: the clock ends the run (and the schedule, spread over its budget)
  c.total_steps = -1
  c.eval_every_epochs = c.num_epochs
  c.optim.warmup_epochs = 0.0
  c.optim.cooldown_epochs = 0
  c.optim.per_epoch_schedule = False
  if 'snn_augment' in c.data.augment:  # event frames
    c.data.augment.snn_augment = False
  else:
    c.data.augment.randaug = ''
    c.data.augment.reprob = 0.0
  c.mixup.mixup_alpha = c.mixup.cutmix_alpha = 0.0
  c.model.spike_kernels = True
  c.log_every_steps = 50
  c.checkpoint.every_steps = 10**9  # saved at the end (and on preemption)
  return c


def split_sample_dir(sample_file: pathlib.Path, num_train: int) -> pathlib.Path | None:
  """A folder with `train.npz` = the first `num_train` images of an npz sample and `test.npz` = the rest.

  For the 'npz' source (`<data_dir>/<split>.npz`), written once to the temp directory. Returns None when
  the sample is absent.
  """
  if not sample_file.is_file():
    return None
  folder = pathlib.Path(tempfile.gettempdir()) / 'spikingformer-samples' / f'{sample_file.parent.name}-{num_train}'
  if (folder / 'test.npz').is_file():
    return folder
  with np.load(sample_file) as f:
    images, labels = f['images'], f['labels']
  folder.mkdir(parents=True, exist_ok=True)
  for split, part in (('train', slice(0, num_train)), ('test', slice(num_train, None))):
    tmp = folder / f'.{split}.{os.getpid()}.npz'
    np.savez(tmp, images=images[part], labels=labels[part])
    os.replace(tmp, folder / f'{split}.npz')  # atomic: concurrent runs never see a half-written file
  return folder


def staged_sample_dir(sample_file: pathlib.Path, splits=('train', 'test')) -> pathlib.Path | None:
  """A folder in which `<split>.npz` are symlinks to `sample_file` (the 'npz' source's layout).

  The shared ImageNet sample is one file (`sample224.npz`, read-only folder); the 'npz' source
  reads `<data_dir>/<split>.npz`, so runlocal gives it a folder of links in the temp directory.
  Returns None when the sample is absent. Train and test are then the same 50 images: a pipeline
  check, not an accuracy.
  """
  if not sample_file.is_file():
    return None
  folder = pathlib.Path(tempfile.gettempdir()) / 'spikingformer-samples' / sample_file.parent.name
  folder.mkdir(parents=True, exist_ok=True)
  for split in splits:
    link = folder / f'{split}.npz'
    if link.is_symlink() and os.readlink(link) == str(sample_file):
      continue
    tmp = folder / f'.{split}.{os.getpid()}.tmp'
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(sample_file)
    os.replace(tmp, link)  # atomic: concurrent runs never see a half-made link
  return folder


def shared_sample(*parts) -> pathlib.Path:
  return paths.shared_data_dir(*parts)
