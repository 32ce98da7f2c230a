"""Device mesh, shardings and global batches for `jax.jit`-based data-parallel / FSDP training.

Mesh axes ('data', 'fsdp'). Batches are split over both axes (every device sees distinct examples);
parameters and optimizer state are replicated, or with fsdp > 1 each tensor is split along its
largest dimension divisible by the fsdp size (ZeRO-3 style; XLA inserts the all-gathers).
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def maybe_initialize_distributed(enabled: bool, environ=os.environ) -> None:
  """Joins a multi-process job, once, when `enabled` or `JAX_COORDINATOR_ADDRESS` is set.

  TPU pods (and Slurm/MPI) need nothing else: `jax.distributed.initialize()` detects the rest.
  Elsewhere, e.g. several processes on one machine, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` give
  the job's size and this process's index (jax itself reads only the coordinator's address).
  CPU processes exchange collectives over gloo (jax's default CPU implementation).
  """
  if jax.distributed.is_initialized() or not (enabled or environ.get('JAX_COORDINATOR_ADDRESS')):
    return
  given = {name: environ.get(name, '') for name in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')}
  if any(given.values()) and not all(given.values()):
    missing = [name for name, value in given.items() if not value]
    raise ValueError(f'{missing[0]} is not set: JAX_NUM_PROCESSES and JAX_PROCESS_ID go together '
                     f'(got {given}).')
  kwargs = {}
  if all(given.values()):
    try:
      kwargs = dict(num_processes=int(given['JAX_NUM_PROCESSES']), process_id=int(given['JAX_PROCESS_ID']))
    except ValueError:
      raise ValueError(f'JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got {given}.') from None
    if not 0 <= kwargs['process_id'] < kwargs['num_processes']:
      raise ValueError(f'JAX_PROCESS_ID = {kwargs["process_id"]} is not in [0, JAX_NUM_PROCESSES = '
                       f'{kwargs["num_processes"]}).')
  jax.distributed.initialize(**kwargs)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  fsdp = int(mesh_cfg.fsdp)
  data = len(devices) // fsdp if int(mesh_cfg.data) == -1 else int(mesh_cfg.data)
  if data * fsdp != len(devices):
    raise ValueError(f'config.mesh: data={mesh_cfg.data} x fsdp={fsdp} does not use exactly the '
                     f'{len(devices)} available devices.')
  # Auto axes: shardings are hints to the partitioner; grads over sharded batches need no explicit mode.
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def _fsdp_spec(shape, fsdp_size: int) -> P:
  if fsdp_size == 1 or not shape:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def state_shardings(abstract_tree, mesh):
  """A NamedSharding per leaf: replicated, or FSDP-split along the largest divisible dimension."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _fsdp_spec(tuple(x.shape), fsdp_size)),
                                abstract_tree)


def traced_in(mesh, fn):
  """`fn` traced with `mesh` as the abstract mesh, so that `keep_batch_split` sees it inside jit."""
  @functools.wraps(fn)
  def in_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return in_mesh


def keep_batch_split(x, axis: int):
  """Pins `x`'s batch axis `axis` to the batch axes of an FSDP mesh (a no-op otherwise).

  With FSDP the weights are split over 'fsdp' along a channel axis, and XLA's sharding propagation
  may follow them and split activations by channel, then all-gather or all-to-all activations between
  layers (the 8-768 step gathered 35 GB per chip). An activation whose batch stays split makes XLA
  gather the weights instead, which is what FSDP means. Without FSDP the batch split propagates from
  the inputs (but see `pin_batch`), and pinning every product's output there cost the 8-768 step on
  v5e 1 GiB of temporaries and 25 GB of memory traffic per chip.
  """
  mesh = jax.sharding.get_abstract_mesh()
  return x if mesh.empty or mesh.shape['fsdp'] == 1 else pin_batch(x, axis)


def pin_batch(x, axis: int):
  """Pins `x`'s batch axis `axis` to the mesh's batch axes (a no-op outside `traced_in` or on one device).

  For `[T, B, ...]` activations, where time may be split instead: with one example per chip and T = chips
  (DVS at T=16 on 16 chips) the partitioner split the tokenizer BatchNorms' backward over time and
  all-to-alled every tokenizer activation (224 MB per chip per step).
  """
  if batch_shards(x.shape[axis]) == 1:
    return x
  spec = [None] * x.ndim
  spec[axis] = BATCH_AXES
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_shards(batch_size: int) -> int:
  """How many devices a batch of `batch_size` is split over inside `traced_in` (1 outside, or where the
  mesh's batch axes do not divide it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  return shards if batch_size % shards == 0 else 1


def global_batch(local_batch: dict, mesh) -> dict:
  """Assembles each process's numpy batch into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                local_batch)
