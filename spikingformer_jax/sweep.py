"""Hyperparameter sweeps as code: a grid or list of config overrides, expanded into named runs.

A sweep file (`experiments/sweeps/<name>.py`) defines `get_sweep()` returning
`{'config': 'experiments/cifar10.py:variant=4-384', 'overrides': [{'optim.lr': 1e-3, ...}, ...]}`;
`grid({...})` builds the list as a Cartesian product. Each run is named by its overrides (sorted
keys, so the name never depends on dict order) and gets the workdir `<root>/<name>`.

  python -m spikingformer_jax.sweep --sweep=experiments/sweeps/cifar10_lr_wd.py --root=/runs/lr_wd --dry_run
  python -m spikingformer_jax.sweep --sweep=... --root=gs://bucket/lr_wd --target=tpu \
      --tpu_args='--name=my-pod --zone=us-central2-b'

Every run's config is built and validated before anything starts, so a misspelt key fails the
whole sweep up front. A run whose workdir holds `summary.json` with `"completed": true` (written by
`spikingformer_jax.main`) is skipped; an unfinished one is started again and resumes from its
checkpoint. `--target=local` runs the commands one after another here; `--target=tpu` sends each
one through `launch/tpu_pod.sh run` to a TPU VM pod slice (one run at a time on the slice).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import pathlib
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

import ml_collections
from etils import epath

from spikingformer_jax import configs

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
  if str(REPO) not in sys.path:  # configs import `experiments.common`
    sys.path.insert(0, str(REPO))
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
# Runs.

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


def load_sweep(path: str) -> tuple[str, list[dict]]:
  module = _load_module(resolve_config_path(path), 'sweep')
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path}: defines no get_sweep().')
  spec = module.get_sweep()
  if not isinstance(spec, dict) or set(spec) != {'config', 'overrides'}:
    raise SweepError(f'{path}: get_sweep() must return {{"config": "file.py:arg", "overrides": [dict, ...]}}, '
                     f'got {spec!r:.200}.')
  overrides = list(spec['overrides'])
  if not overrides or not all(isinstance(o, dict) for o in overrides):
    raise SweepError(f'{path}: "overrides" must be a non-empty list of dicts.')
  return spec['config'], overrides


def expand(sweep_path: str, root: str) -> list[Run]:
  """The sweep's runs, each config built and validated; duplicate names are an error."""
  config_string, override_list = load_sweep(sweep_path)
  runs, seen = [], {}
  for i, overrides in enumerate(override_list):
    name = run_name(overrides)
    if name in seen:
      raise SweepError(f'{sweep_path}: runs {seen[name]} and {i} have the same overrides ({name}).')
    seen[name] = i
    origin = f'{sweep_path} run {i} ({name})'
    config = apply_overrides(load_config(config_string), overrides, origin)
    try:
      configs.validate(config)
    except configs.ConfigError as e:
      raise SweepError(f'{origin}: {e}') from None
    runs.append(Run(name, config_string, dict(overrides), str(epath.Path(root) / name)))
  return runs


def command(run: Run, target: str, *, python: str = sys.executable, tpu_args: str = '') -> list[str]:
  """The process that trains `run` on `target` ('local': here; 'tpu': every worker of a pod slice)."""
  if target == 'local':
    return [python] + run.main_args()
  if target == 'tpu':
    return (['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'run'] + shlex.split(tpu_args) + ['--'] +
            run.main_args()[2:])  # tpu_pod.sh adds python3 -m spikingformer_jax.main and --config.distributed
  raise SweepError(f'target={target!r}: expected "local" or "tpu".')


def launch(runs: list[Run], target: str, *, dry_run: bool, tpu_args: str = '', stream=sys.stdout) -> dict:
  """Starts every unfinished run in order; returns {'skipped': [...], 'started': [...], 'failed': [...]}."""
  report = {'skipped': [], 'started': [], 'failed': []}
  for run in runs:
    if is_finished(run.workdir):
      print(f'# {run.name}: finished ({run.workdir}/summary.json), skipped', file=stream)
      report['skipped'].append(run.name)
      continue
    cmd = command(run, target, tpu_args=tpu_args)
    print(shlex.join(cmd), file=stream, flush=True)
    report['started'].append(run.name)
    if not dry_run and subprocess.run(cmd, cwd=REPO, check=False).returncode != 0:
      print(f'# {run.name}: FAILED', file=stream)
      report['failed'].append(run.name)
  return report


def main(argv=None):
  import argparse  # noqa: PLC0415
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sweep', required=True, help='experiments/sweeps/<name>.py')
  parser.add_argument('--root', required=True, help='parent of the run workdirs (a local path or gs://...)')
  parser.add_argument('--target', choices=('local', 'tpu'), default='local')
  parser.add_argument('--dry_run', '--dry-run', action='store_true', help='print the commands, start nothing')
  parser.add_argument('--tpu_args', default='', help='flags for launch/tpu_pod.sh run, e.g. "--name=X --zone=Y"')
  args = parser.parse_args(argv)
  try:
    runs = expand(args.sweep, args.root)
    report = launch(runs, args.target, dry_run=args.dry_run, tpu_args=args.tpu_args)
  except (SweepError, configs.ConfigError, ValueError) as e:
    parser.exit(2, f'error: {e}\n')
  print(f'# {len(runs)} runs: {len(report["skipped"])} finished, {len(report["started"])} '
        f'{"to start" if args.dry_run else "started"}, {len(report["failed"])} failed')
  return 1 if report['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
