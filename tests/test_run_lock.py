"""One run per local workdir: refusal naming the holder, takeover of a dead run's lock, nothing written first."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import pytest

from spikingformer_jax import run_lock, train
from test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_run_on_the_workdir_is_refused_before_writing_anything(tmp_path):
  holder = run_lock.make_lock(tmp_path, 60)
  holder.acquire()
  try:
    with pytest.raises(run_lock.RunLockError) as refused:
      train.train_and_evaluate(tiny_config(**{'mesh.data': 1, 'total_steps': 2}), tmp_path, devices=jax.devices()[:1])
  finally:
    holder.release()
  message = str(refused.value)
  assert '\n' not in message
  assert message.startswith(f'{tmp_path} is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, '
                            f'started {time.strftime("%Y-%m-%d", time.gmtime())}')
  assert f'delete {tmp_path}/RUN_LOCK if that run is gone' in message
  assert sorted(p.name for p in tmp_path.iterdir()) == ['RUN_LOCK']
  assert (tmp_path / 'RUN_LOCK').read_text() == ''  # Released: free, and nothing to warn about.


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
  # Another process takes the lock and is killed with SIGKILL, the way a crashed run ends.
  code = ('import sys, time; from spikingformer_jax import run_lock; run_lock.make_lock(sys.argv[1], 60).acquire(); '
          'print("held", flush=True); time.sleep(600)')
  other = subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                           env=dict(os.environ, JAX_PLATFORMS='cpu'))
  try:
    assert other.stdout.readline().strip() == 'held'
    with pytest.raises(run_lock.RunLockError, match=f'pid {other.pid}, started'):
      run_lock.make_lock(tmp_path, 60).acquire()
  finally:
    other.kill()
    other.wait()
  lock = run_lock.make_lock(tmp_path, 60)
  with caplog.at_level('WARNING'):
    lock.acquire()
  assert any(f'pid {other.pid}' in r.getMessage() and 'ended without releasing it' in r.getMessage()
             for r in caplog.records)
  mine = json.loads((tmp_path / 'RUN_LOCK').read_text())
  assert (mine['host'], mine['pid']) == (socket.gethostname(), os.getpid())
  lock.release()


def test_holder_staleness():
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True,
                        check=True)
  now = time.time()
  here = socket.gethostname()
  assert run_lock.Holder(here, int(dead.stdout), now, now).is_stale(3600)  # Its process is gone.
  assert not run_lock.Holder(here, os.getpid(), now - 7200, now - 10).is_stale(3600)  # Alive, recent heartbeat.
  assert not run_lock.Holder('other-host', 1, now - 7200, now - 10).is_stale(3600)
  assert run_lock.Holder('other-host', 1, now - 7200, now - 4000).is_stale(3600)  # Heartbeat too old.
  assert run_lock.Holder.parse('') is None and run_lock.Holder.parse('{"host": 1}') is None
