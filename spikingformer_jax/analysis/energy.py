"""Firing rates, synaptic operations (SOPs) and energy, with the Spikingformer paper's method.

For every conv / dense / attention product of the traced forward pass (see flops.py):

- spike-driven product (an input-derived operand had only 0/1 values on every measured batch):
  SOPs = firing rate x FLOPs, energy = E_AC x SOPs. With two binary operands (K^T V, Q K^T) the
  rate is the smaller of the two, as the reference's SSA term min(fr_k, fr_v).
- any other product (the stem conv on the analog image, the head on the float stream, Spikformer's
  convs on its integer-valued residual): energy = E_MAC x FLOPs.

FLOPs are multiply-accumulates per example over all T time steps (the reference counts convs on
the [T*B] batch), so "firing rate x T x FLOPs per step" of the paper is `rate x flops` here. The
rate is the mean operand value over all its elements (time steps included) and all examples.
Constants: E_MAC = 4.6 pJ, E_AC = 0.9 pJ (45 nm, 32-bit float), as in the reference code.

Text models (spikingformer-text-*, batches with input_ids / segment_ids / attention_mask):
- the embedding lookup is a gather and LayerNorm has no product: neither is counted. The blocks'
  dense and attention products read spikes (AC); the head is the one MAC.
- padded tokens (attention_mask 0) do not count towards any rate: a spike operand of the blocks
  ([T, B, N, ...]) and every LIF output is averaged over the real tokens only, and batches are
  weighted by their number of real tokens. (Padded keys and values are zero anyway; padded queries
  and the padded positions of the residual stream fire, but a deployment would not compute them.)
- FLOPs are those of the whole padded sequence as the model runs it (as the vision models count
  every pixel), so all batches must have one length: the CLI turns data.dynamic_padding off.

CLI:
  python -m spikingformer_jax.analysis.energy --config=experiments/digits.py --checkpoint=DIR --batches=10 --out=DIR
writes energy.json (per-layer table, per-block and total numbers, LIF firing rates) and energy.png.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spikingformer_jax import layers, models
from spikingformer_jax.analysis import flops

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


@dataclasses.dataclass(frozen=True)
class LayerEnergy:
  """One product, per example. `spike_rate` is None for a MAC (non-spike) product."""
  location: str
  primitive: str
  flops: float  # multiply-accumulates of the dense computation
  spike_rate: Optional[float]
  operand_means: tuple[Optional[float], ...]  # measured mean of each input-derived operand
  sops: float  # accumulate operations (spike-driven products only)
  macs: float  # multiply-accumulates (non-spike products only)
  energy_pj: float

  @property
  def block(self) -> str:
    """The top-level module ('tokenizer', 'block_3', 'head')."""
    return self.location.split('/')[0]


def layer_energy(product: flops.Product, spike_rate: Optional[float],
                 operand_means: Sequence[Optional[float]] = (), e_mac_pj: float = E_MAC_PJ,
                 e_ac_pj: float = E_AC_PJ) -> LayerEnergy:
  """Energy of one product traced at batch 1 (so its FLOPs are per example)."""
  if spike_rate is not None and not 0.0 <= spike_rate <= 1.0:
    raise ValueError(f'{product.location}: firing rate {spike_rate} is not in [0, 1].')
  sops = 0.0 if spike_rate is None else spike_rate * product.macs
  macs = float(product.macs) if spike_rate is None else 0.0
  return LayerEnergy(product.location, product.primitive, float(product.macs), spike_rate,
                     tuple(operand_means), sops, macs, e_mac_pj * macs + e_ac_pj * sops)


def spike_rate(product: flops.Product, operand_means: Sequence[Optional[float]],
               operand_binary: Sequence[Optional[bool]]) -> Optional[float]:
  """The product's AC rate: the smallest mean among its binary input-derived operands, else None (MAC)."""
  rates = [m for o, m, b in zip(product.operands, operand_means, operand_binary) if o.from_input and b]
  return min(rates) if rates else None


@dataclasses.dataclass(frozen=True)
class Measurement:
  """Dataset averages from `measure`; `products` are traced at batch 1 (FLOPs per example)."""
  products: tuple[flops.Product, ...]
  operand_means: tuple[tuple[Optional[float], ...], ...]
  operand_binary: tuple[tuple[Optional[bool], ...], ...]
  lif_rates: dict[str, float]
  num_examples: int


def token_mean(value, token_mask) -> jax.Array:
  """Mean of a [T, B, N, ...] value over the real tokens (token_mask [B, N] is 1) only."""
  if value.ndim < 3 or value.shape[1:3] != token_mask.shape:
    raise ValueError(f'A spike tensor of shape {value.shape} does not have the [T, B, N, ...] layout of the '
                     f'text blocks for an attention mask of shape {token_mask.shape}.')
  weights = token_mask.astype(jnp.float32).reshape((1,) + token_mask.shape + (1,) * (value.ndim - 3))
  per_token = value.shape[0] * np.prod(value.shape[3:], dtype=np.int64)
  return jnp.sum(value.astype(jnp.float32) * weights) / (jnp.maximum(jnp.sum(weights), 1.0) * per_token)


def _token_operand_stats(token_mask):
  """flops.OperandStats with spike (provably binary) operands averaged over real tokens only."""
  def operand_stats(value, operand: flops.Operand) -> flops.OperandStats:
    stats = flops.measure_operand(value, operand)
    return stats._replace(mean=token_mean(value, token_mask)) if operand.binary else stats
  return operand_stats


def _lif_means(spikes, token_mask=None) -> dict[str, jax.Array]:
  """{'block_0/attn/q_lif': mean spike} from the sown 'spikes' collection (real tokens only if masked)."""
  means = {}
  for path, value in jax.tree_util.tree_flatten_with_path(spikes)[0]:
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys and keys[-1] == 'out':  # the sow name of layers.LIF
      keys = keys[:-1]
    calls = [k.idx for k in path if isinstance(k, jax.tree_util.SequenceKey)]
    name = '/'.join(keys) + ''.join(f'#{i}' for i in calls if i)
    means[name] = (jnp.mean(value.astype(jnp.float32)) if token_mask is None else
                   token_mean(value, token_mask))
  return means


TEXT_KEYS = ('input_ids', 'segment_ids', 'attention_mask')


def _batch_stats_fn(model, text: bool, train: bool):
  root = type(model).__name__
  forward = flops.model_forward(model, train)

  @jax.jit
  def batch_stats(variables, *inputs):
    if not text:
      (_, state), _, stats = flops.evaluate(forward, variables, *inputs, root=root)
      return _lif_means(state.get(layers.SPIKES, {})), stats
    token_mask = inputs[2]
    (_, state), _, stats = flops.evaluate(
        forward, variables, *inputs, root=root, input_argnums=flops.TEXT_INPUT_ARGNUMS,
        binary_argnums=flops.TEXT_BINARY_ARGNUMS, operand_stats=_token_operand_stats(token_mask))
    return _lif_means(state.get(layers.SPIKES, {}), token_mask), stats
  return batch_stats


def _batch_inputs(batch: Mapping[str, Any], index: int) -> tuple[np.ndarray, ...]:
  """(images,) or (input_ids, segment_ids, attention_mask) of the real examples (batch['mask'] 1)."""
  if 'image' in batch:
    inputs = (np.asarray(batch['image']),)
  elif all(k in batch for k in TEXT_KEYS):
    inputs = tuple(np.asarray(batch[k]) for k in TEXT_KEYS)
    if inputs[0].ndim != 2 or any(a.shape != inputs[0].shape for a in inputs[1:]):
      raise ValueError(f'Batch {index}: {", ".join(f"{k} {a.shape}" for k, a in zip(TEXT_KEYS, inputs))} '
                       'must all be [B, N].')
    if not np.all((inputs[2] == 0) | (inputs[2] == 1)):
      raise ValueError(f'Batch {index}: attention_mask must hold only 0 (padding) and 1 (real tokens).')
  else:
    raise ValueError(f'Batch {index} has keys {sorted(batch)}; expected an "image" entry or '
                     f'{", ".join(TEXT_KEYS)} (and optionally "mask").')
  if 'mask' in batch:  # padded examples of the last batch do not count
    mask = np.asarray(batch['mask']).astype(bool)
    if mask.shape != inputs[0].shape[:1]:
      raise ValueError(f'Batch {index}: mask shape {mask.shape} does not match the batch of inputs '
                       f'{inputs[0].shape}.')
    inputs = tuple(a[mask] for a in inputs)
  return inputs


def measure(model, variables, batches: Iterable[Mapping[str, Any]], train: bool = False) -> Measurement:
  """Runs inference over `batches` (dicts with 'image', or a text model's TEXT_KEYS, and optional 'mask')
  and averages every rate (text: spike rates over real tokens, see the module docstring).

  train=True measures the forward pass of a training step instead: BatchNorm normalises each batch (its
  real examples) with the batch's own statistics, so the rates are those that a training step's
  products see (benchmarks/spike_density.py), not the deployed model's.
  """
  model = models.per_step_stem(model)
  traced = products = lif_sums = mean_sums = binary = batch_stats = None
  text = False
  count = tokens = 0
  for index, batch in enumerate(batches):
    inputs = _batch_inputs(batch, index)
    n = inputs[0].shape[0]
    if n == 0:
      continue
    if products is None:
      text = len(inputs) == 3
      traced = (flops.text_model_trace(model, variables, 1, inputs[0].shape[1]) if text else
                flops.model_trace(model, variables, (1,) + inputs[0].shape[1:], inputs[0].dtype))
      products, first_shape = traced.products, inputs[0].shape[1:]
      batch_stats = _batch_stats_fn(model, text, train)
      lif_sums = collections.defaultdict(float)
      mean_sums = [[0.0] * 2 for _ in products]
      binary = [[True] * 2 for _ in products]
    if inputs[0].shape[1:] != first_shape:
      raise ValueError(f'Batch {index} has examples of shape {inputs[0].shape[1:]}, the first {first_shape}: '
                       'FLOPs are counted for one shape (text: set config.data.dynamic_padding = False).')
    # Spike rates of a text model are per real token: such batches weigh by their real tokens.
    n_tokens = int(inputs[2].sum()) if text else n
    lif, stats = jax.device_get(batch_stats(variables, *map(jnp.asarray, inputs)))
    if len(stats) != len(products):
      raise RuntimeError(f'Traced {len(stats)} products at batch {n} but {len(products)} at batch 1.')
    for name, mean in lif.items():
      lif_sums[name] += float(mean) * n_tokens
    for p, product_stats in enumerate(stats):
      for o, operand in enumerate(product_stats):
        if operand is not None:
          mean_sums[p][o] += float(operand.mean) * (n_tokens if products[p].operands[o].binary else n)
          binary[p][o] &= bool(operand.all_binary)
    count += n
    tokens += n_tokens
  if not count:
    raise ValueError('No examples to measure: the batches were empty (or fully masked).')
  means = tuple(tuple(s / (tokens if o.binary else count) if o.from_input else None
                      for s, o in zip(sums, p.operands))
                for sums, p in zip(mean_sums, products))
  flags = tuple(tuple(b if o.from_input else None for b, o in zip(bs, p.operands))
                for bs, p in zip(binary, products))
  lif_rates = {k: lif_sums[k] / tokens for k in sorted(lif_sums, key=traced.program_order)}
  return Measurement(products, means, flags, lif_rates, count)


def _operand_names(product: flops.Product) -> list[Optional[str]]:
  from_input = [o.from_input for o in product.operands]
  if sum(from_input) == 1:
    return ['input' if f else None for f in from_input]
  return [side if f else None for side, f in zip(('lhs', 'rhs'), from_input)]


def _unique(names: Sequence[str]) -> list[str]:
  seen = collections.Counter()
  out = []
  for name in names:
    seen[name] += 1
    out.append(name if seen[name] == 1 else f'{name}#{seen[name] - 1}')
  return out


def rates_from_measurement(m: Measurement) -> dict[str, float]:
  """LIF rates by module path, and binary product inputs as '<location>:input' (or ':lhs'/':rhs')."""
  rates = dict(m.lif_rates)
  for location, p, means, flags in zip(_unique([p.location for p in m.products]), m.products,
                                       m.operand_means, m.operand_binary):
    for name, mean, is_binary in zip(_operand_names(p), means, flags):
      if name is not None and is_binary:
        rates[f'{location}:{name}'] = mean
  return rates


def firing_rates(model, variables, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Dataset-average firing rates of every LIF and of every spike (0/1) input of a conv/dense/matmul."""
  return rates_from_measurement(measure(model, variables, batches))


@dataclasses.dataclass(frozen=True)
class Report:
  layers: tuple[LayerEnergy, ...]
  lif_rates: dict[str, float]
  num_examples: int
  e_mac_pj: float = E_MAC_PJ
  e_ac_pj: float = E_AC_PJ

  @property
  def sops(self) -> float:
    return sum(l.sops for l in self.layers)

  @property
  def macs(self) -> float:
    return sum(l.macs for l in self.layers)

  @property
  def energy_mj(self) -> float:
    return sum(l.energy_pj for l in self.layers) * 1e-9

  def per_block(self) -> dict[str, dict[str, float]]:
    blocks = {}
    for l in self.layers:
      b = blocks.setdefault(l.block, dict(flops=0.0, sops=0.0, macs=0.0, mac_energy_mj=0.0, ac_energy_mj=0.0))
      b['flops'] += l.flops
      b['sops'] += l.sops
      b['macs'] += l.macs
      b['mac_energy_mj'] += self.e_mac_pj * l.macs * 1e-9
      b['ac_energy_mj'] += self.e_ac_pj * l.sops * 1e-9
    for b in blocks.values():
      b['energy_mj'] = b['mac_energy_mj'] + b['ac_energy_mj']
    return blocks

  def to_dict(self) -> dict:
    return dict(
        num_examples=self.num_examples, e_mac_pj=self.e_mac_pj, e_ac_pj=self.e_ac_pj,
        totals=dict(energy_mj=self.energy_mj, sops=self.sops, macs=self.macs,
                    mac_energy_mj=self.e_mac_pj * self.macs * 1e-9, ac_energy_mj=self.e_ac_pj * self.sops * 1e-9,
                    flops=sum(l.flops for l in self.layers)),
        per_block=self.per_block(),
        layers=[dict(dataclasses.asdict(l), spike_driven=l.spike_rate is not None, energy_mj=l.energy_pj * 1e-9)
                for l in self.layers],
        lif_firing_rates=dict(self.lif_rates))

  def table(self) -> str:
    lines = [f'{"layer":<44} {"kind":<5} {"FLOPs":>10} {"rate":>7} {"SOPs":>10} {"MACs":>10} {"energy":>10}']
    for l in self.layers:
      rate = 'MAC' if l.spike_rate is None else f'{l.spike_rate:.4f}'
      kind = 'conv' if l.primitive == 'conv_general_dilated' else 'dot'
      lines.append(f'{l.location:<44} {kind:<5} {l.flops:>10.4g} {rate:>7} {l.sops:>10.4g} {l.macs:>10.4g} '
                   f'{format_energy(l.energy_pj * 1e-9):>10}')
    lines.append(f'total per example (average of {self.num_examples}): {self.sops / 1e9:.4g} G SOPs, '
                 f'{self.macs / 1e9:.4g} G MACs, {format_energy(self.energy_mj)}')
    lines.append('LIF firing rates:')
    lines += [f'  {name:<42} {rate:.4f}' for name, rate in self.lif_rates.items()]
    return '\n'.join(lines)


ENERGY_UNITS = (('pJ', 1e-9), ('nJ', 1e-6), ('µJ', 1e-3), ('mJ', 1.0))  # (unit, its size in mJ)


def energy_unit(mj: float) -> tuple[str, float]:
  """The largest of pJ/nJ/µJ/mJ that `mj` millijoules fill at least once (pJ below 1 pJ, mJ above), and its size."""
  fitting = [(unit, size) for unit, size in ENERGY_UNITS if abs(mj) >= size]
  return fitting[-1] if fitting else ENERGY_UNITS[0]


def format_energy(mj: float) -> str:
  """`mj` millijoules with 4 significant digits in its own unit: 13.66 mJ, 2.07 µJ, 310.5 pJ."""
  unit, size = energy_unit(mj)
  return f'{mj / size:.4g} {unit}'


def report_from_measurement(m: Measurement, e_mac_pj: float = E_MAC_PJ, e_ac_pj: float = E_AC_PJ) -> Report:
  energies = []
  for location, p, means, flags in zip(_unique([p.location for p in m.products]), m.products,
                                       m.operand_means, m.operand_binary):
    energy = layer_energy(p, spike_rate(p, means, flags), means, e_mac_pj, e_ac_pj)
    energies.append(dataclasses.replace(energy, location=location))
  return Report(tuple(energies), dict(m.lif_rates), m.num_examples, e_mac_pj, e_ac_pj)


def energy_report(model, variables, batches: Iterable[Mapping[str, Any]], e_mac_pj: float = E_MAC_PJ,
                  e_ac_pj: float = E_AC_PJ, train: bool = False) -> Report:
  return report_from_measurement(measure(model, variables, batches, train), e_mac_pj, e_ac_pj)


def plot(report: Report, path) -> None:
  """PNG: LIF firing rates (top) and MAC/AC energy per block (bottom)."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  names, rates = list(report.lif_rates), list(report.lif_rates.values())
  blocks = report.per_block()
  fig, (ax_rate, ax_energy) = plt.subplots(2, 1, figsize=(max(8, 0.3 * len(names)), 9))
  ax_rate.bar(range(len(names)), rates, color='tab:blue')
  ax_rate.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
  ax_rate.set_ylabel('firing rate')
  ax_rate.set_title(f'LIF firing rates ({report.num_examples} examples)')
  x = np.arange(len(blocks))
  unit, size = energy_unit(max((b['energy_mj'] for b in blocks.values()), default=0.0))
  mac = [b['mac_energy_mj'] / size for b in blocks.values()]
  ac = [b['ac_energy_mj'] / size for b in blocks.values()]
  ax_energy.bar(x, mac, label=f'MAC ({report.e_mac_pj} pJ)', color='tab:red')
  ax_energy.bar(x, ac, bottom=mac, label=f'AC ({report.e_ac_pj} pJ x rate)', color='tab:green')
  ax_energy.set_xticks(x, list(blocks), rotation=45, fontsize=8)
  ax_energy.set_ylabel(f'energy per example ({unit})')
  ax_energy.set_title(f'Energy per block: total {format_energy(report.energy_mj)}, {report.sops / 1e9:.4g} G SOPs')
  ax_energy.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(report: Report, out_dir) -> tuple[pathlib.Path, pathlib.Path]:
  """energy.json and energy.png in `out_dir`."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  json_path, png_path = out / 'energy.json', out / 'energy.png'
  json_path.write_text(json.dumps(report.to_dict(), indent=2))
  plot(report, png_path)
  return json_path, png_path


# ---- CLI ----------------------------------------------------------------------------------------

def run(config, checkpoint_path: str = '', num_batches: int = 10, split: str = '', batch_size: int = 0,
        out_dir: str = '') -> Report:
  """The CLI's work: measure `num_batches` (<= 0: all) of a split and optionally write JSON + PNG."""
  from spikingformer_jax import configs, tasks  # the model and data plumbing is only needed here
  configs.validate(config)
  config = config.copy_and_resolve_references()
  if tasks.is_text(config) and config.data.get('dynamic_padding', False):
    config.data.dynamic_padding = False  # one sequence length (data.max_len) for every batch
  # The CPU kernels' foreign calls hide their arithmetic from the trace; XLA's products have the same
  # parameters and compute the same values (the `cpu` configs train with the kernels).
  config.model.spike_kernels = False
  task = tasks.get_task(config)
  dm = task.data_module
  model = task.build_model(dm.dataset_info(config.data))
  split = split or config.data.eval_split
  loader = dm.make_loader(config.data, split, batch_size=batch_size or config.eval_batch_size, train=False,
                          seed=0)
  batches = iter(loader)
  if num_batches > 0:
    batches = itertools.islice(batches, num_batches)
  first = next(batches, None)
  if first is None:
    raise ValueError(f'Split {split!r} of dataset {config.data.name!r} gave no batches.')
  if checkpoint_path:
    from spikingformer_jax import checkpoint
    variables = checkpoint.load_variables(checkpoint_path)
  else:
    example = tuple(jnp.asarray(a[:1]) for a in _batch_inputs(first, 0))
    init = jax.jit(lambda rng, inputs: model.init(rng, *inputs, train=False))
    variables = {k: v for k, v in init(jax.random.PRNGKey(config.seed), example).items()
                 if k in ('params', 'batch_stats')}
  report = energy_report(model, variables, itertools.chain([first], batches))
  print(report.table())
  if out_dir:
    json_path, png_path = write(report, out_dir)
    print(f'wrote {json_path} and {png_path}')
  return report


def cli():
  # Flags are defined only when run as a program, so that importing this module defines none.
  from absl import app, flags
  from ml_collections import config_flags
  config = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config file (e.g. experiments/digits.py or experiments/glue.py:task=sst2).')
  checkpoint = flags.DEFINE_string('checkpoint', '', 'Checkpoint to load; empty: freshly initialised variables.')
  batches = flags.DEFINE_integer('batches', 10, 'Number of batches to average over; <= 0: the whole split.')
  split = flags.DEFINE_string('split', '', 'Dataset split; empty: config.data.eval_split.')
  batch_size = flags.DEFINE_integer('batch_size', 0, 'Batch size; 0: config.eval_batch_size.')
  out = flags.DEFINE_string('out', '', 'Directory for energy.json and energy.png; empty: print only.')
  flags.mark_flags_as_required(['config'])

  def main(argv):
    del argv
    run(config.value, checkpoint.value, batches.value, split.value, batch_size.value, out.value)
  app.run(main)


if __name__ == '__main__':
  cli()
