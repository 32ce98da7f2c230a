"""The persistent compilation cache: a second process loads the step the first one compiled."""
import os
import subprocess
import sys

from conftest import REPO

_SCRIPT = '''
import sys
import jax
import jax.numpy as jnp
from spikingformer_jax import compile_cache

hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if 'cache_hits' in event else None)
print('dir', compile_cache.enable(sys.argv[1], min_compile_secs=0.0))
step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print('value', float(step(jnp.ones((64, 64)))))
print('hits', len(hits))
'''


def _run(cache_dir, **env):
  environ = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  out = subprocess.run([sys.executable, '-c', _SCRIPT, str(cache_dir)], cwd=REPO, capture_output=True, text=True,
                       env=dict(environ, JAX_PLATFORMS='cpu', **env), check=True, timeout=120)
  return dict(line.split(' ', 1) for line in out.stdout.splitlines() if line.split(' ', 1)[0] in ('dir', 'value',
                                                                                                  'hits'))


def test_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
  first, second = _run(tmp_path / 'cache'), _run(tmp_path / 'cache')
  assert first['dir'] == second['dir'] == str(tmp_path / 'cache')
  assert first['hits'] == '0' and int(second['hits']) >= 1 and first['value'] == second['value']
  assert any(p.name.startswith('jit_') for p in (tmp_path / 'cache').iterdir())
  off = _run('off')
  assert (off['dir'], off['hits']) == ('None', '0')
  assert _run('ignored', JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'own'))['dir'] == str(tmp_path / 'own')
