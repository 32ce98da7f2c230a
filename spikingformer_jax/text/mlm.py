"""Masked-language-model data: packing a plain-text corpus into fixed-length sequences, and BERT masking.

Packing (RoBERTa's FULL-SENTENCES without next-sentence prediction): documents (one per line) are
word-pieced, joined with [SEP] and cut into chunks of `max_len - 2` pieces, each wrapped as
`[CLS] chunk [SEP]`; all segment ids are 0. Only the last chunk of the corpus can be short.

Masking (BERT): each non-special, non-padding position is selected with probability 15% (at least
one per sequence); a selected token becomes [MASK] with probability 80%, a random non-special
token with 10%, and stays unchanged with 10%. Targets are the original ids at selected positions
(weight 1), 0 elsewhere (weight 0). Masks are drawn per example and per epoch (dynamic masking).
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np


def pack_documents(docs: list[np.ndarray], max_len: int, cls_id: int, sep_id: int) -> list[np.ndarray]:
  """Fixed-length `[CLS] ... [SEP]` sequences from word-pieced documents (empty ones skipped)."""
  if max_len < 3:
    raise ValueError(f'max_len must be >= 3 for packing, got {max_len}.')
  pieces = []
  for doc in docs:
    if doc.size:
      pieces.extend((doc, np.array([sep_id], np.int32)))
  if not pieces:
    return []
  stream = np.concatenate(pieces[:-1])  # No trailing [SEP]: every chunk gets its own below.
  body = max_len - 2
  return [np.concatenate(([cls_id], stream[i:i + body], [sep_id])).astype(np.int32)
          for i in range(0, stream.size, body)]


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  mask_prob: float = 0.15
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1

  def __post_init__(self):
    if not 0 < self.mask_prob < 1:
      raise ValueError(f'mask_prob must be in (0, 1), got {self.mask_prob}.')
    if not (0 <= self.mask_token_prob and 0 <= self.random_token_prob
            and self.mask_token_prob + self.random_token_prob <= 1):
      raise ValueError('mask_token_prob and random_token_prob must be >= 0 with a sum <= 1, got '
                       f'{self.mask_token_prob} and {self.random_token_prob}.')


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int, special_ids: np.ndarray,
                replacement_ids: np.ndarray, cfg: MaskingConfig = MaskingConfig()):
  """(masked input ids, targets, weights) for one sequence `ids` [L] (padding counts as special).

  `replacement_ids`: the ids a "random token" is drawn from (the vocabulary minus special tokens).
  """
  candidates = ~np.isin(ids, special_ids)
  selected = candidates & (rng.random(ids.shape) < cfg.mask_prob)
  if candidates.any() and not selected.any():  # BERT masks at least one token per sequence.
    selected[rng.choice(np.flatnonzero(candidates))] = True
  action = rng.random(ids.shape)
  to_mask = selected & (action < cfg.mask_token_prob)
  to_random = selected & (action >= cfg.mask_token_prob) & (action < cfg.mask_token_prob + cfg.random_token_prob)
  masked = np.where(to_mask, mask_id, ids)
  masked = np.where(to_random, rng.choice(replacement_ids, size=ids.shape), masked).astype(np.int32)
  targets = np.where(selected, ids, 0).astype(np.int32)
  return masked, targets, selected.astype(np.float32)


class BertMasking(grain.transforms.RandomMap):
  """Grain transform: an example {'input_ids', ...} gets BERT-masked ids, 'label' targets, 'mlm_weights'."""

  def __init__(self, mask_id: int, special_ids: np.ndarray, vocab_size: int, cfg: MaskingConfig = MaskingConfig()):
    self.mask_id = mask_id
    self.special_ids = np.asarray(special_ids, np.int32)
    self.replacement_ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int32), self.special_ids)
    self.cfg = cfg

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    masked, targets, weights = mask_tokens(element['input_ids'], rng, mask_id=self.mask_id,
                                           special_ids=self.special_ids,
                                           replacement_ids=self.replacement_ids, cfg=self.cfg)
    return dict(element, input_ids=masked, label=targets, mlm_weights=weights)
