"""Spikingformer CIFAR 4-384 (T=4, batch 16) on CPU: our JAX training step vs the PyTorch reference.

Every measurement runs in a fresh subprocess (`--worker ...`), so its peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`) is its own; the orchestrator runs the workers in interleaved rounds
and takes medians, and measures a large float32 (and bfloat16) matmul's GFLOP/s in the same run.

Rows: our full training step (AdamW via optax, BatchNorm statistics updated) in float32 as shipped
(`batchnorm.BatchNorm`'s one-tensor backward, `neurons.lif`'s hand-written BPTT, the XLA:CPU options of
`cpu_runtime.CPU_FLAGS` that main.py applies), then with each of those undone (XLA's defaults, the default
scheduler only, flax's BatchNorm, both: the previous release), with remat, in bfloat16, fwd+bwd only; with
the sparse spike kernels (`spike_kernels=True`: the products with a spike operand and their weight
gradients in spikingformer_jax/kernels, the rest unchanged); and the reference's training step (benchmarks/torch_reference.py with SpikingJelly's MultiStepLIFNode torch
backend, AdamW).

  /tmp/bench-venv/bin/python -m benchmarks.model_step   # writes benchmarks/results/model_step.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks import common

MODEL = 'spikingformer-cifar-4-384'
# The reference (issue text): PyTorch Spikingformer CIFAR 4-384, T=4, batch 16, AdamW, this machine kind.
REFERENCE_IMAGES_PER_S = 3.3
REFERENCE_PEAK_RSS_GB = 4.7


def analytic_train_gflop_per_image(dim=384, depth=4, T=4, hw=32, mlp_ratio=4) -> float:
  """2 x MACs of every conv/matmul, forward x 3 (backward = 2 forwards), per image.

  The CIFAR stem keeps 32x32 for stages 0-2 and pools before stages 3 (16x16) and 4 (8x8); the
  blocks work on N = 64 tokens. BatchNorm, LIF, pooling and the optimizer are not counted.
  """
  widths = (3, dim // 8, dim // 4, dim // 2, dim, dim)
  sizes = (hw, hw, hw, hw // 2, hw // 4)
  stem = sum(9 * widths[k] * widths[k + 1] * sizes[k] ** 2 for k in range(5))
  n = (hw // 4) ** 2
  block = 4 * dim * dim * n + 2 * mlp_ratio * dim * dim * n + 2 * n * n * dim  # qkv+proj, mlp, attention.
  return 2 * 3 * T * (stem + depth * block + dim * 10) / 1e9


# ----------------------------------------------------------------------------------------------
# Workers (each runs in its own process and prints one JSON line).
# ----------------------------------------------------------------------------------------------
def jax_worker(args) -> dict:
  import os

  from spikingformer_jax import cpu_runtime
  # Before jax starts its CPU client: the command line's options (unless undone), then any extra flags.
  flags = (args.xla_flags + ' ' + os.environ.get('XLA_FLAGS', '')).strip()
  os.environ['XLA_FLAGS'] = flags if args.xla_defaults else cpu_runtime.merged(flags)  # merged: given flags win
  import jax
  import jax.numpy as jnp
  import optax

  from spikingformer_jax import layers, models, registry
  if args.flax_bn:
    layers.batch_norm = common.flax_batch_norm

  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[args.dtype]
  model = registry.get_model(MODEL, dtype=dtype, remat=args.remat, spike_kernels=args.spike_kernels)
  images = jax.random.normal(jax.random.PRNGKey(0), (args.batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(jax.random.PRNGKey(1), (args.batch,), 0, 10)
  variables = jax.jit(models.init_variables, static_argnums=0)(  # as train.py: jitted init
      model, jax.random.PRNGKey(2), images[:1])
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optax.adamw(5e-4, weight_decay=0.05)
  opt_state = tx.init(params)

  def loss_fn(params, batch_stats):
    logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                  mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates['batch_stats']

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  if args.mode == 'fwdbwd':
    step = jax.jit(lambda p, s: grad_fn(p, s))
    call_args = (params, batch_stats)
    run = lambda: jax.block_until_ready(compiled(*call_args))
  else:
    def train_step(params, opt_state, batch_stats):
      (loss, batch_stats), grads = grad_fn(params, batch_stats)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, batch_stats, loss

    step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    call_args = (params, opt_state, batch_stats)
    state = {'args': call_args}

    def run():
      params, opt_state, batch_stats, loss = compiled(*state['args'])
      state['args'] = (params, opt_state, batch_stats)
      return jax.block_until_ready(loss)

  start = time.perf_counter()
  compiled = step.lower(*call_args).compile()
  compile_s = time.perf_counter() - start
  cpu_runtime.release_freed_memory()  # as train.py does after its first step
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  memory = compiled.memory_analysis()
  xla_bytes = sum(getattr(memory, f, 0) for f in ('temp_size_in_bytes', 'argument_size_in_bytes',
                                                   'output_size_in_bytes')) if memory else float('nan')
  common.reset_peak_rss()  # From here on the high-water mark covers the steps, not the compiler.
  _, samples = common.median_time(run, args.steps, warmup=1)
  return dict(step_s=samples, compile_s=compile_s, flops=flops, peak_rss=common.peak_rss_bytes(),
              steps_peak_rss=common.current_peak_rss_bytes(), xla_bytes=xla_bytes)


def torch_worker(args) -> dict:
  import torch

  from benchmarks import torch_reference
  torch.manual_seed(0)
  model = torch_reference.cifar_4_384(lif=args.lif).train()
  images = torch.randn(args.batch, 3, 32, 32)
  labels = torch.randint(0, 10, (args.batch,))
  optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    if args.mode == 'train':
      optimizer.step()
    return loss.item()

  run()  # warm-up, then the same heap hygiene as the JAX rows
  from spikingformer_jax import cpu_runtime
  cpu_runtime.release_freed_memory()
  common.reset_peak_rss()
  _, samples = common.median_time(run, args.steps, warmup=0)
  return dict(step_s=samples, compile_s=0.0, flops=float('nan'), peak_rss=common.peak_rss_bytes(),
              steps_peak_rss=common.current_peak_rss_bytes(), xla_bytes=float('nan'),
              threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------------
# Orchestrator.
# ----------------------------------------------------------------------------------------------
# Every worker runs with glibc's malloc on transparent huge pages, as launch/local.sh runs training
# (GLIBC_TUNABLES, set at process start), unless its row says NO_HUGE_PAGES.
HUGE_PAGES = 'glibc.malloc.hugetlb=1'
NO_HUGE_PAGES = '<no huge pages>'
ROWS = {
    # row name: worker arguments
    'JAX train step, float32, spike kernels': ['jax', '--mode', 'train', '--spike-kernels'],
    'JAX train step, float32': ['jax', '--mode', 'train'],
    'PyTorch reference train step (SpikingJelly torch LIF)': ['torch', '--mode', 'train', '--lif', 'spikingjelly'],
    'JAX train step, float32, without huge-page malloc': ['jax', '--mode', 'train', NO_HUGE_PAGES],
    'PyTorch reference train step, without huge-page malloc': ['torch', '--mode', 'train', NO_HUGE_PAGES],
    'JAX train step, float32, XLA defaults (no CPU_FLAGS)': ['jax', '--mode', 'train', '--xla-defaults'],
    'JAX train step, float32, default scheduler': [
        'jax', '--mode', 'train', '--xla-flags=--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'],
    'JAX train step, float32, flax BatchNorm': ['jax', '--mode', 'train', '--flax-bn'],
    'JAX train step, float32, flax BatchNorm, XLA defaults (previous release)':
        ['jax', '--mode', 'train', '--flax-bn', '--xla-defaults'],
    'JAX fwd+bwd, float32': ['jax', '--mode', 'fwdbwd'],
    'JAX train step, bfloat16': ['jax', '--mode', 'train', '--dtype', 'bfloat16'],
    'JAX train step, float32, remat': ['jax', '--mode', 'train', '--remat'],
}
REFERENCE_ROW = 'PyTorch reference train step (SpikingJelly torch LIF)'
# Rows timed in every round; the others (slow or secondary) only in the first.
EVERY_ROUND = ('JAX train step, float32, spike kernels', 'JAX train step, float32', REFERENCE_ROW)


def matmul_gflops(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[dtype_name]
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  t, _ = common.median_time(lambda: matmul(a, a).block_until_ready(), repeats, warmup=2)
  return 2 * n ** 3 / t / 1e9


def orchestrate(args):
  import os
  rows = {name: [] for name in args.rows}
  failures = {}
  if any('--spike-kernels' in ROWS[name] for name in args.rows):
    from spikingformer_jax.kernels import build
    build.build_library()  # Once, before the workers: their compile times are XLA's alone.
  matmul = {'float32': [], 'bfloat16': []}
  load = [os.getloadavg()[0]]
  for r in range(args.rounds):
    for dtype in matmul:
      matmul[dtype].append(matmul_gflops(dtype))
    for name in args.rows:
      if r and (name not in EVERY_ROUND or name in failures):
        continue
      worker_args = [a for a in ROWS[name] if a != NO_HUGE_PAGES] + ['--batch', str(args.batch), '--steps', str(args.steps)]
      env = {} if NO_HUGE_PAGES in ROWS[name] else {'GLIBC_TUNABLES': HUGE_PAGES}
      try:
        result = common.run_worker('benchmarks.model_step', ['--worker'] + worker_args, env=env)
      except RuntimeError as e:  # Reported in the table (e.g. spikingjelly missing, an XLA:CPU limitation).
        failures[name] = str(e).strip().splitlines()[-1]
        print(f'{name} failed: {e}', flush=True)
        continue
      print(f'round {r}: {name}: {json.dumps(result)}', flush=True)
      rows[name].append(result)
    load.append(os.getloadavg()[0])

  mm = {k: statistics.median(v) for k, v in matmul.items()}
  train_gflop = analytic_train_gflop_per_image() * args.batch
  summary = {}
  for name, results in rows.items():
    if not results:
      continue
    step_s = statistics.median(statistics.median(r['step_s']) for r in results)
    flops = statistics.median(r['flops'] for r in results)
    summary[name] = dict(step_s=step_s, img_s=args.batch / step_s,
                         peak_gb=statistics.median(r['peak_rss'] for r in results) / 1e9,
                         steps_peak_gb=statistics.median(r['steps_peak_rss'] for r in results) / 1e9,
                         xla_gb=statistics.median(r['xla_bytes'] for r in results) / 1e9,
                         rounds=len(results),
                         compile_s=statistics.median(r['compile_s'] for r in results), flops=flops)
  ref = summary.get(REFERENCE_ROW)
  table = [[name, 0, f'failed: `{message[:160]}`'] + ['-'] * 9 for name, message in failures.items()]
  for name, s in summary.items():
    is_bf16 = 'bfloat16' in name
    # XLA does not count the custom calls' work: the spike-kernel row reports its dense equivalent.
    xla_gflop = float('nan') if 'spike kernels' in name else s['flops'] / 1e9
    achieved = (xla_gflop if xla_gflop == xla_gflop else train_gflop) / s['step_s']
    table.append([
        name, s['rounds'], f'{s["step_s"]:.2f}', f'{s["img_s"]:.2f}',
        f'{s["img_s"] / ref["img_s"]:.2f}x' if ref else 'n/a',
        f'{s["img_s"] / REFERENCE_IMAGES_PER_S:.2f}x',
        f'{s["peak_gb"]:.2f} / {s["steps_peak_gb"]:.2f} / '
        + ('-' if s['xla_gb'] != s['xla_gb'] else f'{s["xla_gb"]:.2f}'),
        f'{s["peak_gb"] / ref["peak_gb"]:.2f}x' if ref else 'n/a',
        f'{s["peak_gb"] / REFERENCE_PEAK_RSS_GB:.2f}x',
        '-' if xla_gflop != xla_gflop else f'{xla_gflop:.0f}',
        f'{achieved:.0f} ({achieved / mm["bfloat16" if is_bf16 else "float32"]:.0%})',
        f'{s["compile_s"]:.0f}' if s['compile_s'] else '-',
    ])
  lines = ['# Spikingformer CIFAR 4-384 training step on CPU: JAX vs the PyTorch reference', '',
           f'Command: `{common.command_line("benchmarks.model_step")}`', '']
  lines += common.machine_lines()
  lines += [f'- load average (1 min) before/after each round: {", ".join(f"{l:.1f}" for l in load)} '
            '(other jobs share the 2 cores)',
            f'- large matmul ({2048}x{2048}, jax.jit) in this run: float32 {mm["float32"]:.0f} GFLOP/s, '
            f'bfloat16 {mm["bfloat16"]:.0f} GFLOP/s (median of {args.rounds} rounds)', '']
  lines += [f'Model `{MODEL}` (9.33 M parameters), T=4, batch {args.batch}, 32x32x3 inputs, AdamW (lr 5e-4, '
            f'wd 0.05). Each row is a fresh process per round (rows interleaved; {", ".join(EVERY_ROUND)} in all '
            f'{args.rounds} rounds, the slower/secondary rows in the first only); a round '
            f'times {args.steps} steps after one warm-up step; the table gives the median over rounds of the '
            'per-round median step time, and the median peak RSS (whole process: Python, framework, '
            'compiled code, data). Achieved GFLOP/s = XLA `cost_analysis()` FLOPs of the compiled step / '
            'step time (for PyTorch, and for the spike kernels, whose custom calls XLA does not count: the '
            f'analytic {analytic_train_gflop_per_image():.1f} GFLOP per training image x {args.batch}, i.e. '
            'the dense equivalent). The reference code measured earlier on this machine: '
            f'{REFERENCE_IMAGES_PER_S} images/s, '
            f'{REFERENCE_PEAK_RSS_GB} GB peak RSS. Targets: >= 2x its images/s, <= 0.5x its peak memory.', '']
  lines += common.markdown_table(
      ['row', 'rounds', 's / step', 'images/s', 'vs PyTorch (this run)', 'vs 3.3 img/s (issue)', 'peak RSS GB (process / during steps / XLA buffers)',
       'RSS vs PyTorch (this run)', 'RSS vs 4.7 GB (issue)', 'XLA GFLOP / step', 'achieved GFLOP/s (of matmul)',
       'compile s'], table)
  common.write_report(args.out, lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--worker', choices=['jax', 'torch'], help='internal: run one measurement')
  parser.add_argument('--mode', choices=['train', 'fwdbwd'], default='train')
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--spike-kernels', action='store_true', help='jax: the model with spike_kernels=True')
  parser.add_argument('--lif', default='spikingjelly', help="torch: 'spikingjelly' | 'builtin'")
  parser.add_argument('--flax-bn', action='store_true', help="jax: flax's BatchNorm instead of batchnorm.BatchNorm")
  parser.add_argument('--xla-defaults', action='store_true', help='jax: without cpu_runtime.CPU_FLAGS')
  parser.add_argument('--xla-flags', default='', help='jax: extra XLA_FLAGS (override CPU_FLAGS)')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', type=int, default=3, help='timed steps per round (after one warm-up)')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
  parser.add_argument('--out', default=f'{common.REPO_ROOT}/benchmarks/results/model_step.md')
  args = parser.parse_args()
  if args.worker == 'jax':
    print(json.dumps(jax_worker(args)))
  elif args.worker == 'torch':
    print(json.dumps(torch_worker(args)))
  else:
    orchestrate(args)


if __name__ == '__main__':
  main()
