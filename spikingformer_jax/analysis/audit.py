"""Machine-checked "spike-driven" audit of a model: which conv/matmul products are real MACs.

The model's inference pass is traced with `jax.make_jaxpr` (shapes only; nothing runs), and every
`conv_general_dilated` / `dot_general` is classified by flops.py's static analysis:

- spike-driven (AC): at least one operand computed from the input is provably binary (it comes
  from a spike function, possibly through reshapes, pooling, padding, casts, 0/1 masks, select).
  This includes q (k^T v), where k^T v is an integer count but q is binary, as in the paper.
- MAC: no operand is provably binary.

A spike-driven network may still have two MACs: the layer that reads the (analog) input and the
read-out head (a product no other product consumes). Spikingformer has exactly those two;
Spikformer also multiplies its integer-valued residual stream in q/k/v and the first MLP layer.

Text models (spikingformer-text-*): the embedding lookup is a gather and LayerNorm has no product,
so neither is counted; the first block's LIF turns the float embedding into spikes, which leaves
exactly one MAC, the head (classification / regression Dense, or the MLM logits). The 0/1
attention mask is declared binary (flops.TEXT_BINARY_ARGNUMS), so the masked k and v stay spikes.

CLI: python -m spikingformer_jax.analysis.audit --model=spikingformer-cifar-4-384 [--expect_spike_driven]
"""
from __future__ import annotations

import dataclasses
import sys

import jax

from spikingformer_jax import models, registry
from spikingformer_jax.analysis import flops
from spikingformer_jax.text import model as text_model


@dataclasses.dataclass(frozen=True)
class AuditReport:
  model: str
  products: tuple[flops.Product, ...]

  @property
  def macs(self) -> tuple[flops.Product, ...]:
    """Products without a binary input-derived operand."""
    return tuple(p for p in self.products if not p.spike_driven)

  @property
  def unexpected_macs(self) -> tuple[flops.Product, ...]:
    """MACs other than the input layer (stem) and the read-out (head)."""
    return tuple(p for p in self.macs if not (p.reads_input or p.feeds_output))

  @property
  def spike_driven(self) -> bool:
    return not self.unexpected_macs

  def format(self) -> str:
    lines = [f'Spike-driven audit of {self.model}: {len(self.products)} conv/matmul products, '
             f'{len(self.macs)} non-spike MACs.',
             f'{"verdict":<8} {"role":<6} {"location":<44} {"MACs/example":>13}  operands (binary?)']
    for p in self.products:
      verdict = 'AC' if p.spike_driven else 'MAC'
      role = 'stem' if p.reads_input else 'head' if p.feeds_output else ''
      operands = ', '.join(f'{"x" if o.from_input else "w"}{list(o.shape)}:{"0/1" if o.binary else "real"}'
                           for o in p.operands)
      lines.append(f'{verdict:<8} {role:<6} {p.location:<44} {p.macs:>13,}  {operands}')
    lines.append('Non-spike MACs:')
    lines += [f'  {p.location} ({"stem" if p.reads_input else "head" if p.feeds_output else "hidden"})'
              for p in self.macs]
    verdict = ('SPIKE-DRIVEN: only the stem and head multiply real values.' if self.spike_driven else
               f'NOT spike-driven: {len(self.unexpected_macs)} hidden MAC(s): '
               + ', '.join(p.location for p in self.unexpected_macs))
    lines.append(verdict)
    return '\n'.join(lines)


def audit(model, input_shape, model_name: str = '') -> AuditReport:
  """Audits `model` for one input of shape `input_shape` (batch included), from shapes only.

  For a text model `input_shape` is [batch, length] of its token inputs.
  """
  if isinstance(model, text_model.SpikingformerText):
    batch, length = input_shape
    variables = jax.eval_shape(lambda: text_model.init_variables(model, jax.random.PRNGKey(0), batch, length))
    trace = flops.text_model_trace(model, variables, batch, length)
  else:
    model = models.per_step_stem(model)  # the products as the reference computes them
    variables = models.abstract_variables(model, tuple(input_shape))
    trace = flops.model_trace(model, variables, tuple(input_shape))
  return AuditReport(model_name or type(model).__name__, trace.products)


TEXT_AUDIT_LENGTH = 128  # tokens; the verdict does not depend on it (within the model's max_len)


def audit_registered(name: str, **overrides) -> AuditReport:
  """Audits a registered model (vision or text) at batch 1."""
  spec = registry.get_spec(name)
  model = spec.build(**overrides)
  if spec.kind == registry.TEXT:
    return audit(model, (1, min(TEXT_AUDIT_LENGTH, model.max_len)), name)
  return audit(model, (1,) + tuple(spec.input_shape), name)


def run(name: str, expect_spike_driven: bool) -> int:
  """Prints the audit; the exit status is 1 when a spike-driven model was expected but is not."""
  report = audit_registered(name)
  print(report.format())
  return 1 if expect_spike_driven and not report.spike_driven else 0


def cli():
  # Flags are defined only when run as a program, so that importing this module defines none.
  from absl import app, flags
  model = flags.DEFINE_string('model', 'spikingformer-cifar-4-384',
                              'A registered model name (vision or spikingformer-text-*).')
  expect = flags.DEFINE_bool('expect_spike_driven', False,
                             'Exit with status 1 when a non-spike MAC other than the stem and head exists.')

  def main(argv):
    del argv
    sys.exit(run(model.value, expect.value))
  app.run(main)


if __name__ == '__main__':
  cli()
