"""Every model by name, vision and text: one table, one lookup, one rule for overrides.

Vision (`models.Spikingformer`): `<family>-<depth>-<dim>` for ImageNet, `<family>-cifar-<depth>-<dim>` and
`<family>-dvs-<depth>-<dim>`, with family in {spikingformer, spikingformer-cml, spikformer}, and the CPU-sized
`spikingformer-tiny`. Text (`text_model.SpikingformerText`): `spikingformer-text-<depth>-<dim>` and
`spikingformer-text-tiny`. `get_model(name, **overrides)` builds the Flax module; overrides change any
field of it (num_classes, T, dtype, remat, ...), see `ModelSpec.build`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from spikingformer_jax import models, neurons
from spikingformer_jax.text import model as text_model

VISION, TEXT = 'vision', 'text'
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# A field the vision models and the text model name differently: the override names either.
_FIELD_ALIASES = {'num_classes': 'num_labels'}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a registry entry fixes; `build(**overrides)` returns the module."""
  name: str
  module: type[nn.Module]  # models.Spikingformer or text_model.SpikingformerText
  kwargs: dict
  # One example without batch: images [H, W, C], event frames [T, H, W, C], or token ids [L] (a text model
  # takes any length up to its max_len; this L is the one shape-only uses such as `param_count` trace).
  input_shape: tuple

  @property
  def kind(self) -> str:
    return TEXT if self.module is text_model.SpikingformerText else VISION

  def build(self, **overrides) -> nn.Module:
    """The module with fields changed by `overrides`: `tau` sets the time constant of every LIF (the `lif`
    field's), a dtype may be given by name, and num_classes names a text model's num_labels."""
    fields = {f.name for f in dataclasses.fields(self.module)} - {'parent', 'name'}
    overrides = {k if k in fields else _FIELD_ALIASES.get(k, k): v for k, v in overrides.items()}
    unknown = set(overrides) - fields - {'tau'}
    if unknown:
      raise ValueError(f'Unknown model override(s) {sorted(unknown)} for {self.name}; known: {sorted(fields)} '
                       'and tau.')
    if isinstance(overrides.get('dtype'), str):
      if overrides['dtype'] not in _DTYPES:
        raise ValueError(f'dtype {overrides["dtype"]!r}: expected one of {sorted(_DTYPES)}.')
      overrides['dtype'] = _DTYPES[overrides['dtype']]
    kwargs = dict(self.kwargs)
    if 'tau' in overrides:
      kwargs['lif'] = kwargs.get('lif', neurons.LIFConfig()).replace(tau=overrides.pop('tau'))
    kwargs.update(overrides)
    return self.module(**kwargs)

  def example_inputs(self) -> tuple:
    """Zero inputs of one example, the model's positional arguments."""
    if self.kind == TEXT:
      return text_model.dummy_inputs(1, *self.input_shape)
    return image_example(self.input_shape)


def image_example(shape) -> tuple:
  """The positional inputs of a vision model for one example of `shape` (`[H, W, C]` or `[T, H, W, C]`): zeros."""
  return (jnp.zeros((1,) + tuple(shape), jnp.float32),)


_FAMILIES = {'spikingformer': 'spikingformer', 'spikingformer-cml': 'cml', 'spikformer': 'spikformer'}
_DATASETS = {
    # dataset tag: (pool stages, default classes, input shape, heads(dim), tau)
    '': ((True,) * 4, 1000, (224, 224, 3), lambda dim: 8, 2.0),
    'cifar': ((False, False, True, True), 10, (32, 32, 3), lambda dim: 12 if dim % 12 == 0 else 8, 2.0),
    'dvs': ((True,) * 4, 10, (16, 128, 128, 2), lambda dim: 16, 1.5),
}
_SIZES = {'': ('8-384', '8-512', '8-768'), 'cifar': ('4-256', '2-384', '4-384'), 'dvs': ('2-256',)}
_TEXT_SIZES = ((12, 768), (8, 768), (8, 512), (6, 512), (8, 384), (4, 256))
_TEXT_LENGTH = 128  # the token sequence of `ModelSpec.input_shape` (within every text model's max_len)


def _vision_specs() -> dict[str, ModelSpec]:
  specs = {}
  for family, style in _FAMILIES.items():
    for tag, sizes in _SIZES.items():
      pool, classes, shape, heads, tau = _DATASETS[tag]
      for size in sizes:
        depth, dim = map(int, size.split('-'))
        name = '-'.join(p for p in (family, tag, size) if p)
        T = shape[0] if tag == 'dvs' else 4
        # Spikformer's DVS model keeps tau 2 and uses scale 0.25 (ZK-Zhou/spikformer cifar10dvs/model.py).
        spk_dvs = style == 'spikformer' and tag == 'dvs'
        kwargs = dict(num_classes=classes, embed_dim=dim, depth=depth, num_heads=heads(dim), T=T,
                      pool=pool, style=style, lif=neurons.LIFConfig(tau=2.0 if spk_dvs else tau),
                      attn_scale=0.25 if spk_dvs else 0.125, reference_code=tag or 'imagenet',
                      # Spikformer's CIFAR code projects q/k/v with biased nn.Linear (ZK-Zhou/spikformer
                      # cifar10/model.py); its ImageNet and DVS codes use bias-free Conv1d.
                      qkv_bias=style == 'spikformer' and tag == 'cifar')
        specs[name] = ModelSpec(name, models.Spikingformer, kwargs, shape)
  # A tiny CPU-sized model for the embedded default (8x8 digits) and for tests.
  specs['spikingformer-tiny'] = ModelSpec('spikingformer-tiny', models.Spikingformer, dict(
      num_classes=10, embed_dim=64, depth=1, num_heads=4, T=4, pool=(False, False, False, True),
      style='spikingformer', lif=neurons.LIFConfig()), (8, 8, 1))
  return specs


def _text_specs() -> dict[str, ModelSpec]:
  sizes = {f'{depth}-{dim}': dict(depth=depth, embed_dim=dim, num_heads=dim // 64) for depth, dim in _TEXT_SIZES}
  sizes['tiny'] = dict(depth=2, embed_dim=64, num_heads=4, max_len=128)
  return {f'spikingformer-text-{size}': ModelSpec(f'spikingformer-text-{size}', text_model.SpikingformerText,
                                                  kwargs, (_TEXT_LENGTH,)) for size, kwargs in sizes.items()}


MODELS: dict[str, ModelSpec] = {**_vision_specs(), **_text_specs()}


def names(kind: str | None = None) -> list[str]:
  """The registered names, sorted: all, or those of one kind (VISION or TEXT)."""
  return sorted(name for name, spec in MODELS.items() if kind in (None, spec.kind))


def get_spec(name: str) -> ModelSpec:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}. Registered: {", ".join(names())}.')
  return MODELS[name]


def get_model(name: str, **overrides) -> nn.Module:
  return get_spec(name).build(**overrides)


def param_count(name: str, **overrides) -> int:
  """Exact parameter count from shapes alone (no memory, no FLOPs)."""
  spec = get_spec(name)
  model = spec.build(**overrides)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *spec.example_inputs(), train=False))
  return models.count_params(variables['params'])
