"""The command line (`python -m spikingformer_jax.main`) as a user meets it: what it prints and writes."""
import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from experiments import digits, glue
from spikingformer_jax import configs, console, data, sharding, sweep, train

REPO = pathlib.Path(__file__).resolve().parents[1]
# Digits, 2 steps per epoch, an evaluation after each of 3 epochs (steps 2, 4, 6), each saved.
SHORT_RUN = {'total_steps': 6, 'num_epochs': 3, 'data.max_train_examples': 64, 'data.max_eval_examples': 120,
             'checkpoint.async_save': False, 'progress_bar': False, 'optim.warmup_epochs': 0, 'mesh.data': 1}
EVAL_LINE = re.compile(r'^epoch (\d+) step (\d+): top1 (\S+) loss (\S+) \(([\d,]+) img/s\)$')


def _cli(workdir, *flags):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  args = [f'--config={REPO / "experiments" / "digits.py"}', f'--workdir={workdir}']
  args += [f'--config.{k}={v}' for k, v in SHORT_RUN.items()]
  return subprocess.run([sys.executable, '-m', 'spikingformer_jax.main', *args, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cli') / 'run'
  return workdir, _cli(workdir)


def _evals(workdir) -> dict[int, dict]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {row['step']: row for row in rows if row['split'] == 'eval'}


def test_training_prints_one_line_per_evaluation_saves_its_config_and_drops_orbax_info(trained):
  workdir, run = trained
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [EVAL_LINE.match(line) for line in run.stdout.splitlines() if line.startswith('epoch ')]
  assert all(lines) and [(int(m[1]), int(m[2])) for m in lines] == [(1, 2), (2, 4), (3, 6)]
  evals = _evals(workdir)
  for m in lines:
    assert m[3] == f'{evals[int(m[2])]["top1"]:.4g}' and m[4] == f'{evals[int(m[2])]["loss"]:.4g}'
    assert int(m[5].replace(',', '')) > 0
  expected = sweep.apply_overrides(digits.get_config(), SHORT_RUN)
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(expected.to_json_best_effort())
  # Orbax logs ~200 INFO lines for this run (checkpoint_manager.py and others); none reach the console.
  assert 'checkpoint_manager.py' not in run.stderr and 'orbax-checkpoint version' not in run.stderr


def test_eval_line_puts_the_selecting_metric_first_with_4_significant_digits():
  result = {'loss': 0.0412345, 'top1': 0.988888, 'top5': 1.0}
  assert train.format_eval_line(digits.get_config(), 3, 135, result, 1234.4) == (
      'epoch 3 step 135: top1 0.9889 loss 0.04123 (1,234 img/s)')
  assert train.format_eval_line(digits.get_config(), 1, 1, result, None) == 'epoch 1 step 1: top1 0.9889 loss 0.04123'
  cola = glue.get_config('task=cola,variant=tiny')
  assert train.format_eval_line(cola, 2, 10, {'matthews': 0.123456, 'loss': 0.6, 'top1': 0.7}, 56.0) == (
      'epoch 2 step 10: matthews 0.1235 loss 0.6 (56 sequences/s)')


def test_orbax_info_filter_keeps_warnings_and_other_packages():
  keep = console.drop_info_from('orbax')
  record = lambda level, path: logging.LogRecord('absl', level, path, 1, 'message', (), None)
  assert not keep(record(logging.INFO, '/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'))
  assert keep(record(logging.WARNING, '/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'))
  assert keep(record(logging.INFO, str(REPO / 'spikingformer_jax' / 'train.py')))


def test_eval_mode_evaluates_the_chosen_checkpoint_into_its_own_summary(trained):
  workdir, run = trained
  assert run.returncode == 0, run.stderr[-3000:]
  training_summary = (workdir / 'summary.json').read_text()
  evals = _evals(workdir)
  best_top1 = max(row['top1'] for row in evals.values())
  assert evals[6]['top1'] < best_top1, 'the latest checkpoint must not be the best for this test to bite'
  for choice in ('4', 'best'):
    result = _cli(workdir, '--mode=eval', f'--checkpoint={choice}')
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / 'eval_summary.json').read_text())
    step = summary['step']
    assert step == 4 if choice == '4' else evals[step]['top1'] == best_top1
    assert summary['total_steps'] == 6 and summary['checkpoint'] == str(workdir / 'checkpoints' / str(step))
    assert summary['final']['top1'] == evals[step]['top1']
    assert re.search(rf'^\| step +\| {step} / 6 \|$', result.stdout, re.M)
  assert (workdir / 'summary.json').read_text() == training_summary
  missing = _cli(workdir, '--mode=eval', '--checkpoint=7')
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1] == (f'error: {workdir} has no checkpoint of step 7; it has steps '
                                                     '[2, 4, 6].')
  wrong = _cli(workdir, '--mode=eval', '--checkpoint=newest')
  assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1] == (
      "error: checkpoint 'newest': expected latest, best or a step number.")


def test_fine_tuning_from_another_models_checkpoint_names_both_models(trained):
  workdir, run = trained
  assert run.returncode == 0, run.stderr[-3000:]
  config = digits.get_config()
  config.model.name = 'spikformer-cifar-2-384'
  config.model.overrides = {'depth': 1, 'embed_dim': 32, 'num_heads': 2}
  configs.validate(config)
  ctx, example = train.make_context(config, data.dataset_info(config.data))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with pytest.raises(configs.ConfigError) as info:
    train.create_state(ctx, mesh, example, jax.random.PRNGKey(0), str(workdir))
  message = str(info.value)
  assert message.startswith(f"{workdir}/checkpoints/6 holds a 'spikingformer-tiny' model but config.model.name is "
                            "'spikformer-cifar-2-384': the checkpoint does not fit the model:\n  ")
  assert 'shape mismatch: params/' in message
