"""Metrics to a JSONL file and TensorBoard event files in the workdir (process 0 only)."""
from __future__ import annotations

import json
import pathlib
import time

import jax


class MetricWriter:
  def __init__(self, workdir):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # Writes TensorBoard event files without TensorFlow.
      self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, split: str, metrics: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'split': split, 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f'{split}/{k}', v, int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
