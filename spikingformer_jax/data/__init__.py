"""Input pipelines: image and event-camera datasets by name, as grain loaders of numpy batches.

The trainer calls `dataset_info(config.data)` and `make_loader(config.data, split, ...)`; see
README.md in this folder for the dataset names, how to prepare each one, and the augment keys.
"""
from __future__ import annotations

import dataclasses

from spikingformer_jax.data import pipeline
from spikingformer_jax.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the tasks and the trainer know of a dataset before reading a batch; this pipeline's and the text
  pipeline's (`text.data.dataset_info`)."""
  num_classes: int  # 1 for regression; the vocabulary size for MLM
  example_shape: tuple  # one example, channels-last: (H, W, C) images or (T, H, W, 2) event frames; () text
  num_train: int
  num_eval: int
  vocab_size: int = 0  # text: the tokenizer's vocabulary
  task: str = 'classification'  # 'classification' | 'regression' | 'mlm'


def dataset_info(data_cfg) -> DatasetInfo:
  """Class count, example shape and split sizes (after max_*_examples) of config.data's dataset."""
  train, train_source = pipeline.open_split(data_cfg, data_cfg.train_split, data_cfg.get('max_train_examples', -1))
  evaluation, eval_source = pipeline.open_split(data_cfg, data_cfg.eval_split, data_cfg.get('max_eval_examples', -1))
  num_classes = pipeline.get_spec(data_cfg.name).num_classes
  if num_classes is None:  # the generic npz source: config.data.num_classes, else inferred
    num_classes = data_cfg.get('num_classes', None) or int(max(train_source.labels[:len(train)].max(),
                                                                eval_source.labels[:len(evaluation)].max())) + 1
  shapes = {split: pipeline.example_shape(data_cfg, source) for split, source in
            ((data_cfg.train_split, train), (data_cfg.eval_split, evaluation))}
  if len(set(shapes.values())) > 1:
    raise DataError(f'Dataset {data_cfg.name!r}: the {data_cfg.train_split!r} examples are shaped '
                    f'{shapes[data_cfg.train_split]} but the {data_cfg.eval_split!r} ones '
                    f'{shapes[data_cfg.eval_split]}; a model takes one shape (set data.augment.image_size to resize '
                    'both).')
  return DatasetInfo(num_classes=num_classes, example_shape=shapes[data_cfg.train_split],
                     num_train=len(train), num_eval=len(evaluation))


def make_loader(data_cfg, split: str, *, batch_size: int, train: bool, seed: int,
                process_index: int = 0, process_count: int = 1, num_epochs: int | None = None):
  """A grain IterDataset of this process's rows of every global batch of `split`.

  Batches: dict(image=float32 [b, *example_shape] (normalised images; raw counts for event frames),
  label=int32 [b]) with b = batch_size // process_count: rows [i*b, (i+1)*b) of the global batch for
  process i, so the global batches (augmentations included) do not depend on the process count. Train: shuffled with `seed` (reshuffled
  every epoch), augmented, remainder dropped, `num_epochs` passes (None: endless). Eval: one pass,
  no augmentation, padded to whole batches on every process, with mask=float32 [b] (1 = real).
  `iter(loader)` has get_state()/set_state() for exact resumption.
  """
  return pipeline.make_loader(data_cfg, split, batch_size=batch_size, train=train, seed=seed,
                              process_index=process_index, process_count=process_count,
                              num_epochs=num_epochs)
