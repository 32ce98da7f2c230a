"""The launch scripts: shellcheck-clean, --dry-run prints the exact commands, missing tools/flags fail clearly."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from spikingformer_jax import sweep

LAUNCH = sweep.REPO / 'launch'
SCRIPTS = ('local.sh', 'tpu_pod.sh', 'sweep.sh')
POD = ['--name=my-pod', '--zone=us-central2-b']
TRAIN = ['--config=experiments/imagenet.py:variant=8-768', '--config.data.augment.randaug=rand-m9 n1',
         '--workdir=gs://bucket/imagenet']


def _run(script, *args, env=None):
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, check=False)


def _dry_run_lines(result):
  assert result.returncode == 0, result.stderr
  return [line for line in result.stdout.splitlines() if line.startswith('[dry-run] ')]


def _dry_run_commands(result):
  """The argv of every `[dry-run]` line, parsed back the way a shell would."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line[len('[dry-run] '):]) for line in result.stdout.splitlines()
          if line.startswith('[dry-run] ') and not line.startswith('[dry-run] reuse')]


@pytest.mark.parametrize('script', SCRIPTS)
def test_scripts_are_shellcheck_clean(script):
  if shutil.which('shellcheck') is None:
    pytest.skip('shellcheck is not installed (apt-get install shellcheck)')
  result = subprocess.run(['shellcheck', str(LAUNCH / script)], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_local_dry_run_prints_the_trainer_command_and_requires_config_and_workdir():
  result = _run('local.sh', '--dry-run', '--python=python3', '--config=experiments/digits.py', '--workdir=/tmp/w',
                '--config.seed=3')
  assert result.returncode == 0
  line = result.stdout.strip()
  assert line.startswith('[dry-run] cd ') and line.endswith(
      'python3 -m spikingformer_jax.main --config=experiments/digits.py --workdir=/tmp/w --config.seed=3')
  missing = _run('local.sh', '--dry-run', '--config=experiments/digits.py')
  assert missing.returncode == 2 and '--workdir=DIR is required' in missing.stderr
  no_python = _run('local.sh', '--python=/nonexistent/python', '--config=experiments/digits.py', '--workdir=/tmp/w')
  assert no_python.returncode == 2 and "python interpreter '/nonexistent/python' not found" in no_python.stderr
  bad = _run('local.sh', '--dry-run', '--processes=two', '--config=experiments/digits.py', '--workdir=/tmp/w')
  assert bad.returncode == 2 and "--processes=N needs a positive integer, got 'two'" in bad.stderr


def test_local_multi_process_dry_run_starts_one_joined_process_each():
  result = _run('local.sh', '--dry-run', f'--python={sys.executable}', '--processes=3', '--cpu-devices=4',
                '--port=4321', '--config=experiments/digits.py', '--workdir=/tmp/w')
  lines = [shlex.split(l[len('[dry-run] '):]) for l in _dry_run_lines(result)]
  assert len(lines) == 3
  for i, words in enumerate(lines):
    env = dict(w.split('=', 1) for w in words[3:] if '=' in w and not w.startswith('--'))
    assert env['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:4321' and env['JAX_NUM_PROCESSES'] == '3'
    assert env['JAX_PROCESS_ID'] == str(i)
    assert env['XLA_FLAGS'].startswith('--xla_force_host_platform_device_count=4')
    assert words[-5:] == [sys.executable, '-m', 'spikingformer_jax.main', '--config=experiments/digits.py',
                          '--workdir=/tmp/w']
  # Without --port, a free one is picked, the same for every process.
  picked = _run('local.sh', '--dry-run', f'--python={sys.executable}', '--processes=2', '--config=x.py',
                '--workdir=/tmp/w')
  ports = {w for l in _dry_run_lines(picked) for w in shlex.split(l) if w.startswith('JAX_COORDINATOR_ADDRESS=')}
  assert len(ports) == 1 and ports.pop().startswith('JAX_COORDINATOR_ADDRESS=127.0.0.1:')


def test_pod_up_creates_or_reuses_copies_the_code_and_installs_on_every_worker():
  result = _run('tpu_pod.sh', 'up', *POD, '--accelerator=v4-32', '--version=tpu-ubuntu2204-base', '--spot',
                '--dry-run')
  assert 'reuse my-pod if' in result.stdout
  create, archive, scp, ssh = _dry_run_commands(result)
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-pod', '--accelerator-type=v4-32',
                    '--version=tpu-ubuntu2204-base', '--spot', '--zone=us-central2-b']
  assert archive[0] == '(cd' and 'git ls-files -z -co --exclude-standard' in ' '.join(archive)
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod'] and '--worker=all' in ssh
  remote = next(a for a in ssh if a.startswith('--command='))
  jax_pin = next(l for l in (sweep.REPO / 'requirements.txt').read_text().splitlines() if l.startswith('jax=='))
  # The default image's python3 is 3.10: uv (from PyPI) makes a Python 3.11 venv, the pins go there.
  steps = [c.strip() for c in remote[len('--command='):].split(';')]
  assert "python3 -m pip install --user --quiet 'uv==0.13.9'" in steps
  assert '~/.local/bin/uv venv --quiet --allow-existing --python 3.11 .venv' in steps
  assert "grep -v '^torch==' requirements.txt > requirements-pod.txt" in steps
  assert (f"~/.local/bin/uv pip install --quiet --python .venv/bin/python -r requirements-pod.txt "
          f"-r requirements-tpu.txt 'jax[tpu]=={jax_pin[5:]}'") in steps
  assert steps.index('~/.local/bin/uv venv --quiet --allow-existing --python 3.11 .venv') < steps.index(
      "grep -v '^torch==' requirements.txt > requirements-pod.txt")
  other = _run('tpu_pod.sh', 'setup', *POD, '--python-version=3.12', '--dry-run')
  assert '--python 3.12 .venv' in _dry_run_commands(other)[-1][-2]


@pytest.mark.parametrize('command', ['run', 'start'])
def test_pod_run_starts_the_same_trainer_command_on_all_workers(command):
  ssh, = _dry_run_commands(_run('tpu_pod.sh', command, *POD, '--project=my-proj', '--dry-run', '--', *TRAIN))
  assert '--worker=all' in ssh and ssh[-2:] == ['--zone=us-central2-b', '--project=my-proj']
  remote = next(a for a in ssh if a.startswith('--command='))[len('--command='):]
  # The remote shell sees the training flags exactly (the space inside one flag survives), plus distributed.
  main = remote[remote.index('.venv/bin/python -m spikingformer_jax.main'):remote.index('--config.distributed=True')]
  assert shlex.split(main)[3:] == TRAIN
  assert remote.startswith('cd ~/spikingformer-jax || exit 1;') and 'train.pid' in remote
  assert ('nohup ' in remote) == (command == 'start') and ('| tee train.log' in remote) == (command == 'run')


@pytest.mark.parametrize('command', ['run', 'start'])
def test_pod_run_can_compile_for_the_tpu_topology_first(command):
  aot, train = _dry_run_commands(_run('tpu_pod.sh', command, *POD, '--aot-check=v5e:4x4', '--dry-run', '--', *TRAIN))
  assert aot[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod', '--worker=0']
  remote = next(a for a in aot if a.startswith('--command='))[len('--command='):]
  prefix = 'cd ~/spikingformer-jax || exit 1; JAX_PLATFORMS=cpu .venv/bin/python -m spikingformer_jax.aot '
  assert remote.startswith(prefix)
  # The training config and its overrides, the topology; not the workdir.
  assert shlex.split(remote[len(prefix):]) == TRAIN[:2] + ['--topology=v5e:4x4']
  assert '--worker=all' in train and any('spikingformer_jax.main' in a for a in train)


def test_pod_run_starts_nothing_when_the_topology_check_fails(tmp_path):
  calls = tmp_path / 'calls'
  gcloud = tmp_path / 'gcloud'  # Records its arguments; the compile check on worker 0 fails.
  gcloud.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n[[ "$*" != *--worker=0* ]]\n')
  gcloud.chmod(0o755)
  result = _run('tpu_pod.sh', 'run', *POD, '--aot-check=v5e:2x2', '--', *TRAIN, env={'GCLOUD': str(gcloud)})
  assert result.returncode == 2 and 'the AOT compile check for v5e:2x2 failed' in result.stderr
  assert len(calls.read_text().splitlines()) == 1 and '--worker=all' not in calls.read_text()


def test_pod_logs_stop_delete_and_clear_errors():
  logs, = _dry_run_commands(_run('tpu_pod.sh', 'logs', *POD, '--worker=3', '--dry-run'))
  assert '--worker=3' in logs and any('tail -n 200 -F ~/spikingformer-jax/train.log' in a for a in logs)
  stop, = _dry_run_commands(_run('tpu_pod.sh', 'stop', *POD, '--dry-run'))
  assert '--worker=all' in stop and any('kill -TERM' in a for a in stop)
  delete, = _dry_run_commands(_run('tpu_pod.sh', 'delete', *POD, '--dry-run'))
  assert delete[4:] == ['delete', 'my-pod', '--quiet', '--zone=us-central2-b']

  no_zone = _run('tpu_pod.sh', 'status', '--name=my-pod', '--dry-run', env={'TPU_ZONE': ''})
  assert no_zone.returncode == 2 and '--zone (or TPU_ZONE) is required' in no_zone.stderr
  no_gcloud = _run('tpu_pod.sh', 'status', *POD, env={'GCLOUD': '/nonexistent/gcloud'})
  assert no_gcloud.returncode == 2 and "'/nonexistent/gcloud' not found: install the Google Cloud CLI" in \
      no_gcloud.stderr
  no_type = _run('tpu_pod.sh', 'create', *POD, '--dry-run', env={'TPU_ACCELERATOR': ''})
  assert no_type.returncode == 2 and '--accelerator (or TPU_ACCELERATOR) is required' in no_type.stderr
  no_flags = _run('tpu_pod.sh', 'run', *POD, '--dry-run', '--', '--config=experiments/digits.py')
  assert no_flags.returncode == 2 and "'run' needs the training flags after '--'" in no_flags.stderr
  local_workdir = _run('tpu_pod.sh', 'run', *POD, '--dry-run', '--', '--config=x.py', '--workdir=/tmp/w')
  assert local_workdir.returncode == 0 and 'is not gs://' in local_workdir.stderr
  assert _run('tpu_pod.sh', 'reboot', *POD).returncode == 2


def test_sweep_launcher_dry_run_lists_runs_and_requires_its_flags(tmp_path):
  result = _run('sweep.sh', '--dry-run', '--sweep=experiments/sweeps/smoke_local.py', f'--root={tmp_path}',
                env={'PYTHON': sys.executable})
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(l) for l in result.stdout.splitlines() if 'spikingformer_jax.main' in l]
  assert [c[-1] for c in commands] == [f'--workdir={tmp_path}/optim.lr=0.0005', f'--workdir={tmp_path}/optim.lr=0.002']
  missing = _run('sweep.sh', '--sweep=experiments/sweeps/smoke_local.py')
  assert missing.returncode == 2 and '--root=DIR' in missing.stderr
