"""Compile the real training step for a TPU slice that is not here: does it fit, how fast, what it moves.

  python -m spikingformer_jax.aot --config=experiments/imagenet.py:variant=8-768 --topology=v5e-16 \
      --per_chip_batch=24 [--config.mesh.fsdp=4] [--out=report.json]

With `libtpu` installed (requirements-tpu.txt), `jax.experimental.topologies` describes the devices of
any TPU slice, and XLA's own TPU compiler builds the trainer's `train_step` for them from abstract
inputs: no TPU, no data, no parameters. The step is the one `train.py` runs: `train.make_context`,
`train.abstract_state`'s shardings on the same ('data', 'fsdp') mesh, `train.jit_train_step` (same
donation). The report (printed, and written as JSON with `--out`) gives per chip: HBM for
arguments, temporaries and outputs against the chip's capacity and a FITS / DOES NOT FIT verdict (a
step that overflows HBM is reported with XLA's figures, not raised); FLOPs and bytes accessed per
step; the estimated step time, the examples/s/chip and the model-FLOPs utilisation it implies (model
FLOPs from `analysis/flops.py`'s count of the forward pass, x3 for forward and backward, not XLA's
count, which includes padding and elementwise work); the collectives by kind with their bytes; and the
compile time. The step time is XLA's cost-model estimate (`optimal_seconds`) where it gives one, else the
roofline max(FLOPs / peak, bytes / HBM bandwidth) of the chip's public figures (XLA returns a negative
estimate for some programs). These are compiler estimates for a slice that was not used, not runs.

Topologies: XLA's names (`v5e:4x4`, `v4:2x2x4`, `v5p:2x4x4`) or Cloud TPU slice names (`v5e-16`,
`v4-32`, `v5p-64`, `v6e-16`; v4 and v5p count TensorCores, two per chip).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from spikingformer_jax import configs, data, sharding, tasks, train
from spikingformer_jax.analysis import flops

GIB = 1024 ** 3


class AotError(ValueError):
  """A topology, batch or installation that cannot be compiled for; the message says which."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation (Cloud TPU documentation)."""
  generation: str
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  tensorcores_in_slice_name: int  # v4 and v5p slice names count TensorCores (2 per chip)
  topology_kwargs: tuple = ()  # extra arguments of get_topology_desc


CHIPS = {
    'v4': Chip('v4', 32 * GIB, 275e12, 1.2e12, 2, (('chip_config_name', 'megacore'),)),
    'v5e': Chip('v5e', 16 * GIB, 197e12, 0.819e12, 1),
    'v5p': Chip('v5p', 95 * GIB, 459e12, 2.765e12, 2),
    'v6e': Chip('v6e', 32 * GIB, 918e12, 1.64e12, 1),
}
# The chip grid of a slice with this many chips (v5e / v6e: 2-D; v4 / v5p: 3-D).
_GRIDS_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
_GRIDS_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8',
             512: '8x8x8', 1024: '8x8x16', 2048: '8x16x16', 4096: '16x16x16'}


def topology_name(name: str) -> tuple[str, Chip]:
  """'v5e-16' or 'v5e:4x4' -> ('v5e:4x4', its Chip)."""
  match = re.fullmatch(r'(v\d+[a-z]*)(?:[:=_]([\dx]+)|-(\d+))', name.strip())
  if not match or match.group(1) not in CHIPS:
    raise AotError(f'--topology={name!r}: expected a slice name like v5e-16, v4-32, v5p-64 or an XLA topology '
                   f'like v5e:4x4, v4:2x2x4; generations: {sorted(CHIPS)}.')
  gen, grid, count = match.groups()
  chip = CHIPS[gen]
  if grid:
    return f'{gen}:{grid}', chip
  chips, rest = divmod(int(count), chip.tensorcores_in_slice_name)
  grids = _GRIDS_3D if gen in ('v4', 'v5p') else _GRIDS_2D
  if rest or chips not in grids:
    raise AotError(f'--topology={name!r}: {gen} slices come in {sorted(k * chip.tensorcores_in_slice_name for k in grids)}'
                   f' {"TensorCores" if chip.tensorcores_in_slice_name > 1 else "chips"}.')
  return f'{gen}:{grids[chips]}', chip


def topology_devices(name: str) -> tuple[list, Chip, str]:
  """The compile-only devices of the slice (needs libtpu), its Chip and XLA topology name."""
  xla_name, chip = topology_name(name)
  if importlib.util.find_spec('libtpu') is None:
    raise AotError('the TPU compiler is not installed: pip install -r requirements-tpu.txt (libtpu).')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # no probing for other hosts of a real slice
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compiling only: other processes may hold libtpu
  from jax.experimental import topologies  # noqa: PLC0415
  try:
    topo = topologies.get_topology_desc(platform='tpu', topology_name=xla_name, **dict(chip.topology_kwargs))
  except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError for topologies it does not know)
    raise AotError(f'--topology={name!r} ({xla_name}): {str(e).splitlines()[0]}') from e
  return list(topo.devices), chip, xla_name


# ---------------------------------------------------------------------------------------------------
# What the step is compiled for: the dataset's nominal facts and one global batch's shapes.

# Datasets too large to read for a compile: (num_train, stored example shape without the event frames' T).
NOMINAL_DATASETS = {
    'imagenet2012': (1_281_167, (224, 224, 3)),
    'cifar10': (50_000, (32, 32, 3)),
    'cifar100': (50_000, (32, 32, 3)),
    'cifar10_dvs': (9_000, (128, 128, 2)),
    'dvs128_gesture': (1_176, (128, 128, 2)),
    'nmnist': (60_000, (34, 34, 2)),
}
# Spikingformer-Text pretraining/fine-tuning sizes: BERT's uncased vocabulary; a nominal corpus size.
BERT_VOCAB = 30522
NOMINAL_TEXT_TRAIN = 1_000_000


def nominal_info(config) -> data.DatasetInfo:
  """The DatasetInfo for compiling only: a known dataset's published sizes, else the task's pipeline's info."""
  name = config.data.name
  if tasks.is_text(config):
    return data.DatasetInfo(num_classes=config.model.num_classes, example_shape=(), num_train=NOMINAL_TEXT_TRAIN,
                            num_eval=0, vocab_size=BERT_VOCAB, task=config.task)
  if name not in NOMINAL_DATASETS:
    return tasks.get_task(config).data_module.dataset_info(config.data)
  num_train, shape = NOMINAL_DATASETS[name]
  spec = data.pipeline.get_spec(name)
  if spec.kind == 'events':
    shape = (int(config.data.T),) + shape
  else:
    size = data.pipeline.augment_settings(config.data).image_size
    shape = (size, size, shape[-1]) if size else shape
  return data.DatasetInfo(num_classes=spec.num_classes, example_shape=shape, num_train=num_train, num_eval=0)


def batch_shapes(config, info, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one global training batch, as the loaders of the task's `data_module` yield it."""
  b = batch_size
  if not tasks.is_text(config):
    return {'image': jax.ShapeDtypeStruct((b,) + tuple(info.example_shape), jnp.float32),
            'label': jax.ShapeDtypeStruct((b,), jnp.int32)}
  length = int(config.data.max_len)
  tokens = jax.ShapeDtypeStruct((b, length), jnp.int32)
  batch = {'input_ids': tokens, 'segment_ids': tokens, 'attention_mask': tokens}
  if config.task == 'mlm':
    batch['label'] = tokens
    batch['mlm_weights'] = jax.ShapeDtypeStruct((b, length), jnp.float32)
  else:
    batch['label'] = jax.ShapeDtypeStruct((b,), jnp.float32 if config.task == 'regression' else jnp.int32)
  return batch


# ---------------------------------------------------------------------------------------------------
# Reading the compiled step.

_COLLECTIVE = re.compile(r'=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|'
                         r'collective-permute)(-start)?\(')
_ARRAY = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]')
_ITEM_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4,
               'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}


def shape_bytes(hlo_shape: str) -> int:
  """Bytes of an HLO result shape, e.g. 'f32[32,64]{1,0}' or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(hlo_shape):
    total += _ITEM_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collectives in optimised HLO (bytes: each one's result, per chip).

  An async pair (`*-start` / `*-done`) counts once, at its start. Its result tuple holds the operand
  as well (and for a collective-permute two u32 context scalars after it), so its bytes are those of
  the tuple's largest array: an all-gather's result, a permute's output (the size of its operand).
  """
  out: dict[str, dict[str, int]] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE.search(line)
    if not match:
      continue
    shape, kind, is_async = match.groups()
    if is_async and shape.startswith('('):
      arrays = _ARRAY.findall(shape)
      nbytes = max((shape_bytes(f'{dtype}[{dims}]') for dtype, dims in arrays), default=0)
    else:
      nbytes = shape_bytes(shape)
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += nbytes
  return out


def model_train_flops(ctx, example: tuple) -> float:
  """Training FLOPs of one example: 2 x 3 x the forward pass's multiply-accumulates (`flops.trace`'s count)."""
  variables = jax.eval_shape(lambda: ctx.model.init(jax.random.PRNGKey(0), *example, train=False))
  variables = {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
  trace = flops.trace(flops.model_forward(ctx.model), variables, *example,
                      input_argnums=tuple(range(1, 1 + len(example))))
  return 6.0 * sum(p.macs for p in trace.products) / example[0].shape[0]


_HBM_OVERFLOW = re.compile(r'([\d.]+)([KMGT])\b.*?exceed.*?HBM.*?([\d.]+)([KMGT])', re.IGNORECASE | re.DOTALL)
_UNITS = {'K': 1024, 'M': 1024 ** 2, 'G': GIB, 'T': 1024 ** 4}


def _overflow_bytes(message: str) -> tuple[int | None, int | None]:
  """(needed, available) bytes from XLA's RESOURCE_EXHAUSTED message, if it states them."""
  match = _HBM_OVERFLOW.search(message)
  if not match:
    return None, None
  need, need_unit, have, have_unit = match.groups()
  return int(float(need) * _UNITS[need_unit.upper()]), int(float(have) * _UNITS[have_unit.upper()])


# ---------------------------------------------------------------------------------------------------
# The compile.

@dataclasses.dataclass
class LoweredStep:
  """The trainer's step lowered for a slice, and what the report needs to read it."""
  lowered: Any
  config: Any
  ctx: train.StepContext
  example: tuple
  mesh: jax.sharding.Mesh


def lower_train_step(config, devices, per_chip_batch: int = 0) -> LoweredStep:
  """`train.jit_train_step` lowered on a mesh of `devices` from abstract state and batch.

  `per_chip_batch` > 0 sets the global batch to that many examples per device.
  """
  n_chips = len(devices)
  config = config.copy_and_resolve_references()
  # The sparse spike kernels are XLA:CPU foreign calls (the `cpu` configs'); an accelerator runs XLA's products,
  # with the same parameters, but the compiling host's backend is the CPU, where the kernels would apply.
  config.model.spike_kernels = False
  if per_chip_batch:
    config.batch_size = per_chip_batch * n_chips * int(config.grad_accum_steps)
  configs.validate(config)
  micro = config.batch_size // config.grad_accum_steps
  if micro % n_chips:
    raise AotError(f'config.batch_size (per microbatch: {micro}) is not divisible by the {n_chips} chips; use '
                   f'a multiple of {n_chips} (or --per_chip_batch).')
  mesh = sharding.make_mesh(config.mesh, devices)
  info = nominal_info(config)
  ctx, example = train.make_context(config, info)
  state, state_shardings = train.abstract_state(ctx, mesh, example)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in batch_shapes(config, info, config.batch_size).items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  budget = (jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                                   train.budget_inputs(0.0)),) if ctx.budget_steps else ()
  lowered = train.jit_train_step(ctx, state_shardings, mesh).lower(state, batch, rng, *budget)
  return LoweredStep(lowered, config, ctx, example, mesh)


def compile_report(config, topology: str, per_chip_batch: int = 0, hlo_out: str = '') -> dict:
  """Compiles `config`'s training step for `topology`; returns the report (see the module docstring).

  `per_chip_batch` > 0 sets the global batch to that many examples per chip; `hlo_out` names a file for
  the optimised HLO (per-chip program, with XLA's layouts and fusions).
  """
  devices, chip, xla_name = topology_devices(topology)
  n_chips = len(devices)
  t0 = time.perf_counter()
  step = lower_train_step(config, devices, per_chip_batch)
  lower_seconds = time.perf_counter() - t0
  config, mesh, lowered = step.config, step.mesh, step.lowered
  report: dict[str, Any] = {
      'config': {'model': config.model.name, 'dataset': config.data.name, 'dtype': config.model.dtype,
                 'remat': config.model.remat, 'T': config.model.T},
      'topology': topology, 'xla_topology': xla_name, 'chips': n_chips,
      'mesh': {k: int(v) for k, v in mesh.shape.items()},
      'global_batch': int(config.batch_size), 'per_chip_batch': config.batch_size / n_chips,
      'hbm_capacity_bytes': chip.hbm_bytes,
  }
  report['lower_seconds'] = lower_seconds
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 (XlaRuntimeError: RESOURCE_EXHAUSTED when it does not fit)
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'exceed' not in message:
      raise
    needed, available = _overflow_bytes(message)
    report.update(fits=False, compile_seconds=time.perf_counter() - t0,
                  error=message.strip().splitlines()[0][:500],
                  hbm={'needed_bytes': needed, 'available_bytes': available})
    return report
  report['compile_seconds'] = time.perf_counter() - t0

  mem = compiled.memory_analysis()
  hbm = {'argument_bytes': int(mem.argument_size_in_bytes), 'output_bytes': int(mem.output_size_in_bytes),
         'alias_bytes': int(mem.alias_size_in_bytes), 'temp_bytes': int(mem.temp_size_in_bytes),
         'code_bytes': int(mem.generated_code_size_in_bytes)}
  # Donated state is aliased: its output reuses its argument's buffers.
  hbm['total_bytes'] = (hbm['argument_bytes'] + hbm['output_bytes'] - hbm['alias_bytes'] + hbm['temp_bytes']
                        + hbm['code_bytes'])
  report['hbm'] = hbm
  report['fits'] = hbm['total_bytes'] <= chip.hbm_bytes

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops, bytes_accessed = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  xla_seconds = float(cost.get('optimal_seconds', -1.0))
  # XLA's cost model returns a negative optimal_seconds for some programs; the roofline is its floor.
  roofline = max(xla_flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_s)
  seconds = xla_seconds if xla_seconds > 0 else roofline
  per_chip_examples = config.batch_size / n_chips
  model_flops = model_train_flops(step.ctx, step.example) * per_chip_examples
  report['per_chip_step'] = {
      'xla_flops': xla_flops,
      'bytes_accessed': bytes_accessed,
      'model_flops': model_flops,
      'xla_optimal_seconds': xla_seconds,
      'roofline_seconds': roofline,
      'estimated_seconds': seconds,
      'estimate': 'xla' if xla_seconds > 0 else 'roofline',
      'examples_per_second': per_chip_examples / seconds,
      'mfu': model_flops / (seconds * chip.peak_bf16_flops),
  }
  hlo = compiled.as_text()
  report['collectives'] = collectives(hlo)
  if hlo_out:
    from etils import epath  # noqa: PLC0415
    epath.Path(hlo_out).write_text(hlo)
  return report


def format_report(report: dict) -> str:
  gib = lambda b: f'{b / GIB:.2f} GiB' if b is not None else '?'
  head = (f'{report["config"]["model"]} ({report["config"]["dtype"]}) on {report["topology"]} '
          f'({report["chips"]} chips, mesh {report["mesh"]}), global batch {report["global_batch"]} '
          f'= {report["per_chip_batch"]:g} per chip')
  if not report['fits'] and 'error' in report:
    hbm = report['hbm']
    return (f'{head}\nDOES NOT FIT: needs {gib(hbm["needed_bytes"])} of {gib(hbm["available_bytes"])} HBM per chip '
            f'(compile {report["compile_seconds"]:.0f} s)\n{report["error"]}')
  hbm, step = report['hbm'], report['per_chip_step']
  lines = [head,
           f'{"FITS" if report["fits"] else "DOES NOT FIT"}: {gib(hbm["total_bytes"])} of '
           f'{gib(report["hbm_capacity_bytes"])} HBM per chip (arguments {gib(hbm["argument_bytes"])}, '
           f'temporaries {gib(hbm["temp_bytes"])}, outputs {gib(hbm["output_bytes"])}, '
           f'donated {gib(hbm["alias_bytes"])})',
           f'per chip per step: {step["xla_flops"] / 1e12:.2f} TFLOP (model {step["model_flops"] / 1e12:.2f}), '
           f'{step["bytes_accessed"] / 1e9:.1f} GB accessed',
           f'{"XLA estimate" if step["estimate"] == "xla" else "Roofline estimate (XLA gave none)"}: '
           f'{step["estimated_seconds"]:.4f} s/step, {step["examples_per_second"]:.1f} examples/s/chip, '
           f'MFU {100 * step["mfu"]:.1f}% (roofline {step["roofline_seconds"]:.4f} s)',
           'collectives: ' + (', '.join(f'{k} x{v["count"]} ({v["bytes"] / 1e6:.1f} MB)'
                                        for k, v in sorted(report['collectives'].items())) or 'none'),
           f'compile {report["compile_seconds"]:.0f} s (lowering {report["lower_seconds"]:.0f} s)']
  return '\n'.join(lines)


def _main(argv):
  from absl import flags  # noqa: PLC0415
  del argv
  jax.config.update('jax_platforms', os.environ.get('JAX_PLATFORMS') or 'cpu')  # compile-only: no TPU here
  f = flags.FLAGS
  try:
    report = compile_report(f.config, f.topology, f.per_chip_batch, f.hlo_out)
  except (AotError, configs.ConfigError) as e:
    print(f'aot: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(format_report(report))
  if f.out:
    from etils import epath  # noqa: PLC0415
    out = epath.Path(f.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
  sys.exit(0 if report['fits'] else 1)


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Experiment config file (with optional :args).', lock_config=True)
  flags.DEFINE_string('topology', None, 'TPU slice: v5e-16, v4-32, v5p-64, or an XLA topology like v5e:4x4.')
  flags.DEFINE_integer('per_chip_batch', 0, 'Examples per chip (sets the global batch); 0 keeps the config\'s.')
  flags.DEFINE_string('out', '', 'Write the report as JSON here (a local or gs:// path).')
  flags.DEFINE_string('hlo_out', '', 'Write the compiled per-chip HLO here (to see fusions, layouts, collectives).')
  flags.mark_flags_as_required(['config', 'topology'])
  app.run(_main)
