"""The paper's 13 benchmarks in one command, with a results table beside the reported numbers.

  python -m spikingformer_jax.suite --budget=smoke --out=/tmp/suite              # this CPU, a few minutes
  python -m spikingformer_jax.suite --budget=cpu --minutes=5 --out=/tmp/suite    # M minutes per benchmark
  python -m spikingformer_jax.suite --budget=full --out=/runs/suite               # the reference recipes

Benchmarks: ImageNet-1k, CIFAR-10, CIFAR-100, CIFAR10-DVS, DVS128 Gesture and the 8 GLUE tasks
(the paper's Section 4), each trained in-process from its experiments/ config by `train.train_and_evaluate`.

`full` runs the configs as they are. A benchmark whose data is not prepared is reported with the
command that prepares it, and the others still run; a finished workdir (summary.json with
completed = true) is reported again without retraining, an unfinished one resumes.

`cpu` trains every benchmark that has a real sample offline for `--minutes` of wall time each
(`config.time_budget_minutes`: start-up and compilation count), on that sample, and evaluates it once on
a split it never trained on: CIFAR-10 (`cifar10.py:cpu`, 10,000 train / 2,000 test images), ImageNet
(`imagenet.py:cpu`, 25 / 25 images of distinct classes: a pipeline and speed check), N-MNIST
(`nmnist.py:cpu`, 300 / 50 real recordings, the DVS recipe; it stands in for CIFAR10-DVS and DVS128
Gesture, which have no sample), the 8 GLUE tasks and the sentence sets SST-2 (sentence level), SST-5, MR,
Subj, ChnSentiCorp and Waimai (`glue.py:task=<t>,variant=tiny` from scratch, on the train TSV, evaluated
on the dev TSV; QNLI, which has no staged train split, trains on the first 80% of its dev TSV and is
evaluated on the other 20%). A text recipe that ends sooner (its epochs) ends sooner. The table shows ours,
the majority baseline (the primary metric of always predicting the most frequent training label; 0 for
correlations), and a reference figure for the same budget where one was measured. CIFAR-100 has no
sample offline and is listed without a run.

`smoke` runs each config's `runlocal` variant for a few steps, on the real samples in ../shared/data
where they exist and on stand-ins otherwise; the "data" column says which (CIFAR-100 and, without
its sample, ImageNet use `tfds.testing.mock_data`: random images; the DVS benchmarks use the real
N-MNIST sample). Smoke numbers check that every pipeline runs end to end; they are not accuracies to compare.

Outputs in --out: results.json, results.md, and one workdir per benchmark. Throughput is the
`examples_per_sec` of the last training interval in the workdir's metrics.jsonl (after compilation).
The `cpu` and `smoke` budgets keep a persistent compilation cache in <out>/jax_cache (compile_cache.py),
so a rerun skips compilation.
"""
from __future__ import annotations

from spikingformer_jax import cpu_runtime

if __name__ == '__main__':
  cpu_runtime.reuse_freed_memory_on_cpu()  # Before any import starts a thread (see the function).

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

from spikingformer_jax import metrics, sweep  # noqa: E402

BUDGETS = ('smoke', 'cpu', 'full')


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  title: str
  config: str  # `file.py:arg` of the full run; smoke appends `runlocal`
  paper: float | None  # the reference README's number for this config, in percent; None = none published
  paper_source: str
  prepare: str  # how to make the full data available
  smoke_data: str  # what the smoke run trains on
  smoke_mock: bool = False  # run the smoke variant under tfds.testing.mock_data
  smoke_overrides: dict = dataclasses.field(default_factory=dict)
  cpu: str | None = None  # `file.py:arg` of the cpu budget; None = no real sample offline
  cpu_data: str = ''  # what the cpu budget trains and evaluates on (or why it cannot run)
  cpu_overrides: dict = dataclasses.field(default_factory=dict)
  cpu_reference: dict = dataclasses.field(default_factory=dict)  # minutes -> (value in %, source)


_TFDS = 'tfds build {name} --data_dir=DIR --file_format=array_record, then --config.data.data_dir=DIR'
_PREPARE_DVS = ('python -m spikingformer_jax.data.prepare --dataset={name} --raw_dir=RAW --out_dir=DIR --T=16, '
                'then data_dir=DIR in the config argument')
_GLUE_PREPARE = ('put the official GLUE TSVs (<TaskDir>/train.tsv, dev.tsv) in ../shared/data/glue or set '
                 '--config.data.data_dir')
# GLUE smoke: one padded shape (jit compiles once, and the 2-class tasks share the compiled step through
# the persistent cache) and fewer steps than glue.py's runlocal.
_GLUE_SMOKE = {'total_steps': 20, 'data.dynamic_padding': False}
_GLUE_DATA = 'real GLUE TSV (../shared/data/glue)'
# QNLI has no staged train split: train and evaluate on disjoint parts of its dev TSV.
_QNLI_SPLITS = {'data.train_split': 'validation[:80%]', 'data.eval_split': 'validation[80%:]'}
_CPU_TEXT = 'tiny, from scratch: train TSV -> dev TSV'
# Text on the cpu budget: batches padded to a multiple of 64 tokens, so at most two padded lengths (64, 128)
# compile instead of eight; each compilation takes seconds of a budget of minutes.
_CPU_TEXT_OVERRIDES = {'data.pad_multiple': 64}


def _glue(task: str, title: str, smoke_data: str = _GLUE_DATA, cpu_data: str = _CPU_TEXT,
          **overrides) -> Benchmark:
  return Benchmark(f'glue_{task}', f'GLUE {title}', f'experiments/glue.py:task={task},variant=12-768', None,
                   'no published Spikingformer GLUE numbers', _GLUE_PREPARE, smoke_data,
                   smoke_overrides={**_GLUE_SMOKE, **overrides}, cpu=f'experiments/glue.py:task={task},variant=tiny',
                   cpu_data=cpu_data, cpu_overrides={**_CPU_TEXT_OVERRIDES, **overrides})


def _sentence(task: str, title: str) -> Benchmark:
  return Benchmark(task, title, f'experiments/glue.py:task={task},variant=12-768', None, 'no published number',
                   f'../shared/data/{task}: train.tsv, dev.tsv', '',
                   cpu=f'experiments/glue.py:task={task},variant=tiny', cpu_data=_CPU_TEXT,
                   cpu_overrides=_CPU_TEXT_OVERRIDES)


_NO_SAMPLE = 'no real sample offline: not run'
BENCHMARKS = (
    Benchmark('imagenet', 'ImageNet-1k', 'experiments/imagenet.py:variant=8-768', 75.85,
              'Spikingformer-8-768 top-1, reference README', _TFDS.format(name='imagenet2012') +
              ' (needs the ILSVRC2012 tars in --manual_dir)',
              'real 50-image sample, train = test (../shared/data/imagenet_sample)',
              smoke_mock=True, cpu='experiments/imagenet.py:cpu',
              cpu_data='real sample: 25 -> 25 other images, classes never trained on (pipeline check)'),
    Benchmark('cifar10', 'CIFAR-10', 'experiments/cifar10.py:variant=4-384', 95.81,
              'Spikingformer-4-384-400E, reference README', _TFDS.format(name='cifar10'),
              'real CIFAR-10 sample (../shared/data/cifar10)', cpu='experiments/cifar10.py:cpu',
              cpu_data='real sample, 2-256: 10,000 train -> 2,000 test images',
              cpu_reference={10: (46.45, 'the reference\'s model in PyTorch, same recipe, schedule and sample, 10 '
                                         'minutes on this machine kind (9,408 images seen; '
                                         'benchmarks/torch_cifar_budget.py)')}),
    Benchmark('cifar100', 'CIFAR-100', 'experiments/cifar100.py:variant=4-384', 79.21,
              'Spikingformer-4-384-400E, reference README', _TFDS.format(name='cifar100'),
              'tfds mock_data (random images): no CIFAR-100 sample offline', smoke_mock=True, cpu_data=_NO_SAMPLE),
    Benchmark('cifar10_dvs', 'CIFAR10-DVS', 'experiments/cifar10_dvs.py:T=16', 81.3,
              'Spikingformer-2-256 T=16, reference README', _PREPARE_DVS.format(name='cifar10_dvs'),
              'stand-in: real N-MNIST event sample (../shared/data/nmnist), T=4',
              cpu_data=_NO_SAMPLE + ' (the N-MNIST row runs its recipe on real events)'),
    Benchmark('dvs128_gesture', 'DVS128 Gesture', 'experiments/dvs128_gesture.py:T=16', 98.3,
              'Spikingformer-2-256 T=16, reference README', _PREPARE_DVS.format(name='dvs128_gesture'),
              'stand-in: real N-MNIST event sample (../shared/data/nmnist), T=4, 10 classes',
              cpu_data=_NO_SAMPLE + ' (the N-MNIST row runs its recipe on real events)'),
    _glue('mnli', 'MNLI-m', 'real MNLI proxy TSV: not the GLUE splits (../shared/data/glue/README.md)',
          'tiny, from scratch: MNLI proxy train -> proxy dev'),
    _glue('qqp', 'QQP', 'real QQP train subset; dev carved from train rows (not the GLUE dev)',
          'tiny, from scratch: QQP train subset -> dev carved from other train rows'),
    _glue('qnli', 'QNLI', 'stand-in: first 80% of the QNLI dev TSV to train, the other 20% to evaluate',
          'tiny, from scratch: first 80% of dev -> other 20% (no train TSV staged)', **_QNLI_SPLITS),
    _glue('sst2', 'SST-2'),
    _glue('cola', 'CoLA'),
    _glue('stsb', 'STS-B'),
    _glue('mrpc', 'MRPC'),
    _glue('rte', 'RTE'),
)
# Run by the cpu budget only: real samples beside the paper's 13 benchmarks.
CPU_EXTRAS = (
    Benchmark('nmnist', 'N-MNIST', 'experiments/nmnist.py:sample', None, 'the reference trains no N-MNIST model',
              'python -m spikingformer_jax.data.prepare --dataset=nmnist ...', '', cpu='experiments/nmnist.py:cpu',
              cpu_data='real sample, DVS 2-256, T=4: 300 train -> 50 test recordings'),
    _sentence('sst2_sentence', 'SST-2 (sentences)'),
    _sentence('sst5', 'SST-5'),
    _sentence('mr', 'MR'),
    _sentence('subj', 'Subj'),
    _sentence('chnsenticorp', 'ChnSentiCorp'),
    _sentence('waimai', 'Waimai'),
)


def benchmarks(budget: str) -> tuple[Benchmark, ...]:
  return BENCHMARKS + CPU_EXTRAS if budget == 'cpu' else BENCHMARKS


def get_benchmark(name: str, budget: str = 'cpu') -> Benchmark:
  for bench in benchmarks(budget):
    if bench.name == name:
      return bench
  raise ValueError(f'Unknown benchmark {name!r}; expected one of {[b.name for b in benchmarks(budget)]}.')


def config_string(bench: Benchmark, budget: str) -> str | None:
  if budget == 'cpu':
    return bench.cpu
  return bench.config + (',runlocal' if budget == 'smoke' else '')


def build_config(bench: Benchmark, budget: str, minutes: float = 0.0):
  """The config `bench` runs under `budget` (None: no cpu run); `minutes` is the cpu budget's time."""
  if budget not in BUDGETS:
    raise ValueError(f'budget={budget!r}: expected one of {BUDGETS}.')
  if budget == 'full':
    return sweep.load_config(bench.config)
  if budget == 'smoke':
    config = sweep.load_config(config_string(bench, budget))
    return sweep.apply_overrides(config, bench.smoke_overrides, f'suite smoke overrides of {bench.name}')
  if bench.cpu is None:
    return None
  if minutes <= 0:
    raise ValueError(f'the cpu budget needs minutes > 0, got {minutes}.')
  config = sweep.load_config(bench.cpu)
  overrides = {**bench.cpu_overrides, 'time_budget_minutes': float(minutes), 'eval_every_epochs': 10**6,
               'checkpoint.every_steps': 10**9, 'progress_bar': False}
  return sweep.apply_overrides(config, overrides, f'suite cpu overrides of {bench.name}')


def _mock_context(bench: Benchmark, budget: str):
  if budget == 'smoke' and bench.smoke_mock:
    import tensorflow_datasets as tfds  # noqa: PLC0415
    return tfds.testing.mock_data(num_examples=256)
  return contextlib.nullcontext()


def data_source_label(bench: Benchmark, config, budget: str) -> str:
  if budget == 'full':
    return f'{config.data.name} (full)'
  if budget == 'cpu':
    return bench.cpu_data
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


def _labels(dm, config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(labels, mask) of one ordered pass over `split`, without augmentation."""
  loader = dm.make_loader(config.data, split, batch_size=config.eval_batch_size, train=False, seed=0)
  batches = [(b['label'], b['mask']) for b in loader]
  return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def majority_baseline(config, dm) -> float:
  """The primary metric of predicting the most frequent training label for every evaluated example.

  Regression (STS-B): 0, as a constant prediction is uncorrelated with the scores.
  """
  if config.task != 'classification':
    return 0.0
  train_labels, train_mask = _labels(dm, config, config.data.train_split)
  majority = int(np.bincount(train_labels[train_mask > 0].astype(np.int64)).argmax())
  labels, mask = _labels(dm, config, config.data.eval_split)
  predictions = np.full_like(labels, majority)
  task_name = config.data.get('task_name', '')
  if task_name:
    return metrics.task_metrics(task_name, predictions, labels, mask)[config.metric]
  return metrics.accuracy(predictions, labels, mask)


def _completed_summary(path: pathlib.Path) -> dict | None:
  if not path.is_file():
    return None
  summary = json.loads(path.read_text())
  return summary if summary.get('completed') else None


def run_benchmark(bench: Benchmark, budget: str, out: pathlib.Path, devices=None, minutes: float = 0.0) -> dict:
  """Trains and evaluates one benchmark; never raises for missing data or a failed run (the row says)."""
  from spikingformer_jax import tasks, train  # noqa: PLC0415 (jax starts here, after flags)
  from spikingformer_jax.data import DataError  # noqa: PLC0415

  workdir = out / bench.name
  row = {'benchmark': bench.name, 'title': bench.title, 'config': config_string(bench, budget), 'paper': bench.paper,
         'paper_source': bench.paper_source, 'workdir': str(workdir)}
  if budget == 'cpu':
    row['reference'], row['reference_source'] = bench.cpu_reference.get(minutes, (None, ''))
  start = time.perf_counter()
  try:
    config = build_config(bench, budget, minutes)
    if config is None:
      row.update(status='no sample', data=bench.cpu_data)
      return row
    row.update(metric=config.metric, data=data_source_label(bench, config, budget))
    summary_path = workdir / 'summary.json'
    if budget != 'full':
      shutil.rmtree(workdir, ignore_errors=True)  # a smoke or cpu run always starts fresh
    summary = _completed_summary(summary_path)
    if summary is not None:
      row['status'] = 'ok (finished earlier)'
    else:
      with _mock_context(bench, budget):
        dm = tasks.get_task(config).data_module
        try:
          dm.dataset_info(config.data)
        except (DataError, FileNotFoundError) as e:
          row.update(status='data not prepared', error=str(e), prepare=bench.prepare)
          return row
        summary = train.train_and_evaluate(config, workdir, devices=devices)
        row['train_wall_s'] = time.perf_counter() - start
        if budget == 'cpu':
          row['majority'] = majority_baseline(config, dm)
      summary_path.write_text(json.dumps(summary, indent=2, default=float))
      row['status'] = 'ok' if summary['completed'] else 'stopped early'
  except Exception as e:  # noqa: BLE001 (one broken benchmark must not stop the suite)
    row.update(status='failed', error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc(limit=8))
    return row
  finally:
    row['wall_s'] = time.perf_counter() - start
  final = summary.get('final', {})
  row.update(steps=summary['step'], total_steps=summary['total_steps'], value=final.get(config.metric),
             examples_seen=summary['step'] * config.batch_size, examples_per_sec=last_throughput(workdir))
  return row


_IN_PERCENT = ('Every metric in percent: accuracy, F1, and the correlations (CoLA Matthews, STS-B Pearson) '
               'x100 as GLUE reports them.')


def _fmt(value, spec: str = '.2f') -> str:
  return '—' if value is None else format(value, spec)


def _percent(row: dict, key: str):
  """A metric of `row` in percent: accuracies and F1 like the paper, correlations x100 as GLUE reports them."""
  value = row.get(key)
  return None if value is None else 100.0 * value


def markdown(rows: list[dict], budget: str, minutes: float = 0.0) -> str:
  """The results table, every metric in percent."""
  if budget == 'cpu':
    return _cpu_markdown(rows, minutes)
  lines = [f'# Spikingformer-JAX benchmark suite ({budget})', '',
           '| benchmark | data | status | steps | metric | ours (%) | paper (%) | examples/s | wall (s) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    steps = f'{r["steps"]}/{r["total_steps"]}' if 'steps' in r else '—'
    lines.append(f'| {r["title"]} | {r.get("data", "—")} | {r["status"]} | {steps} | {r.get("metric", "—")} | '
                 f'{_fmt(_percent(r, "value"))} | {_fmt(r["paper"])} | {_fmt(r.get("examples_per_sec"), ".1f")} | '
                 f'{_fmt(r.get("wall_s"), ".0f")} |')
  lines += ['', f'{_IN_PERCENT} Paper: the reference README (github.com/zhouchenlin2096/Spikingformer); the '
            'paper publishes no Spikingformer GLUE numbers, shown as —.']
  if budget == 'smoke':
    lines.append('Smoke runs are a few steps of tiny models: they show every pipeline runs, not accuracy.')
  return '\n'.join(lines + _problems(rows)) + '\n'


def _cpu_markdown(rows: list[dict], minutes: float) -> str:
  lines = [f'# Spikingformer-JAX benchmark suite (cpu, {minutes:g} minutes each)', '',
           '| benchmark | data (train -> held-out eval) | metric | ours (%) | majority (%) | '
           'reference, same budget (%) | paper, full recipe (%) | steps | examples seen | examples/s | '
           'train wall (s) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    if r['status'] in ('ok', 'ok (finished earlier)'):
      ours = _fmt(_percent(r, 'value'))
    else:
      ours = r['status']
    lines.append(f'| {r["title"]} | {r.get("data", "—")} | {r.get("metric", "—")} | {ours} | '
                 f'{_fmt(_percent(r, "majority"))} | {_fmt(r.get("reference"), ".1f")} | {_fmt(r["paper"])} | '
                 f'{r.get("steps", "—")} | {r.get("examples_seen", "—")} | '
                 f'{_fmt(r.get("examples_per_sec"), ".1f")} | {_fmt(r.get("train_wall_s"), ".0f")} |')
  lines += ['', f'{_IN_PERCENT} Train wall: start-up, compilation and training, capped by the budget (text '
            'recipes that finish their epochs sooner stop sooner); the final evaluation comes after it. Majority: '
            'always predicting the most frequent training label. Paper: the reference README, full datasets and '
            'recipes.']
  lines += [f'- Reference for {r["title"]}: {r["reference_source"]}.' for r in rows if r.get('reference')]
  return '\n'.join(lines + _problems(rows)) + '\n'


def _problems(rows: list[dict]) -> list[str]:
  lines = []
  for r in rows:
    if r['status'] == 'data not prepared':
      lines.append(f'- **{r["title"]}**: data not prepared ({r["error"]}). Prepare: `{r["prepare"]}`')
    elif r['status'] == 'failed':
      lines.append(f'- **{r["title"]}** failed: {r["error"]}')
  return lines


def run_suite(budget: str, out, names=None, devices=None, log=print, minutes: float = 0.0) -> list[dict]:
  """Runs the selected benchmarks (default: all of the budget) and writes results.json and results.md in `out`."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  selected = [get_benchmark(n, budget) for n in names] if names else list(benchmarks(budget))
  rows = []
  for bench in selected:
    log(f'[suite] {bench.title}: {config_string(bench, budget)} ({budget})')
    row = run_benchmark(bench, budget, out, devices, minutes)
    log(f'[suite] {bench.title}: {row["status"]}, {row.get("metric")} = {row.get("value")}, '
        f'{row["wall_s"]:.0f} s')
    rows.append(row)
    (out / 'results.json').write_text(json.dumps({'budget': budget, 'minutes': minutes, 'results': rows}, indent=2,
                                                 default=float))
  (out / 'results.md').write_text(markdown(rows, budget, minutes))
  return rows


def main(argv):
  del argv
  import jax  # noqa: PLC0415
  from absl import app, flags  # noqa: PLC0415

  from spikingformer_jax import compile_cache, console  # noqa: PLC0415

  console.quiet_orbax()
  f = flags.FLAGS
  if f.budget == 'cpu' and f.minutes <= 0:
    raise app.UsageError('--budget=cpu needs --minutes > 0 (the wall time of each benchmark).')
  cpu_runtime.apply_cpu_flags()
  default_cache = str(pathlib.Path(f.out) / 'jax_cache') if f.budget != 'full' else 'off'
  compile_cache.enable(f.compile_cache or default_cache)
  devices = jax.devices()[:1] if f.budget != 'full' else None
  rows = run_suite(f.budget, f.out, f.only or None, devices, minutes=f.minutes)
  print(markdown(rows, f.budget, f.minutes))
  return 1 if any(r['status'] == 'failed' for r in rows) else 0


def _define_flags():
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_enum('budget', 'smoke', list(BUDGETS), 'smoke: CPU minutes on samples; cpu: --minutes per '
                    'benchmark on the real samples; full: the reference recipes.')
  flags.DEFINE_float('minutes', 0.0, 'cpu budget: wall-time minutes per benchmark (compilation included).')
  flags.DEFINE_string('out', None, 'Folder for results.json, results.md and the benchmark workdirs.')
  flags.DEFINE_list('only', [], 'Subset of benchmarks: ' + ','.join(b.name for b in BENCHMARKS + CPU_EXTRAS))
  flags.DEFINE_string('compile_cache', '', 'JAX persistent compilation cache folder ("" = <out>/jax_cache for '
                      'smoke and cpu, off for full; "off" disables it).')
  flags.mark_flag_as_required('out')


def cli():
  """`spikingformer-suite`: the command line above."""
  from absl import app  # noqa: PLC0415 (flags are defined only when run as a program)

  _define_flags()
  app.run(main)


if __name__ == '__main__':
  cli()
