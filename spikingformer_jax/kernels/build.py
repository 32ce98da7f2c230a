"""Compiles the kernels (`spike_products.cc`, `lif_backward.cc`) for this machine on first use and registers
their XLA FFI targets.

The library is built with the system's C++ compiler (`$CXX`, else c++ / g++ / clang++) for the host CPU
(`-march=native`: the AVX-512 or AVX2 paths where the CPU has them) against the XLA FFI headers that jaxlib
ships. It is cached under `$SPIKINGFORMER_JAX_CACHE` (default `~/.cache/spikingformer_jax`) by a hash of the
source, the compiler, the flags (plus any in `$SPIKINGFORMER_KERNEL_CFLAGS`, e.g. `-mno-avx512f` to measure
the AVX2 paths), jaxlib's version and the CPU's feature flags, so a change of any of them rebuilds it. The
library is written to a temporary name and renamed, so a concurrent or interrupted build never leaves a
half-written library behind under the cached name.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess

import jax
import jaxlib
from absl import logging

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / 'spike_products.cc', HERE / 'lif_backward.cc')
HEADERS = (HERE / 'parallel_for.h',)
TARGETS = ('SpikeMatmul', 'SpikeMatmulT', 'SpikeConv3x3', 'SpikeConv3x3WGrad', 'LifBackward')
PREFIX = 'spikingformer_'  # FFI target names are global to the process.
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


class KernelBuildError(RuntimeError):
  """The kernels cannot be built or loaded here (no compiler, or it failed); the message says why."""


def cache_dir() -> pathlib.Path:
  root = os.environ.get('SPIKINGFORMER_JAX_CACHE') or pathlib.Path.home() / '.cache' / 'spikingformer_jax'
  return pathlib.Path(root) / 'kernels'


def compiler() -> str | None:
  return os.environ.get('CXX') or next(
      (path for name in ('c++', 'g++', 'clang++') if (path := shutil.which(name))), None)


def _cpu_flags() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith('flags')), '')
  except OSError:
    return ''


def flags() -> tuple[str, ...]:
  return FLAGS + tuple(os.environ.get('SPIKINGFORMER_KERNEL_CFLAGS', '').split())


def library_path(cxx: str) -> pathlib.Path:
  try:
    version = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelBuildError(f'cannot run the C++ compiler {cxx!r}: {e}') from e
  key = hashlib.sha256('\0'.join(
      [*(f.read_text() for f in SOURCES + HEADERS), cxx, version, ' '.join(flags()), jaxlib.__version__,
       _cpu_flags()]).encode()).hexdigest()
  return cache_dir() / f'spike_products-{key[:16]}.so'


def build_library() -> pathlib.Path:
  """The compiled library's path, compiling it first unless the cache has it."""
  cxx = compiler()
  if cxx is None:
    raise KernelBuildError('no C++ compiler found (looked for $CXX, c++, g++, clang++); the spike kernels '
                           'need one to compile the C++ sources in spikingformer_jax/kernels.')
  path = library_path(cxx)
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(f'{path.name}.{os.getpid()}.partial')
  compile_sources(cxx, HERE, partial)
  os.replace(partial, path)
  return path


def compile_sources(cxx: str, source_dir: pathlib.Path, out: pathlib.Path) -> None:
  """Compiles the files named as SOURCES (and HEADERS) in `source_dir` into the library `out`; on failure raises
  KernelBuildError and leaves no `out`."""
  command = [cxx, *flags(), '-I', jax.ffi.include_dir(), '-I', str(source_dir),
             *(str(source_dir / f.name) for f in SOURCES), '-o', str(out)]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.SubprocessError) as e:
    out.unlink(missing_ok=True)
    raise KernelBuildError(f'compiling the spike kernels failed: {e}') from e
  if result.returncode != 0:
    out.unlink(missing_ok=True)
    raise KernelBuildError(f'compiling the spike kernels failed (exit {result.returncode}): '
                           f'{" ".join(command)}\n{result.stderr[-3000:]}')


@functools.cache
def load() -> ctypes.CDLL:
  """Builds (or finds) the library, loads it and registers its FFI targets for the CPU; once per process."""
  lib = ctypes.CDLL(str(build_library()))
  if not lib.SpikeKernelsVectorized():
    logging.warning('The spike kernels were built without AVX2/FMA or AVX-512 (this CPU lacks them): their portable '
                    'loops ran up to 3x slower than XLA\'s products (benchmarks/results/spike_kernels_portable.md); '
                    'measure before using spike_kernels=True here.')
  for name in TARGETS:
    jax.ffi.register_ffi_target(PREFIX + name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
  return lib
