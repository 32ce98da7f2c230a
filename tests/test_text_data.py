"""Tokenisation, GLUE/TSV readers, the batch contract of make_loader, and MLM packing/masking."""
import types

import numpy as np
import pytest

from conftest import shared_path
from spikingformer_jax import configs
from spikingformer_jax.data import DatasetInfo
from spikingformer_jax.data.sources import DataError
from spikingformer_jax.text import data, glue, mlm
from spikingformer_jax.text.tokenizer import WordPiece, build_char_vocab


def _vocab():
  return str(shared_path('data', 'vocab', 'bert-base-uncased-vocab.txt'))


def _vocab_ids(path, tokens):
  with open(path, encoding='utf-8') as f:
    table = {t: i for i, t in enumerate(f.read().split('\n'))}
  return [table[t] for t in tokens]


def test_pair_tokenisation_matches_the_vocab_file():
  vocab = _vocab()
  tok = WordPiece(vocab, max_len=32)
  ids, segs = tok.encode('Hello, World!', 'the playing world')
  expected = _vocab_ids(vocab, ['[CLS]', 'hello', ',', 'world', '!', '[SEP]', 'the', 'playing', 'world', '[SEP]'])
  assert ids.tolist() == expected
  assert segs.tolist() == [0] * 6 + [1] * 4
  assert expected[0] == 101 and expected[5] == 102  # the README's special ids


def test_pair_truncation_is_longest_first():
  tok = WordPiece(_vocab(), max_len=10)
  ids, segs = tok.encode('one two three four five six seven eight nine', 'red blue')
  assert len(ids) == 10 and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
  assert segs.tolist() == [0] * 7 + [1] * 3  # 5 pieces of a kept, b (2 pieces) untouched
  assert tok.decode(ids[1:6]) == 'one two three four five'


def test_char_vocab_for_chinese():
  texts = ['酒店很好，房间干净', '外卖很好吃ok', '很差']
  vocab = build_char_vocab(texts)
  assert [t for t in list(vocab)[:5]] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert list(vocab)[5] == '很'  # the most frequent character comes first
  assert 'o' in vocab and '##k' in vocab and '##店' not in vocab
  tok = WordPiece(vocab, max_len=16)
  ids, _ = tok.encode('酒店很差ok 猫')
  inverse = {i: t for t, i in vocab.items()}
  assert [inverse[i] for i in ids] == ['[CLS]', '酒', '店', '很', '差', 'o', '##k', '[UNK]', '[SEP]']


@pytest.mark.parametrize('task,n_train,n_dev,labels', [
    ('cola', 8551, 834, {0: 2528, 1: 6023}), ('mrpc', 3668, 326, {0: 1194, 1: 2474}),
    ('rte', 2490, 222, {0: 1249, 1: 1241}), ('mnli', 20000, 7852, {0: 6700, 1: 6644, 2: 6656}),
    ('qqp', 20000, 2798, {0: 12577, 1: 7423})])
def test_glue_tsv_counts_match_the_readme(task, n_train, n_dev, labels):
  root = str(shared_path('data', 'glue'))
  train = glue.read_glue_tsv(task, root, 'train')
  assert len(train) == n_train
  assert dict(zip(*np.unique(train.labels, return_counts=True))) == labels
  assert (train.text_b is None) == (task == 'cola')
  split = 'validation_matched' if task == 'mnli' else 'validation'  # MNLI falls back to the staged dev.tsv
  assert len(glue.read_glue_tsv(task, root, split)) == n_dev


def test_glue_regression_and_missing_split():
  root = str(shared_path('data', 'glue'))
  stsb = glue.read_glue_tsv('stsb', root, 'train')
  assert stsb.labels.dtype == np.float32 and 0 <= stsb.labels.min() and stsb.labels.max() <= 5
  assert abs(stsb.labels.mean() - 2.70) < 0.01
  mrpc = glue.read_glue_tsv('mrpc', root, 'validation')
  assert not mrpc.text_a[0].startswith('\ufeff')
  with pytest.raises(DataError, match='train.tsv'):
    glue.read_glue_tsv('qnli', root, 'train')


@pytest.mark.parametrize('content, problem', [('', 'is empty'), ('index\tsentence1\tsentence2\tlabel\n',
                                                                 'has a header line but no examples')])
def test_empty_or_header_only_glue_tsv_names_the_file(tmp_path, content, problem):
  (tmp_path / 'RTE').mkdir()
  (tmp_path / 'RTE' / 'train.tsv').write_text(content)
  with pytest.raises(DataError, match=f'RTE/train.tsv {problem}'):
    glue.read_glue_tsv('rte', str(tmp_path), 'train')


@pytest.mark.parametrize('content, problem', [('', r': expected the header line "label<TAB>text", got an empty file'),
                                              ('label\ttext\n', ' has a header line but no examples')])
def test_empty_or_header_only_sentence_tsv_names_the_file(tmp_path, content, problem):
  (tmp_path / 'train.tsv').write_text(content)
  (tmp_path / 'dev.tsv').write_text('label\ttext\n1\tfine\n')
  with pytest.raises(DataError, match=f'train.tsv{problem}'):
    data.dataset_info(_toy_cfg(tmp_path))


@pytest.mark.parametrize('registered', [False, True], ids=['tfds_glue_unknown', 'tfds_glue_registered'])
def test_missing_glue_folder_is_named_in_one_line(tmp_path, registered):
  if registered:  # TFDS knows its GLUE builder once the module is imported: it must not try to download.
    pytest.importorskip('tensorflow_datasets.text.glue')
  with pytest.raises(DataError) as info:
    data.dataset_info(_toy_cfg(tmp_path, name='glue/rte'))
  message = str(info.value)
  assert message.startswith(f'{tmp_path}/RTE does not exist') and 'TFDS has no prepared glue/rte' in message
  assert '\n' not in message and len(message) < 300  # not TFDS's listing of every dataset


def test_malformed_tsv_names_file_and_line(tmp_path):
  (tmp_path / 'RTE').mkdir()
  (tmp_path / 'RTE' / 'train.tsv').write_text('index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n'
                                              '1\ta\tb\tmaybe\n')
  with pytest.raises(ValueError, match=r'train.tsv:3: label .maybe.'):
    glue.read_glue_tsv('rte', str(tmp_path), 'train')
  (tmp_path / 'bad.tsv').write_text('label\ttext\n1\tfine\n2\n')
  with pytest.raises(ValueError, match=r'bad.tsv:3: expected 2'):
    glue.read_label_text_tsv(str(tmp_path / 'bad.tsv'))


def _toy_cfg(tmp_path, name='tsv', **kw):
  c = configs.base_config().data
  c.update(data.text_data_defaults())
  c.name, c.data_dir, c.vocab_file, c.max_len, c.pad_multiple = name, str(tmp_path), _vocab(), 24, 8
  c.train_split, c.eval_split = 'train', 'validation'
  c.update(kw)
  return c


def _write_toy_tsv(tmp_path, n):
  rng = np.random.default_rng(0)
  words = ['good', 'bad', 'movie', 'film', 'great', 'awful', 'plot', 'actor', 'fun', 'dull']
  for split in ('train', 'dev'):
    lines = ['label\ttext'] + [f'{i % 3}\t' + ' '.join(rng.choice(words, rng.integers(1, 20))) + f' {i}'
                               for i in range(n)]
    (tmp_path / f'{split}.tsv').write_text('\n'.join(lines) + '\n')


def test_eval_loader_covers_every_example_once_across_processes(tmp_path):
  _write_toy_tsv(tmp_path, 53)
  cfg = _toy_cfg(tmp_path)
  tok = data.get_tokenizer(cfg)
  assert data.dataset_info(cfg) == DatasetInfo(num_classes=3, example_shape=(), num_train=53, num_eval=53,
                                               vocab_size=tok.vocab_size, task='classification')  # one type, both pipelines
  expected = [tok.encode(line.split('\t')[1]) for line in (tmp_path / 'dev.tsv').read_text().split('\n')[1:-1]]
  per_process = [list(data.make_loader(cfg, 'validation', batch_size=16, train=False, seed=0, process_index=p,
                                       process_count=2)) for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 4  # ceil(53 / 16)
  seen = []
  for b0, b1 in zip(*per_process):
    assert b0['input_ids'].shape == b1['input_ids'].shape  # processes agree on the padded length
    assert b0['input_ids'].shape[0] == 8 and b0['input_ids'].shape[1] % 8 == 0
    for b in (b0, b1):
      assert {k: v.dtype.name for k, v in b.items()} == dict(input_ids='int32', segment_ids='int32',
                                                             attention_mask='int32', label='int32', mask='float32')
      for row in np.flatnonzero(b['mask']):
        n = b['attention_mask'][row].sum()
        assert (b['attention_mask'][row, :n] == 1).all() and (b['input_ids'][row, n:] == tok.pad_id).all()
        seen.append((b['input_ids'][row, :n].tolist(), int(b['label'][row])))
  assert len(seen) == 53
  assert [s[0] for s in seen] == [ids.tolist() for ids, _ in expected]
  assert [s[1] for s in seen] == [i % 3 for i in range(53)]


def test_train_loader_shuffles_drops_remainder_and_resumes(tmp_path):
  _write_toy_tsv(tmp_path, 40)
  cfg = _toy_cfg(tmp_path, dynamic_padding=False)
  loader = data.make_loader(cfg, 'train', batch_size=8, train=True, seed=3, num_epochs=2)
  batches = list(loader)
  assert len(batches) == 10 and all(b['input_ids'].shape == (8, 24) for b in batches)
  assert 'mask' not in batches[0]
  epoch = lambda bs: sorted(tuple(r) for b in bs for r in b['input_ids'])
  assert epoch(batches[:5]) == epoch(batches[5:])  # each epoch is a permutation of the data
  assert not all(np.array_equal(a['input_ids'], b['input_ids']) for a, b in zip(batches[:5], batches[5:]))
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  rest = [b['input_ids'] for b in it]
  resumed = iter(data.make_loader(cfg, 'train', batch_size=8, train=True, seed=3, num_epochs=2))
  resumed.set_state(state)
  assert all(np.array_equal(a, b['input_ids']) for a, b in zip(rest, resumed))


@pytest.mark.parametrize('workers', [0, 1])
def test_orbax_restores_the_mlm_iterator_exactly(tmp_path, workers):
  from test_data_loader import orbax_round_trip  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  words = ['alpha', 'beta', 'gamma', 'delta', 'fox', 'dog', 'quick', 'lazy']
  rng = np.random.default_rng(1)
  (corpus / 'a.txt').write_text('\n'.join(' '.join(rng.choice(words, rng.integers(2, 30))) for _ in range(200)))
  cfg = _toy_cfg(corpus, name='mlm_text', max_len=16, mlm_holdout_every=10, max_train_examples=30,
                num_workers=workers)
  assert data.dataset_info(cfg).num_train == 30
  # Process 0 of 2, global batches of 8 from 30 examples: the 9 batches read cross two epochs; random masks.
  orbax_round_trip(tmp_path, lambda: data.make_loader(cfg, 'train', batch_size=8, train=True, seed=2,
                                                      process_count=2), skip=2, check=7)


def test_orbax_restores_the_classification_iterator_exactly(tmp_path):
  from test_data_loader import orbax_round_trip  # pylint: disable=import-outside-toplevel
  _write_toy_tsv(tmp_path, 40)
  cfg = _toy_cfg(tmp_path, word_dropout=0.2, pad_multiple=2)  # random drops, a padded length per global batch
  orbax_round_trip(tmp_path, lambda: data.make_loader(cfg, 'train', batch_size=8, train=True, seed=4,
                                                      process_index=1, process_count=2))


def test_dynamic_padding_is_the_global_batch_longest(tmp_path):
  _write_toy_tsv(tmp_path, 64)
  cfg = _toy_cfg(tmp_path, max_len=64, pad_multiple=2)
  whole = list(data.make_loader(cfg, 'train', batch_size=8, train=True, seed=1, num_epochs=1))
  halves = [list(data.make_loader(cfg, 'train', batch_size=8, train=True, seed=1, num_epochs=1, process_index=p,
                                  process_count=2)) for p in range(2)]
  assert len({b['input_ids'].shape[1] for b in whole}) > 1  # lengths vary between global batches
  for batch, first, second in zip(whole, *halves):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])
    assert batch['attention_mask'].sum(1).max() > batch['input_ids'].shape[1] - 2  # rounded up from the longest


def test_mlm_packing_reconstructs_the_stream():
  docs = [np.arange(10, 17, dtype=np.int32), np.array([], np.int32), np.arange(20, 25, dtype=np.int32)]
  chunks = mlm.pack_documents(docs, max_len=6, cls_id=1, sep_id=2)
  assert all(len(c) == 6 for c in chunks[:-1]) and len(chunks[-1]) <= 6
  assert all(c[0] == 1 and c[-1] == 2 for c in chunks)
  stream = np.concatenate([c[1:-1] for c in chunks])
  assert stream.tolist() == list(range(10, 17)) + [2] + list(range(20, 25))


def test_mlm_masking_statistics():
  """15% of eligible tokens selected; of those 80% [MASK], 10% random, 10% kept (4-sigma bounds)."""
  rng = np.random.default_rng(0)
  vocab, mask_id, special = 1000, 4, np.array([0, 1, 2, 3, 4], np.int32)
  replacement = np.setdiff1d(np.arange(vocab, dtype=np.int32), special)
  n_seq, length = 400, 128
  counts = dict(eligible=0, selected=0, masked=0, random=0, kept=0)
  for _ in range(n_seq):
    ids = rng.integers(5, vocab, length).astype(np.int32)
    ids[0], ids[-1], ids[-10:-1] = 2, 3, 0  # [CLS] ... [SEP] + padding
    masked, targets, weights = mlm.mask_tokens(ids, rng, mask_id=mask_id, special_ids=special,
                                               replacement_ids=replacement)
    sel = weights > 0
    assert not sel[np.isin(ids, special)].any()
    assert (targets[sel] == ids[sel]).all() and (targets[~sel] == 0).all()
    assert (masked[~sel] == ids[~sel]).all()
    assert not np.isin(masked[sel & (masked != mask_id)], special).any()
    counts['eligible'] += (~np.isin(ids, special)).sum()
    counts['selected'] += sel.sum()
    counts['masked'] += (masked[sel] == mask_id).sum()
    counts['kept'] += (masked[sel] == ids[sel]).sum()
    counts['random'] += ((masked[sel] != mask_id) & (masked[sel] != ids[sel])).sum()

  def close(k, n, p):
    assert abs(k / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, (k, n, p)

  close(counts['selected'], counts['eligible'], 0.15)
  close(counts['masked'], counts['selected'], 0.8)
  close(counts['random'], counts['selected'], 0.1 * (1 - 1 / len(replacement)))
  close(counts['kept'], counts['selected'], 0.1 + 0.1 / len(replacement))


def test_mlm_loader_batches(tmp_path):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  lines = [f'the quick brown fox number {i} jumps over the lazy dog' for i in range(300)]
  (corpus / 'a.txt').write_text('\n'.join(lines) + '\n')
  cfg = _toy_cfg(corpus, name='mlm_text', max_len=32, mlm_holdout_every=10)
  info = data.dataset_info(cfg)
  assert info.task == 'mlm' and info.vocab_size == 30522 and info.num_train > 5 * info.num_eval > 0
  batch = next(iter(data.make_loader(cfg, 'train', batch_size=4, train=True, seed=0)))
  assert batch['input_ids'].shape == batch['label'].shape == batch['mlm_weights'].shape == (4, 32)
  assert batch['label'].dtype == np.int32 and batch['mlm_weights'].dtype == np.float32
  assert (batch['attention_mask'] == 1).all() and (batch['segment_ids'] == 0).all()
  assert 0.05 < batch['mlm_weights'].mean() < 0.3
  ev = list(data.make_loader(cfg, 'validation', batch_size=4, train=False, seed=0))
  ev2 = list(data.make_loader(cfg, 'validation', batch_size=4, train=False, seed=0))
  assert sum(b['mask'].sum() for b in ev) == info.num_eval
  assert all(np.array_equal(a['input_ids'], b['input_ids']) for a, b in zip(ev, ev2))  # fixed eval masks


def test_bad_config_errors(tmp_path):
  _write_toy_tsv(tmp_path, 10)
  with pytest.raises(ValueError, match='divisible by process_count'):
    data.make_loader(_toy_cfg(tmp_path), 'train', batch_size=5, train=True, seed=0, process_count=2)
  with pytest.raises(DataError, match='data.vocab_file'):
    data.dataset_info(_toy_cfg(tmp_path, vocab_file=str(tmp_path / 'nope.txt')))
  with pytest.raises(ValueError, match='Unknown text dataset'):
    data.dataset_info(_toy_cfg(tmp_path, name='imdb'))
  assert data.is_text_dataset('glue/rte') and data.is_text_dataset('mlm_text') and not data.is_text_dataset('cifar10')


def test_tfds_records_map_to_examples(monkeypatch):
  """The TFDS path's record mapping for glue/mnli's feature names through an in-memory stand-in for
  `tfds.data_source`, so it runs without ../shared; test_text_tfds_glue.py reads really prepared data."""
  import tensorflow_datasets as tfds
  records = [dict(premise=b'A man sleeps.', hypothesis=b'A person rests.', label=0, idx=0),
             dict(premise=b'A dog runs.', hypothesis=b'A cat sits.', label=2, idx=1)]
  calls = []
  prepared = types.SimpleNamespace(is_prepared=lambda: True)
  monkeypatch.setattr(tfds, 'builder', lambda name, data_dir: calls.append(name) or prepared)
  monkeypatch.setattr(tfds, 'data_source', lambda name, split, data_dir, download: calls.append((name, split, download))
                      or records)
  ex = glue.read_glue_tfds('mnli', None, 'validation_matched')
  assert calls == ['glue/mnli', ('glue/mnli', 'validation_matched', False)]  # never downloads
  assert ex.text_a == ['A man sleeps.', 'A dog runs.'] and ex.text_b == ['A person rests.', 'A cat sits.']
  assert ex.labels.tolist() == [0, 2] and ex.labels.dtype == np.int32
  monkeypatch.setattr(tfds, 'data_source', lambda name, split, data_dir, download: [dict(records[0], label=-1)])
  with pytest.raises(ValueError, match='no labels'):
    glue.read_glue_tfds('mnli', None, 'test_matched')


def test_mlm_split_folders(tmp_path):
  (tmp_path / 'train').mkdir()
  (tmp_path / 'train' / 'a.txt').write_text('alpha beta gamma\ndelta epsilon\n')
  cfg = _toy_cfg(tmp_path, name='mlm_text', max_len=6)
  with pytest.raises(DataError, match='validation is absent although'):
    data.dataset_info(cfg)
  (tmp_path / 'validation').mkdir()
  (tmp_path / 'validation' / 'b.txt').write_text('zeta eta\n')
  info = data.dataset_info(cfg)
  assert (info.num_train, info.num_eval) == (2, 1)  # 6 train pieces (with [SEP]) in chunks of 4


def test_split_slices_are_disjoint_parts_of_one_file(tmp_path):
  _write_toy_tsv(tmp_path, 50)
  cfg = _toy_cfg(tmp_path)
  whole = data.make_loader(cfg, 'validation', batch_size=50, train=False, seed=0)
  rows = lambda loader: [(tuple(r[r > 0]), int(l)) for b in loader for r, l, m in
                         zip(b['input_ids'], b['label'], b['mask']) if m]
  head = rows(data.make_loader(cfg, 'validation[:80%]', batch_size=16, train=False, seed=0))
  tail = rows(data.make_loader(cfg, 'validation[40:]', batch_size=16, train=False, seed=0))
  assert (len(head), len(tail)) == (40, 10) and head + tail == rows(whole)
  assert data.parse_split('validation[80%:]') == ('validation', '80%', None)
  with pytest.raises(ValueError, match=r"Split 'validation\[a:b\]'"):
    data.parse_split('validation[a:b]')


def test_word_dropout_masks_training_tokens_only(tmp_path):
  _write_toy_tsv(tmp_path, 400)
  cfg = _toy_cfg(tmp_path, dynamic_padding=False, word_dropout=0.25)
  tok = data.get_tokenizer(cfg)
  plain = next(iter(data.make_loader(_toy_cfg(tmp_path, dynamic_padding=False), 'train', batch_size=400,
                                     train=True, seed=0)))
  dropped = next(iter(data.make_loader(cfg, 'train', batch_size=400, train=True, seed=0)))
  words = ~np.isin(plain['input_ids'], tok.special_ids)
  changed = plain['input_ids'] != dropped['input_ids']
  assert not (changed & ~words).any()  # [CLS], [SEP] and padding stay
  assert (dropped['input_ids'][changed] == tok.mask_id).all()
  assert abs(changed.sum() / words.sum() - 0.25) < 0.02  # ~4,000 word pieces: 0.25 +- 0.007
  evaluated = next(iter(data.make_loader(cfg, 'validation', batch_size=400, train=False, seed=0)))
  assert not (evaluated['input_ids'] == tok.mask_id).any()
