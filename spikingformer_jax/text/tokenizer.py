"""WordPiece tokenisation (BERT's) through the HuggingFace `tokenizers` library.

English text uses a BERT vocabulary file (uncased: lower-casing + accent stripping). No Chinese
BERT vocabulary is available offline, so `build_char_vocab` makes a character vocabulary from the
training text: BERT's pre-tokenizer already splits every CJK character into its own word, and each
non-CJK character gets a word-initial and a `##` continuation entry, so every seen character is
in-vocabulary and unseen ones become [UNK].
"""
from __future__ import annotations

import collections
import os
import unicodedata
from typing import Iterable, Optional, Sequence

import numpy as np

from spikingformer_jax.data.sources import DataError

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def _bert_word_piece(vocab, lowercase: bool):
  """HuggingFace's BertWordPieceTokenizer; `tokenizers` is the `[text]` extra, needed only for text."""
  try:
    import tokenizers  # noqa: PLC0415
  except ImportError as e:
    raise ImportError('Text datasets need the HuggingFace `tokenizers` package: '
                      'pip install "spikingformer-jax[text]" (or tokenizers==0.22.1).') from e
  return tokenizers.BertWordPieceTokenizer(vocab, lowercase=lowercase)


class WordPiece:
  """A BERT tokenizer: `encode(a, b)` gives `[CLS] a [SEP] (b [SEP])` ids and segment ids.

  Pairs are truncated longest-first (BERT's `_truncate_seq_pair`) so that the whole sequence,
  special tokens included, has at most `max_len` tokens. Nothing is padded here (the batcher pads).
  """

  def __init__(self, vocab: str | dict, max_len: int, lowercase: bool = True):
    if isinstance(vocab, str) and not os.path.isfile(vocab):
      raise DataError(f'Vocabulary file {vocab!r} does not exist (data.vocab_file).')
    if max_len < 3:
      raise ValueError(f'max_len must be >= 3 ([CLS] x [SEP]), got {max_len}.')
    self._tok = _bert_word_piece(vocab, lowercase)
    self._tok.enable_truncation(max_length=max_len, strategy='longest_first')
    self.max_len = max_len
    self.vocab = self._tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
    if missing:
      raise ValueError(f'Vocabulary {vocab if isinstance(vocab, str) else "(dict)"} lacks special tokens {missing}.')
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in SPECIAL_TOKENS)
    # Ids that MLM masking never selects or samples as random replacements.
    self.special_ids = np.array(sorted(self.vocab[t] for t in SPECIAL_TOKENS), np.int32)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text_a: str, text_b: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    enc = self._tok.encode(text_a, text_b)
    return np.asarray(enc.ids, np.int32), np.asarray(enc.type_ids, np.int32)

  def encode_batch(self, texts_a: Sequence[str], texts_b: Optional[Sequence[str]] = None):
    """Lists of (ids, segment_ids) int32 arrays; the Rust tokenizer runs the batch in parallel."""
    inputs = list(texts_a) if texts_b is None else list(zip(texts_a, texts_b))
    return [(np.asarray(e.ids, np.int32), np.asarray(e.type_ids, np.int32))
            for e in self._tok.encode_batch(inputs)]

  def word_pieces(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Ids without special tokens and without truncation (for packing MLM corpora)."""
    self._tok.no_truncation()
    try:
      return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
    finally:
      self._tok.enable_truncation(max_length=self.max_len, strategy='longest_first')

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode(list(int(i) for i in ids), skip_special_tokens=False)


def _is_cjk(ch: str) -> bool:
  """The CJK ranges of BERT's BasicTokenizer._is_chinese_char."""
  cp = ord(ch)
  return any(lo <= cp <= hi for lo, hi in (
      (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
      (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def build_char_vocab(texts: Iterable[str], min_count: int = 1, lowercase: bool = True) -> dict[str, int]:
  """A deterministic character vocabulary: specials, then characters by descending count (ties by code point).

  Characters are normalised as the BERT tokenizer will see them (lower-cased and accents
  stripped when `lowercase`), so the vocabulary covers exactly what `WordPiece` produces.
  """
  counts = collections.Counter()
  for text in texts:
    if lowercase:
      text = ''.join(c for c in unicodedata.normalize('NFD', text.lower()) if unicodedata.category(c) != 'Mn')
    counts.update(c for c in text if not c.isspace())
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    if n < min_count:
      break
    forms = (ch,) if _is_cjk(ch) else (ch, '##' + ch)
    for form in forms:
      vocab.setdefault(form, len(vocab))
  return vocab
