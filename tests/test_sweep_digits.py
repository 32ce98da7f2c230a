"""A digits sweep trained for real: sequential, --parallel=2 and vmapped (K=4) give the same trials.

One module fixture runs the same four trials three ways through the sweep driver (every trial in its
own `spikingformer_jax.main` or `.trials` process, as users run them); the tests compare what the
runs wrote. The processes share a JAX compilation cache, so each distinct program compiles once.
"""
import csv
import io
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from spikingformer_jax import checkpoint, sweep, sweep_results, trials

TINY = '''
import sys
sys.path.insert(0, {experiments!r})
import digits


def get_config(arg=''):
  c = digits.get_config()
  c.model.T = 1
  c.model.overrides = {{'embed_dim': 16, 'num_heads': 1}}
  c.batch_size = 16
  c.eval_batch_size = 40
  c.data.max_train_examples = 96  # 6 steps per epoch, 2 epochs
  c.data.max_eval_examples = 80
  c.num_epochs = 2
  c.optim.warmup_epochs = 1
  c.optim.eps = 1e-3  # see test_vmapped_trials_equal_their_sequential_runs
  c.log_every_steps = 3
  c.checkpoint.async_save = False
  c.metric = 'top5'  # 12 steps leave top-1 near chance, with ties; top-5 tells these trials apart
  return c
'''
# Four trials: two hyperparameter settings (the second changes every per-trial input: learning rate,
# weight decay, warmup, label smoothing, mixup alpha) at two seeds each. A seed is not part of the
# compiled program, so the separate runs compile two training steps, not four. --parallel=2 runs the
# first two and a trial whose value fails at run time.
SECOND = {'optim.lr': 5e-3, 'optim.weight_decay': 0.1, 'optim.warmup_epochs': 0, 'label_smoothing': 0.1,
          'mixup.mixup_alpha': 0.5}
TRIALS = [{'seed': 1}, dict(SECOND, seed=1), {'seed': 2}, dict(SECOND, seed=3)]
BAD = {'model.num_classes': 7}  # validates, but digits has 10 classes: the trainer refuses it
NAMES = [sweep.run_name(t) for t in TRIALS]


def _sweep_file(tmp, name, trials, extra=''):
  path = tmp / name
  config = str(tmp / 'tiny.py')
  path.write_text(f'def get_sweep():\n  return {{"config": {config!r}, "overrides": {trials!r}{extra}}}\n')
  return str(path)


def _cached_compilation(tmp) -> dict:
  """The environment of the trial processes: one CPU device each (the test session fakes 8), one
  compilation cache for all (equal programs compile once)."""
  return {'XLA_FLAGS': '', 'JAX_COMPILATION_CACHE_DIR': str(tmp / 'jax_cache'),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


@pytest.fixture(scope='module')
def sweeps(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('digits_sweep')
  (tmp / 'tiny.py').write_text(TINY.format(experiments=str(sweep.REPO / 'experiments')))
  plain = _sweep_file(tmp, 'plain.py', TRIALS)
  with_bad = _sweep_file(tmp, 'with_bad.py', TRIALS[:2] + [BAD])
  stopping = _sweep_file(tmp, 'stopping.py', TRIALS, ", 'early_stopping': {'epochs': [1], 'min_trials': 4}")
  roots = {mode: str(tmp / mode) for mode in ('sequential', 'parallel', 'vmapped')}
  with pytest.MonkeyPatch.context() as mp:
    for k, v in _cached_compilation(tmp).items():
      mp.setenv(k, v)
    codes = {'sequential': sweep.main([f'--sweep={plain}', f'--root={roots["sequential"]}']),
             'parallel': sweep.main([f'--sweep={with_bad}', f'--root={roots["parallel"]}', '--parallel=2',
                                     '--accelerator=cpu']),
             'vmapped': sweep.main([f'--sweep={stopping}', f'--root={roots["vmapped"]}', '--vmap=4'])}
    yield {'tmp': tmp, 'roots': roots, 'codes': codes, 'files': {'plain': plain, 'with_bad': with_bad,
                                                                  'stopping': stopping}}


def _rows(root, name, split):
  return [r for r in sweep_results.read_metrics(f'{root}/{name}') if r['split'] == split]


def _variables(root, name, step=None):
  path = f'{root}/{name}' + (f'/checkpoints/{step}' if step else '')
  return jax.tree_util.tree_leaves(checkpoint.load_variables(path))


def _assert_same_run(root_a, root_b, name, *, upto=None, atol):
  """Same logged losses (every logged step up to `upto`) and evaluations, and the same variables."""
  for split, key, rtol in (('train', 'loss', 1e-5), ('eval', 'top5', 0), ('eval', 'loss', 1e-5)):
    a = [(r['step'], r[key]) for r in _rows(root_a, name, split) if upto is None or r['step'] <= upto]
    b = [(r['step'], r[key]) for r in _rows(root_b, name, split) if upto is None or r['step'] <= upto]
    assert [s for s, _ in a] == [s for s, _ in b] and a, (name, split)
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=rtol, atol=1e-7, err_msg=name)
  for x, y in zip(_variables(root_a, name, upto), _variables(root_b, name, upto), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=name)


def test_parallel_trials_equal_sequential_ones_and_a_failing_trial_spares_the_others(sweeps):
  roots = sweeps['roots']
  assert sweeps['codes']['sequential'] == 0 and sweeps['codes']['parallel'] == 1  # 1: a trial failed
  state = sweep_results.SweepState(roots['parallel']).read()
  bad = sweep.run_name(BAD)
  assert state[bad]['status'] == 'failed'
  assert 'config.model.num_classes = 7, but dataset' in state[bad]['reason']
  for name in NAMES[:2]:
    assert state[name]['status'] == 'finished' and sweep.is_finished(f'{roots["parallel"]}/{name}')
    # The same program on one core instead of two: float rounding only.
    _assert_same_run(roots['sequential'], roots['parallel'], name, atol=1e-6)


def test_vmapped_trials_equal_their_sequential_runs_and_stop_early_by_the_median(sweeps):
  """K=4 in one vmapped step: every trial's losses, evaluations and variables are its separate run's.

  vmapped products sum in another order, so values agree to float rounding, which Adam's tiny
  default eps would amplify on the parameters BatchNorm leaves without gradient (conv biases: their
  'gradient' is rounding noise whose sign flips the update); the config's eps = 1e-3 keeps those
  updates small, as the sharded-step test in test_train does.
  """
  roots = sweeps['roots']
  assert sweeps['codes']['vmapped'] == 0
  state = sweep_results.SweepState(roots['vmapped']).read()
  # The rule, applied at epoch 1 (step 6) when all four had evaluated: below the median of the four stop.
  at_epoch1 = {n: _rows(roots['sequential'], n, 'eval')[0]['top5'] for n in NAMES}
  median = np.median(list(at_epoch1.values()))
  expected_stops = {n for n, v in at_epoch1.items() if v < median}
  assert expected_stops, at_epoch1  # these hyperparameters do separate the trials
  assert {n for n in NAMES if state[n]['status'] == 'stopped'} == expected_stops
  for name in NAMES:
    assert state[name]['job'] == 'vmap x4'
    stopped = name in expected_stops
    summary = sweep_results.read_summary(f'{roots["vmapped"]}/{name}')
    assert summary['completed'] is not stopped and summary['step'] == (6 if stopped else 12)
    if stopped:
      assert f'< median {median:.4f} of 4 trials' in state[name]['reason'] == summary['stopped']
    _assert_same_run(roots['sequential'], roots['vmapped'], name, upto=6 if stopped else None, atol=2e-5)


def test_a_vmapped_trials_checkpoint_resumes_like_any_run(sweeps):
  """The plain trainer resumes an early-stopped vmapped trial from its step-6 checkpoint (parameters,
  optimizer and BatchNorm state, data position) and ends where the trial's own separate run ended.

  (`--mode=eval` and `--config.init_from` read a checkpoint with checkpoint.load_variables, which
  the comparisons above already apply to every vmapped trial.)
  """
  roots, tmp = sweeps['roots'], sweeps['tmp']
  stopped = next(n for n in NAMES if sweep_results.read_summary(f'{roots["vmapped"]}/{n}').get('stopped'))
  run = {r.name: r for r in sweep.expand(sweeps['files']['plain'], roots['vmapped'])}[stopped]
  with pytest.MonkeyPatch.context() as mp:
    for k, v in _cached_compilation(tmp).items():
      mp.setenv(k, v)
    subprocess.run([sys.executable] + run.main_args(), cwd=sweep.REPO, check=True, capture_output=True)
  assert sweep_results.read_summary(run.workdir)['completed']
  _assert_same_run(roots['sequential'], roots['vmapped'], stopped, atol=2e-5)


def test_a_preempted_vmapped_group_saves_every_trial_and_resumes_to_the_uninterrupted_runs(sweeps):
  """SIGTERM during a group's first evaluation: every trial saves that step and says it was preempted;
  the rerun resumes all of them and ends where their separate, uninterrupted runs end (metrics
  logged once per step: nothing of the interrupted run is replayed twice)."""
  roots, tmp = sweeps['roots'], sweeps['tmp']
  root = str(tmp / 'preempted')
  runs = {r.name: r for r in sweep.expand(sweeps['files']['plain'], root)}
  group = [runs[n] for n in NAMES[:2]]

  def sigterm_at_the_first_evaluation(step, steps_per_epoch):
    if step == steps_per_epoch:
      os.kill(os.getpid(), signal.SIGTERM)
    return {}

  def train_group(**kwargs):
    return trials.train_and_evaluate([r.build_config() for r in group], [r.workdir for r in group],
                                     names=NAMES[:2], devices=jax.devices()[:1], **kwargs)

  first = train_group(should_stop=sigterm_at_the_first_evaluation)
  assert [(s['step'], s['preempted'], s['completed']) for s in first] == [(6, True, False)] * 2
  for run in group:
    assert max(int(p.name) for p in checkpoint.checkpoint_dir(run.workdir).iterdir() if p.name.isdigit()) == 6
  second = train_group()
  assert [(s['step'], s['preempted'], s['completed']) for s in second] == [(12, False, True)] * 2
  for name in NAMES[:2]:
    _assert_same_run(roots['sequential'], root, name, atol=2e-5)


def test_report_matches_the_summaries_and_reruns_skip_finished_and_stopped_trials(sweeps):
  roots = sweeps['roots']
  out = io.StringIO()
  sweep.report(sweeps['files']['with_bad'], roots['parallel'], stream=out)
  table = {r['trial']: r for r in csv.DictReader(open(f'{roots["parallel"]}/report.csv'))}
  assert list(table)[-1] == sweep.run_name(BAD) and table[sweep.run_name(BAD)]['status'] == 'failed'
  best = [float(r['best top5']) for r in list(table.values())[:-1]]
  assert best == sorted(best, reverse=True)
  for name in NAMES[:2]:
    summary = json.load(open(f'{roots["parallel"]}/{name}/summary.json'))
    row = table[name]
    assert (row['status'], int(row['step']), int(row['total steps'])) == ('finished', summary['step'],
                                                                          summary['total_steps'])
    assert float(row['final top5']) == summary['final']['top5'] and float(row['best top5']) == summary['best']['top5']
    assert int(row['best step']) == summary['best']['step'] and float(row['images/s']) > 0
  # Rerunning: finished and early-stopped trials are skipped, the failed one is tried again.
  rerun = sweep.launch(sweep.expand(sweeps['files']['with_bad'], roots['parallel']), 'local', dry_run=True,
                       stream=io.StringIO(), root=roots['parallel'])
  assert rerun['started'] == [sweep.run_name(BAD)] and rerun['skipped'] == NAMES[:2]
  stopping = sweep.expand(sweeps['files']['stopping'], roots['vmapped'])
  assert sweep.launch(stopping, 'local', dry_run=True, stream=io.StringIO(), root=roots['vmapped'])['started'] == []
