"""Command line: `python -m spikingformer_jax.main --config=experiments/<benchmark>.py:<args> --workdir=DIR`.

Overrides use ml_collections' syntax, e.g. `--config.batch_size=64 --config.optim.lr=1e-3`.
`--mode=train` trains (resuming from the workdir when it holds a checkpoint), evaluates and writes
`<workdir>/config.json` and `<workdir>/summary.json`, printing one line per evaluation; `--mode=eval`
evaluates a checkpoint of the workdir (`--checkpoint=latest|best|<step>`; without any, the one
`--config.init_from` names) only and writes `<workdir>/eval_summary.json`. DIR may be gs://bucket/....
Orbax's INFO log lines are dropped (`--orbax_info` keeps them).

Multi-process jobs: TPU pods join with `--config.distributed=True`; anywhere else (e.g. several
processes on one machine, see launch/local.sh) set JAX_COORDINATOR_ADDRESS=host:port,
JAX_NUM_PROCESSES and JAX_PROCESS_ID for each process.

Exit status: 0 done; 1 an error, reported in one line (config, checkpoint, run lock, data);
75 (EX_TEMPFAIL) preempted by SIGTERM after saving a checkpoint: rerun the same command to resume.
"""
from __future__ import annotations

from spikingformer_jax import cpu_runtime

cpu_runtime.reuse_freed_memory_on_cpu()  # Before any import starts a thread (see the function).

import json  # noqa: E402
import logging as python_logging  # noqa: E402
import sys  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (with optional :args).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and TensorBoard files go (local or gs://).')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (and evaluate) or only evaluate.')
flags.DEFINE_string('checkpoint', 'latest', '--mode=eval: the checkpoint to evaluate: latest, best (by '
                    'config.metric) or a step number.')
flags.DEFINE_bool('orbax_info', False, "Keep Orbax's INFO log lines (about a thousand per short run).")
flags.mark_flags_as_required(['config', 'workdir'])


def _without_closed_loop_reports(hook):
  """`sys.unraisablehook` minus the "Event loop is closed" reports that follow a failed checkpoint save.

  When one of Orbax's array writes fails, Orbax stops waiting and closes its asyncio loop; TensorStore
  still completes every other write onto that closed loop, and each prints a traceback: dozens,
  around the one line that says what failed.
  """
  def report(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
      hook(unraisable)
  return report


def main(argv):
  del argv
  import jax  # noqa: PLC0415 (after flags: jax config)

  from spikingformer_jax import (checkpoint, compile_cache, configs, console, data, evaluate_only,  # noqa: PLC0415
                                 paths, run_lock, train)
  from spikingformer_jax.porting import weights  # noqa: PLC0415

  cpu_runtime.apply_cpu_flags()
  compile_cache.enable()
  sys.unraisablehook = _without_closed_loop_reports(sys.unraisablehook)

  if not FLAGS.orbax_info:
    console.quiet_orbax()
  config = FLAGS.config
  logging.info('Config:\n%s', config)
  try:
    if FLAGS.mode == 'train':
      summary = train.train_and_evaluate(config, FLAGS.workdir)
    else:
      summary = evaluate_only.run(config, FLAGS.workdir, FLAGS.checkpoint)
  except (configs.ConfigError, checkpoint.CheckpointError, run_lock.RunLockError, data.DataError,
          weights.WeightsError) as e:
    # What asyncio would still log at exit about Orbax's abandoned writes repeats this line dozens of times.
    python_logging.getLogger('asyncio').setLevel(python_logging.CRITICAL)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    name = 'summary.json' if FLAGS.mode == 'train' else 'eval_summary.json'
    (paths.path(FLAGS.workdir) / name).write_text(json.dumps(summary, indent=2, default=float))
  if summary.get('preempted'):
    print(f'preempted at step {summary["step"]}; rerun the same command to resume', flush=True)
    sys.exit(train.EXIT_PREEMPTED)
  if jax.process_index() == 0:
    print(train.format_summary(summary))
    final = summary.get('final', {})
    if config.metric in final:
      print(f'{config.metric}: {final[config.metric]:.4f}')


def cli():
  """`spikingformer-train`: the command line above."""
  app.run(main)


def eval_cli():
  """`spikingformer-eval`: the command line above with --mode=eval."""
  app.run(main, argv=sys.argv[:1] + ['--mode=eval'] + sys.argv[1:])


if __name__ == '__main__':
  cli()
