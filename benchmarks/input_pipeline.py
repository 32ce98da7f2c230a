"""Input-pipeline throughput: augmented training images per second through the grain loader.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--seconds=10] [--workers=1,2]

CIFAR-sized: ../shared/data/cifar10 with the reference's CIFAR transform (RandAugment
rand-m9-n1-mstd0.4-inc1, flip, random erasing, normalisation). ImageNet-sized:
../shared/data/imagenet_sample (224x224) with the ImageNet transform (centre square -> 224
bicubic, rand-m9-mstd0.5-inc1, flip, random erasing, normalisation); the 50 images repeat.
Writes benchmarks/results/input_pipeline.md.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from spikingformer_jax import configs, paths
from spikingformer_jax.data import pipeline

RESULTS = pathlib.Path(__file__).resolve().parent / 'results' / 'input_pipeline.md'


def cpu_model() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def imagenet_as_npz(folder: pathlib.Path) -> pathlib.Path:
  """The ImageNet sample as an npz train split (the generic source) with the ImageNet preset."""
  with np.load(paths.shared_data_dir('imagenet_sample', 'sample224.npz')) as f:
    np.savez(folder / 'train.npz', images=f['images'], labels=f['labels'])
  return folder


def measure(data_cfg, batch_size: int, seconds: float) -> float:
  loader = pipeline.make_loader(data_cfg, 'train', batch_size=batch_size, train=True, seed=0, num_epochs=None)
  it = iter(loader)
  next(it)  # start-up (worker spawn, first reads) is not throughput
  images, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    images += next(it)['image'].shape[0]
  return images / (time.perf_counter() - start)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--workers', default='1,2')
  args = parser.parse_args(argv)
  tmp = pathlib.Path(tempfile.mkdtemp())
  cases = [('CIFAR-10 32x32', 'cifar10_sample', '', {}, 64),
           ('ImageNet 224x224', 'npz', str(imagenet_as_npz(tmp)), pipeline.IMAGENET_AUGMENT, 32)]
  rows = []
  try:
    for label, name, data_dir, preset, batch in cases:
      for workers in (int(w) for w in args.workers.split(',')):
        cfg = configs.base_config().data
        cfg.name, cfg.data_dir, cfg.num_workers, cfg.prefetch = name, data_dir, workers, 2
        for key, value in preset.items():
          cfg.augment[key] = value
        rate = measure(cfg, batch, args.seconds)
        rows.append((label, workers, batch, rate))
        print(f'{label}: {workers} worker(s), batch {batch}: {rate:,.0f} images/s', flush=True)
  finally:
    shutil.rmtree(tmp)
  table = ['| images | workers | batch | images/s |', '| --- | --- | --- | --- |']
  table += [f'| {label} | {workers} | {batch} | {rate:,.0f} |' for label, workers, batch, rate in rows]
  command = 'PYTHONPATH=. python benchmarks/input_pipeline.py ' + ' '.join(argv)
  machine = f'nproc={os.cpu_count()}, CPU: {cpu_model()}, Python {platform.python_version()}'
  text = '\n'.join([
      '# Input pipeline throughput (training transform, grain IterDataset)', '',
      *table, '',
      f'Command: `{command.strip()}`', '',
      f'Machine: {machine}', '',
      'Each figure: images/s over a timed window after the first batch; augmentation as the reference '
      '(CIFAR: rand-m9-n1-mstd0.4-inc1, flip 0.5, random erasing 0.25; ImageNet: centre square -> 224 '
      'bicubic, rand-m9-mstd0.5-inc1, flip 0.5, random erasing 0.25), normalised float32 output.', ''])
  print('\n' + '\n'.join(table))
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(text)


if __name__ == '__main__':
  main(sys.argv[1:])
