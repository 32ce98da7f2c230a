"""Two processes on this machine through the real CLI (4 CPU devices each, gloo collectives).

Data parallel over the 8 devices and FSDP spanning both processes train what one process with 8
devices trains; SIGTERM to one of the two processes stops both at the same step with one
checkpoint, and rerunning resumes bitwise; --mode=eval reads the two-process checkpoint back; processes
whose clocks disagree spend one time budget together.
The launches share one persistent compilation cache: only the first of each program compiles.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from spikingformer_jax import checkpoint, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8 steps of 32 (one epoch of 256 digits, then one evaluation), a checkpoint every 2, T = 2 (half the
# tracing and compiling of T = 4). Adam's eps = 1 keeps updates a smooth function of the gradients (see
# test_train), so another float summation order over devices and processes stays within the one-step
# tolerances. (Over longer runs a reordered sum in BatchNorm's statistics can move a membrane
# potential across the threshold: one spike flips.)
OVERRIDES = {'total_steps': 8, 'model.T': 2, 'data.max_train_examples': 256, 'data.max_eval_examples': 120,
             'log_every_steps': 1, 'checkpoint.every_steps': 2, 'progress_bar': False, 'optim.eps': 1.0,
             'optim.warmup_epochs': 0}
PREEMPTED = 75
FAST_COMPILE = '--xla_backend_optimization_level=0'  # Halves XLA:CPU compile time; these steps are tiny.


def _flags(overrides):
  return ['--config=experiments/digits.py'] + [f'--config.{k}={v}' for k, v in overrides.items()]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Job:
  """`python -m spikingformer_jax.main` as process i of n, for i in range(n), joined through 127.0.0.1."""

  def __init__(self, tmp, name, args, processes=2, devices=4, entry=('-m', 'spikingformer_jax.main')):
    self.logs = [tmp / f'{name}.{i}.log' for i in range(processes)]
    port = _free_port()
    self.procs = []
    for i, log in enumerate(self.logs):
      env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_COMPILE}',
                 JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp / 'cache'),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
      if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
      with open(log, 'w') as out:
        self.procs.append(subprocess.Popen([sys.executable, *entry, *args], cwd=REPO, env=env,
                                           stdout=out, stderr=subprocess.STDOUT))

  def output(self, i) -> str:
    return self.logs[i].read_text()

  def wait(self, timeout=400) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(1, deadline - time.monotonic())) for p in self.procs]
    except subprocess.TimeoutExpired:
      for p in self.procs:
        p.kill()
      pytest.fail('timed out; last output:\n' + '\n'.join(self.output(i)[-3000:] for i in range(len(self.procs))))

  def run(self) -> None:
    codes = self.wait()
    assert codes == [0] * len(codes), '\n'.join(self.output(i)[-4000:] for i in range(len(codes)))


def _train_rows(workdir) -> list[dict]:
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [l for l in lines if l['split'] == 'train']


def _train_losses(workdir) -> dict:
  losses = [(l['step'], l['loss']) for l in _train_rows(workdir)]
  assert len(losses) == len(dict(losses)), f'a step logged twice: {losses}'
  return dict(losses)


def _iterator_files(step_dir) -> list[str]:
  return sorted(p.name for p in (step_dir / 'data_iter').iterdir() if p.name.startswith('process_'))


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The single-process 8-device run and the 2-process data-parallel one (both through the CLI)."""
  tmp = tmp_path_factory.mktemp('multihost')
  jobs = [Job(tmp, 'single', _flags(OVERRIDES) + [f'--workdir={tmp / "single"}'], processes=1, devices=8),
          Job(tmp, 'dp', _flags(OVERRIDES) + [f'--workdir={tmp / "dp"}'])]
  for job in jobs:
    job.run()
  return tmp


def test_two_processes_train_what_one_process_trains(runs):
  tmp = runs
  summary = json.loads((tmp / 'dp' / 'summary.json').read_text())
  assert summary['completed'] and summary['step'] == 8
  single, dp = _train_losses(tmp / 'single'), _train_losses(tmp / 'dp')
  assert sorted(dp) == sorted(single) == list(range(1, 9))
  np.testing.assert_allclose([dp[s] for s in sorted(dp)], [single[s] for s in sorted(single)], rtol=1e-5)
  _assert_close(checkpoint.load_variables(tmp / 'single'), checkpoint.load_variables(tmp / 'dp'))
  reference = json.loads((tmp / 'single' / 'summary.json').read_text())
  assert summary['final']['top1'] == reference['final']['top1']
  # One checkpoint written by both: each process's data-iterator position is in it.
  assert _iterator_files(tmp / 'dp' / 'checkpoints' / '8') == ['process_0-of-2.json', 'process_1-of-2.json']
  # --mode=eval in two processes reads it back: exactly the evaluation at the end of training.
  Job(tmp, 'eval', _flags(OVERRIDES) + [f'--workdir={tmp / "dp"}', '--mode=eval']).run()
  assert json.loads((tmp / 'dp' / 'eval_summary.json').read_text())['final'] == summary['final']


def test_fsdp_spanning_both_processes_trains_what_one_process_trains(runs):
  tmp = runs
  fsdp = dict(OVERRIDES, **{'mesh.data': 1, 'mesh.fsdp': 8})
  # Started the way a user would: launch/local.sh starts and joins the two processes.
  local = subprocess.run(['bash', os.path.join(REPO, 'launch', 'local.sh'), f'--python={sys.executable}',
                          '--processes=2', '--cpu-devices=4', *_flags(fsdp), f'--workdir={tmp / "fsdp"}'],
                         env=dict(os.environ, XLA_FLAGS=FAST_COMPILE, JAX_PLATFORMS='cpu',
                                  JAX_COMPILATION_CACHE_DIR=str(tmp / 'cache'),
                                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0'),
                         capture_output=True, text=True, timeout=600, check=False)
  assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
  assert local.stdout.count('top1: ') == 1  # Process 0 prints the summary.
  single, split = _train_losses(tmp / 'single'), _train_losses(tmp / 'fsdp')
  np.testing.assert_allclose([split[s] for s in sorted(split)], [single[s] for s in sorted(single)], rtol=1e-5)
  _assert_close(checkpoint.load_variables(tmp / 'single'), checkpoint.load_variables(tmp / 'fsdp'))
  # The parameters are split over the devices of both processes: process 1 wrote array data too.
  state = tmp / 'fsdp' / 'checkpoints' / '8' / 'state'
  assert any((state / 'ocdbt.process_1' / 'd').iterdir())


def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes_bitwise(runs):
  tmp = runs
  args = _flags(OVERRIDES) + [f'--workdir={tmp / "preempted"}']
  job = Job(tmp, 'preempted', args)
  lock = tmp / 'preempted' / 'RUN_LOCK'
  deadline = time.monotonic() + 300
  while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
    time.sleep(0.2)  # The job is joined and the lock taken: both processes handle SIGTERM from here on.
  job.procs[1].send_signal(signal.SIGTERM)
  assert job.wait() == [PREEMPTED, PREEMPTED], job.output(0)[-3000:] + job.output(1)[-3000:]
  said = [[l for l in job.output(i).splitlines() if l.startswith('preempted at step ')] for i in range(2)]
  assert said[0] == said[1] and len(said[0]) == 1, said
  step = int(said[0][0].split()[3].rstrip(';'))
  assert said[0][0] == f'preempted at step {step}; rerun the same command to resume' and 1 <= step < 8
  assert 'top1:' not in job.output(0)
  steps = sorted(int(p.name) for p in (tmp / 'preempted' / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == step and not json.loads((tmp / 'preempted' / 'summary.json').read_text())['completed']
  assert _iterator_files(tmp / 'preempted' / 'checkpoints' / str(step)) == ['process_0-of-2.json',
                                                                              'process_1-of-2.json']
  assert not lock.read_text()  # Released.

  Job(tmp, 'resumed', args).run()
  # Each step logged once (the rerun continues the metrics), every loss and parameter bitwise equal.
  assert _train_losses(tmp / 'preempted') == _train_losses(tmp / 'dp')
  for a, b in zip(jax.tree_util.tree_leaves(checkpoint.load_variables(tmp / 'preempted')),
                  jax.tree_util.tree_leaves(checkpoint.load_variables(tmp / 'dp')), strict=True):
    np.testing.assert_array_equal(a, b)


# train_and_evaluate on a ticking clock: each read advances process i's clock by i + 1 seconds.
BUDGET_WORKER = """
import functools, itertools, json, os, sys
from experiments import digits
from spikingformer_jax import train
config = digits.get_config()
config.update_from_flattened_dict(json.loads(sys.argv[2]))
clock = functools.partial(next, itertools.count(0, 1 + int(os.environ['JAX_PROCESS_ID'])))
print('summary', json.dumps(train.train_and_evaluate(config, sys.argv[1], clock=clock)['step']))
"""


def test_processes_whose_clocks_disagree_spend_one_time_budget_together(tmp_path):
  """Each process reads its own clock; the job anneals and stops by the one that ran furthest (process 1's,
  twice as fast), in step on both: a process that stopped alone would leave the other in a collective."""
  budget_s, lr, min_lr = 12, 2e-3, 1e-5
  overrides = dict(OVERRIDES, **{'total_steps': 10**6, 'time_budget_minutes': budget_s / 60,
                                 'checkpoint.every_steps': 10**6, 'optim.lr': lr, 'optim.min_lr': min_lr,
                                 'optim.cooldown_epochs': 0})
  job = Job(tmp_path, 'budget', [str(tmp_path / 'budget'), json.dumps(overrides)], devices=1,
            entry=('-c', BUDGET_WORKER))
  job.run()
  # The first read starts the budget, one read per step: step k runs at progress 2k / budget on process
  # 1's clock, and the step after which it reaches 1 is the last.
  last = budget_s // 2 - 1
  assert [job.output(i).splitlines()[-1] for i in range(2)] == [f'summary {last}'] * 2
  logged = [(l['step'], l['lr']) for l in _train_rows(tmp_path / 'budget')]
  cosine = lambda p: min_lr + 0.5 * (lr - min_lr) * (1 + np.cos(np.pi * p))
  assert [s for s, _ in logged] == list(range(1, last + 1))
  np.testing.assert_allclose([v for _, v in logged], [cosine(2 * k / budget_s) for k in range(1, last + 1)],
                             rtol=1e-5)


def test_the_job_environment_is_checked_before_joining():
  join = lambda **env: sharding.maybe_initialize_distributed(False, environ=dict(JAX_COORDINATOR_ADDRESS='x:1', **env))
  with pytest.raises(ValueError, match='JAX_PROCESS_ID is not set: JAX_NUM_PROCESSES and JAX_PROCESS_ID go together'):
    join(JAX_NUM_PROCESSES='2')
  with pytest.raises(ValueError, match='must be integers'):
    join(JAX_NUM_PROCESSES='two', JAX_PROCESS_ID='0')
  with pytest.raises(ValueError, match=r'JAX_PROCESS_ID = 2 is not in \[0, JAX_NUM_PROCESSES = 2\)'):
    join(JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='2')
  sharding.maybe_initialize_distributed(False, environ={})  # Nothing asked for: a single process, no error.
  assert jax.process_count() == 1
