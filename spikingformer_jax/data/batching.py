"""The one grain pipeline of every loader (images, event frames, text): records -> epochs -> this process's batches.

Everything before `iterate` is a lazy `grain.MapDataset`, indexed by global position: a random map
draws from the seed and the record's position in the global stream, and process p of P reads rows
[p*b, (p+1)*b) of every global batch of P*b records. So the global batches, augmentation included,
are the same for any process or worker count, and each process computes only its own rows. The
iterator's state is the next batch index, which grain's Orbax handler saves and restores exactly.
"""
from __future__ import annotations

import functools

import grain
import numpy as np


def records(source, max_examples: int = -1) -> grain.MapDataset:
  """A random-access source as a MapDataset; its first `max_examples` when that is positive."""
  ds = grain.MapDataset.source(source)
  return ds[:max_examples] if (max_examples or 0) > 0 else ds


def _masked(real: int, index: int, element: dict) -> dict:
  return dict(element, mask=np.float32(index < real))


def epochs(ds: grain.MapDataset, *, train: bool, seed: int, num_epochs: int | None,
           batch_size: int) -> grain.MapDataset:
  """The record stream. Train: shuffled anew every epoch (grain folds the epoch into the seed), `num_epochs`
  passes (None: endless). Eval: one ordered pass padded to whole global batches of `batch_size`, with
  mask 1.0 on the real records and 0.0 on the padding (the first records again), so that every
  process runs the same number of equally shaped batches and each real record counts once.
  """
  if train:
    return ds.shuffle(seed).repeat(num_epochs)
  total = -(-len(ds) // batch_size) * batch_size
  return ds.repeat(-(-total // len(ds)))[:total].map_with_index(functools.partial(_masked, len(ds)))


def process_batches(ds: grain.MapDataset, *, batch_size: int, process_index: int, process_count: int,
                    batch_fn=None) -> grain.MapDataset:
  """This process's batches: element g holds rows [p*b, (p+1)*b) of global batch g of `ds` (b = batch_size / P).

  Batches of b follow each other in the stream, so global batch g is per-process batches gP .. gP + P - 1
  and process p takes every P-th from p. An incomplete last global batch is dropped.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size = {batch_size} (global) is not divisible by process_count = {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index = {process_index} is not in [0, {process_count}).')
  whole = len(ds) // batch_size * process_count
  return ds.batch(batch_size // process_count, batch_fn=batch_fn)[:whole][process_index::process_count]


def _allow_worker_processes():
  """grain's mp_prefetch reads its absl flags; outside absl.app.run they must be marked parsed."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def iterate(ds: grain.MapDataset, data_cfg) -> grain.IterDataset:
  """Batches read ahead: `data.prefetch` of them by as many threads, or, with `data.num_workers` > 0, by each
  of that many worker processes."""
  prefetch = max(1, int(data_cfg.get('prefetch', 2)))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
  workers = int(data_cfg.get('num_workers', 0))
  if workers <= 0:
    return it
  _allow_worker_processes()
  return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
