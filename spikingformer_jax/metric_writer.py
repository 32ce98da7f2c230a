"""Metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only), local or gs://.

A resumed run continues both from its checkpoint's step: JSONL lines after that step (written
before the interruption, about to be replayed) are dropped when the writer opens, and TensorBoard
is told to purge its events after it (tensorboardX's `purge_step`). Locally every line is appended
and flushed as it is written. Object stores cannot append, so there the file is rewritten whole by
`flush()`, which the trainer calls before every checkpoint (whatever a checkpoint covers is
stored), and at most every `REMOTE_FLUSH_S` seconds in between. TensorBoard events reach gs://
through tensorboardX's own Cloud Storage writer.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid

import jax

from spikingformer_jax import paths

REMOTE_FLUSH_S = 60.0


def _lines_through(path, step: int) -> list[str]:
  """The complete JSONL lines of `path` whose step is at most `step` (a torn last line is dropped)."""
  if not path.exists():
    return []
  kept = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and isinstance(record.get('step'), int) and record['step'] <= step:
      kept.append(line + '\n')
  return kept


def _summary_writer_class():
  """tensorboardX's SummaryWriter (TensorBoard event files without TensorFlow), imported without torch.

  tensorboardX imports torch when it can, only to recognise torch tensors; that takes seconds of every
  run's start-up where torch is installed (the converter's dependency). Scalars need none of it.
  """
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError meanwhile.
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  def __init__(self, workdir, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path, self._remote = workdir / 'metrics.jsonl', paths.is_remote(workdir)
    self._lines = _lines_through(self._path, start_step)
    self._rewrite()
    self._file = None if self._remote else open(self._path, 'a', encoding='utf-8')
    # A suffix of its own: tensorboardX names files by the second, and a restart within it would overwrite.
    self._tb = _summary_writer_class()(str(workdir / 'tensorboard'), purge_step=start_step + 1,
                             filename_suffix=f'.{uuid.uuid4().hex[:8]}')

  def _rewrite(self):
    text = ''.join(self._lines)
    if self._remote:
      self._path.write_text(text)
    else:  # Atomically: a crash leaves the old file or the new one.
      tmp = self._path.parent / f'.{self._path.name}.tmp-{os.getpid()}'
      tmp.write_text(text)
      os.replace(tmp, self._path)
    self._flushed = time.monotonic()

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({'step': int(step), 'split': split, 'time': time.time(), **scalars}) + '\n'
    if self._remote:
      self._lines.append(line)
      if time.monotonic() - self._flushed > REMOTE_FLUSH_S:
        self._rewrite()
    else:
      self._file.write(line)
      self._file.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f'{split}/{k}', v, int(step))

  def flush(self):
    if self.enabled:
      if self._remote:
        self._rewrite()
      self._tb.flush()

  def close(self):
    if self.enabled:
      self.flush()
      if self._file is not None:
        self._file.close()
      self._tb.close()
