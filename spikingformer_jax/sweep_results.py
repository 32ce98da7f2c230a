"""What a sweep's trials have produced: status, curves and figures; the early-stopping rule; the report.

Everything is read from the trial workdirs as `spikingformer_jax.main` (or `spikingformer_jax.trials`)
writes them: `summary.json` when a run ends, `metrics.jsonl` while it runs; plus the sweep driver's
record `<root>/sweep_state.json` (which trials failed, were stopped early, or are running). Paths go
through etils.epath, so a gs:// root reads like a local one, and a trial still running shows its
latest figures.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/sweep --report

writes `<root>/report.md`, `report.csv`, `report_hparams.png` (the metric against each swept
hyperparameter) and `report_curves.png` (every trial's eval metric and training loss over steps).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import statistics
import time
from typing import Iterable, Sequence

from etils import epath

STATE_FILE = 'sweep_state.json'


# ---------------------------------------------------------------------------------------------------
# The driver's record.

class SweepState:
  """`<root>/sweep_state.json`: {trial name: {'status', 'reason', 'job', 'time'}}, written by the driver.

  Statuses: 'running', 'failed' (reason: the error), 'stopped' (reason: the early-stopping rule's
  figures), 'finished', 'unfinished'. Reads tolerate a file being rewritten (they see {}).
  """

  def __init__(self, root):
    self.path = epath.Path(root) / STATE_FILE

  def read(self) -> dict:
    try:
      return json.loads(self.path.read_text()) if self.path.exists() else {}
    except (json.JSONDecodeError, OSError):
      return {}

  def update(self, name: str, status: str, reason: str = '', job: str | None = None):
    record = self.read()
    entry = dict(record.get(name, {}), status=status, reason=reason, time=time.time())
    if job is not None:
      entry['job'] = job
    record[name] = entry
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(record, indent=1, sort_keys=True))


# ---------------------------------------------------------------------------------------------------
# One trial's results.

def read_summary(workdir) -> dict | None:
  path = epath.Path(workdir) / 'summary.json'
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (json.JSONDecodeError, OSError):
    return None


def read_metrics(workdir) -> list[dict]:
  """metrics.jsonl's rows (a line being written is skipped); a step logged twice (a resumed run) keeps the last."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  rows = {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    rows[(row.get('split'), row.get('step'))] = row
  return sorted(rows.values(), key=lambda r: (r.get('step', 0), r.get('split', '')))


@dataclasses.dataclass
class TrialResult:
  name: str
  values: dict  # swept key -> the trial's value
  status: str  # finished | stopped | failed | running | unfinished | pending
  reason: str = ''
  job: str = ''
  step: int | None = None
  total_steps: int | None = None
  best: float | None = None
  best_step: int | None = None
  final: float | None = None  # the latest evaluation (the final one once finished)
  images_per_sec: float | None = None
  eval_curve: list = dataclasses.field(default_factory=list)  # [(step, metric)]
  loss_curve: list = dataclasses.field(default_factory=list)  # [(step, training loss)]


def trial_result(name: str, values: dict, workdir, metric: str, state: dict) -> TrialResult:
  """A trial's figures: summary.json's once it has one, metrics.jsonl's before (a running trial)."""
  summary, rows = read_summary(workdir), read_metrics(workdir)
  record = state.get(name, {})
  if summary and summary.get('completed'):
    status = 'finished'
  elif record.get('status') in ('stopped', 'failed', 'running'):
    status = record['status']
  else:
    status = 'unfinished' if rows or summary else 'pending'
  result = TrialResult(name, dict(values), status, record.get('reason', '') if status in ('stopped', 'failed')
                       else '', record.get('job', ''))
  result.eval_curve = [(r['step'], r[metric]) for r in rows if r.get('split') == 'eval' and metric in r]
  result.loss_curve = [(r['step'], r['loss']) for r in rows if r.get('split') == 'train' and 'loss' in r]
  speeds = [r['examples_per_sec'] for r in rows if r.get('split') == 'train' and 'examples_per_sec' in r]
  if speeds:  # the first interval includes compilation
    result.images_per_sec = statistics.median(speeds[1:] or speeds)
  steps = [r['step'] for r in rows]
  result.step = max(steps) if steps else None
  if result.eval_curve:
    result.final = result.eval_curve[-1][1]
    result.best_step, result.best = max(result.eval_curve, key=lambda sv: (sv[1], -sv[0]))
  if summary:
    result.step, result.total_steps = summary.get('step', result.step), summary.get('total_steps')
    final, best = summary.get('final', {}), summary.get('best', {})
    if metric in final:
      result.final = final[metric]
    if metric in best and (result.best is None or best[metric] >= result.best):
      result.best, result.best_step = best[metric], best.get('step', result.best_step)
  return result


def collect(trials: Sequence[tuple[str, dict, str]], metric: str, root) -> list[TrialResult]:
  """TrialResult of every (name, swept values, workdir)."""
  state = SweepState(root).read()
  return [trial_result(name, values, workdir, metric, state) for name, values, workdir in trials]


# ---------------------------------------------------------------------------------------------------
# Early stopping.

@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Median stopping: a trial whose metric at a checkpoint (an epoch or a step) is below the median of
  every trial that reached it is stopped, once at least `min_trials` trials have (the trial counted)."""
  epochs: tuple = ()
  steps: tuple = ()
  min_trials: int = 3
  rule: str = 'median'

  @classmethod
  def from_spec(cls, spec: dict, origin: str) -> 'EarlyStopping':
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(spec, dict) or set(spec) - known:
      raise ValueError(f'{origin}: "early_stopping" must be a dict with keys from {sorted(known)}, got {spec!r}.')
    rule = cls(**{k: tuple(v) if k in ('epochs', 'steps') else v for k, v in spec.items()})
    if rule.rule != 'median':
      raise ValueError(f'{origin}: early_stopping.rule = {rule.rule!r}: expected "median".')
    if not rule.epochs and not rule.steps:
      raise ValueError(f'{origin}: early_stopping needs "epochs" or "steps" (when to compare the trials).')
    if any(not isinstance(v, int) or v < 1 for v in rule.epochs + rule.steps):
      raise ValueError(f'{origin}: early_stopping epochs and steps must be positive integers.')
    if not isinstance(rule.min_trials, int) or rule.min_trials < 2:
      raise ValueError(f'{origin}: early_stopping.min_trials = {rule.min_trials!r}: expected an integer >= 2.')
    return rule

  def checkpoints(self, steps_per_epoch: int | None) -> list[tuple[str, int]]:
    """[(label, step)] where trials are compared."""
    points = [(f'step {s}', s) for s in self.steps]
    if self.epochs:
      if steps_per_epoch is None:
        raise ValueError('early_stopping.epochs needs the steps per epoch (the dataset is not readable here); '
                         'give early_stopping.steps instead.')
      points += [(f'epoch {e}', e * steps_per_epoch) for e in self.epochs]
    return sorted(points, key=lambda p: p[1])


def value_at(result: TrialResult, step: int) -> float | None:
  """The metric of the last evaluation at or before `step`, if the trial got that far (evaluated at or after
  it); a trial that ended or was stopped earlier does not count."""
  if not result.eval_curve or result.eval_curve[-1][0] < step:
    return None
  before = [v for s, v in result.eval_curve if s <= step]
  return before[-1] if before else None


def decide_stops(rule: EarlyStopping, results: Sequence[TrialResult], candidates: Iterable[str], metric: str,
                 steps_per_epoch: int | None = None) -> dict[str, str]:
  """{name: reason} for each candidate (a trial still training) that the rule stops now."""
  candidates = set(candidates)
  stops = {}
  for label, step in rule.checkpoints(steps_per_epoch):
    values = {r.name: v for r in results if (v := value_at(r, step)) is not None}
    if len(values) < rule.min_trials:
      continue
    median = statistics.median(values.values())
    for name in sorted(candidates & set(values)):
      if values[name] < median and name not in stops:
        stops[name] = (f'{metric} {values[name]:.4f} at {label} < median {median:.4f} of {len(values)} trials '
                       '(early_stopping)')
  return stops


# ---------------------------------------------------------------------------------------------------
# The report.

def _fmt(value, digits=4) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.{digits}f}' if math.isfinite(value) else str(value)
  return str(value)


def table_rows(results: Sequence[TrialResult], keys: Sequence[str], metric: str) -> tuple[list[str], list[list]]:
  """(header, rows) sorted by the best metric (highest first; trials without one last)."""
  header = ['trial'] + list(keys) + ['status', 'step', 'total steps', f'best {metric}', 'best step',
                                     f'final {metric}', 'images/s', 'job', 'note']
  ordered = sorted(results, key=lambda r: (r.best is None, -(r.best or 0.0), r.name))
  rows = [[r.name] + [r.values.get(k) for k in keys] + [r.status, r.step, r.total_steps, r.best, r.best_step,
                                                         r.final, r.images_per_sec, r.job, r.reason] for r in ordered]
  return header, rows


def markdown_table(header, rows) -> str:
  metric_columns = {i for i, h in enumerate(header) if h.startswith(('best ', 'final ')) and h != 'best step'}

  def cell(v, col):
    if isinstance(v, float) and col not in metric_columns:
      text = f'{v:.1f}' if header[col] == 'images/s' else f'{v:g}'
    else:
      text = _fmt(v)
    return text.replace('|', '\\|').replace('\n', ' ')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(cell(v, i) for i, v in enumerate(row)) + ' |' for row in rows]
  return '\n'.join(lines)


def csv_table(header, rows) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(header)
  writer.writerows([['' if v is None else v for v in row] for row in rows])
  return out.getvalue()


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_hparams(results, keys, metric):
  """One panel per swept key: each trial's best metric against the key's value (log axis when it spans 10x)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # noqa: PLC0415
  keys = list(keys) or ['trial']
  cols = min(4, len(keys))
  rows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
  for ax in axes.flat[len(keys):]:
    ax.set_visible(False)
  for ax, key in zip(axes.flat, keys):
    points = [(r.values.get(key, r.name), r.best, r.status) for r in results if r.best is not None]
    values = [p[0] for p in points]
    if points and _numeric(values):
      xs = values
      if min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_xscale('log')
    else:
      labels = sorted({str(v) for v in values})
      xs = [labels.index(str(v)) for v in values]
      ax.set_xticks(range(len(labels)), labels, rotation=30, ha='right', fontsize=7)
    for status, marker in (('finished', 'o'), ('stopped', 'x'), ('running', '^'), ('unfinished', 's'),
                           ('failed', 'v')):
      sel = [(x, p[1]) for x, p in zip(xs, points) if p[2] == status]
      if sel:
        ax.scatter([s[0] for s in sel], [s[1] for s in sel], marker=marker, label=status)
    ax.set_xlabel(key)
    ax.set_ylabel(f'best {metric}')
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_curves(results, metric):
  """Eval metric and training loss against step, one line per trial."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # noqa: PLC0415
  fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
  for r in results:
    if r.eval_curve:
      ax_metric.plot(*zip(*r.eval_curve), marker='.', label=r.name, linestyle='--' if r.status == 'stopped' else '-')
    if r.loss_curve:
      ax_loss.plot(*zip(*r.loss_curve), label=r.name)
  for ax, label in ((ax_metric, f'eval {metric}'), (ax_loss, 'training loss')):
    ax.set_xlabel('step')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  if 0 < len(results) <= 12:
    ax_metric.legend(fontsize=6)
  fig.tight_layout()
  return fig


def _save_png(fig, path: epath.Path):
  from matplotlib import pyplot as plt  # noqa: PLC0415
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=110)
  plt.close(fig)
  path.write_bytes(buffer.getvalue())


def write_report(results: Sequence[TrialResult], keys: Sequence[str], metric: str, out_dir,
                 title: str = 'Sweep report', note: str = '') -> dict[str, str]:
  """report.md, report.csv and the two PNGs into `out_dir` (local or gs://); returns {kind: path}."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  header, rows = table_rows(results, keys, metric)
  counts = ', '.join(f'{n} {s}' for s, n in sorted(collections.Counter(r.status for r in results).items()))
  paths = {k: out_dir / f for k, f in (('markdown', 'report.md'), ('csv', 'report.csv'),
                                       ('hparams', 'report_hparams.png'), ('curves', 'report_curves.png'))}
  text = [f'# {title}', '', f'{len(results)} trials: {counts}. Sorted by best {metric} (highest first); '
          '"final" is the latest evaluation of a trial still running.', '']
  if note:
    text += [note, '']
  text += [markdown_table(header, rows), '', f'![{metric} against each swept hyperparameter](report_hparams.png)',
           '', '![learning curves](report_curves.png)', '']
  paths['markdown'].write_text('\n'.join(text))
  paths['csv'].write_text(csv_table(header, rows))
  _save_png(plot_hparams(results, keys, metric), paths['hparams'])
  _save_png(plot_curves(results, metric), paths['curves'])
  return {k: str(v) for k, v in paths.items()}

