"""The pod plan: every benchmark's training step compiled for TPU slices, at the reference global batch.

  python -m benchmarks.pod_plan run [--only=SUBSTRING] [--tag=after]   # one aot compile per row, JSON each
  python -m benchmarks.pod_plan table                                  # -> benchmarks/results/pod_plan.md

`run` calls `python -m spikingformer_jax.aot` once per row (a fresh process each, so one failure or
one compiler's memory does not carry over) and keeps each report in benchmarks/results/pod_plan/; rows
whose report exists are skipped, so an interrupted plan resumes. `--tag=before` names reports made
from an older checkout (run this script there) for the before/after columns. `table` renders them.
These are XLA TPU compiler estimates for slices that were not used, not measured runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / 'results'
REPORTS = RESULTS / 'pod_plan'
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Benchmark:
  label: str
  config: str
  global_batch: int  # the reference's
  examples_per_epoch: int
  epochs: float  # the reference schedule's, cooldown included

  def days(self, examples_per_second: float) -> float:
    return self.epochs * self.examples_per_epoch / examples_per_second / 86400


BENCHMARKS = (
    Benchmark('ImageNet 8-768', 'experiments/imagenet.py:variant=8-768', 192, 1_281_167, 310),
    Benchmark('CIFAR-10 4-384', 'experiments/cifar10.py:variant=4-384', 64, 50_000, 410),
    Benchmark('CIFAR-100 4-384', 'experiments/cifar100.py:variant=4-384', 64, 50_000, 410),
    Benchmark('CIFAR10-DVS 2-256 T=16', 'experiments/cifar10_dvs.py:T=16', 16, 9_000, 106),
    Benchmark('DVS128 Gesture 2-256 T=16', 'experiments/dvs128_gesture.py:T=16', 16, 1_176, 202),
    # No reference pretraining run: BERT-base's schedule, 1M steps of 256 sequences of 128 tokens.
    Benchmark('Text 12-768 MLM', 'experiments/pretrain_mlm.py:variant=12-768', 256, 256, 1_000_000),
)
SLICES = (('v4-32', 16), ('v5e-16', 16), ('v5e-256', 256), ('v5p-64', 32))
MODES = ('data', 'fsdp')


@dataclasses.dataclass(frozen=True)
class Row:
  bench: Benchmark
  topology: str
  chips: int
  mode: str

  @property
  def batch(self) -> int:
    """The reference global batch, raised to the next multiple of the chips when it does not divide."""
    return -(-self.bench.global_batch // self.chips) * self.chips

  @property
  def key(self) -> str:
    name = self.bench.label.lower().replace(' ', '_').replace('=', '').replace('-', '')
    return f'{name}__{self.topology}__{self.mode}'

  def command(self, out: pathlib.Path) -> list[str]:
    mesh = ['--config.mesh.data=-1', '--config.mesh.fsdp=1'] if self.mode == 'data' else \
        ['--config.mesh.data=1', f'--config.mesh.fsdp={self.chips}']
    return [sys.executable, '-m', 'spikingformer_jax.aot', f'--config={self.bench.config}',
            f'--topology={self.topology}', f'--config.batch_size={self.batch}', *mesh, f'--out={out}']


def rows(only: str = '') -> list[Row]:
  return [Row(b, t, n, m) for b in BENCHMARKS for t, n in SLICES for m in MODES
          if only in f'{b.label} {t} {m}']


def run(only: str, tag: str, timeout: int) -> None:
  REPORTS.mkdir(parents=True, exist_ok=True)
  for row in rows(only):
    out = REPORTS / f'{row.key}.{tag}.json'
    if out.exists():
      continue
    cmd = row.command(out)
    print(f'[{time.strftime("%H:%M:%S")}] {row.key} ({tag})', flush=True)
    try:
      result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      out.write_text(json.dumps({'error': f'compile did not finish in {timeout} s', 'command': cmd[2:]}))
      continue
    if not out.exists():  # an error before the report (e.g. a config the slice cannot take)
      message = (result.stderr.strip().splitlines() or ['?'])[-1]
      out.write_text(json.dumps({'error': message, 'command': cmd[2:]}))
      continue
    report = json.loads(out.read_text())
    report['command'] = cmd[2:]
    out.write_text(json.dumps(report, indent=2))


def _cell(report: dict | None, row: Row) -> list[str]:
  if report is None:
    return ['not run'] + [''] * 5
  if 'error' in report and 'fits' not in report:
    return [f'error: {report["error"][:80]}'] + [''] * 5
  if not report['fits']:
    need = report['hbm'].get('needed_bytes') or report['hbm'].get('total_bytes')
    return ['**no**', f'{need / GIB:.1f} > {report["hbm_capacity_bytes"] / GIB:.0f}' if need else '?', '', '', '', '']
  step = report['per_chip_step']
  chips = report['chips']
  return ['yes', f'{report["hbm"]["total_bytes"] / GIB:.1f} / {report["hbm_capacity_bytes"] / GIB:.0f}',
          f'{step["estimated_seconds"]:.3f}' + ('' if step['estimate'] == 'xla' else ' (r)'),
          f'{step["examples_per_second"]:.0f}', f'{100 * step["mfu"]:.0f}%',
          _duration(row.bench.days(step["examples_per_second"] * chips))]


def _duration(days: float) -> str:
  return f'{days:.1f} d' if days >= 1 else f'{24 * days:.1f} h'


def table() -> str:
  header = ('| benchmark | slice | mesh | global batch (per chip) | fits? | HBM GiB / chip | est. s/step '
            '| examples/s/chip | MFU | paper schedule |')
  lines = [header, '|' + '---|' * 10]
  commands = []
  for row in rows():
    reports = {tag: REPORTS / f'{row.key}.{tag}.json' for tag in ('before', 'after')}
    for tag, path in reports.items():
      if tag == 'before' and not path.exists():
        continue
      report = json.loads(path.read_text()) if path.exists() else None
      label = f'{row.bench.label}' + (' (before)' if tag == 'before' else '')
      mesh = 'data' if row.mode == 'data' else f'fsdp={row.chips}'
      batch = f'{row.batch} ({row.batch // row.chips})' + ('' if row.batch == row.bench.global_batch else ' *')
      lines.append('| ' + ' | '.join([label, row.topology, mesh, batch] + _cell(report, row)) + ' |')
      if report and 'command' in report:
        commands.append('python -m ' + ' '.join(shlex.quote(c) for c in report['command']))
  return '\n'.join(lines) + '\n\nCommands, one per row:\n\n```\n' + '\n'.join(commands) + '\n```\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('action', choices=('run', 'table'))
  parser.add_argument('--only', default='', help='rows whose "label slice mode" contains this')
  parser.add_argument('--tag', default='after', choices=('before', 'after'))
  parser.add_argument('--timeout', type=int, default=3600)
  args = parser.parse_args()
  if args.action == 'run':
    run(args.only, args.tag, args.timeout)
  else:
    (RESULTS / 'pod_plan.md').write_text(table())
    print(RESULTS / 'pod_plan.md')


if __name__ == '__main__':
  main()
