"""CPU runtime settings for training: XLA:CPU options, and handing freed host memory back to the OS.

`apply_cpu_flags` adds XLA:CPU options through `XLA_FLAGS` (before JAX starts its CPU client). Both were
measured on the CIFAR 4-384 training step (benchmarks/model_step.py, BENCHMARKS.md):
- XLA:CPU hands 3x3 convolutions to YNNPACK by default, whose kernel gradient ran at 38 GFLOP/s
  against Eigen's 152 on this project's CPU machine (forward 127 vs 187, input gradient 121 vs 186).
- The default scheduler runs the backward pass's recomputations (normalised BatchNorm inputs, LIF
  membranes) as early as it can and keeps them alive: 1.9 GB of temporaries against 0.9 GB for
  the memory-optimised scheduler, which is also faster here (fewer fresh pages to fault in).
On GPU and TPU these options are never read.

`apply_cpu_flags` also tunes glibc's allocator when this host has no accelerator (`reuse_freed_memory`; command
lines do it first of all, `reuse_freed_memory_on_cpu`): by
default every XLA:CPU worker thread allocates from its own arena, whose buffers above 32 MB are mapped
and unmapped afresh, so each training step faulted in ~1 GB of new zeroed pages (3 M page faults in ten
steps of the CIFAR 2-256 step, 12% of the CPU samples in the kernel). With one arena and no mapped chunks the step
reuses its own freed heap: 0.4 M faults, the step 20% shorter (benchmarks/cifar_cpu_step.py, BENCHMARKS.md).

`release_freed_memory` asks glibc to return the heap it keeps after XLA compiles a step (LLVM's working
memory, ~0.3 GB for the CIFAR training step) to the OS: without it, that memory stays resident for the
whole run and counts in the process's peak RSS.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os

from absl import logging

CPU_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
    '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
)


def _name(flag: str) -> str:
  return flag.split('=', 1)[0]


def merged(existing: str, flags=CPU_FLAGS) -> str:
  """`existing` XLA_FLAGS plus each of `flags` whose option it does not already set (the user's wins)."""
  present = {_name(f) for f in existing.split()}
  return ' '.join(existing.split() + [f for f in flags if _name(f) not in present])


def apply_cpu_flags(environ=os.environ) -> bool:
  """Adds CPU_FLAGS to `XLA_FLAGS` (and `reuse_freed_memory` on a CPU-only host); False, with a
  warning, if JAX's backends already started."""
  from jax._src import xla_bridge  # noqa: PLC0415

  if xla_bridge.backends_are_initialized():
    logging.warning('XLA backends already initialised; the XLA:CPU flags %s are not applied.', CPU_FLAGS)
    return False
  environ['XLA_FLAGS'] = merged(environ.get('XLA_FLAGS', ''))
  reuse_freed_memory_on_cpu(environ)
  return True


def reuse_freed_memory_on_cpu(environ=os.environ) -> bool:
  """`reuse_freed_memory` where JAX computes on the CPU; False elsewhere (or without glibc).

  Command lines call it before they import JAX: a thread keeps the malloc arena of its first allocation, and
  importing JAX, Orbax and TensorStore starts threads. Called after those imports (as `apply_cpu_flags` is),
  XLA's threads share those threads' arenas, which still map and unmap the step's large buffers afresh: in a
  10-minute CIFAR run, a burst of ~240,000 page faults every few steps.
  """
  return runs_on_cpu(environ) and reuse_freed_memory()


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will compute on the CPU: `JAX_PLATFORMS` says so, or the host has no TPU or GPU device files."""
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(glob.glob(pattern) for pattern in ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*'))


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
  """glibc: one arena for every thread, no separately mapped chunks, no automatic trim of the heap's top.

  A freed step buffer then stays in the heap for the next step instead of being unmapped and faulted
  in again. Must run before JAX starts its CPU client: a thread keeps the arena of its first allocation.
  `release_freed_memory` still gives memory back when asked. False where there is no glibc.
  """
  libc = _libc()
  if libc is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)


@functools.cache
def _libc():
  name = ctypes.util.find_library('c')
  libc = ctypes.CDLL(name) if name else None
  return libc if libc is not None and hasattr(libc, 'malloc_trim') else None


def release_freed_memory() -> bool:
  """glibc `malloc_trim(0)`: gives freed heap pages back to the OS; False where there is no glibc."""
  libc = _libc()
  if libc is None:
    return False
  libc.malloc_trim(0)  # returns 1 if it released memory, 0 if there was none to release
  return True
