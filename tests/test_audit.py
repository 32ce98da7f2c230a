"""The spike-driven audit: the static binary analysis, FLOP counts from shapes, and the model verdicts."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from spikingformer_jax import registry
from spikingformer_jax.analysis import audit, flops
from spikingformer_jax.surrogates import spike

SMALL = dict(depth=2, embed_dim=32, num_heads=4)
F32 = jnp.float32


def products_of(fn, *shapes):
  """Products of fn(w, *inputs) with w a [8, 8] weight (not input-derived) and inputs of `shapes`."""
  args = [jax.ShapeDtypeStruct((8, 8), F32)] + [jax.ShapeDtypeStruct(s, F32) for s in shapes]
  return flops.trace(fn, *args, input_argnums=tuple(range(1, len(args)))).products


def max_pool(x):  # [B, H, W, C], MaxPool2d(3, 2, padding 1) as layers.max_pool
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


@pytest.mark.parametrize('make_operand, binary', [
    (lambda x: spike(x), True),
    (lambda x: spike(x).reshape(2, 4, 4, 8).transpose(0, 2, 1, 3).reshape(32, 8), True),
    (lambda x: max_pool(spike(x).reshape(2, 4, 4, 8)).reshape(-1, 8), True),
    (lambda x: jnp.pad(spike(x), ((1, 0), (0, 0))), True),
    (lambda x: jnp.pad(spike(x), ((1, 0), (0, 0)), constant_values=2.0), False),
    (lambda x: spike(x).astype(jnp.bfloat16).astype(F32), True),
    (lambda x: spike(x) * (x[:, :1] > 0.5).astype(F32), True),  # a 0/1 mask
    (lambda x: jnp.where(x > 1.0, spike(x), 0.0), True),
    (lambda x: jnp.broadcast_to(spike(x)[None], (3, 32, 8)).reshape(96, 8), True),
    (lambda x: jnp.maximum(spike(x), spike(-x)), True),
    (lambda x: (x > 0).astype(F32), True),  # any Heaviside is a spike function
    (lambda x: spike(x) + spike(x - 1.0), False),  # integer counts (Spikformer's SEW residual)
    (lambda x: spike(x) * 0.5, False),
    (lambda x: jnp.where(x > 1.0, spike(x), 0.5), False),
    (lambda x: x, False),
    (lambda x: jax.nn.relu(x), False),
])
def test_binary_analysis(make_operand, binary):
  (p,) = products_of(lambda w, x: make_operand(x) @ w, (32, 8))
  assert p.operands[0].from_input and not p.operands[1].from_input
  assert p.operands[0].binary is binary
  assert p.spike_driven is binary


def test_pool_with_all_padding_windows_is_not_binary():
  # Padding 3 >= window 3: some windows see only the -inf padding.
  pool = lambda s: jax.lax.reduce_window(s, -jnp.inf, jax.lax.max, (1, 3), (1, 1), ((0, 0), (3, 3)))
  (p,) = products_of(lambda w, x: pool(spike(x))[:, :8] @ w, (32, 8))
  assert not p.operands[0].binary


def test_binary_through_a_scan_carry_needs_a_fixpoint():
  def lif_like(x, reset_to):
    def step(s, x_t):
      new = spike(x_t) * s if reset_to is None else spike(x_t) + reset_to * s
      return new, s
    return jax.lax.scan(step, jnp.ones(x.shape[1:]), x)[1]
  (kept,) = products_of(lambda w, x: lif_like(x, None)[0] @ w, (4, 32, 8))
  (lost,) = products_of(lambda w, x: lif_like(x, 1.0)[1] @ w, (4, 32, 8))
  assert kept.operands[0].binary  # 1 * s, s * spike: always 0/1
  assert not lost.operands[0].binary  # the carry becomes 2 at the second step


def test_ac_when_one_operand_is_binary_mac_when_none():
  # q (k^T v): k^T v is an integer count, q is binary -> AC.
  def attention(w, q, k, v):
    kv = spike(k).T @ spike(v)
    return spike(q) @ kv, (q @ w) @ (k.T @ v)
  p_kv, p_qkv, p_qw, p_kv_real, p_real = products_of(attention, (16, 8), (16, 8), (16, 8))
  assert p_kv.spike_driven and p_kv.operands[0].binary and p_kv.operands[1].binary
  assert p_qkv.spike_driven and p_qkv.operands[0].binary and not p_qkv.operands[1].binary
  assert not p_qw.spike_driven and not p_kv_real.spike_driven and not p_real.spike_driven


def test_macs_from_shapes():
  def fn(w, x, y, img):
    a = jnp.einsum('bnk,bkm->bnm', x, y)  # batch 3, 5x7 @ 7x4
    kernel = jnp.ones((3, 3, 2, 6))  # HWIO with 2 input features per group, 2 groups
    c = jax.lax.conv_general_dilated(img, kernel, (2, 2), ((1, 1), (1, 1)), feature_group_count=2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return a, c, w
  ein, conv = products_of(fn, (3, 5, 7), (3, 7, 4), (2, 9, 9, 4))
  assert ein.macs == 3 * 5 * 7 * 4
  assert conv.macs == 2 * 5 * 5 * 6 * (3 * 3 * 2)  # output elements x (kernel volume x features/group)


def test_products_inside_loops_are_refused_with_the_location():
  loop = lambda w, x: jax.lax.scan(lambda c, x_t: (c, x_t @ w), 0.0, x)[1]
  with pytest.raises(NotImplementedError, match='scan'):
    products_of(loop, (4, 2, 8))


def test_spikingformer_macs_are_exactly_stem_and_head():
  report = audit.audit(registry.get_model('spikingformer-cifar-4-384', **SMALL), (1, 32, 32, 3))
  assert [(p.location, p.reads_input, p.feeds_output) for p in report.macs] == [
      ('tokenizer/stage0/conv', True, False), ('head', False, True)]
  assert report.spike_driven and not report.unexpected_macs
  # 5 stem convs, per block q/k/v, two attention matmuls, proj, mlp1, mlp2, and the head.
  assert len(report.products) == 5 + SMALL['depth'] * 8 + 1


@pytest.mark.parametrize('name, shape', [('spikingformer-cml-cifar-4-384', (1, 32, 32, 3)),
                                         ('spikingformer-cml-dvs-2-256', (1, 16, 128, 128, 2))])
def test_cml_is_spike_driven_too(name, shape):
  report = audit.audit(registry.get_model(name, **SMALL), shape)
  assert [p.location for p in report.macs] == ['tokenizer/stage0/conv', 'head']


def test_spikformer_multiplies_its_integer_residual():
  report = audit.audit(registry.get_model('spikformer-cifar-4-384', **SMALL), (1, 32, 32, 3))
  expected = {'tokenizer/stage0/conv', 'head'} | {
      f'block_{i}/{name}' for i in range(SMALL['depth'])
      for name in ('attn/q_conv/dense', 'attn/k_conv/dense', 'attn/v_conv/dense', 'mlp/mlp1_conv/dense')}
  assert {p.location for p in report.macs} == expected
  assert not report.spike_driven
  assert len(report.unexpected_macs) == 4 * SMALL['depth']
  # The stem's later convs read spikes and the attention products read q/k/v spikes: AC.
  spiking = {p.location for p in report.products if p.spike_driven}
  assert 'tokenizer/stage4/conv' in spiking and 'block_0/attn/proj_conv/dense' in spiking
  assert 'block_1/mlp/mlp2_conv/dense' in spiking


def test_full_size_imagenet_model_from_shapes_only():
  report = audit.audit_registered('spikingformer-8-768')
  assert [p.location for p in report.macs] == ['tokenizer/stage0/conv', 'head']
  assert report.macs[0].macs == 4 * 224 * 224 * 9 * 3 * 96
  assert report.macs[1].macs == 768 * 1000


def test_remat_does_not_hide_anything():
  plain = audit.audit(registry.get_model('spikingformer-cifar-4-384', **SMALL), (1, 32, 32, 3))
  remat = audit.audit(registry.get_model('spikingformer-cifar-4-384', remat=True, **SMALL), (1, 32, 32, 3))
  assert [(p.location, p.macs, p.spike_driven) for p in remat.products] == [
      (p.location, p.macs, p.spike_driven) for p in plain.products]


def test_cli_exit_status():
  assert audit.run('spikingformer-cifar-4-384', expect_spike_driven=True) == 0
  env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-m', 'spikingformer_jax.analysis.audit', '--model=spikformer-cifar-2-384',
                           '--expect_spike_driven'], capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'NOT spike-driven' in result.stdout and 'block_0/attn/q_conv/dense' in result.stdout


TEXT_SMALL = dict(depth=2, embed_dim=32, num_heads=4, vocab_size=50, max_len=32)


@pytest.mark.parametrize('task, head', [('classification', 'head'), ('regression', 'head'), ('mlm', 'mlm_head')])
def test_text_model_has_exactly_one_mac_the_head(task, head):
  model = registry.get_model('spikingformer-text-tiny', task=task, **TEXT_SMALL)
  report = audit.audit(model, (1, 24))
  # Embedding lookups are gathers and LayerNorm has no product: nothing but the head multiplies.
  assert [(p.location, p.feeds_output) for p in report.macs] == [(head, True)]
  assert report.spike_driven
  assert len(report.products) == TEXT_SMALL['depth'] * 8 + 1
  vocab_or_labels = TEXT_SMALL['vocab_size'] * 24 if task == 'mlm' else (1 if task == 'regression' else 2)
  assert report.macs[0].macs == TEXT_SMALL['embed_dim'] * vocab_or_labels


def test_text_attention_mask_must_be_declared_binary():
  """The masked k, v (k * mask) stay spikes only because the 0/1 mask is declared binary."""
  from spikingformer_jax.text import model as text_model
  model = registry.get_model('spikingformer-text-tiny', **TEXT_SMALL)
  variables = jax.eval_shape(lambda: text_model.init_variables(model, jax.random.PRNGKey(0), 1, 24))
  undeclared = flops.trace(flops.model_forward(model), variables, *flops.text_inputs(1, 24),
                           input_argnums=flops.TEXT_INPUT_ARGNUMS, root=type(model).__name__)
  macs = [p.location for p in undeclared.products if not p.spike_driven]
  assert macs == ['block_0/attn/kv/tbnhi,tbnhj->tbhij', 'block_1/attn/kv/tbnhi,tbnhj->tbhij', 'head']


def test_text_cli_verdict():
  assert audit.run('spikingformer-text-tiny', expect_spike_driven=True) == 0
