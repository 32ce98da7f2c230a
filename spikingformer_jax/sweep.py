"""Hyperparameter sweeps as code: config overrides expanded into named trials, run in parallel, reported.

A sweep file (`experiments/sweeps/<name>.py`) defines `get_sweep()` returning
`{'config': 'experiments/cifar10.py:variant=4-384', 'overrides': [{'optim.lr': 1e-3, ...}, ...]}`
and optionally `'early_stopping': {'epochs': [2], 'min_trials': 3}`; `grid({...})` builds the list as a
Cartesian product. Each trial is named by its overrides (sorted keys, so the name never depends on
dict order) and gets the workdir `<root>/<name>`.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/sweep --parallel=2
  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/sweep --vmap=4
  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/sweep --report
  python -m spikingformer_jax.sweep --sweep=... --root=gs://bucket/lr_wd --target=tpu \
      --tpu_names=pod-a,pod-b --tpu_args='--zone=us-central2-b'

Every trial's config is built and validated before anything starts, so a misspelt key fails the
whole sweep up front. A trial whose `summary.json` says `"completed": true`, or that the sweep's
early-stopping rule stopped, is skipped; any other (unfinished, failed) is started again and resumes
from its checkpoint.

- `--parallel=N` runs up to N trials at once, each its own process on its own devices: a share of
  the GPUs (CUDA_VISIBLE_DEVICES) or TPU chips (TPU_VISIBLE_CHIPS and its process bounds) of this
  host, or of its CPU cores (affinity). `--target=tpu` sends each trial through
  `launch/tpu_pod.sh run` to a TPU VM slice, one trial at a time per slice of `--tpu_names`.
- `--vmap=K` trains up to K trials that differ only in optimizer hyperparameters and seeds as one
  compiled step (spikingformer_jax.trials); the other trials run on their own.
- A trial that fails is reported (its last error line) and the others go on; the driver records
  failures, early stops and running trials in `<root>/sweep_state.json` for the report.
- `early_stopping` (spikingformer_jax.sweep_results.EarlyStopping): every `--poll_seconds` the
  driver compares the trials' metrics at the given epochs or steps and stops a running trial below
  the median (SIGTERM: it saves a checkpoint and exits). A vmapped group applies the same rule at
  each of its evaluations (its trials reach each epoch together), so its trials stop right there.
- `--report` writes the results table (Markdown and CSV) and plots into the root (see
  spikingformer_jax.sweep_results); it launches nothing.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import ml_collections
from etils import epath

from spikingformer_jax import configs, sweep_results, tasks, train, trials

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_NAME = 120


class SweepError(ValueError):
  """A sweep file, one of its overrides or its runs is not usable; the message names which."""


def grid(axes: dict[str, Sequence[Any]]) -> list[dict]:
  """Every combination of the axis values, the first axis varying slowest: {'a': [1, 2], 'b': [3]} ->
  [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]."""
  for key, values in axes.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise SweepError(f'grid axis {key!r}: expected a non-empty list of values, got {values!r}.')
  keys = list(axes)
  return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


# ---------------------------------------------------------------------------------------------------
# Configs: the same `file.py:arg` strings as `--config=` of spikingformer_jax.main.

def resolve_config_path(path: str) -> pathlib.Path:
  """A config file relative to the working directory, else to the repository root."""
  candidate = pathlib.Path(path)
  for base in (pathlib.Path.cwd(), REPO):
    full = candidate if candidate.is_absolute() else base / candidate
    if full.is_file():
      return full.resolve()
  raise SweepError(f'Config file {path!r} not found (relative to {pathlib.Path.cwd()} or {REPO}).')


def _load_module(path: pathlib.Path, prefix: str):
  """The module of a config or sweep file (configs import `experiments.common`: installed with the package,
  or importable from a checkout's root)."""
  spec = importlib.util.spec_from_file_location(f'{prefix}_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config_string: str) -> ml_collections.ConfigDict:
  """'experiments/cifar10.py:variant=4-384' -> get_config('variant=4-384') of that file."""
  path, _, arg = config_string.partition(':')
  module = _load_module(resolve_config_path(path), 'config')
  if not hasattr(module, 'get_config'):
    raise SweepError(f'{path}: defines no get_config().')
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict, origin: str = 'override'):
  """Sets dotted keys in place; a key the config lacks or a value of the wrong type is an error."""
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise SweepError(f'{origin}: config has no section {".".join(parents[:i + 1])!r} (key {key!r}).')
      node = node[part]
    if leaf not in node:
      raise SweepError(f'{origin}: unknown config key {key!r}; known at that level: {sorted(node.keys())}.')
    try:
      node[leaf] = value
    except TypeError as e:
      raise SweepError(f'{origin}: {key} = {value!r} does not fit the config field ({e}).') from None
  return config



# ---------------------------------------------------------------------------------------------------
# Trials.

def format_value(value) -> str:
  """The command-line form that ml_collections parses back into the same value."""
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(format_value(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


def run_name(overrides: dict) -> str:
  """'data.T=16_optim.lr=0.001' from the overrides (sorted keys); 'base' for none."""
  if not overrides:
    return 'base'
  name = '_'.join(f'{k}={format_value(overrides[k])}' for k in sorted(overrides))
  name = re.sub(r'[^A-Za-z0-9._=+-]+', '-', name)
  if len(name) > MAX_NAME:
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    name = f'{name[:MAX_NAME - 9]}-{digest}'
  return name


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str  # the base `file.py:arg` string
  overrides: dict
  workdir: str

  def main_args(self) -> list[str]:
    """The arguments of `python -m spikingformer_jax.main` for this run."""
    return (['-m', 'spikingformer_jax.main', f'--config={self.config}'] +
            [f'--config.{k}={format_value(v)}' for k, v in self.overrides.items()] + [f'--workdir={self.workdir}'])

  def build_config(self) -> ml_collections.ConfigDict:
    return apply_overrides(load_config(self.config), self.overrides, f'run {self.name}')


def is_finished(workdir) -> bool:
  """True when `<workdir>/summary.json` says completed (what spikingformer_jax.main writes at the end)."""
  summary = epath.Path(workdir) / 'summary.json'
  try:
    if not summary.exists():
      return False
  except ImportError as e:  # e.g. gs:// without gcsfs
    raise SweepError(f'Cannot check {summary} for a finished run ({e}); install the filesystem package '
                     '(gs://: pip install gcsfs) or use a local --root.') from None
  try:
    return bool(json.loads(summary.read_text()).get('completed', False))
  except (json.JSONDecodeError, AttributeError):
    return False  # a half-written or foreign file: run again (the trainer resumes from its checkpoint)


@dataclasses.dataclass(frozen=True)
class Spec:
  config: str
  overrides: list
  early_stopping: sweep_results.EarlyStopping | None = None


def load_spec(path: str) -> Spec:
  module = _load_module(resolve_config_path(path), 'sweep')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path}: defines no get_sweep().')
  spec = module.get_sweep()
  if not isinstance(spec, dict) or not {'config', 'overrides'} <= set(spec) <= {'config', 'overrides',
                                                                                 'early_stopping'}:
    raise SweepError(f'{path}: get_sweep() must return {{"config": "file.py:arg", "overrides": [dict, ...]}} '
                     f'(and optionally "early_stopping": {{...}}), got {spec!r:.200}.')
  overrides = list(spec['overrides'])
  if not overrides or not all(isinstance(o, dict) for o in overrides):
    raise SweepError(f'{path}: "overrides" must be a non-empty list of dicts.')
  early = spec.get('early_stopping')
  try:
    early = sweep_results.EarlyStopping.from_spec(early, path) if early is not None else None
  except (ValueError, TypeError) as e:
    raise SweepError(str(e)) from None
  return Spec(spec['config'], overrides, early)


def expand(sweep_path: str, root: str) -> list[Run]:
  """The sweep's runs, each config built and validated; duplicate names are an error."""
  spec = load_spec(sweep_path)
  runs, seen = [], {}
  for i, overrides in enumerate(spec.overrides):
    name = run_name(overrides)
    if name in seen:
      raise SweepError(f'{sweep_path}: runs {seen[name]} and {i} have the same overrides ({name}).')
    seen[name] = i
    origin = f'{sweep_path} run {i} ({name})'
    config = apply_overrides(load_config(spec.config), overrides, origin)
    try:
      configs.validate(config)
    except configs.ConfigError as e:
      raise SweepError(f'{origin}: {e}') from None
    runs.append(Run(name, spec.config, dict(overrides), str(epath.Path(root) / name)))
  return runs


# ---------------------------------------------------------------------------------------------------
# Jobs: one trial in its own process, or a vmapped group of trials in one.

@dataclasses.dataclass(frozen=True)
class Job:
  runs: tuple

  @property
  def label(self) -> str:
    return self.runs[0].name if len(self.runs) == 1 else f'group of {len(self.runs)}'

  @property
  def kind(self) -> str:
    return 'process' if len(self.runs) == 1 else f'vmap x{len(self.runs)}'


def plan_jobs(runs: Sequence[Run], vmap: int) -> list[Job]:
  """Runs in order; with vmap > 1, runs whose configs differ only in trials.TRIAL_KEYS in groups of <= vmap
  (a run with config.time_budget_minutes alone)."""
  if vmap <= 1:
    return [Job((r,)) for r in runs]
  buckets, jobs = collections.defaultdict(list), []
  for run in runs:
    flat = {k: v for k, v in trials.flat_config(run.build_config()).items() if k not in trials.TRIAL_KEYS}
    if flat.get('time_budget_minutes', 0) > 0:  # a wall-time budget is the plain trainer's
      jobs.append(Job((run,)))
      continue
    buckets[json.dumps(flat, sort_keys=True, default=str)].append(run)
  for bucket in buckets.values():
    jobs += [Job(tuple(bucket[i:i + vmap])) for i in range(0, len(bucket), vmap)]
  order = {r.name: i for i, r in enumerate(runs)}
  return sorted(jobs, key=lambda j: order[j.runs[0].name])


def job_args(job: Job, sweep_path: str, root: str) -> list[str]:
  """`-m <module> <flags>` of the job: spikingformer_jax.main for one trial, .trials for a group."""
  if len(job.runs) == 1:
    return job.runs[0].main_args()
  return ['-m', 'spikingformer_jax.trials', f'--sweep={sweep_path}', f'--root={root}',
          '--trials=' + ','.join(r.name for r in job.runs)]


def command(run, target: str, *, python: str = sys.executable, tpu_args: str = '', sweep_path: str = '',
            root: str = '') -> list[str]:
  """The process that trains `run` (a Run or a Job) on `target` ('local': here; 'tpu': every worker of a slice)."""
  job = run if isinstance(run, Job) else Job((run,))
  args = job_args(job, sweep_path, root)
  if target == 'local':
    return [python] + args
  if target == 'tpu':  # tpu_pod.sh adds python3 -m <module> (and --config.distributed=True for main)
    group = ['--module=spikingformer_jax.trials'] if len(job.runs) > 1 else []
    return (['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'run'] + shlex.split(tpu_args) + group + ['--'] + args[2:] +
            (['--distributed'] if group else []))
  raise SweepError(f'target={target!r}: expected "local" or "tpu".')


# ---------------------------------------------------------------------------------------------------
# Device slots: what each of the parallel processes may use.

@dataclasses.dataclass(frozen=True)
class Slot:
  env: dict  # added to the process environment
  cpus: frozenset | None = None  # CPU affinity (CPU training)
  tpu_name: str = ''  # --target=tpu: the slice

  def describe(self) -> str:
    parts = [f'{k}={v}' for k, v in self.env.items() if k in ('CUDA_VISIBLE_DEVICES', 'TPU_VISIBLE_CHIPS')]
    if self.cpus is not None:
      parts.append(f'cpus {",".join(map(str, sorted(self.cpus)))}')
    if self.tpu_name:
      parts.append(f'slice {self.tpu_name}')
    return ', '.join(parts) or 'all devices'


TPU_CHIP_BOUNDS = {1: '1,1,1', 2: '1,2,1', 4: '2,2,1'}
TPU_PORT = 8476


def detect_accelerator() -> tuple[str, int]:
  """('tpu' | 'gpu' | 'cpu', how many chips / GPUs / usable cores) of this host, without starting JAX."""
  chips = glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*')
  if chips:
    return 'tpu', len(chips)
  if shutil.which('nvidia-smi'):
    result = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, check=False)
    gpus = [l for l in result.stdout.splitlines() if l.startswith('GPU ')]
    if result.returncode == 0 and gpus:
      return 'gpu', len(gpus)
  return 'cpu', len(os.sched_getaffinity(0))


def device_slots(parallel: int, accelerator: str, count: int, per_trial: int = 0) -> list[Slot]:
  """`parallel` disjoint device sets of `per_trial` devices (default: an equal share of `count`)."""
  if parallel < 1:
    raise SweepError(f'--parallel={parallel}: expected >= 1.')
  if parallel == 1 and not per_trial:
    return [Slot({})]
  per = per_trial or count // parallel
  if accelerator == 'cpu':
    cores = sorted(os.sched_getaffinity(0))
    if per < 1:  # more trials than cores: they share all of them
      return [Slot({}) for _ in range(parallel)]
    return [Slot({}, frozenset(cores[i * per:(i + 1) * per])) for i in range(parallel)]
  if per < 1 or per * parallel > count:
    raise SweepError(f'--parallel={parallel} x {per or "?"} devices per trial: this host has {count} '
                     f'{accelerator.upper()} devices; lower --parallel or --devices_per_trial.')
  slots = []
  for i in range(parallel):
    ids = ','.join(str(d) for d in range(i * per, (i + 1) * per))
    if accelerator == 'gpu':
      slots.append(Slot({'CUDA_VISIBLE_DEVICES': ids}))
      continue
    if per not in TPU_CHIP_BOUNDS:
      raise SweepError(f'{per} TPU chips per trial: a process can own {sorted(TPU_CHIP_BOUNDS)} chips of a host.')
    port = str(TPU_PORT + i)
    slots.append(Slot({'TPU_VISIBLE_CHIPS': ids, 'TPU_CHIPS_PER_PROCESS_BOUNDS': TPU_CHIP_BOUNDS[per],
                       'TPU_PROCESS_BOUNDS': '1,1,1', 'TPU_MESH_CONTROLLER_ADDRESS': f'localhost:{port}',
                       'TPU_MESH_CONTROLLER_PORT': port, 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}))
  return slots


def tpu_slots(tpu_names: Sequence[str], tpu_args: str) -> list[Slot]:
  if not tpu_names and '--name=' not in tpu_args:
    raise SweepError('--target=tpu needs the slices: --tpu_names=a,b (one trial at a time on each) or '
                     '--tpu_args="--name=X ...".')
  return [Slot({}, tpu_name=name) for name in tpu_names] or [Slot({})]


# ---------------------------------------------------------------------------------------------------
# Running jobs.

class _Process:
  """A started job: its process, and a thread that prints its output prefixed and keeps the tail."""

  def __init__(self, job: Job, cmd: list[str], slot: Slot, stream):
    self.job, self.slot, self.stopping = job, slot, {}
    env = {**os.environ, **slot.env, 'PYTHONUNBUFFERED': '1', 'TQDM_DISABLE': '1'}  # no progress bars in pipes
    # Its own session: a Ctrl-C reaches only the driver, which stops each trial with SIGTERM (a checkpoint).
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors='replace', start_new_session=True)
    if slot.cpus is not None:
      os.sched_setaffinity(self.proc.pid, slot.cpus)  # before it starts JAX: its thread pools follow
    self.tail = collections.deque(maxlen=40)
    self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
    self.thread.start()

  def _pump(self, stream):
    for line in self.proc.stdout:
      self.tail.append(line.rstrip('\n'))
      print(f'[{self.job.label}] {line}', end='', file=stream, flush=True)

  def error_line(self) -> str:
    """The last line that names an error, else the last line."""
    lines = [l for l in self.tail if l.strip()]
    errors = [l for l in lines if re.search(r'(Error|Exception|error:|FAILED)', l)]
    return (errors or lines or ['(no output)'])[-1].strip()[:500]


def steps_per_epoch(runs: Sequence[Run]) -> int:
  """The trials' common steps per epoch, for an early-stopping rule given in epochs."""
  found = {}
  for run in runs:
    config = run.build_config()
    key = json.dumps([config.data.to_dict(), config.batch_size], sort_keys=True, default=str)
    if key not in found:
      try:
        found[key] = train.plan(config, tasks.get_task(config).data_module.dataset_info(config.data))[0]
      except Exception as e:  # noqa: BLE001 (any reason the dataset cannot be read here)
        raise SweepError(f'early_stopping.epochs: cannot read the dataset of {run.name} here to count its steps per '
                         f'epoch ({type(e).__name__}: {e}); give early_stopping.steps instead.') from None
  if len(set(found.values())) > 1:
    raise SweepError(f'early_stopping.epochs: the trials have different steps per epoch ({sorted(set(found.values()))}'
                     '); give early_stopping.steps instead.')
  return next(iter(found.values()))


class Driver:
  """Starts the jobs on free slots, records their outcome, applies early stopping; see launch()."""

  def __init__(self, jobs, slots, target, *, sweep_path, root, tpu_args, python, stream, early_stopping, metric,
               poll_seconds):
    self.pending, self.slots = collections.deque(jobs), list(slots)
    self.target, self.sweep_path, self.root, self.tpu_args = target, sweep_path, root, tpu_args
    self.python, self.stream, self.early, self.metric = python, stream, early_stopping, metric
    self.poll_seconds = poll_seconds
    self.state = sweep_results.SweepState(root)
    self.running: list[_Process] = []
    self.outcome = {'started': [], 'failed': [], 'stopped': []}
    self.all_runs = [r for j in jobs for r in j.runs]
    self.steps_per_epoch = steps_per_epoch(self.all_runs) if self.early and self.early.epochs else None

  def say(self, text):
    print(text, file=self.stream, flush=True)

  def command(self, job: Job, slot: Slot) -> list[str]:
    tpu_args = self.tpu_args + (f' --name={slot.tpu_name}' if slot.tpu_name else '')
    return command(job, self.target, python=self.python, tpu_args=tpu_args, sweep_path=self.sweep_path,
                   root=self.root)

  def start(self, job: Job, slot: Slot):
    cmd = self.command(job, slot)
    self.say(f'# {job.label} on {slot.describe()}: {shlex.join(cmd)}')
    if len(job.runs) > 1:
      self.say(f'# {job.label}: {", ".join(r.name for r in job.runs)} (vmapped)')
    for run in job.runs:
      self.state.update(run.name, 'running', job=job.kind)
      self.outcome['started'].append(run.name)
    self.running.append(_Process(job, cmd, slot, self.stream))

  def finish(self, process: _Process):
    process.thread.join()
    code = process.proc.returncode
    for run in process.job.runs:
      summary = sweep_results.read_summary(run.workdir) or {}
      group_ran = len(process.job.runs) > 1 and code in (0, trials.FAILED_TRIALS, train.EXIT_PREEMPTED)
      if group_ran and summary.get('error'):
        status, reason = 'failed', summary['error']
      elif group_ran and summary.get('stopped'):
        status, reason = 'stopped', summary['stopped']
      elif code not in (0, train.EXIT_PREEMPTED) and not group_ran:  # 75: saved and stopped, resumable
        status, reason = 'failed', f'exit code {code}: {process.error_line()}'
      elif summary.get('completed'):
        status, reason = 'finished', ''
      elif run.name in process.stopping:
        status, reason = 'stopped', process.stopping[run.name]
      else:
        status, reason = 'unfinished', 'ended before its last step (preempted?); rerun the sweep to resume'
      self.state.update(run.name, status, reason)
      if status in ('failed', 'stopped'):
        self.outcome[status].append(run.name)
      self.say(f'# {run.name}: {status.upper() if status == "failed" else status}' + (f': {reason}' if reason else ''))

  def apply_early_stopping(self):
    """Stops the single-trial processes the rule stops (vmapped groups apply it themselves)."""
    if not self.early:
      return
    active = {p.job.runs[0].name: p for p in self.running if len(p.job.runs) == 1 and not p.stopping}
    results = sweep_results.collect([(r.name, r.overrides, r.workdir) for r in self.all_runs], self.metric,
                                    self.root)
    for name, reason in sweep_results.decide_stops(self.early, results, active, self.metric,
                                                   self.steps_per_epoch).items():
      process = active[name]
      process.stopping[name] = reason
      self.say(f'# {name}: stopping: {reason}')
      if self.target == 'tpu':
        subprocess.run(['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'stop'] + shlex.split(self.tpu_args) +
                       ([f'--name={process.slot.tpu_name}'] if process.slot.tpu_name else []), check=False)
      else:
        process.proc.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits

  def run(self):
    """Runs every job; on Ctrl-C or SIGTERM the running trials get SIGTERM (each saves a checkpoint)."""
    free = list(self.slots)
    last_check = 0.0
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
      while self.pending or self.running:
        while self.pending and free:
          self.start(self.pending.popleft(), free.pop(0))
        time.sleep(min(0.2, self.poll_seconds))
        for process in [p for p in self.running if p.proc.poll() is not None]:
          self.running.remove(process)
          self.finish(process)
          free.append(process.slot)
        if time.monotonic() - last_check >= self.poll_seconds:
          last_check = time.monotonic()
          self.apply_early_stopping()
    except KeyboardInterrupt:
      self.say('# interrupted: stopping the running trials (each saves a checkpoint; rerun to resume)')
      for process in self.running:
        process.proc.send_signal(signal.SIGTERM)
      for process in self.running:
        process.proc.wait()
        self.finish(process)
      raise
    finally:
      if in_main_thread:
        signal.signal(signal.SIGTERM, previous)
    return self.outcome


def _raise_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


def launch(runs: list[Run], target: str, *, dry_run: bool, tpu_args: str = '', stream=sys.stdout,
           parallel: int = 1, vmap: int = 1, sweep_path: str = '', root: str = '', slots: Sequence[Slot] = (),
           early_stopping=None, metric: str = 'top1', poll_seconds: float = 5.0, python: str = sys.executable,
           ) -> dict:
  """Starts every unfinished run (up to `parallel` at once, on `slots`); returns the names
  {'skipped': [...], 'started': [...], 'failed': [...], 'stopped': [...]}."""
  record = sweep_results.SweepState(root).read() if root else {}
  todo, skipped = [], []
  for run in runs:
    if is_finished(run.workdir):
      print(f'# {run.name}: finished ({run.workdir}/summary.json), skipped', file=stream)
      skipped.append(run.name)
    elif record.get(run.name, {}).get('status') == 'stopped':
      print(f'# {run.name}: stopped early ({record[run.name].get("reason", "")}), skipped', file=stream)
      skipped.append(run.name)
    else:
      todo.append(run)
  jobs = plan_jobs(todo, vmap)
  slots = list(slots) or [Slot({})] * parallel
  driver = Driver(jobs, slots, target, sweep_path=sweep_path, root=root, tpu_args=tpu_args, python=python,
                  stream=stream, early_stopping=early_stopping, metric=metric, poll_seconds=poll_seconds)
  if dry_run:
    for i, job in enumerate(jobs):
      slot = slots[i % len(slots)]
      env = ''.join(f'{k}={v} ' for k, v in slot.env.items())
      print(env + shlex.join(driver.command(job, slot)), file=stream, flush=True)
    return {'skipped': skipped, 'started': [r.name for r in todo], 'failed': [], 'stopped': []}
  return dict(skipped=skipped, **driver.run())


# ---------------------------------------------------------------------------------------------------
# Command line.

def report(sweep_path: str, root: str, out_dir: str = '', stream=sys.stdout) -> dict:
  """Writes the results report of the sweep's trials; returns {kind: path}."""
  spec = load_spec(sweep_path)
  runs = expand(sweep_path, root)
  metric = load_config(spec.config).metric
  keys = sorted({k for r in runs for k in r.overrides})
  flats = [trials.flat_config(r.build_config()) for r in runs]
  results = sweep_results.collect([(r.name, {k: f.get(k) for k in keys}, r.workdir) for r, f in zip(runs, flats)],
                                  metric, root)
  note = ''
  if spec.early_stopping:
    e = spec.early_stopping
    when = ', '.join([f'epoch {x}' for x in e.epochs] + [f'step {x}' for x in e.steps])
    note = (f'Early stopping: a trial below the median {metric} of the trials at {when} was stopped '
            f'(once {e.min_trials} trials had reached it).')
  paths = sweep_results.write_report(results, keys, metric, out_dir or root, title=f'Sweep {sweep_path}', note=note)
  header, rows = sweep_results.table_rows(results, keys, metric)
  print(sweep_results.markdown_table(header, rows), file=stream)
  for kind, path in paths.items():
    print(f'# {kind}: {path}', file=stream)
  return paths


def main(argv=None):
  import argparse  # noqa: PLC0415
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sweep', required=True, help='experiments/sweeps/<name>.py')
  parser.add_argument('--root', required=True, help='parent of the trial workdirs (a local path or gs://...)')
  parser.add_argument('--target', choices=('local', 'tpu'), default='local')
  parser.add_argument('--parallel', type=int, default=0,
                      help='trials at once (default 1 here, one per slice of --tpu_names for --target=tpu)')
  parser.add_argument('--devices_per_trial', type=int, default=0, help='default: an equal share of this host')
  parser.add_argument('--accelerator', choices=('auto', 'cpu', 'gpu', 'tpu'), default='auto',
                      help='what --parallel shares out (auto: TPU chips, else GPUs, else CPU cores)')
  parser.add_argument('--vmap', type=int, default=1, help='train up to K hyperparameter/seed trials as one step')
  parser.add_argument('--dry_run', '--dry-run', action='store_true', help='print the commands, start nothing')
  parser.add_argument('--tpu_args', default='', help='flags for launch/tpu_pod.sh run, e.g. "--zone=Y"')
  parser.add_argument('--tpu_names', default='', help='--target=tpu: comma-separated slice names')
  parser.add_argument('--poll_seconds', type=float, default=5.0, help='how often early stopping looks')
  parser.add_argument('--report', action='store_true', help='write the results report; start nothing')
  parser.add_argument('--report_dir', default='', help='where the report goes (default: --root)')
  args = parser.parse_args(argv)
  try:
    if args.report:
      report(args.sweep, args.root, args.report_dir)
      return 0
    spec = load_spec(args.sweep)
    runs = expand(args.sweep, args.root)
    if args.target == 'tpu':
      slots = tpu_slots([n for n in args.tpu_names.split(',') if n], args.tpu_args)
      if args.parallel > len(slots):
        raise SweepError(f'--parallel={args.parallel} but {len(slots)} TPU slice(s): one trial at a time per slice.')
    else:
      detected, count = detect_accelerator()
      kind = detected if args.accelerator == 'auto' else args.accelerator
      if kind == 'cpu':
        count = len(os.sched_getaffinity(0))
      elif kind != detected:
        raise SweepError(f'--accelerator={kind}: none on this host (found {detected}).')
      slots = device_slots(max(1, args.parallel), kind, count, args.devices_per_trial)
    result = launch(runs, args.target, dry_run=args.dry_run, tpu_args=args.tpu_args, parallel=len(slots),
                    vmap=args.vmap, sweep_path=args.sweep, root=args.root, slots=slots,
                    early_stopping=spec.early_stopping, metric=load_config(spec.config).metric,
                    poll_seconds=args.poll_seconds)
  except (SweepError, configs.ConfigError, ValueError) as e:
    parser.exit(2, f'error: {e}\n')
  except KeyboardInterrupt:
    print('# interrupted: rerun the same command to resume the unfinished trials')
    return 130
  stopped = f', {len(result["stopped"])} stopped early' if result['stopped'] else ''
  print(f'# {len(runs)} runs: {len(result["skipped"])} finished, {len(result["started"])} '
        f'{"to start" if args.dry_run else "started"}, {len(result["failed"])} failed{stopped}')
  for name in result['failed']:
    print(f'# failed: {name}')
  return 1 if result['failed'] else 0


def cli():
  """`spikingformer-sweep`: the command line above."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
