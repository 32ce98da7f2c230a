"""The one model registry: vision and text names through one lookup, one override rule."""
import jax.numpy as jnp
import pytest

from spikingformer_jax import models, registry
from spikingformer_jax.text import model as text_model


def test_one_lookup_builds_vision_and_text_models():
  vision, text = registry.get_model('spikingformer-cifar-4-384'), registry.get_model('spikingformer-text-tiny')
  assert type(vision) is models.Spikingformer and vision.embed_dim == 384
  assert type(text) is text_model.SpikingformerText and text.embed_dim == 64
  assert registry.get_spec('spikingformer-tiny').kind == registry.VISION
  assert registry.get_spec('spikingformer-text-12-768').kind == registry.TEXT
  assert registry.names() == sorted(registry.names(registry.VISION) + registry.names(registry.TEXT))


def test_unknown_names_list_every_registered_model():
  with pytest.raises(ValueError, match='Unknown model') as error:
    registry.get_model('spikingformer-text-99-1')
  assert 'spikingformer-cifar-4-384' in str(error.value) and 'spikingformer-text-tiny' in str(error.value)
  assert all(name in str(error.value) for name in registry.names())


@pytest.mark.parametrize('name', ['spikingformer-tiny', 'spikingformer-text-tiny'])
def test_the_override_rule_is_the_same_for_both_kinds(name):
  model = registry.get_model(name, tau=3.0, dtype='bfloat16', num_classes=7, depth=1)
  assert model.lif.tau == 3.0 and model.dtype == jnp.bfloat16 and model.depth == 1
  assert (model.num_labels if name.startswith('spikingformer-text') else model.num_classes) == 7
  with pytest.raises(ValueError, match=r"Unknown model override\(s\) \['depht'\]"):
    registry.get_model(name, depht=2)
  with pytest.raises(ValueError, match='dtype'):
    registry.get_model(name, dtype='float16')


def test_parameter_counts_of_both_kinds_come_from_shapes():
  assert registry.param_count('spikingformer-cifar-4-384') == 9_320_122
  d, vocab, positions, classes = 64, 30522, 128, 2
  embeddings = vocab * d + positions * d + 2 * d + 2 * d  # token, position, segment, LayerNorm
  assert registry.param_count('spikingformer-text-tiny', depth=0) == embeddings + d * classes + classes
