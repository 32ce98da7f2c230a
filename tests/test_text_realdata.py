"""Real data through the trainer and the shipped configs: the tiny Spikingformer-Text learns from scratch.

Each test loads an experiments/ config as the command line would (`--config=experiments/glue.py:task=...,
variant=tiny`), changes only how long it trains (fewer epochs, and for MLM fewer, shorter sequences, with
the warmup scaled to them where it would otherwise fill the run) and pads every batch to one length (one compilation), so each test stays within
tens of seconds on 2 CPU cores, trains it with `train.train_and_evaluate`, and compares the held-out metric with the
majority baseline measured on the same held-out examples. What the full recipes reach is in BENCHMARKS.md.
"""
import jax
import numpy as np

from conftest import shared_path
from spikingformer_jax import sweep, train
from spikingformer_jax.text import data, glue


# Every batch padded to data.max_len: one compiled training step and one evaluation step (dynamic padding
# compiles one per padded length, which costs more than these short runs train).
_ONE_SHAPE = {'data.dynamic_padding': False}


def _train(config_string, workdir, **overrides):
  config = sweep.apply_overrides(sweep.load_config(config_string),
                                 {'progress_bar': False, 'checkpoint.async_save': False, **overrides})
  summary = train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
  assert summary['completed'], summary
  return config, summary['final']


def _majority(config) -> float:
  """Accuracy of always answering the most frequent training label, on the evaluated examples."""
  counts = np.bincount(data._tokenized(data._cache_key(config.data), config.data.train_split).labels)
  held_out = data._tokenized(data._cache_key(config.data), config.data.eval_split).labels
  return float(np.mean(held_out == counts.argmax()))


def test_sst2_sentences_learn_from_scratch_with_the_shipped_tiny_config(tmp_path):
  shared_path('data', 'sst2', 'train.tsv')
  config, final = _train('experiments/glue.py:task=sst2_sentence,variant=tiny', tmp_path, num_epochs=1,
                         **_ONE_SHAPE, **{'data.max_len': 64, 'optim.warmup_epochs': 1 / 3})
  majority = _majority(config)  # 444/872 = 0.509
  assert final['num_examples'] == 872
  # One epoch of the 3-epoch recipe, warming up over its first third as the recipe does; the whole recipe
  # reaches 0.79 on this dev split (BENCHMARKS.md).
  assert final['accuracy'] > majority + 0.2, (final, majority)


def _rte_heldout_split(directory, n_train=1245):
  """GLUE-layout RTE files: the first `n_train` training pairs to train on; the other training pairs
  plus the official dev pairs (1,467 in all) held out, so the accuracy is measured to +-0.013."""
  rte = glue.read_glue_tsv('rte', str(shared_path('data', 'glue')), 'train')
  (directory / 'RTE').mkdir(parents=True)
  header = 'index\tsentence1\tsentence2\tlabel\n'
  names = glue.GLUE_TASKS['rte'].label_names
  rows = lambda ex, part: ''.join(f'{i}\t{a}\t{b}\t{names[y]}\n' for i, (a, b, y) in enumerate(
      zip(ex.text_a[part], ex.text_b[part], ex.labels[part])))
  dev = glue.read_glue_tsv('rte', str(shared_path('data', 'glue')), 'validation')
  (directory / 'RTE' / 'train.tsv').write_text(header + rows(rte, slice(0, n_train)), encoding='utf-8')
  (directory / 'RTE' / 'dev.tsv').write_text(header + rows(rte, slice(n_train, None)) + rows(dev, slice(None)),
                                             encoding='utf-8')
  return directory


def test_rte_pairs_learn_from_scratch_with_the_shipped_tiny_config(tmp_path):
  """The from-scratch recipe turns on the cross-segment match embedding for pairs (text/README.md): the
  tiny model learns the premise/hypothesis overlap signal and beats the majority on 1,467 held-out pairs."""
  config, final = _train('experiments/glue.py:task=rte,variant=tiny', tmp_path / 'run', num_epochs=4, **_ONE_SHAPE,
                         **{'data.data_dir': str(_rte_heldout_split(tmp_path / 'glue'))})
  assert config.model.overrides.cross_segment_match
  majority = _majority(config)  # 751/1467 = 0.512
  assert final['num_examples'] == 1467
  assert final['accuracy'] > majority + 0.04, (final, majority)


def test_mlm_pretraining_beats_the_unigram_guess_on_heldout_text(tmp_path):
  """MR sentences as a corpus (every 20th held out), a character vocabulary (~130 entries) so the output
  layer is cheap on CPU: held-out masked characters are predicted far better than by always answering the
  most frequent training character, which needs context."""
  corpus = tmp_path / 'mr'
  corpus.mkdir()
  lines = shared_path('data', 'mr', 'train.tsv').read_text(encoding='utf-8').split('\n')[1:]
  (corpus / 'mr.txt').write_text('\n'.join(line.split('\t', 1)[1] for line in lines if line) + '\n', encoding='utf-8')
  config, final = _train(f'experiments/pretrain_mlm.py:variant=tiny,corpus={corpus},vocab=char', tmp_path / 'run',
                         num_epochs=1, **{'data.mlm_holdout_every': 20, 'data.max_eval_examples': 128,
                                          'data.max_len': 64, 'data.max_train_examples': 4800,
                                          'optim.warmup_epochs': 0.1, 'batch_size': 32})
  tok = data.get_tokenizer(config.data)
  assert tok.vocab_size < 300
  split_tokens = lambda split: np.concatenate([data._tokenized(data._cache_key(config.data), split)[i]['input_ids']
                                               for i in range(len(data._tokenized(data._cache_key(config.data),
                                                                                  split)))])
  train_tokens, held_out = split_tokens('train'), split_tokens('validation')
  train_tokens = train_tokens[~np.isin(train_tokens, tok.special_ids)]
  held_out = held_out[~np.isin(held_out, tok.special_ids)]
  unigram_guess = float(np.mean(held_out == np.bincount(train_tokens).argmax()))
  assert final['num_masked_tokens'] > 500
  assert final['mlm_accuracy'] > unigram_guess + 0.04, (final, unigram_guess)  # measured 0.18 vs 0.11
