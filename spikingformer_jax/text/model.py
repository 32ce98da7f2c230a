"""Spikingformer-Text: Spikingformer blocks over WordPiece token sequences (our definition; the
reference released no language code, see text/README.md for every choice).

  embeddings  token + learned position + segment (+ optional cross-segment match), LayerNorm (float,
              outside the spiking blocks)
  encoding    direct: the same embedding at every one of the T time steps -> [T, B, N, D]
  blocks      L x layers.Block(pre_activation=True) with the attention mask (padding is neither
              attended to nor counted in BatchNorm statistics)
  heads       classification / regression: mean over valid tokens and time -> Dense
              mlm: mean over time -> LayerNorm -> logits against the (tied or untied) embedding

`model.apply(variables, input_ids, segment_ids, attention_mask, train=...)` returns logits [B, K],
scores [B] or MLM logits [B, N, V]. The registered sizes are in registry.py (`spikingformer-text-*`).
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from spikingformer_jax import layers, neurons, sharding
from spikingformer_jax.configs import TASKS

# BERT's initialiser for embeddings and task heads (the blocks keep layers.py's PyTorch inits).
_bert_init = nn.initializers.truncated_normal(0.02)


class SpikingformerText(nn.Module):
  # Fine-tuning may switch these on over an MLM checkpoint that lacks them (train.merge_pretrained).
  added_in_finetuning: ClassVar[tuple[str, ...]] = ('match_embed',)

  vocab_size: int = 30522
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  T: int = 4
  max_len: int = 512
  type_vocab_size: int = 2
  task: str = 'classification'
  num_labels: int = 2
  tie_embeddings: bool = True
  cross_segment_match: bool = False
  lif: neurons.LIFConfig = neurons.LIFConfig()
  attn_scale: float = 0.125
  dtype: Any = jnp.float32
  remat: bool = False
  spike_kernels: bool = False  # The blocks' products through the sparse CPU kernels (as in models.Spikingformer).

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'task {self.task!r}: expected one of {TASKS}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, input_ids, segment_ids, attention_mask, train: bool = False):
    b, n = input_ids.shape
    if n > self.max_len:
      raise ValueError(f'Sequence length {n} exceeds the model max_len {self.max_len}.')
    if segment_ids.shape != (b, n) or attention_mask.shape != (b, n):
      raise ValueError(f'input_ids {input_ids.shape}, segment_ids {segment_ids.shape} and attention_mask '
                       f'{attention_mask.shape} must all be [B, N].')
    mask = attention_mask.astype(jnp.int32)
    token_embed = nn.Embed(self.vocab_size, self.embed_dim, embedding_init=_bert_init, param_dtype=jnp.float32,
                           name='token_embed')
    pos = self.param('pos_embed', _bert_init, (self.max_len, self.embed_dim), jnp.float32)
    seg = nn.Embed(self.type_vocab_size, self.embed_dim, embedding_init=_bert_init, param_dtype=jnp.float32,
                   name='segment_embed')
    x = token_embed(input_ids) + pos[None, :n] + seg(segment_ids)
    if self.cross_segment_match:
      match_embed = nn.Embed(2, self.embed_dim, embedding_init=_bert_init, param_dtype=jnp.float32,
                             name='match_embed')
      x = x + match_embed(cross_segment_match(input_ids, segment_ids, mask))
    x = nn.LayerNorm(epsilon=1e-12, param_dtype=jnp.float32, name='embed_norm')(sharding.keep_batch_split(x, 0))
    x = jnp.broadcast_to(x.astype(self.dtype)[None], (self.T, b, n, self.embed_dim))
    block_cls = layers.remat(layers.Block) if self.remat else layers.Block
    for i in range(self.depth):
      x = block_cls(self.embed_dim, self.num_heads, self.mlp_ratio, self.lif, pre_activation=True,
                    attn_scale=self.attn_scale, dtype=self.dtype, spike_kernels=self.spike_kernels,
                    name=f'block_{i}')(x, train, mask)
    x = x.astype(jnp.float32)
    if self.task == 'mlm':
      table = token_embed.embedding if self.tie_embeddings else None
      return MLMHead(self.vocab_size, name='mlm_head')(x.mean(axis=0), table)
    valid = mask.astype(jnp.float32)[None, :, :, None]
    pooled = (x * valid).sum(axis=2) / jnp.maximum(valid.sum(axis=2), 1.0)  # [T, B, D]: valid tokens
    pooled = pooled.mean(axis=0)  # then time
    out = nn.Dense(1 if self.task == 'regression' else self.num_labels, kernel_init=_bert_init,
                   bias_init=nn.initializers.zeros, param_dtype=jnp.float32, name='head')(pooled)
    return out[:, 0] if self.task == 'regression' else out


def cross_segment_match(input_ids, segment_ids, attention_mask):
  """[B, N] 0/1: whether each valid token's id also occurs among the valid tokens of another segment.

  The exact-match feature of reading-comprehension and NLI models (DrQA, Chen et al. 2017): it hands
  a model trained from scratch the lexical overlap between premise and hypothesis, which BERT-style
  models only learn in pretraining. Single-segment inputs get all zeros.
  """
  valid = attention_mask > 0
  same_id = input_ids[:, :, None] == input_ids[:, None, :]
  other_segment = segment_ids[:, :, None] != segment_ids[:, None, :]
  found = jnp.any(same_id & other_segment & valid[:, None, :], axis=-1)
  return (found & valid).astype(jnp.int32)


class MLMHead(nn.Module):
  """LayerNorm, then logits against the token embedding table (tied) or an own decoder, plus a bias.

  Named '*head*' so that fine-tuning from an MLM checkpoint drops it like any task head.
  """
  vocab_size: int

  @nn.compact
  def __call__(self, h, tied_table=None):
    h = nn.LayerNorm(epsilon=1e-12, param_dtype=jnp.float32, name='norm')(h)
    bias = self.param('bias', nn.initializers.zeros, (self.vocab_size,), jnp.float32)
    if tied_table is not None:
      return sharding.keep_batch_split(h @ tied_table.T, 0) + bias
    return sharding.keep_batch_split(nn.Dense(self.vocab_size, use_bias=False, kernel_init=_bert_init,
                                              param_dtype=jnp.float32, name='decoder')(h), 0) + bias


def dummy_inputs(batch: int, length: int):
  """(input_ids, segment_ids, attention_mask) of zeros / ones, for init and eval_shape."""
  ids = jnp.zeros((batch, length), jnp.int32)
  return ids, ids, jnp.ones((batch, length), jnp.int32)


def init_variables(model: SpikingformerText, rng: jax.Array, batch: int = 1, length: int = 8) -> dict:
  """{'params', 'batch_stats'} (the sown 'spikes' of the init pass are dropped)."""
  variables = model.init(rng, *dummy_inputs(batch, length), train=False)
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}
