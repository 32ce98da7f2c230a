"""LIF forward+backward: our `neurons.lif` against SpikingJelly's MultiStepLIFNode (torch backend).

One run times, in interleaved rounds on the same inputs and cotangents:
  - `neurons.lif` with the fully unrolled scan (the default) and with a rolled scan;
  - `lif_time_vjp` below: a candidate that differentiates the whole LIF over time with one
    `jax.custom_vjp` (residual = the input x, membrane recomputed in the backward pass);
  - SpikingJelly 0.0.0.0.14 `clock_driven.neuron.MultiStepLIFNode(tau=2, detach_reset=True,
    backend='torch')`, the reference's neuron on CPU (skipped when spikingjelly is missing).
It checks that every contender emits the same spikes and input gradients as the default, and relates
the JAX LIF's bytes moved per second to the machine's copy bandwidth measured in the same run.

  /tmp/bench-venv/bin/python -m benchmarks.lif            # writes benchmarks/results/lif.md
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from spikingformer_jax import neurons
from spikingformer_jax.surrogates import get_surrogate

# [T, B, N, C]: one q/k/v LIF of CIFAR 4-384 at batch 32, and the MLP-hidden LIF at batch 64.
SHAPES = {'T4-B32-N64-C384': (4, 32, 64, 384), 'T4-B64-N64-C1536': (4, 64, 64, 1536)}


# ----------------------------------------------------------------------------------------------
# Candidate: one custom_vjp over the whole time loop.
# ----------------------------------------------------------------------------------------------
def _lif_forward(x, cfg: neurons.LIFConfig):
  """Unrolled LIF returning the spikes and the pre-spike membranes H[t] - V_th (list over t)."""
  decay = 1.0 / cfg.tau
  rest = 0.0 if cfg.v_reset is None else cfg.v_reset
  v = jnp.full(x.shape[1:], rest, x.dtype)
  spikes, margins = [], []
  for t in range(x.shape[0]):
    h = neurons._charge(v, x[t], decay, cfg.v_reset, cfg.decay_input)
    margin = h - cfg.v_threshold
    s = (margin >= 0).astype(x.dtype)
    v = h - s * cfg.v_threshold if cfg.v_reset is None else h * (1.0 - s) + cfg.v_reset * s
    spikes.append(s)
    margins.append(margin)
  return spikes, margins


def _backward(g, spikes, surrogate_grads, cfg: neurons.LIFConfig):
  """BPTT: grad_h[t] = g[t] sg'(H[t]-V_th) + grad_v[t] dV/dH[t]; grad_v[t-1] = grad_h[t] (1 - 1/tau)."""
  decay = 1.0 / cfg.tau
  grad_v = jnp.zeros_like(g[0])
  grads = [None] * g.shape[0]
  for t in reversed(range(g.shape[0])):
    through_v = grad_v if cfg.v_reset is None else grad_v * (1.0 - spikes[t])
    grad_h = g[t] * surrogate_grads[t].astype(g.dtype) + through_v
    grads[t] = grad_h * decay if cfg.decay_input else grad_h
    grad_v = grad_h * (1.0 - decay)
  return jnp.stack(grads)


def _surrogate(cfg: neurons.LIFConfig):
  if not cfg.detach_reset:
    raise NotImplementedError('lif_time_vjp implements detach_reset=True (the reference setting) only.')
  grad_fn, default_alpha = get_surrogate(cfg.surrogate)
  return lambda margin: grad_fn(margin, default_alpha if cfg.alpha is None else cfg.alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def lif_time_vjp(x, cfg: neurons.LIFConfig, residual: str = 'input'):
  """`neurons.lif` with a hand-written BPTT over the whole time loop (detach_reset=True only).

  residual='input': saves only x and recomputes membranes and surrogate in the backward pass.
  residual='surrogate': saves sg'(H - V_th) (the spikes are the output), so the backward pass is a
  multiply-add recurrence with no transcendental.
  """
  del residual
  return jnp.stack(_lif_forward(x, cfg)[0])


def _lif_time_vjp_fwd(x, cfg, residual):
  spikes, margins = _lif_forward(x, cfg)
  spikes = jnp.stack(spikes)
  if residual == 'input':
    return spikes, (x,)
  if residual == 'surrogate':
    return spikes, (spikes, _surrogate(cfg)(jnp.stack(margins)))
  raise ValueError(f"residual must be 'input' or 'surrogate', got {residual!r}.")


def _lif_time_vjp_bwd(cfg, residual, saved, g):
  if residual == 'input':
    spikes, margins = _lif_forward(saved[0], cfg)
    return (_backward(g, spikes, [_surrogate(cfg)(m) for m in margins], cfg),)
  spikes, surrogate_grads = saved
  return (_backward(g, spikes, surrogate_grads, cfg),)


lif_time_vjp.defvjp(_lif_time_vjp_fwd, _lif_time_vjp_bwd)


# ----------------------------------------------------------------------------------------------
# Contenders: each maps (x, g) numpy arrays to {row name: (timed call, result getter, residual bytes)}.
# ----------------------------------------------------------------------------------------------
def jax_contender(lif_fn):
  """'fused': one jit computing spikes and d<spikes, g>/dx (XLA sees forward and backward together).
  'split': forward (spikes + saved residuals) and backward as two jit calls, as in a training step
  where other layers separate them; the residuals are what the LIF keeps alive in between.
  """
  @jax.jit
  def fused(x, g):
    spikes, vjp = jax.vjp(lif_fn, x)
    return spikes, vjp(g)[0]

  forward = jax.jit(lambda x: jax.vjp(lif_fn, x))
  backward = jax.jit(lambda vjp, g: vjp(g)[0])

  def make(shape_name):
    x, g = (jnp.asarray(a) for a in inputs(SHAPES[shape_name]))
    fused_call = lambda: jax.block_until_ready(fused(x, g))

    def split_call():
      spikes, vjp = forward(x)
      return jax.block_until_ready((spikes, backward(vjp, g)))

    residuals = [a for a in jax.tree_util.tree_leaves(forward(x)[1]) if hasattr(a, 'nbytes')]
    residual_bytes = sum(int(a.nbytes) for a in residuals)
    as_numpy = lambda call: lambda: tuple(np.asarray(a) for a in call())
    block = lambda call: lambda calls: common.median_time(call, calls, warmup=1)[1]
    return {'fused': (block(fused_call), as_numpy(fused_call), None),
            'split': (block(split_call), as_numpy(split_call), residual_bytes)}
  return make


def spikingjelly_block(shape_name: str, calls: int, result_path: str = '') -> dict:
  """Worker side: SpikingJelly's node on the benchmark inputs; one warm-up, `calls` timed calls."""
  import torch
  from spikingjelly.clock_driven import neuron
  node = neuron.MultiStepLIFNode(tau=2.0, detach_reset=True, backend='torch')
  x_np, g_np = inputs(SHAPES[shape_name])
  g = torch.from_numpy(g_np)

  def run():
    x = torch.from_numpy(x_np).requires_grad_(True)
    spikes = node(x)
    spikes.backward(g)
    node.reset()
    return spikes, x.grad

  if result_path:
    spikes, grad = run()
    np.savez(result_path, spikes=spikes.detach().numpy(), grad=grad.numpy())
  return {'samples': common.median_time(run, calls, warmup=1)[1]}


def spikingjelly_contender():
  """SpikingJelly runs in its own process: in a process where XLA just ran, XLA's idle worker threads
  keep spinning and PyTorch's OpenMP threads get several times slower on 2 cores."""
  import importlib.util
  if importlib.util.find_spec('spikingjelly') is None:
    raise ImportError('spikingjelly is not installed')

  def make(shape_name):
    def call_block(calls):
      return common.run_worker('benchmarks.lif', ['--spikingjelly-worker', shape_name, '--calls', str(calls)])['samples']

    def result():
      with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'out.npz')
        common.run_worker('benchmarks.lif', ['--spikingjelly-worker', shape_name, '--calls', '1',
                                             '--result-path', path])
        out = np.load(path)
        return out['spikes'], out['grad']
    return {'': (call_block, result, None)}
  return make


SPIKINGJELLY = 'SpikingJelly MultiStepLIFNode torch'


def contenders() -> dict:
  cfg = neurons.LIFConfig()
  out = {
      'jax neurons.lif unroll=True (default)': jax_contender(lambda x: neurons.lif(x, cfg)),
      'jax neurons.lif rolled scan': jax_contender(lambda x: neurons.lif(x, cfg.replace(unroll=1))),
      'jax candidate lif_time_vjp residual=x': jax_contender(lambda x: lif_time_vjp(x, cfg, 'input')),
      "jax candidate lif_time_vjp residual=sg'": jax_contender(lambda x: lif_time_vjp(x, cfg, 'surrogate')),
  }
  try:
    out[SPIKINGJELLY] = spikingjelly_contender()
  except ImportError as e:
    print(f'SpikingJelly unavailable ({e}); benchmarking the JAX variants only.')
  return out


# ----------------------------------------------------------------------------------------------
# Copy bandwidth of this machine, measured in the same run.
# ----------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 7) -> dict:
  """Bytes read+written per second by a NumPy copy (1 thread) and an XLA elementwise op (all threads)."""
  n = nbytes // 4
  src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
  dst = np.empty_like(src)
  t_np, _ = common.median_time(lambda: np.copyto(dst, src), repeats)
  x = jnp.asarray(src)
  scale = jax.jit(lambda a: a * 1.5)  # One read, one write: XLA cannot elide it like a plain copy.
  t_jax, _ = common.median_time(lambda: scale(x).block_until_ready(), repeats)
  return {'numpy copy': 2 * nbytes / t_np, 'jax x*1.5': 2 * nbytes / t_jax}


def inputs(shape):
  """The benchmark's input current x (mean 0.8: realistic firing) and cotangent g, float32."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(shape, dtype=np.float32) + 0.8).astype(np.float32)
  return x, rng.standard_normal(shape, dtype=np.float32)


def min_bytes(shape) -> int:
  """Reads x and g, writes spikes and grad_x: the least a fused fwd+bwd must move (float32)."""
  return 4 * 4 * int(np.prod(shape))


def check_against(reference, result, name: str) -> dict:
  spikes_ref, grad_ref = reference
  spikes, grad = result
  mismatched = int(np.sum(spikes != spikes_ref))
  max_err = float(np.max(np.abs(grad - grad_ref)))
  if mismatched or not np.allclose(grad, grad_ref, rtol=1e-5, atol=1e-6):
    raise AssertionError(f'{name}: {mismatched} spike mismatches, max |grad diff| {max_err:.3g}')
  return {'spike_mismatches': mismatched, 'max_grad_diff': max_err}


def run(args):
  makers = contenders()
  bandwidth = copy_bandwidth()
  copy_bw = max(bandwidth.values())
  lines = ['# LIF forward+backward: JAX vs SpikingJelly (CPU)', '',
           f'Command: `{common.command_line("benchmarks.lif")}`', '']
  lines += common.machine_lines()
  lines += ['- copy bandwidth measured in this run (read+write bytes/s, 512 MiB): '
            + ', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in bandwidth.items()), '']
  lines += ['Each row computes spikes and d<spikes, g>/dx for a fixed random cotangent g. The contenders '
            f'take turns: {args.rounds} rounds, in each one warm-up call and {args.calls} timed calls per '
            'contender, so load from other jobs hits all of them alike; medians and minima over all timed '
            "calls. SpikingJelly runs in a subprocess per block: in the JAX process, XLA's idle worker "
            "threads keep spinning and made PyTorch's OpenMP threads 5-15x slower on 2 cores. "
            'LIF: tau=2, v_th=1, hard reset to 0, detach_reset=True, sigmoid surrogate alpha=4. `fused`: one jit for forward+backward; '
            '`split`: forward and backward as two jit calls with the residuals in memory between them '
            '(the situation inside a training step).', '']
  for shape_name in args.shapes:
    shape = SHAPES[shape_name]
    rows, reference = {}, None
    for name, make in makers.items():
      for mode, (call, result, residual_bytes) in make(shape_name).items():
        row = f'{name} {mode}'.strip()
        out = result()  # Also compiles and warms up.
        reference = reference or out
        rows[row] = dict(call=call, samples=[], residual=residual_bytes, **check_against(reference, out, row))
    for _ in range(args.rounds):
      for row in rows.values():
        row['samples'] += row['call'](args.calls)
    sj = statistics.median(rows[SPIKINGJELLY]['samples']) if SPIKINGJELLY in rows else None
    sj_min = min(rows[SPIKINGJELLY]['samples']) if SPIKINGJELLY in rows else None
    table = []
    for name, row in rows.items():
      t = statistics.median(row['samples'])
      bw = min_bytes(shape) / t
      t_min = min(row['samples'])
      table.append([name, f'{t * 1e3:.2f}', f'{t_min * 1e3:.2f}', f'{sj / t:.2f}x' if sj else 'n/a',
                    f'{sj_min / t_min:.2f}x' if sj else 'n/a',
                    f'{bw / 1e9:.1f} GB/s ({bw / copy_bw:.0%})' if name.startswith('jax') else '-',
                    '-' if row['residual'] is None else f'{row["residual"] / 2**20:.0f}',
                    row['spike_mismatches'], f'{row["max_grad_diff"]:.1e}'])
    lines += [f'## Input {list(shape)} float32 ({np.prod(shape) * 4 / 2**20:.0f} MiB per tensor)', '']
    lines += common.markdown_table(
        ['contender', 'median ms', 'min ms', 'speed-up vs SpikingJelly (medians)', '(minima)',
         'min bytes / median time (vs copy bw)', 'residual MiB', 'spike mismatches', 'max |grad - first row|'],
        table)
    lines += ['', f'Min bytes = reads of x, g + writes of spikes, grad_x = {min_bytes(shape) / 2**20:.0f} MiB per call.',
              '']
  common.write_report(args.out, lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument('--rounds', type=int, default=6, help='interleaved rounds over all contenders')
  parser.add_argument('--calls', type=int, default=5, help='timed calls per contender and round')
  parser.add_argument('--out', default=f'{common.REPO_ROOT}/benchmarks/results/lif.md')
  parser.add_argument('--spikingjelly-worker', metavar='SHAPE', help='internal: time SpikingJelly in this process')
  parser.add_argument('--result-path', default='', help='internal: where the worker saves spikes and grads')
  args = parser.parse_args()
  if args.spikingjelly_worker:
    print(json.dumps(spikingjelly_block(args.spikingjelly_worker, args.calls, args.result_path)))
  else:
    run(args)


if __name__ == '__main__':
  main()
