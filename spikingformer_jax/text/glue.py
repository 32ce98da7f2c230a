"""Labelled text datasets: the GLUE tasks and single-sentence `label<TAB>text` corpora.

Each reader returns `Examples` (text_a, text_b or None, label) from either
- the official GLUE TSV layout (`<data_dir>/<TaskDir>/{train,dev,dev_matched,...}.tsv`); columns are
  found by header name (CoLA has no header: fixed columns), so the official files and the staged
  copies in ../shared/data/glue load alike; or
- a prepared TFDS GLUE dataset through `tfds.data_source` (ArrayRecord, no TensorFlow); or
- `label<TAB>text` files with a header (SST-2/SST-5/MR/Subj/ChnSentiCorp/Waimai as staged).

Label ids follow TFDS/HF GLUE: MNLI entailment/neutral/contradiction = 0/1/2, QNLI and RTE
entailment/not_entailment = 0/1.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np

from spikingformer_jax.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class Examples:
  text_a: list[str]
  text_b: Optional[list[str]]
  labels: np.ndarray  # int32 class ids or float32 scores

  def __len__(self):
    return len(self.text_a)


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: where its TSV columns are and how its labels map to ids."""
  name: str
  tsv_dir: str
  text_a: str | int  # header name, or column index for header-less files
  text_b: Optional[str | int]
  label: str | int
  label_names: Optional[tuple[str, ...]]  # None: labels are already integers / floats
  tfds_keys: tuple[str, Optional[str]]
  num_classes: int  # 1 for regression (the official metrics are in spikingformer_jax.metrics)

  @property
  def task(self) -> str:
    return 'regression' if self.num_classes == 1 else 'classification'


GLUE_TASKS = {t.name: t for t in (
    GlueTask('cola', 'CoLA', 3, None, 1, None, ('sentence', None), 2),
    GlueTask('sst2', 'SST-2', 'sentence', None, 'label', None, ('sentence', None), 2),
    GlueTask('mrpc', 'MRPC', '#1 String', '#2 String', 'Quality', None, ('sentence1', 'sentence2'), 2),
    GlueTask('stsb', 'STS-B', 'sentence1', 'sentence2', 'score', None, ('sentence1', 'sentence2'), 1),
    GlueTask('qqp', 'QQP', 'question1', 'question2', 'is_duplicate', None, ('question1', 'question2'), 2),
    GlueTask('mnli', 'MNLI', 'sentence1', 'sentence2', 'gold_label',
             ('entailment', 'neutral', 'contradiction'), ('premise', 'hypothesis'), 3),
    GlueTask('qnli', 'QNLI', 'question', 'sentence', 'label', ('entailment', 'not_entailment'),
             ('question', 'sentence'), 2),
    GlueTask('rte', 'RTE', 'sentence1', 'sentence2', 'label', ('entailment', 'not_entailment'),
             ('sentence1', 'sentence2'), 2),
)}

# Split name -> candidate TSV files, first existing wins. The staged MNLI proxy has only dev.tsv
# (no matched/mismatched distinction), so 'validation_matched' falls back to it with a warning.
_TSV_SPLITS = {
    'train': ('train.tsv',),
    'validation': ('dev.tsv',),
    'dev': ('dev.tsv',),
    'validation_matched': ('dev_matched.tsv', 'dev.tsv'),
    'dev_matched': ('dev_matched.tsv',),
    'validation_mismatched': ('dev_mismatched.tsv',),
    'dev_mismatched': ('dev_mismatched.tsv',),
}


def _read_tsv_rows(path: str) -> list[list[str]]:
  """Rows of a GLUE-style TSV: UTF-8 (BOM tolerated), split on '\\n' and TAB only, no quoting."""
  with open(path, encoding='utf-8-sig', newline='') as f:
    text = f.read()
  return [line.rstrip('\r').split('\t') for line in text.split('\n') if line.strip()]


def _column(header: Optional[list[str]], key: str | int, path: str) -> int:
  if isinstance(key, int):
    return key
  if header is None or key not in header:
    raise DataError(f'{path}: expected a header line with column {key!r}, got header {header}.')
  return header.index(key)


def _label_value(raw: str, task: GlueTask, path: str, line_no: int):
  try:
    if task.label_names is not None:
      return task.label_names.index(raw)
    return float(raw) if task.num_classes == 1 else int(raw)
  except ValueError:
    expected = task.label_names or ('a float score' if task.num_classes == 1 else 'an integer class id')
    raise DataError(f'{path}:{line_no}: label {raw!r} is not one of {expected}.') from None


def resolve_tsv_split(task_dir: str, split: str) -> str:
  if split not in _TSV_SPLITS:
    raise ValueError(f'Unknown split {split!r} for GLUE TSV files; expected one of {sorted(_TSV_SPLITS)}.')
  candidates = _TSV_SPLITS[split]
  for i, name in enumerate(candidates):
    path = os.path.join(task_dir, name)
    if os.path.isfile(path):
      if i:
        logging.warning('GLUE split %r: %s is absent, using %s instead.', split, candidates[0], path)
      return path
  present = sorted(os.listdir(task_dir)) if os.path.isdir(task_dir) else 'directory absent'
  raise DataError(f'GLUE split {split!r} needs one of {candidates} in {task_dir} (found: {present}).')


def read_glue_tsv(task_name: str, data_dir: str, split: str) -> Examples:
  """A GLUE task from its official TSV files under `data_dir/<TaskDir>/`."""
  task = get_glue_task(task_name)
  path = resolve_tsv_split(os.path.join(data_dir, task.tsv_dir), split)
  rows = _read_tsv_rows(path)
  has_header = not isinstance(task.label, int)
  if not rows:
    raise DataError(f'{path} is empty: expected GLUE {task.tsv_dir} examples.')
  header, body, first_line = (rows[0], rows[1:], 2) if has_header else (None, rows, 1)
  if not body:
    raise DataError(f'{path} has a header line but no examples.')
  cols = [_column(header, k, path) for k in (task.text_a, task.label)]
  b_col = None if task.text_b is None else _column(header, task.text_b, path)
  width = len(header) if header else max(len(r) for r in body)
  text_a, text_b, labels = [], [], []
  for line_no, row in enumerate(body, start=first_line):
    if len(row) != width:
      raise DataError(f'{path}:{line_no}: expected {width} TAB-separated columns, got {len(row)}.')
    text_a.append(row[cols[0]].strip())
    if b_col is not None:
      text_b.append(row[b_col].strip())
    labels.append(_label_value(row[cols[1]].strip(), task, path, line_no))
  dtype = np.float32 if task.num_classes == 1 else np.int32
  return Examples(text_a, text_b if b_col is not None else None, np.asarray(labels, dtype))


def read_glue_tfds(task_name: str, data_dir: Optional[str], split: str) -> Examples:
  """A prepared TFDS `glue/<task>` (ArrayRecord) via `tfds.data_source`: no TensorFlow needed.

  TFDS stores the examples shuffled; they are put back in file order (the `idx` feature, the row number
  in the GLUE TSV), so both sources give the same examples in the same order.
  """
  import tensorflow_datasets as tfds  # Imported lazily: only this source needs it.
  task = get_glue_task(task_name)
  missing = DataError(f'TFDS has no prepared glue/{task.name} in {data_dir or "its default data_dir"}.')
  try:
    prepared = tfds.builder(f'glue/{task.name}', data_dir=data_dir or None).is_prepared()
  except tfds.core.registered.DatasetNotFoundError:  # its message lists every TFDS dataset
    raise missing from None
  if not prepared:  # Where TFDS's GLUE builder is registered, data_source would try to download it.
    raise missing
  source = tfds.data_source(f'glue/{task.name}', split=split, data_dir=data_dir or None, download=False)
  # Stripped like the TSV reader's columns (GLUE's SST-2 sentences end with a space).
  decode = lambda v: (v.decode('utf-8') if isinstance(v, bytes) else str(v)).strip()
  records = sorted((source[i] for i in range(len(source))), key=lambda r: int(r['idx']))
  key_a, key_b = task.tfds_keys
  labels = np.asarray([r['label'] for r in records], np.float32 if task.num_classes == 1 else np.int32)
  if (labels < 0).any():  # TFDS marks unlabelled examples with -1, also for the STS-B scores (in [0, 5])
    raise ValueError(f'glue/{task.name} split {split!r} has no labels (label -1): the GLUE test splits are '
                     'unlabelled; evaluate on a validation split.')
  return Examples([decode(r[key_a]) for r in records],
                  None if key_b is None else [decode(r[key_b]) for r in records], labels)


def read_label_text_tsv(path: str) -> Examples:
  """`label<TAB>text` with a header line (the staged SST/MR/Subj/Chinese sentiment files)."""
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist (expected a label<TAB>text TSV).')
  rows = _read_tsv_rows(path)
  if not rows or rows[0][:2] != ['label', 'text']:
    raise DataError(f'{path}: expected the header line "label<TAB>text", got {rows[0] if rows else "an empty file"}.')
  texts, labels = [], []
  for line_no, row in enumerate(rows[1:], start=2):
    if len(row) != 2:
      raise DataError(f'{path}:{line_no}: expected 2 TAB-separated columns (label, text), got {len(row)}.')
    try:
      labels.append(int(row[0]))
    except ValueError:
      raise DataError(f'{path}:{line_no}: label {row[0]!r} is not an integer.') from None
    texts.append(row[1])
  if not texts:
    raise DataError(f'{path} has a header line but no examples.')
  return Examples(texts, None, np.asarray(labels, np.int32))


def get_glue_task(name: str) -> GlueTask:
  name = name.split('/', 1)[1] if name.startswith('glue/') else name
  if name not in GLUE_TASKS:
    raise ValueError(f'Unknown GLUE task {name!r}; expected one of {sorted(GLUE_TASKS)}.')
  return GLUE_TASKS[name]
