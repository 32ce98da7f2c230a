"""cpu_runtime: XLA:CPU options merged with the user's XLA_FLAGS and read by XLA; freed heap reused, or
returned to the OS."""
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from spikingformer_jax import cpu_runtime


def test_merge_keeps_the_users_choices():
  user = '--xla_force_host_platform_device_count=8 --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'
  assert cpu_runtime.merged(user).split() == user.split() + ['--xla_cpu_experimental_ynn_fusion_type=-individual_convolution']
  assert cpu_runtime.merged('') == ' '.join(cpu_runtime.CPU_FLAGS)


def test_applied_in_this_session_and_convolutions_leave_ynnpack():
  """conftest applies the flags as main.py does; then no convolution is compiled into a YNNPACK fusion."""
  x, k = jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
  environ = {}
  assert cpu_runtime.apply_cpu_flags(environ) is False and not environ  # backends running: too late, says so
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  hlo = jax.jit(jax.grad(lambda k: jnp.sum(conv(x, k) ** 2))).lower(k).compile().as_text()
  ynn_lines = [line for line in hlo.splitlines() if re.match(r'\s*%?ynn_fusion\S* = ', line)]
  ynn_bodies = [_body(hlo, name) for line in ynn_lines for name in re.findall(r'calls=(%?[\w.\-]+)', line)]
  assert 'convolution(' in hlo
  assert not any('convolution(' in body for body in ynn_bodies), ynn_lines


def _body(hlo: str, name: str) -> str:
  match = re.search(r'^' + re.escape(name) + r' .*?^\}', hlo, re.M | re.S)
  return match.group(0) if match else ''


def _rss_bytes() -> int:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmRSS:'))


def test_release_freed_memory_returns_heap_holes_to_the_os():
  """Freed blocks below live ones stay resident until malloc_trim gives their pages back."""
  blocks = [b'x' * 65536 for _ in range(3000)]  # ~200 MB of heap (below glibc's mmap threshold)
  keep = blocks[::50]  # live blocks pin the heap, so the automatic top-of-heap trim cannot free it
  del blocks
  before = _rss_bytes()
  assert cpu_runtime.release_freed_memory()
  assert before - _rss_bytes() > 100e6, (before, _rss_bytes())
  assert len(keep) == 60


_REFAULT_PROBE = '''
import resource, sys
from spikingformer_jax import cpu_runtime
if sys.argv[1] == 'reuse':
  assert cpu_runtime.reuse_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buffer = bytearray(64 << 20); del buffer  # a step's 64 MB temporary, allocated and freed
before = faults()
for _ in range(10):
  buffer = bytearray(64 << 20); del buffer
print(faults() - before)
'''


def _page_faults_of_ten_buffers(mode):
  out = subprocess.run([sys.executable, '-c', _REFAULT_PROBE, mode], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1], timeout=120)
  return int(out.stdout.split()[-1])


def test_reuse_freed_memory_stops_faulting_in_each_fresh_buffer():
  """glibc maps a 64 MB block afresh on every malloc (16,384 page faults each); reused heap faults no more."""
  assert _page_faults_of_ten_buffers('default') > 10 * 16384 * 0.9
  assert _page_faults_of_ten_buffers('reuse') < 16384


_ARENA_PROBE = '''
import ctypes, runpy, sys
command = sys.argv[1]
if command == 'import jax':
  import jax
else:  # the command line `python -m <module> --help`: its imports, then the help text and exit
  sys.argv = [command, '--help']
  try:
    runpy.run_module(command, run_name='__main__', alter_sys=True)
  except SystemExit:
    pass
import jax, jax.numpy as jnp
from spikingformer_jax import train  # Orbax and TensorStore start their threads
x = jnp.ones((512, 512))
(x @ x).block_until_ready()
ctypes.CDLL(None).malloc_stats()  # glibc: an "Arena N:" paragraph per malloc arena, on stderr
'''


def _malloc_arenas_after(command):
  out = subprocess.run([sys.executable, '-c', _ARENA_PROBE, command], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  return len(re.findall(r'^Arena \d+:', out.stderr, re.M))


@pytest.mark.skipif(cpu_runtime._libc() is None, reason='glibc only (malloc arenas, malloc_stats)')
@pytest.mark.parametrize('module', ['spikingformer_jax.main', 'spikingformer_jax.suite', 'spikingformer_jax.trials'])
def test_the_command_lines_keep_every_thread_on_one_malloc_arena(module):
  """Each command line tunes malloc before an import starts a thread, so XLA's threads allocate from the one
  arena (whose freed step buffers are reused); imported first, JAX's threads take arenas of their own."""
  assert _malloc_arenas_after(module) == 1


@pytest.mark.skipif(cpu_runtime._libc() is None, reason='glibc only (malloc arenas, malloc_stats)')
def test_jax_imported_first_spreads_threads_over_malloc_arenas():
  assert _malloc_arenas_after('import jax') > 1


def test_runs_on_cpu_follows_jax_platforms():
  assert cpu_runtime.runs_on_cpu({'JAX_PLATFORMS': 'cpu'})
  assert not cpu_runtime.runs_on_cpu({'JAX_PLATFORMS': 'tpu,cpu'})
  assert not cpu_runtime.runs_on_cpu({'JAX_PLATFORMS': 'cuda'})
