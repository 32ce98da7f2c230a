"""Text input pipelines: GLUE / sentence classification and MLM pretraining, through grain.

`make_loader(data_cfg, split, ...)` yields dict batches of numpy arrays:
  input_ids, segment_ids, attention_mask  int32 [b, L]  (attention_mask 1 = real token)
  label        int32 [b] (classification) | float32 [b] (regression) | int32 [b, L] (MLM targets)
  mlm_weights  float32 [b, L]   (MLM only: 1 where a target is scored)
  mask         float32 [b]      (eval only: 1 = real example; the last global batch is padded with copies)
`batch_size` is the global batch: process p yields rows [p*b, (p+1)*b) of every global batch,
b = batch_size // process_count. With `dynamic_padding`, L is the longest sequence of the *global*
batch rounded up to `pad_multiple` (so every process agrees on L and jit sees few shapes).

Datasets (`data_cfg.name`): 'glue/<task>' (see glue.py; data_dir = the GLUE root with CoLA/, SST-2/, ...),
'sst2', 'sst5', 'mr', 'subj', 'chnsenticorp', 'waimai' and 'tsv' (data_dir holds `<split>.tsv` in
`label<TAB>text` form), and 'mlm_text' (data_dir holds a plain-text corpus, one document per line).
A split may name a slice, `<split>[<start>:<stop>]` with example counts or percentages (as in TFDS),
e.g. 'validation[:80%]' and 'validation[80%:]' to train and evaluate on disjoint parts of one file.
Text is tokenised once per process and split, then cached in memory.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
from typing import Optional

import grain
import ml_collections
import numpy as np

from spikingformer_jax import paths
from spikingformer_jax.data import DatasetInfo, batching
from spikingformer_jax.data.sources import DataError
from spikingformer_jax.text import glue, mlm
from spikingformer_jax.text.tokenizer import WordPiece, build_char_vocab

SENTENCE_DATASETS = {  # name: (num_classes, language)
    'sst2': (2, 'en'), 'sst5': (5, 'en'), 'mr': (2, 'en'), 'subj': (2, 'en'),
    'chnsenticorp': (2, 'zh'), 'waimai': (2, 'zh'), 'tsv': (0, 'en'),
}
MLM_DATASET = 'mlm_text'
CHAR_VOCAB = 'char'  # data.vocab_file value: build a character vocabulary from the training text.
_TSV_FILES = {'validation': 'dev', 'dev': 'dev', 'train': 'train', 'test': 'test'}


def text_data_defaults() -> ml_collections.ConfigDict:
  """The keys this pipeline reads beyond `configs.base_config().data`, with their defaults."""
  c = ml_collections.ConfigDict()
  c.task_name = ''  # the task_metrics() name the trainer reports, e.g. 'glue/cola' or 'sst5'
  c.source = 'auto'  # GLUE: 'tsv' | 'tfds' | 'auto' (TSV when <data_dir>/<TaskDir> exists, else TFDS)
  c.vocab_file = ''  # '' = BERT uncased (English) or 'char' (Chinese datasets); 'char'; or a path
  c.lowercase = True
  c.char_vocab_min_count = 1
  c.max_len = 128
  c.dynamic_padding = True
  c.pad_multiple = 16
  c.num_classes = 0  # 'tsv' only: 0 = infer from the training labels (max + 1)
  c.mask_prob = 0.15
  c.mask_token_prob = 0.8
  c.random_token_prob = 0.1
  c.mlm_holdout_every = 100  # 'mlm_text' without <split>/ folders: every k-th document is 'validation'
  c.word_dropout = 0.0  # classification/regression training only: each word piece -> [MASK] with this probability
  return c


def is_text_dataset(name: str) -> bool:
  return name.startswith('glue/') or name in SENTENCE_DATASETS or name == MLM_DATASET


def _cfg(data_cfg, key):
  """A text key from data_cfg, or its default when the config predates it."""
  return data_cfg[key] if key in data_cfg else text_data_defaults()[key]


def _data_dir(data_cfg) -> str:
  if data_cfg.data_dir:
    return data_cfg.data_dir
  name = data_cfg.name
  if name.startswith('glue/'):
    return str(paths.shared_data_dir('glue'))
  if name in SENTENCE_DATASETS and name != 'tsv':
    return str(paths.shared_data_dir(name))
  raise ValueError(f'data.data_dir must be set for dataset {name!r}.')


# ----------------------------------------------------------------------------- reading raw examples

_SLICE = re.compile(r'^(?P<split>[\w-]+)\[(?P<start>\d*%?):(?P<stop>\d*%?)\]$')


def parse_split(split: str) -> tuple[str, str | None, str | None]:
  """'validation[:80%]' -> ('validation', None, '80%'); a plain name -> (name, None, None)."""
  if '[' not in split:
    return split, None, None
  match = _SLICE.match(split)
  if not match:
    raise ValueError(f"Split {split!r}: expected '<split>' or '<split>[start:stop]' with counts or percentages, "
                     "e.g. 'validation[:80%]'.")
  return match['split'], match['start'] or None, match['stop'] or None


def _bound(value: str | None, n: int, default: int) -> int:
  if value is None:
    return default
  return min(n, int(value[:-1]) * n // 100 if value.endswith('%') else int(value))


def _read_examples(data_cfg, split: str) -> glue.Examples:
  split, start, stop = parse_split(split)
  examples = _read_whole_split(data_cfg, split)
  if start is None and stop is None:
    return examples
  n = len(examples)
  part = slice(_bound(start, n, 0), _bound(stop, n, n))
  return glue.Examples(examples.text_a[part], None if examples.text_b is None else examples.text_b[part],
                       examples.labels[part])


def _read_whole_split(data_cfg, split: str) -> glue.Examples:
  name, data_dir = data_cfg.name, _data_dir(data_cfg)
  if name.startswith('glue/'):
    task = glue.get_glue_task(name)
    source = _cfg(data_cfg, 'source')
    task_dir = os.path.join(data_dir, task.tsv_dir)
    if source == 'auto' and not os.path.isdir(task_dir):
      try:
        return glue.read_glue_tfds(name, data_cfg.data_dir, split)
      except DataError as e:
        raise DataError(f'{task_dir} does not exist (GLUE\'s {task.tsv_dir}/*.tsv under data.data_dir) and '
                        f'{e}') from None
    if source in ('auto', 'tsv'):
      return glue.read_glue_tsv(name, data_dir, split)
    if source == 'tfds':
      return glue.read_glue_tfds(name, data_cfg.data_dir, split)
    raise ValueError(f"data.source = {source!r}: expected 'auto', 'tsv' or 'tfds'.")
  if name in SENTENCE_DATASETS:
    return glue.read_label_text_tsv(os.path.join(data_dir, f'{_TSV_FILES.get(split, split)}.tsv'))
  raise ValueError(f'Unknown text dataset {name!r}: expected glue/<task>, one of '
                   f'{sorted(SENTENCE_DATASETS)} or {MLM_DATASET!r}.')


def _corpus_documents(data_cfg, split: str) -> list[str]:
  """Lines of `<data_dir>/<split>/**/*.txt`, or of `<data_dir>/**/*.txt` with every k-th line held out."""
  root = _data_dir(data_cfg)
  split_dir = os.path.join(root, split)
  holdout = None
  if not os.path.isdir(split_dir):
    if os.path.isdir(os.path.join(root, 'train')):  # split folders exist: never hold out from train/ itself
      raise DataError(f'{split_dir} is absent although {root} has a train/ folder.')
    split_dir, holdout = root, _cfg(data_cfg, 'mlm_holdout_every')
    if split != 'train' and holdout <= 0:
      raise DataError(f'{os.path.join(root, split)} is absent and data.mlm_holdout_every <= 0: '
                      f'no {split!r} documents.')
  files = sorted(glob.glob(os.path.join(split_dir, '**', '*.txt'), recursive=True))
  if not files:
    raise DataError(f'No *.txt files under {split_dir} (data.name={MLM_DATASET!r} expects a plain-text '
                    'corpus, one document per line).')
  docs = []
  for path in files:
    with open(path, encoding='utf-8') as f:
      docs.extend(line.strip() for line in f.read().split('\n') if line.strip())
  if holdout:
    keep_eval = split != 'train'
    docs = [d for i, d in enumerate(docs) if (i % holdout == holdout - 1) == keep_eval]
  return docs


# ----------------------------------------------------------------------------- tokenisation (cached)

# The fields that decide the tokenised content of a split (the in-memory cache key).
_CONTENT_FIELDS = ('name', 'data_dir', 'source', 'vocab_file', 'lowercase', 'char_vocab_min_count', 'max_len',
                   'mlm_holdout_every')


def _cache_key(data_cfg) -> tuple:
  return tuple(data_cfg[k] if k in ('name', 'data_dir') else _cfg(data_cfg, k) for k in _CONTENT_FIELDS)


def _config_from_key(key: tuple) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(zip(_CONTENT_FIELDS, key)))


@functools.lru_cache(maxsize=8)
def _tokenizer(key: tuple) -> WordPiece:
  cfg = _config_from_key(key)
  vocab = cfg.vocab_file
  chinese = SENTENCE_DATASETS.get(cfg.name, (0, 'en'))[1] == 'zh'
  if not vocab:
    vocab = CHAR_VOCAB if chinese else str(paths.shared_data_dir('vocab', 'bert-base-uncased-vocab.txt'))
  if vocab == CHAR_VOCAB:
    if cfg.name == MLM_DATASET:
      texts = _corpus_documents(cfg, 'train')
    else:
      train = _read_examples(cfg, 'train')
      texts = train.text_a + (train.text_b or [])
    vocab = build_char_vocab(texts, cfg.char_vocab_min_count, cfg.lowercase)
  return WordPiece(vocab, cfg.max_len, lowercase=cfg.lowercase)


def get_tokenizer(data_cfg) -> WordPiece:
  return _tokenizer(_cache_key(data_cfg))


class TokenizedExamples:
  """Random-access tokenised examples in flat arrays (cheap to pickle to grain workers)."""

  def __init__(self, sequences: list[tuple[np.ndarray, np.ndarray]], labels: Optional[np.ndarray]):
    lengths = np.array([len(ids) for ids, _ in sequences], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(lengths)])
    self.ids = np.concatenate([ids for ids, _ in sequences]) if sequences else np.zeros(0, np.int32)
    self.segments = np.concatenate([s for _, s in sequences]) if sequences else np.zeros(0, np.int32)
    self.labels = labels

  def __len__(self):
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> dict:
    lo, hi = self.offsets[i], self.offsets[i + 1]
    out = {'input_ids': self.ids[lo:hi], 'segment_ids': self.segments[lo:hi]}
    if self.labels is not None:
      out['label'] = self.labels[i]
    return out


@functools.lru_cache(maxsize=16)
def _tokenized(key: tuple, split: str) -> TokenizedExamples:
  cfg = _config_from_key(key)
  tok = _tokenizer(key)
  if cfg.name == MLM_DATASET:
    chunks = mlm.pack_documents(tok.word_pieces(_corpus_documents(cfg, split)), cfg.max_len, tok.cls_id, tok.sep_id)
    return TokenizedExamples([(c, np.zeros_like(c)) for c in chunks], None)
  examples = _read_examples(cfg, split)
  return TokenizedExamples(tok.encode_batch(examples.text_a, examples.text_b), examples.labels)


def _split_examples(data_cfg, split: str, train: bool) -> tuple[grain.MapDataset, Optional[np.ndarray]]:
  """The split's tokenised examples as a MapDataset (the first data.max_train_examples / max_eval_examples
  when positive) and their labels (None for MLM)."""
  examples = _tokenized(_cache_key(data_cfg), split)
  ds = batching.records(examples, data_cfg.get('max_train_examples' if train else 'max_eval_examples', -1))
  return ds, None if examples.labels is None else examples.labels[:len(ds)]


# ----------------------------------------------------------------------------- batching

class WordDropout(grain.transforms.RandomMap):
  """Word dropout (Iyyer et al. 2015): each non-special token becomes [MASK] with probability `rate`.

  A regulariser for models trained from scratch on a few thousand sentences, which otherwise memorise
  them within an epoch or two (the text model has no dropout of its own). Redrawn per example and epoch.
  """

  def __init__(self, rate: float, mask_id: int, special_ids):
    if not 0 <= rate < 1:
      raise ValueError(f'data.word_dropout = {rate}: expected a probability in [0, 1).')
    self.rate, self.mask_id = rate, mask_id
    self.special_ids = np.asarray(special_ids, np.int32)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    ids = element['input_ids']
    drop = (rng.random(ids.shape) < self.rate) & ~np.isin(ids, self.special_ids)
    return dict(element, input_ids=np.where(drop, self.mask_id, ids).astype(ids.dtype))


def _num_tokens(element: dict) -> int:
  return len(element['input_ids'])


class Collate(grain.transforms.MapWithIndex):
  """Pads this process's rows of global batch `index` to one length L and stacks them.

  L is max_len, or with dynamic padding the longest sequence of the whole global batch rounded up to
  pad_multiple (`longest[index]`, from token counts alone), so every process agrees on it.
  """

  def __init__(self, *, max_len: int, pad_id: int, pad_multiple: int, longest: Optional[grain.MapDataset]):
    self.max_len, self.pad_id, self.pad_multiple, self.longest = max_len, pad_id, pad_multiple, longest

  def map_with_index(self, index: int, elements: list[dict]) -> dict:
    length = self.max_len
    if self.longest is not None:
      length = min(self.max_len, -(-self.longest[index] // self.pad_multiple) * self.pad_multiple)
    batch = {k: np.full((len(elements), length), v, np.int32) for k, v in
             (('input_ids', self.pad_id), ('segment_ids', 0), ('attention_mask', 0))}
    token_level_label = 'mlm_weights' in elements[0]
    if token_level_label:
      batch['label'] = np.zeros((len(elements), length), np.int32)
      batch['mlm_weights'] = np.zeros((len(elements), length), np.float32)
    else:
      batch['label'] = np.stack([e['label'] for e in elements])
    for i, e in enumerate(elements):
      n = len(e['input_ids'])
      batch['input_ids'][i, :n] = e['input_ids']
      batch['segment_ids'][i, :n] = e['segment_ids']
      batch['attention_mask'][i, :n] = 1
      if token_level_label:
        batch['label'][i, :n] = e['label']
        batch['mlm_weights'][i, :n] = e['mlm_weights']
    if 'mask' in elements[0]:
      batch['mask'] = np.array([e['mask'] for e in elements], np.float32)
    return batch


def make_loader(data_cfg, split: str, *, batch_size: int, train: bool, seed: int, process_index: int = 0,
                process_count: int = 1, num_epochs: Optional[int] = None):
  """A grain IterDataset of batches (see the module docstring); its iterators checkpoint via get/set_state.

  The same pipeline as the image loaders (spikingformer_jax.data.batching). Train: shuffled (reshuffled
  every epoch), `num_epochs` passes (None = forever), incomplete last global batch dropped. Eval: one
  ordered pass, padded to whole global batches (mask 0).
  """
  tok = get_tokenizer(data_cfg)
  ds, _ = _split_examples(data_cfg, split, train)
  if len(ds) == 0:
    raise DataError(f'Dataset {data_cfg.name!r} split {split!r} is empty.')
  if train and len(ds) < batch_size:
    raise DataError(f'{data_cfg.name} {split}: {len(ds)} examples cannot fill one batch of {batch_size}.')
  ds = batching.epochs(ds, train=train, seed=seed, num_epochs=num_epochs, batch_size=batch_size)
  longest = ds.map(_num_tokens).batch(batch_size, batch_fn=max) if _cfg(data_cfg, 'dynamic_padding') else None
  if train and _cfg(data_cfg, 'word_dropout') > 0 and data_cfg.name != MLM_DATASET:
    ds = ds.random_map(WordDropout(_cfg(data_cfg, 'word_dropout'), tok.mask_id, tok.special_ids), seed=seed)
  if data_cfg.name == MLM_DATASET:
    masking = mlm.MaskingConfig(_cfg(data_cfg, 'mask_prob'), _cfg(data_cfg, 'mask_token_prob'),
                                _cfg(data_cfg, 'random_token_prob'))
    ds = ds.random_map(mlm.BertMasking(tok.mask_id, tok.special_ids, tok.vocab_size,
                                       masking), seed=seed)
  ds = batching.process_batches(ds, batch_size=batch_size, process_index=process_index, process_count=process_count,
                                batch_fn=list)
  ds = ds.map_with_index(Collate(max_len=_cfg(data_cfg, 'max_len'), pad_id=tok.pad_id,
                                 pad_multiple=_cfg(data_cfg, 'pad_multiple'), longest=longest))
  return batching.iterate(ds, data_cfg)


def dataset_info(data_cfg) -> DatasetInfo:
  """Sizes and task of `data_cfg` (tokenises the train and eval splits once; later loaders reuse that)."""
  tok = get_tokenizer(data_cfg)
  train, labels = _split_examples(data_cfg, data_cfg.train_split, True)
  num_eval = len(_split_examples(data_cfg, data_cfg.eval_split, False)[0])
  name = data_cfg.name
  sizes = dict(example_shape=(), num_train=len(train), num_eval=num_eval, vocab_size=tok.vocab_size)
  if name == MLM_DATASET:
    return DatasetInfo(num_classes=tok.vocab_size, task='mlm', **sizes)
  if name.startswith('glue/'):
    task = glue.get_glue_task(name)
    return DatasetInfo(num_classes=task.num_classes, task=task.task, **sizes)
  num_classes = SENTENCE_DATASETS[name][0] or _cfg(data_cfg, 'num_classes')
  if not num_classes:
    num_classes = int(np.max(labels)) + 1
  if np.max(labels) >= num_classes or np.min(labels) < 0:
    raise DataError(f'{name}: training labels span [{np.min(labels)}, {np.max(labels)}], outside '
                    f'[0, {num_classes}) (data.num_classes).')
  return DatasetInfo(num_classes=num_classes, task='classification', **sizes)
