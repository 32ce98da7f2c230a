"""Test setup: 8 fake CPU devices for sharding tests, one compilation cache for the session, and access to
the real-data samples in ../shared."""
import os
import pathlib
import shutil
import tempfile

# Must happen before jax starts its backends anywhere in the test session: 8 CPU devices, and the XLA:CPU
# options the command line applies (spikingformer_jax/cpu_runtime.py).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# JAX's persistent compilation cache, fresh for this session and shared by its worker processes (they inherit
# this environment) and the commands tests start: a program that several tests build (the tiny configs recur
# across files) compiles once. Removed when the session ends; a cache the caller set is used and kept.
_SESSION_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  _SESSION_CACHE = os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='spikingformer-test-xla-')
from spikingformer_jax import cpu_runtime  # noqa: E402

cpu_runtime.apply_cpu_flags()

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The library finds the samples through $SPIKINGFORMER_SHARED (spikingformer_jax.paths.shared_data_dir); the tests
# default it to the checkout's sibling folder, for this process and the commands it starts.
SHARED = pathlib.Path(os.environ.setdefault('SPIKINGFORMER_SHARED', str(REPO.parent / 'shared')))


def shared_path(*parts: str) -> pathlib.Path:
  """Path under ../shared, or skip the calling test with the reason when it is absent."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f'{path} is absent: this test needs the real-data samples in ../shared '
                '(set SPIKINGFORMER_SHARED to their location).')
  return path


def pytest_sessionfinish(session):
  if _SESSION_CACHE and not hasattr(session.config, 'workerinput'):  # the process that made it (not a worker)
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
