"""gs:// workdirs end to end, against a Cloud Storage emulator the test starts on 127.0.0.1.

gcsfs (etils.epath's gs:// backend), google-cloud-storage (run lock, TensorBoard) and Orbax's
TensorStore each reach the emulator from STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL.
gcp-storage-emulator ignores generation preconditions (ifGenerationMatch): the run lock's atomic
create and compare-and-swap are not exercised here, its refusal, takeover and heartbeat logic is.
It also sends no generation header with downloads, which TensorStore's OCDBT driver needs:
tests/gcs_emulator.py adds it (see there).
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
from etils import epath

from spikingformer_jax import checkpoint, data, run_lock, sharding, sweep, train
from spikingformer_jax.porting import weights
from test_multihost import FAST_COMPILE, OVERRIDES, REPO, _flags, _free_port

sys.path.insert(0, os.path.join(REPO, 'experiments'))
import digits  # noqa: E402

pytest.importorskip('gcp_storage_emulator')
pytest.importorskip('gcsfs')


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  """A fresh in-memory emulator with bucket 'bucket'; this process and its children point at it."""
  port = _free_port()
  server = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'gcs_emulator.py'), 'start',
                             '--host=127.0.0.1', f'--port={port}', '--in-memory', '--default-bucket=bucket', '--quiet'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 60
  while True:
    try:
      socket.create_connection(('127.0.0.1', port), timeout=1).close()
      break
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, 'the storage emulator did not start'
      time.sleep(0.2)
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield {'env': env, 'cache': tmp_path_factory.mktemp('gcs_compile_cache')}
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(30)


def _cli(emulator, *args, **kwargs):
  env = dict(os.environ, **emulator['env'], XLA_FLAGS=f'--xla_force_host_platform_device_count=1 {FAST_COMPILE}',
             JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(emulator['cache']),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  return subprocess.Popen([sys.executable, '-m', 'spikingformer_jax.main', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc, timeout=400):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _train_steps(run):
  lines = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  return [l['step'] for l in lines if l['split'] == 'train']


def test_train_preempt_resume_evaluate_and_fine_tune_on_gs(emulator):
  run = epath.Path('gs://bucket/run')
  args = _flags(OVERRIDES) + [f'--workdir={run}']
  # Refused while another run holds the workdir: one line naming it, nothing written.
  holder = run_lock.make_lock(run, 3600)
  holder.acquire()
  try:
    code, _, err = _finish(_cli(emulator, *args))
  finally:
    holder.release()
  assert code == 1 and err.strip().splitlines()[-1].startswith(
      f'error: {run} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, started ')
  assert not run.exists()

  # SIGTERM: a checkpoint on gs://, the preempted line, no final metric, exit status 75.
  first = _cli(emulator, *args)
  deadline = time.monotonic() + 300
  while not (run / 'RUN_LOCK').exists() and time.monotonic() < deadline:
    time.sleep(0.2)
  first.send_signal(signal.SIGTERM)
  code, out, err = _finish(first)
  assert code == 75, err[-3000:]
  step = int(out.split('preempted at step ')[1].split(';')[0])
  assert f'preempted at step {step}; rerun the same command to resume' in out and 'top1:' not in out
  assert [p.name for p in (run / 'checkpoints').iterdir() if p.name.isdigit()][-1] == str(step)
  assert _train_steps(run)[-1] <= step and not (run / 'RUN_LOCK').exists()

  # The rerun resumes there and finishes; metrics hold every step once, TensorBoard has its events.
  code, out, err = _finish(_cli(emulator, *args))
  assert code == 0, err[-3000:]
  assert 'top1:' in out and json.loads((run / 'summary.json').read_text())['completed']
  assert _train_steps(run) == list(range(1, OVERRIDES['total_steps'] + 1))
  assert any(p.name.startswith('events.out.tfevents') for p in (run / 'tensorboard').iterdir())
  assert sweep.is_finished(str(run))  # What a sweep over gs:// roots checks.

  # --mode=eval reads the gs:// checkpoint back.
  code, _, err = _finish(_cli(emulator, *args, '--mode=eval'))
  assert code == 0, err[-3000:]
  summary = json.loads((run / 'summary.json').read_text())
  assert json.loads((run / 'eval_summary.json').read_text())['final'] == summary['final']

  # Fine-tuning from it (init_from=gs://...) starts from exactly its variables.
  config = sweep.apply_overrides(digits.get_config(), dict(OVERRIDES, init_from=str(run)))
  ctx, example = train.make_context(config, data.dataset_info(config.data))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _ = train.create_state(ctx, mesh, example, jax.random.PRNGKey(7), config.init_from)
  trained = checkpoint.load_variables(run)
  for a, b in zip(jax.tree_util.tree_leaves(trained['params']), jax.tree_util.tree_leaves(state['params']),
                  strict=True):
    np.testing.assert_array_equal(a, np.asarray(b))

  # Weights checkpoints (what convert writes) on gs:// too.
  out_dir = weights.save_weights('gs://bucket/weights/digits', trained, model_name=config.model.name,
                                 model_overrides={}, source=str(run))
  loaded, meta = weights.load_weights(out_dir)
  assert meta['source'] == str(run)
  for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(loaded), strict=True):
    np.testing.assert_array_equal(a, b)
  assert checkpoint.load_variables(out_dir)['params'].keys() == trained['params'].keys()


def test_gs_run_lock_loses_races_it_did_not_see(emulator, monkeypatch):
  """Another run writes the lock between this run's read and its conditional write: the write fails
  (Cloud Storage's ifGenerationMatch) and acquire refuses, naming the winner; the same for a stale takeover."""
  workdir = epath.Path('gs://bucket/raced')
  lock_object = workdir / run_lock.LOCK_NAME
  now = time.time()
  for before in (None, run_lock.Holder('gone-host', 1, now - 9000, now - 7200)):  # absent, then stale
    if before is not None:
      lock_object.write_text(before.dumps())
    lock = run_lock.make_lock(workdir, 3600)
    real_read = type(lock)._read

    def read_then_lose_the_race(self, real_read=real_read):
      seen = real_read(self)
      lock_object.write_text(run_lock.Holder('winner-host', 99, time.time(), time.time()).dumps())
      monkeypatch.setattr(type(self), '_read', real_read)
      return seen

    monkeypatch.setattr(type(lock), '_read', read_then_lose_the_race)
    with pytest.raises(run_lock.RunLockError, match=r'in use by another run \(host winner-host, pid 99'):
      lock.acquire()
    assert json.loads(lock_object.read_text())['host'] == 'winner-host'
    lock_object.unlink()


def test_gs_run_lock_refuses_takes_over_stale_locks_and_notices_losing_it(emulator, caplog):
  workdir = epath.Path('gs://bucket/locked')
  lock_object = workdir / run_lock.LOCK_NAME
  now = time.time()
  lock_object.write_text(run_lock.Holder('other-host', 4242, now - 60, now - 5).dumps())
  with pytest.raises(run_lock.RunLockError, match=r'in use by another run \(host other-host, pid 4242'):
    run_lock.make_lock(workdir, 3600).acquire()

  lock_object.write_text(run_lock.Holder('other-host', 4242, now - 9000, now - 7200).dumps())
  lock = run_lock.make_lock(workdir, 3600)
  with caplog.at_level('WARNING'):
    lock.acquire()
  assert any('other-host' in r.getMessage() and 'heartbeat is older than 3600 s' in r.getMessage()
             for r in caplog.records)
  assert json.loads(lock_object.read_text())['pid'] == os.getpid()
  before = json.loads(lock_object.read_text())['heartbeat']
  lock.refresh()
  assert json.loads(lock_object.read_text())['heartbeat'] > before

  # Another run took the lock over (say, after a long stall here): the next heartbeat stops this one.
  lock_object.write_text(run_lock.Holder('third-host', 7, now, now).dumps())
  with pytest.raises(run_lock.RunLockError, match='Lost the run lock .* host third-host, pid 7'):
    lock.refresh()

  # A lock left by a dead process of this host is taken over at once; releasing deletes it.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True,
                        check=True)
  lock_object.write_text(run_lock.Holder(socket.gethostname(), int(dead.stdout), now, time.time()).dumps())
  lock = run_lock.make_lock(workdir, 3600)
  with caplog.at_level('WARNING'):
    lock.acquire()
  assert any('its process is gone' in r.getMessage() for r in caplog.records)
  lock.release()
  assert not lock_object.exists()
