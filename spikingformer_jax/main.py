"""Command line: `python -m spikingformer_jax.main --config=experiments/<benchmark>.py:<args> --workdir=DIR`.

Overrides use ml_collections' syntax, e.g. `--config.batch_size=64 --config.optim.lr=1e-3`.
`--mode=train` trains (resuming from the workdir when it holds a checkpoint) and evaluates;
`--mode=eval` evaluates the latest checkpoint in the workdir (or `--config.init_from`) only.
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (with optional :args).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and TensorBoard files go.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (and evaluate) or only evaluate.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from spikingformer_jax import compile_cache, cpu_runtime, evaluate_only, train  # noqa: PLC0415 (jax after flags)

  cpu_runtime.apply_cpu_flags()
  compile_cache.enable()

  config = FLAGS.config
  logging.info('Config:\n%s', config)
  if FLAGS.mode == 'train':
    summary = train.train_and_evaluate(config, FLAGS.workdir)
  else:
    summary = evaluate_only.run(config, FLAGS.workdir)
  print(train.format_summary(summary))
  final = summary.get('final', {})
  if config.metric in final:
    print(f'{config.metric}: {final[config.metric]:.4f}')
  with open(f'{FLAGS.workdir}/summary.json', 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2, default=float)


if __name__ == '__main__':
  app.run(main)
