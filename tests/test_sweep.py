"""Sweeps: deterministic expansion into named runs, validation up front, finished runs skipped, CLI round trip."""
import io
import json
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from spikingformer_jax import sweep

REPO = sweep.REPO


def _write_sweep(tmp_path, body, name='my_sweep.py'):
  path = tmp_path / name
  path.write_text('from spikingformer_jax import sweep\n\n\ndef get_sweep():\n' + body)
  return str(path)


def test_grid_is_the_cartesian_product_in_axis_order():
  runs = sweep.grid({'optim.lr': [1e-3, 5e-4], 'seed': [1, 2, 3]})
  assert runs == [{'optim.lr': lr, 'seed': s} for lr in (1e-3, 5e-4) for s in (1, 2, 3)]
  with pytest.raises(sweep.SweepError, match="grid axis 'seed'"):
    sweep.grid({'seed': 3})
  with pytest.raises(sweep.SweepError, match="grid axis 'model.name'"):
    sweep.grid({'model.name': 'abc'})  # a string is not a list of names


def test_run_names_are_deterministic_and_independent_of_key_order():
  a = sweep.run_name({'seed': 1, 'optim.lr': 0.001, 'model.name': 'spikformer-cifar-4-384'})
  b = sweep.run_name({'model.name': 'spikformer-cifar-4-384', 'optim.lr': 0.001, 'seed': 1})
  assert a == b == 'model.name=spikformer-cifar-4-384_optim.lr=0.001_seed=1'
  assert sweep.run_name({}) == 'base'
  assert sweep.run_name({'data.data_dir': '/data/x y'}) == 'data.data_dir=-data-x-y'
  long_a = sweep.run_name({'data.data_dir': 'a' * 200})
  long_b = sweep.run_name({'data.data_dir': 'a' * 199 + 'b'})
  assert len(long_a) == sweep.MAX_NAME and long_a != long_b  # truncated, told apart by a hash


def test_expand_builds_validated_runs_with_workdirs_under_root(tmp_path):
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/cifar10.py:runlocal',\n"
                                "          'overrides': sweep.grid({'optim.lr': [1e-3, 2e-3], 'seed': [0]})}\n")
  runs = sweep.expand(path, str(tmp_path / 'root'))
  assert [r.name for r in runs] == ['optim.lr=0.001_seed=0', 'optim.lr=0.002_seed=0']
  assert runs == sweep.expand(path, str(tmp_path / 'root'))  # deterministic
  assert runs[1].workdir == str(tmp_path / 'root' / 'optim.lr=0.002_seed=0')
  assert runs[0].main_args() == ['-m', 'spikingformer_jax.main', '--config=experiments/cifar10.py:runlocal',
                                 '--config.optim.lr=0.001', '--config.seed=0', f'--workdir={runs[0].workdir}']


@pytest.mark.parametrize('overrides,message', [
    ("[{'optim.lrr': 1e-3}]", r"unknown config key 'optim.lrr'"),
    ("[{'optimizer.lr': 1e-3}]", r"config has no section 'optimizer'"),
    ("[{'optim.lr': 'fast'}]", r"optim.lr = 'fast' does not fit"),
    ("[{'optim.min_lr': 1.0}]", r'run 0 \(optim.min_lr=1.0\): config.optim.min_lr = 1.0'),
    ("[{'seed': 1}, {'seed': 1}]", r'runs 0 and 1 have the same overrides'),
    ("[]", 'non-empty list'),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, overrides, message):
  path = _write_sweep(tmp_path, f"  return {{'config': 'experiments/cifar10.py', 'overrides': {overrides}}}\n")
  with pytest.raises(sweep.SweepError, match=message):
    sweep.expand(path, str(tmp_path))


def test_finished_runs_are_skipped_and_unfinished_ones_started(tmp_path):
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py', "
                                "'overrides': [{'seed': 1}, {'seed': 2}, {'seed': 3}]}\n")
  runs = sweep.expand(path, str(tmp_path / 'root'))
  for run, completed in zip(runs[:2], (True, False)):
    (tmp_path / 'root' / run.name).mkdir(parents=True)
    (tmp_path / 'root' / run.name / 'summary.json').write_text(json.dumps({'completed': completed}))
  assert [sweep.is_finished(r.workdir) for r in runs] == [True, False, False]
  out = io.StringIO()
  report = sweep.launch(runs, 'local', dry_run=True, stream=out)
  assert report == {'skipped': ['seed=1'], 'started': ['seed=2', 'seed=3'], 'failed': []}
  lines = out.getvalue().splitlines()
  assert lines[0].startswith('# seed=1: finished') and 'spikingformer_jax.main' in lines[1]
  assert lines[2].endswith(f'--workdir={runs[2].workdir}')


def test_command_line_overrides_parse_back_to_the_expanded_config(tmp_path):
  """What the printed command passes to spikingformer_jax.main gives the same config as the expansion."""
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/cifar10_dvs.py:T=16', 'overrides': [\n"
                                "      {'optim.lr': 2.5e-4, 'model.T': 10, 'data.T': 10, 'mixup.prob': 1.0,\n"
                                "       'model.name': 'spikformer-dvs-2-256', 'checkpoint.async_save': False}]}\n")
  run, = sweep.expand(path, str(tmp_path))
  expected = sweep.apply_overrides(sweep.load_config(run.config), run.overrides)
  argv = ['main'] + [a.replace('experiments/', f'{REPO}/experiments/', 1) for a in run.main_args()[2:]]
  fv = flags.FlagValues()  # the flags of spikingformer_jax.main, on their own FlagValues
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
  fv(argv)
  assert fv.config.to_dict() == expected.to_dict() and fv.workdir == run.workdir
  assert fv.config.optim.lr == 2.5e-4 and fv.config.model.T == 10 and fv.config.checkpoint.async_save is False


def test_tpu_target_goes_through_the_pod_launcher_and_cli_dry_run_lists_all_runs(tmp_path):
  run = sweep.Run('seed=1', 'experiments/digits.py', {'seed': 1}, 'gs://bucket/x/seed=1')
  cmd = sweep.command(run, 'tpu', tpu_args='--name=pod --zone=us-central2-b')
  assert cmd[:3] == ['bash', str(REPO / 'launch' / 'tpu_pod.sh'), 'run']
  assert cmd[3:6] == ['--name=pod', '--zone=us-central2-b', '--']
  assert cmd[6:] == ['--config=experiments/digits.py', '--config.seed=1', '--workdir=gs://bucket/x/seed=1']
  with pytest.raises(sweep.SweepError, match='target='):
    sweep.command(run, 'gpu-cluster')
  result = subprocess.run([sys.executable, '-m', 'spikingformer_jax.sweep',
                           '--sweep=experiments/sweeps/cifar10_lr_wd.py', f'--root={tmp_path}', '--dry_run'],
                          cwd=REPO, capture_output=True, text=True, check=True)
  commands = [l for l in result.stdout.splitlines() if 'spikingformer_jax.main' in l]
  assert len(commands) == 12 and len(set(commands)) == 12  # 3 lr x 2 weight decay x 2 seeds
  assert result.stdout.splitlines()[-1] == '# 12 runs: 0 finished, 12 to start, 0 failed'
  assert not any(tmp_path.iterdir())  # a dry run creates nothing
