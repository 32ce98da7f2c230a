"""The paper's 13 benchmarks in one command, with a results table beside the reported numbers.

  python -m spikingformer_jax.suite --budget=smoke --out=/tmp/suite      # this CPU, a few minutes
  python -m spikingformer_jax.suite --budget=full --out=/runs/suite        # the reference recipes

Benchmarks: ImageNet-1k, CIFAR-10, CIFAR-100, CIFAR10-DVS, DVS128 Gesture and the 8 GLUE tasks
(dossier §4.1), each trained in-process from its experiments/ config by `train.train_and_evaluate`.

`full` runs the configs as they are. A benchmark whose data is not prepared is reported with the
command that prepares it, and the others still run; a finished workdir (summary.json with
completed = true) is reported again without retraining, an unfinished one resumes.

`smoke` runs each config's `runlocal` variant for a few steps, on the real samples in ../shared/data
where they exist and on stand-ins otherwise; the "data" column says which (CIFAR-100 and, without
its sample, ImageNet use `tfds.testing.mock_data`: random images; the DVS benchmarks use the real
N-MNIST sample; QNLI has no staged train split, so it trains and evaluates on its dev split). Smoke
numbers check that every pipeline runs end to end; they are not accuracies to compare.

Outputs in --out: results.json, results.md, and one workdir per benchmark. Throughput is the
`examples_per_sec` of the last training interval in the workdir's metrics.jsonl (after compilation).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import shutil
import time
import traceback

from spikingformer_jax import sweep

BUDGETS = ('smoke', 'full')


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  title: str
  config: str  # `file.py:arg` of the full run; smoke appends `runlocal`
  paper: float | None  # the reported number for this config (dossier §4.2); None = not published/verified
  paper_source: str
  prepare: str  # how to make the full data available
  smoke_data: str  # what the smoke run trains on
  smoke_mock: bool = False  # run the smoke variant under tfds.testing.mock_data
  smoke_overrides: dict = dataclasses.field(default_factory=dict)


_TFDS = 'tfds build {name} --data_dir=DIR --file_format=array_record, then --config.data.data_dir=DIR'
_PREPARE_DVS = ('python -m spikingformer_jax.data.prepare --dataset={name} --raw_dir=RAW --out_dir=DIR --T=16, '
                'then data_dir=DIR in the config argument')
_GLUE_PREPARE = ('put the official GLUE TSVs (<TaskDir>/train.tsv, dev.tsv) in ../shared/data/glue or set '
                 '--config.data.data_dir')
# GLUE smoke: one padded shape (jit compiles once, and the 2-class tasks share the compiled step through
# the persistent cache) and fewer steps than glue.py's runlocal.
_GLUE_SMOKE = {'total_steps': 20, 'data.dynamic_padding': False}
_GLUE_DATA = 'real GLUE TSV (../shared/data/glue)'


def _glue(task: str, title: str, smoke_data: str = _GLUE_DATA, **overrides) -> Benchmark:
  return Benchmark(f'glue_{task}', f'GLUE {title}', f'experiments/glue.py:task={task},variant=12-768', None,
                   'no published Spikingformer GLUE numbers (UNVERIFIED)', _GLUE_PREPARE, smoke_data,
                   smoke_overrides={**_GLUE_SMOKE, **overrides})


BENCHMARKS = (
    Benchmark('imagenet', 'ImageNet-1k', 'experiments/imagenet.py:variant=8-768', 75.85,
              'Spikingformer-8-768 top-1, reference README', _TFDS.format(name='imagenet2012') +
              ' (needs the ILSVRC2012 tars in --manual_dir)',
              'real 50-image sample, train = test (../shared/data/imagenet_sample)',
              smoke_mock=True),
    Benchmark('cifar10', 'CIFAR-10', 'experiments/cifar10.py:variant=4-384', 95.81,
              'Spikingformer-4-384-400E, reference README', _TFDS.format(name='cifar10'),
              'real CIFAR-10 sample (../shared/data/cifar10)'),
    Benchmark('cifar100', 'CIFAR-100', 'experiments/cifar100.py:variant=4-384', 79.21,
              'Spikingformer-4-384-400E, reference README', _TFDS.format(name='cifar100'),
              'tfds mock_data (random images): no CIFAR-100 sample offline', smoke_mock=True),
    Benchmark('cifar10_dvs', 'CIFAR10-DVS', 'experiments/cifar10_dvs.py:T=16', 81.3,
              'Spikingformer-2-256 T=16, reference README', _PREPARE_DVS.format(name='cifar10_dvs'),
              'stand-in: real N-MNIST event sample (../shared/data/nmnist), T=4'),
    Benchmark('dvs128_gesture', 'DVS128 Gesture', 'experiments/dvs128_gesture.py:T=16', 98.3,
              'Spikingformer-2-256 T=16, reference README', _PREPARE_DVS.format(name='dvs128_gesture'),
              'stand-in: real N-MNIST event sample (../shared/data/nmnist), T=4, 10 classes'),
    _glue('mnli', 'MNLI-m', 'real MNLI proxy TSV: not the GLUE splits (../shared/data/glue/README.md)'),
    _glue('qqp', 'QQP', 'real QQP train subset; dev carved from train rows (not the GLUE dev)'),
    _glue('qnli', 'QNLI', 'stand-in: QNLI dev TSV for training AND evaluation (no train TSV staged)',
          **{'data.train_split': 'validation'}),
    _glue('sst2', 'SST-2'),
    _glue('cola', 'CoLA'),
    _glue('stsb', 'STS-B'),
    _glue('mrpc', 'MRPC'),
    _glue('rte', 'RTE'),
)


def get_benchmark(name: str) -> Benchmark:
  for bench in BENCHMARKS:
    if bench.name == name:
      return bench
  raise ValueError(f'Unknown benchmark {name!r}; expected one of {[b.name for b in BENCHMARKS]}.')


def build_config(bench: Benchmark, budget: str):
  if budget not in BUDGETS:
    raise ValueError(f'budget={budget!r}: expected one of {BUDGETS}.')
  if budget == 'full':
    return sweep.load_config(bench.config)
  config = sweep.load_config(f'{bench.config},runlocal')
  return sweep.apply_overrides(config, bench.smoke_overrides, f'suite smoke overrides of {bench.name}')


def _mock_context(bench: Benchmark, budget: str):
  if budget == 'smoke' and bench.smoke_mock:
    import tensorflow_datasets as tfds  # noqa: PLC0415
    return tfds.testing.mock_data(num_examples=256)
  return contextlib.nullcontext()


def data_source_label(bench: Benchmark, config, budget: str) -> str:
  if budget == 'full':
    return f'{config.data.name} (full)'
  if bench.smoke_mock and config.data.name in ('imagenet2012', 'cifar100', 'cifar10'):
    return f'{config.data.name}: tfds mock_data (random images)'
  return bench.smoke_data


def last_throughput(workdir: pathlib.Path) -> float | None:
  """examples_per_sec of the last training record in metrics.jsonl (the first includes compilation)."""
  path = workdir / 'metrics.jsonl'
  if not path.is_file():
    return None
  value = None
  for line in path.read_text().splitlines():
    record = json.loads(line)
    if record.get('split') == 'train' and 'examples_per_sec' in record:
      value = float(record['examples_per_sec'])
  return value


def _completed_summary(path: pathlib.Path) -> dict | None:
  if not path.is_file():
    return None
  summary = json.loads(path.read_text())
  return summary if summary.get('completed') else None


def run_benchmark(bench: Benchmark, budget: str, out: pathlib.Path, devices=None) -> dict:
  """Trains and evaluates one benchmark; never raises for missing data or a failed run (the row says)."""
  from spikingformer_jax import train  # noqa: PLC0415 (jax starts here, after flags)
  from spikingformer_jax.data import DataError  # noqa: PLC0415

  workdir = out / bench.name
  config_string = bench.config + (',runlocal' if budget == 'smoke' else '')
  row = {'benchmark': bench.name, 'title': bench.title, 'config': config_string, 'paper': bench.paper,
         'paper_source': bench.paper_source, 'workdir': str(workdir)}
  start = time.perf_counter()
  try:
    config = build_config(bench, budget)
    row.update(metric=config.metric, data=data_source_label(bench, config, budget))
    summary_path = workdir / 'summary.json'
    if budget == 'smoke':
      shutil.rmtree(workdir, ignore_errors=True)  # a smoke run always starts fresh
    summary = _completed_summary(summary_path)
    if summary is not None:
      row['status'] = 'ok (finished earlier)'
    else:
      with _mock_context(bench, budget):
        try:
          train.data_module(config).dataset_info(config.data)
        except (DataError, FileNotFoundError) as e:
          row.update(status='data not prepared', error=str(e), prepare=bench.prepare)
          return row
        summary = train.train_and_evaluate(config, workdir, devices=devices)
      summary_path.write_text(json.dumps(summary, indent=2, default=float))
      row['status'] = 'ok' if summary['completed'] else 'stopped early'
  except Exception as e:  # noqa: BLE001 (one broken benchmark must not stop the suite)
    row.update(status='failed', error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc(limit=8))
    return row
  finally:
    row['wall_s'] = time.perf_counter() - start
  final = summary.get('final', {})
  row.update(steps=summary['step'], total_steps=summary['total_steps'], value=final.get(config.metric),
             examples_per_sec=last_throughput(workdir))
  return row


def _fmt(value, spec: str = '.2f') -> str:
  return '—' if value is None else format(value, spec)


def markdown(rows: list[dict], budget: str) -> str:
  """The results table; accuracies are shown in percent like the paper, correlations as they are."""
  lines = [f'# Spikingformer-JAX benchmark suite ({budget})', '',
           '| benchmark | data | status | steps | metric | ours | paper | examples/s | wall (s) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    scale = 100.0 if r.get('metric') in ('top1', 'accuracy') else 1.0
    ours = None if r.get('value') is None else scale * r['value']
    steps = f'{r["steps"]}/{r["total_steps"]}' if 'steps' in r else '—'
    lines.append(f'| {r["title"]} | {r.get("data", "—")} | {r["status"]} | {steps} | {r.get("metric", "—")} | '
                 f'{_fmt(ours)} | {_fmt(r["paper"])} | {_fmt(r.get("examples_per_sec"), ".1f")} | '
                 f'{_fmt(r.get("wall_s"), ".0f")} |')
  lines += ['', 'Paper numbers: dossier §4.2 (reference README). GLUE: no published Spikingformer numbers '
            '(UNVERIFIED), shown as —.']
  if budget == 'smoke':
    lines.append('Smoke runs are a few steps of tiny models: they show every pipeline runs, not accuracy.')
  for r in rows:
    if r['status'] == 'data not prepared':
      lines.append(f'- **{r["title"]}**: data not prepared ({r["error"]}). Prepare: `{r["prepare"]}`')
    elif r['status'] == 'failed':
      lines.append(f'- **{r["title"]}** failed: {r["error"]}')
  return '\n'.join(lines) + '\n'


def run_suite(budget: str, out, names=None, devices=None, log=print) -> list[dict]:
  """Runs the selected benchmarks (default: all 13) and writes results.json and results.md in `out`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  selected = [get_benchmark(n) for n in names] if names else list(BENCHMARKS)
  rows = []
  for bench in selected:
    log(f'[suite] {bench.title}: {bench.config} ({budget})')
    row = run_benchmark(bench, budget, out, devices)
    log(f'[suite] {bench.title}: {row["status"]}, {row.get("metric")} = {row.get("value")}, '
        f'{row["wall_s"]:.0f} s')
    rows.append(row)
    (out / 'results.json').write_text(json.dumps({'budget': budget, 'results': rows}, indent=2, default=float))
  (out / 'results.md').write_text(markdown(rows, budget))
  return rows


def main(argv):
  del argv
  import jax  # noqa: PLC0415
  from absl import flags  # noqa: PLC0415

  f = flags.FLAGS
  cache = f.compile_cache or (str(pathlib.Path(f.out) / 'jax_cache') if f.budget == 'smoke' else '')
  if cache:  # the 2-class GLUE tasks share one compiled step; reruns reuse all of them
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  devices = jax.devices()[:1] if f.budget == 'smoke' else None
  rows = run_suite(f.budget, f.out, f.only or None, devices)
  print(markdown(rows, f.budget))
  return 1 if any(r['status'] == 'failed' for r in rows) else 0


def _define_flags():
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_enum('budget', 'smoke', list(BUDGETS), 'smoke: CPU minutes on samples; full: the reference recipes.')
  flags.DEFINE_string('out', None, 'Folder for results.json, results.md and the benchmark workdirs.')
  flags.DEFINE_list('only', [], f'Subset of benchmarks: {",".join(b.name for b in BENCHMARKS)}.')
  flags.DEFINE_string('compile_cache', '', 'JAX persistent compilation cache folder ("" = <out>/jax_cache for '
                      'smoke, off for full).')
  flags.mark_flag_as_required('out')


if __name__ == '__main__':
  from absl import app

  _define_flags()
  app.run(main)
