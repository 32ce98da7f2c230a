"""Sweeps: deterministic expansion into named runs, validation up front, finished runs skipped, CLI round trip."""
import csv
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from absl import flags
from etils import epath
from ml_collections import config_flags

from spikingformer_jax import sweep, sweep_results

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
  assert report == {'skipped': ['seed=1'], 'started': ['seed=2', 'seed=3'], 'failed': [], 'stopped': []}
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


# ---------------------------------------------------------------------------------------------------
# Jobs, device slots, the TPU target.

def test_vmap_groups_only_trials_that_differ_in_hyperparameters_and_seeds(tmp_path):
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py', 'overrides': [\n"
                                "      {'optim.lr': 1e-3, 'seed': 1}, {'model.T': 2}, {'optim.lr': 2e-3, 'seed': 2},\n"
                                "      {'label_smoothing': 0.1}, {'mixup.mixup_alpha': 0.2},\n"
                                "      {'seed': 5, 'time_budget_minutes': 1.0},\n"
                                "      {'seed': 6, 'time_budget_minutes': 1.0}]}\n")
  runs = sweep.expand(path, str(tmp_path / 'root'))
  jobs = sweep.plan_jobs(runs, vmap=2)
  assert [[r.name for r in j.runs] for j in jobs] == [
      ['optim.lr=0.001_seed=1', 'optim.lr=0.002_seed=2'], ['model.T=2'],
      ['label_smoothing=0.1', 'mixup.mixup_alpha=0.2'], ['seed=5_time_budget_minutes=1.0'],
      ['seed=6_time_budget_minutes=1.0']]
  assert [j.kind for j in jobs] == ['vmap x2', 'process', 'vmap x2', 'process', 'process']
  group = sweep.command(jobs[0], 'local', python='python3', sweep_path=path, root=str(tmp_path / 'root'))
  assert group == ['python3', '-m', 'spikingformer_jax.trials', f'--sweep={path}', f'--root={tmp_path / "root"}',
                   '--trials=optim.lr=0.001_seed=1,optim.lr=0.002_seed=2']
  assert sweep.plan_jobs(runs, vmap=1) == [sweep.Job((r,)) for r in runs]


def test_parallel_slots_share_out_the_hosts_devices():
  cores = sorted(os.sched_getaffinity(0))
  cpu = sweep.device_slots(len(cores), 'cpu', len(cores))
  assert [s.cpus for s in cpu] == [frozenset([c]) for c in cores] and all(not s.env for s in cpu)
  assert sweep.device_slots(1, 'cpu', len(cores)) == [sweep.Slot({})]
  assert sweep.device_slots(2, 'gpu', 8)[1].env == {'CUDA_VISIBLE_DEVICES': '4,5,6,7'}
  tpu = sweep.device_slots(4, 'tpu', 4)
  assert [s.env['TPU_VISIBLE_CHIPS'] for s in tpu] == ['0', '1', '2', '3']
  assert {s.env['TPU_CHIPS_PER_PROCESS_BOUNDS'] for s in tpu} == {'1,1,1'}
  assert len({s.env['TPU_MESH_CONTROLLER_PORT'] for s in tpu}) == 4  # one controller per process
  assert sweep.device_slots(2, 'tpu', 4)[1].env['TPU_VISIBLE_CHIPS'] == '2,3'
  with pytest.raises(sweep.SweepError, match='this host has 4 TPU devices'):
    sweep.device_slots(8, 'tpu', 4)
  with pytest.raises(sweep.SweepError, match='--parallel=0'):
    sweep.device_slots(0, 'gpu', 4)


def test_tpu_target_spreads_trials_over_slices_one_at_a_time_each(tmp_path):
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py', 'overrides': [\n"
                                "      {'seed': 1}, {'seed': 2}, {'seed': 3}, {'model.T': 2}]}\n")
  out, root = io.StringIO(), str(tmp_path / 'sw')
  slots = sweep.tpu_slots(['pod-a', 'pod-b'], '--zone=z')
  sweep.launch(sweep.expand(path, root), 'tpu', dry_run=True, tpu_args='--zone=z', stream=out, vmap=2,
               sweep_path=path, root=root, slots=slots)
  lines = [shlex.split(l) for l in out.getvalue().splitlines()]
  assert [l[3:6] for l in lines] == [['--zone=z', '--name=pod-a', '--module=spikingformer_jax.trials'],
                                     ['--zone=z', '--name=pod-b', '--'], ['--zone=z', '--name=pod-a', '--']]
  assert lines[0][-2:] == ['--trials=seed=1,seed=2', '--distributed'] and lines[1][-1] == f'--workdir={root}/seed=3'
  with pytest.raises(sweep.SweepError, match='--tpu_names'):
    sweep.tpu_slots([], '--zone=z')


# ---------------------------------------------------------------------------------------------------
# Early stopping.

def _result(name, curve, status='running'):
  return sweep_results.TrialResult(name, {}, status, eval_curve=curve)


def test_median_rule_stops_trials_below_the_median_once_enough_trials_reached_the_checkpoint():
  rule = sweep_results.EarlyStopping.from_spec({'epochs': [2], 'min_trials': 3}, 'sweep.py')
  assert rule.checkpoints(steps_per_epoch=10) == [('epoch 2', 20)]
  results = [_result('a', [(10, 0.5), (20, 0.6)], 'finished'), _result('b', [(10, 0.2), (20, 0.3)]),
             _result('c', [(10, 0.4)]), _result('d', [(20, 0.9), (30, 0.1)])]
  # c has not reached step 20: a, b, d have (0.6, 0.3, 0.9), median 0.6; only running trials are stopped.
  stops = sweep_results.decide_stops(rule, results, {'b', 'c', 'd'}, 'top1', steps_per_epoch=10)
  assert list(stops) == ['b'] and 'top1 0.3000 at epoch 2 < median 0.6000 of 3 trials' in stops['b']
  assert sweep_results.decide_stops(rule, results[:2], {'b'}, 'top1', 10) == {}  # 2 < min_trials
  # The value at a checkpoint is the last evaluation at or before it, for trials that got that far.
  assert sweep_results.value_at(_result('e', [(15, 0.7), (25, 0.8)]), 20) == 0.7
  assert sweep_results.value_at(_result('f', [(15, 0.7)]), 20) is None  # not there yet
  assert sweep_results.value_at(_result('g', [(15, 0.7)], 'stopped'), 20) is None  # will never be
  with pytest.raises(ValueError, match='needs the steps per epoch'):
    rule.checkpoints(None)


@pytest.mark.parametrize('spec,message', [
    ("{'epochs': [2], 'rule': 'mean'}", 'expected "median"'),
    ("{'min_trials': 3}", 'needs "epochs" or "steps"'),
    ("{'epochs': [0]}", 'positive integers'),
    ("{'epochs': [1], 'patience': 2}", 'keys from'),
])
def test_bad_early_stopping_specs_fail_up_front(tmp_path, spec, message):
  path = _write_sweep(tmp_path, f"  return {{'config': 'experiments/digits.py', 'overrides': [{{'seed': 1}}],\n"
                                f"          'early_stopping': {spec}}}\n")
  with pytest.raises(sweep.SweepError, match=message):
    sweep.load_spec(path)


FAKE_TRAINER = '''
import json, pathlib, signal, sys, time
args = dict(a.split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)
workdir = pathlib.Path(args['--workdir'])
workdir.mkdir(parents=True, exist_ok=True)
score = float(args['--config.optim.lr'])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
step = 0
with open(workdir / 'metrics.jsonl', 'a') as f:
  for epoch in range(1, 5):
    time.sleep(1.0)
    if stop:
      break
    step = 10 * epoch
    f.write(json.dumps({'step': step, 'split': 'train', 'loss': 1 - score, 'examples_per_sec': 50.0}) + '\\n')
    f.write(json.dumps({'step': step, 'split': 'eval', 'top1': score * epoch}) + '\\n')
    f.flush()
last = {'top1': score * step / 10}
(workdir / 'summary.json').write_text(json.dumps({'step': step, 'total_steps': 40, 'final': last,
                                                  'best': dict(last, step=step), 'completed': step == 40}))
'''


@pytest.fixture
def fake_python(tmp_path):
  """An interpreter stand-in that runs FAKE_TRAINER whatever module it is asked for."""
  (tmp_path / 'fake_main.py').write_text(FAKE_TRAINER)
  python = tmp_path / 'python'
  python.write_text(f'#!/bin/sh\nexec {sys.executable} {tmp_path / "fake_main.py"} "$@"\n')
  python.chmod(0o755)
  return str(python)


def test_driver_stops_trials_below_the_median_records_why_and_skips_them_on_rerun(tmp_path, fake_python):
  """Four trials at once (a stand-in trainer that logs an eval per second and saves on SIGTERM)."""
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py',\n"
                                "          'overrides': sweep.grid({'optim.lr': [0.1, 0.2, 0.3, 0.4]}),\n"
                                "          'early_stopping': {'steps': [10], 'min_trials': 4}}\n")
  root = str(tmp_path / 'root')
  spec, runs = sweep.load_spec(path), sweep.expand(path, root)
  out = io.StringIO()
  result = sweep.launch(runs, 'local', dry_run=False, stream=out, sweep_path=path, root=root,
                        slots=[sweep.Slot({})] * 4, early_stopping=spec.early_stopping, poll_seconds=0.1,
                        python=fake_python)
  assert sorted(result['stopped']) == ['optim.lr=0.1', 'optim.lr=0.2'] and not result['failed'], out.getvalue()
  state = sweep_results.SweepState(root).read()
  assert [state[r.name]['status'] for r in runs] == ['stopped', 'stopped', 'finished', 'finished']
  assert 'top1 0.1000 at step 10 < median 0.2500 of 4 trials' in state['optim.lr=0.1']['reason']
  assert json.loads((tmp_path / 'root' / 'optim.lr=0.2' / 'summary.json').read_text())['step'] == 10
  rerun = sweep.launch(runs, 'local', dry_run=True, stream=io.StringIO(), root=root)
  assert rerun['skipped'] == [r.name for r in runs] and not rerun['started']
  report = io.StringIO()
  sweep.report(path, root, stream=report)
  assert '| stopped |' in report.getvalue() and 'median 0.2500' in report.getvalue()
  assert 'Early stopping: a trial below the median top1 of the trials at step 10' in (
      tmp_path / 'root' / 'report.md').read_text()


# ---------------------------------------------------------------------------------------------------
# The report.

@pytest.fixture
def gcs_bucket():
  """A Cloud Storage emulator on 127.0.0.1 (bucket 'sweeps'), stopped after the test."""
  pytest.importorskip('gcsfs')
  emulator = shutil.which('gcp-storage-emulator') or str(pathlib.Path(sys.executable).parent / 'gcp-storage-emulator')
  if not os.path.exists(emulator):
    pytest.skip('gcp-storage-emulator is not installed (pip install gcp-storage-emulator)')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([emulator, 'start', '--host=127.0.0.1', f'--port={port}', '--in-memory',
                           '--default-bucket=sweeps', '-q'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(100):
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          break
      time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
      mp.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{port}')
      yield 'gs://sweeps'
  finally:
    proc.terminate()
    proc.wait()


def _fake_results(root):
  """Three trials as a sweep leaves them: one finished, one running (metrics only), one failed."""
  root = epath.Path(root)
  rows = {'optim.lr=0.1': [(10, 0.4), (20, 0.6), (30, 0.5)], 'optim.lr=0.2': [(10, 0.3), (20, 0.7)]}
  for name, curve in rows.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    lines = [{'step': s, 'split': 'train', 'loss': 1 - v, 'examples_per_sec': 100.0 + s} for s, v in curve]
    lines += [{'step': s, 'split': 'eval', 'top1': v} for s, v in curve]
    (root / name / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines) + '{"step": 4')
  summary = {'step': 30, 'total_steps': 30, 'final': {'top1': 0.5, 'loss': 0.9}, 'best': {'top1': 0.6, 'step': 20},
             'completed': True}
  (root / 'optim.lr=0.1' / 'summary.json').write_text(json.dumps(summary))
  (root / sweep_results.STATE_FILE).write_text(json.dumps({
      'optim.lr=0.2': {'status': 'running', 'reason': '', 'job': 'vmap x2'},
      'optim.lr=0.3': {'status': 'failed', 'reason': 'exit code 1: ValueError: boom', 'job': 'process'}}))
  return summary


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_report_tables_and_plots_for_finished_running_and_failed_trials(tmp_path, where, request):
  root = str(tmp_path / 'root') if where == 'local' else request.getfixturevalue('gcs_bucket') + '/root'
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py',\n"
                                "          'overrides': sweep.grid({'optim.lr': [0.1, 0.2, 0.3]})}\n")
  summary = _fake_results(root)
  assert sweep.main([f'--sweep={path}', f'--root={root}', '--report']) == 0
  out = epath.Path(root)
  table = list(csv.DictReader(io.StringIO((out / 'report.csv').read_text())))
  assert [r['trial'] for r in table] == ['optim.lr=0.2', 'optim.lr=0.1', 'optim.lr=0.3']  # by best top1
  running, finished, failed = table
  assert (finished['status'], finished['step'], finished['total steps']) == ('finished', '30', '30')
  assert float(finished['best top1']) == summary['best']['top1'] and finished['best step'] == '20'
  assert float(finished['final top1']) == summary['final']['top1']
  assert float(finished['images/s']) == 125.0  # the median after the first (compiling) interval
  assert (running['status'], running['step'], running['final top1'], running['job']) == ('running', '20', '0.7',
                                                                                          'vmap x2')
  assert failed['status'] == 'failed' and failed['note'] == 'exit code 1: ValueError: boom' and not failed['best top1']
  assert [r['optim.lr'] for r in table] == ['0.2', '0.1', '0.3']
  markdown = (out / 'report.md').read_text()
  assert '| optim.lr=0.1 | 0.1 | finished | 30 | 30 | 0.6000 | 20 | 0.5000 | 125.0 |  |  |' in markdown
  for png in ('report_hparams.png', 'report_curves.png'):
    assert (out / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_epochs_need_one_steps_per_epoch_for_all_trials(tmp_path):
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py', 'overrides': [\n"
                                "      {'batch_size': 16}, {'batch_size': 32}], 'early_stopping': {'epochs': [1]}}\n")
  runs = sweep.expand(path, str(tmp_path / 'root'))
  assert sweep.steps_per_epoch(runs[1:]) == 1437 // 32  # digits: 1,437 training images
  with pytest.raises(sweep.SweepError, match=r'different steps per epoch \(\[44, 89\]\)'):
    sweep.launch(runs, 'local', dry_run=False, stream=io.StringIO(), sweep_path=path, root=str(tmp_path / 'root'),
                 early_stopping=sweep.load_spec(path).early_stopping)
  assert not (tmp_path / 'root').exists()  # refused before anything started


def test_sigterm_to_the_driver_stops_every_running_trial_cleanly(tmp_path, fake_python):
  path = _write_sweep(tmp_path, "  return {'config': 'experiments/digits.py',\n"
                                "          'overrides': sweep.grid({'optim.lr': [0.1, 0.2, 0.3]})}\n")
  root = str(tmp_path / 'root')
  runs = sweep.expand(path, root)
  timer = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
  timer.start()
  try:
    with pytest.raises(KeyboardInterrupt):
      sweep.launch(runs, 'local', dry_run=False, stream=io.StringIO(), sweep_path=path, root=root,
                   slots=[sweep.Slot({})] * 2, python=fake_python)
  finally:
    timer.cancel()
  state = sweep_results.SweepState(root).read()
  # The two running trials saved and ended early; the third never started; a rerun resumes all three.
  assert [state.get(r.name, {}).get('status') for r in runs] == ['unfinished', 'unfinished', None]
  assert all(json.loads((tmp_path / 'root' / r.name / 'summary.json').read_text())['step'] < 40 for r in runs[:2])
  assert sweep.launch(runs, 'local', dry_run=True, stream=io.StringIO(), root=root)['started'] == [r.name for r in runs]
