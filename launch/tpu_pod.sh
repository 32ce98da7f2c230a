#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create or reuse it, copy the code, install, run on every worker.
#
#   launch/tpu_pod.sh up     --name=my-pod --zone=us-central2-b --accelerator=v4-32
#   launch/tpu_pod.sh run    --name=my-pod --zone=us-central2-b -- \
#       --config=experiments/imagenet.py:variant=8-768 --workdir=gs://my-bucket/imagenet-8-768
#   launch/tpu_pod.sh logs   --name=my-pod --zone=us-central2-b
#   launch/tpu_pod.sh delete --name=my-pod --zone=us-central2-b
#
# Commands:
#   up       create the slice unless it exists (reuse), then setup
#   create   create the slice unless it exists
#   setup    copy this checkout (git-tracked and untracked-not-ignored files) to every worker, make a
#            Python 3.11 venv there (uv, installed from PyPI: the default image's python3 is 3.10, older
#            than the pins accept) and install requirements.txt (without torch), requirements-tpu.txt
#            (libtpu) and jax[tpu] of the pinned jax version into it
#   run      start `.venv/bin/python -m spikingformer_jax.main <flags> --config.distributed=True` on
#            all workers and stream their output until it ends (the output is also kept in train.log);
#            with --aot-check=TOPOLOGY, first compile the training step for that TPU topology on
#            worker 0 (`python -m spikingformer_jax.aot`) and start nothing if it does not fit
#   start    the same in the background (nohup); follow it with `logs`
#   logs     follow train.log of one worker (--worker=N, default 0)
#   stop     SIGTERM the run on every worker: the trainer saves a checkpoint and exits; rerun to resume
#   status   describe the slice
#   delete   delete the slice
#
# Options (or environment variables):
#   --name=NAME (TPU_NAME), --zone=ZONE (TPU_ZONE): required
#   --project=ID (TPU_PROJECT): default gcloud's configured project
#   --accelerator=TYPE (TPU_ACCELERATOR), e.g. v4-32, v5p-64: required by create/up
#   --version=RUNTIME (TPU_VERSION): default tpu-ubuntu2204-base
#   --spot: create a Spot slice; --remote-dir=DIR: checkout folder in each worker's home (spikingformer-jax)
#   --worker=N|all: the worker(s) of `logs` (default 0); --dry-run: print every command, run nothing
#   --python-version=V (TPU_PYTHON): the venv's Python for setup (default 3.11)
#   --aot-check=TOPOLOGY: run/start compile the step for TOPOLOGY (e.g. v5e:4x4, v4:2x2x4) first
#   --module=NAME: what run/start execute (default spikingformer_jax.main; the sweep driver sends
#            vmapped trial groups as spikingformer_jax.trials)
# Everything after `--` goes to spikingformer_jax.main. The workdir should be a gs:// path: every host
# of a multi-host slice writes the same checkpoints (Orbax) and must see the same directory. A run
# stopped by `stop` (or a preemption) saves, prints "preempted at step N" and exits with status 75.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gcloud_bin="${GCLOUD:-gcloud}"
name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator="${TPU_ACCELERATOR:-}"
version="${TPU_VERSION:-tpu-ubuntu2204-base}"
python_version="${TPU_PYTHON:-3.11}"
uv_version="0.13.9"  # uv, from PyPI: installs the venv's Python (python-build-standalone) and the pins.
aot_topology=""
remote_dir="spikingformer-jax"
worker="0"
module="spikingformer_jax.main"
spot=0
dry_run=0
train_args=()

die() { echo "launch/tpu_pod.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,40p' "$0"; }

[[ $# -ge 1 ]] || { usage; die "a command is required (up, create, setup, run, start, logs, stop, status, delete)."; }
cmd="$1"
shift
case "$cmd" in
  up|create|setup|run|start|logs|stop|status|delete) ;;
  -h|--help|help) usage; exit 0 ;;
  *) die "unknown command '$cmd' (expected up, create, setup, run, start, logs, stop, status, delete)." ;;
esac

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --remote-dir=*) remote_dir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --worker=*) worker="${1#*=}" ;;
    --python-version=*) python_version="${1#*=}" ;;
    --aot-check=*) aot_topology="${1#*=}" ;;
    --spot) spot=1 ;;
    --dry-run|--dry_run) dry_run=1 ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown option '$1' (training flags go after '--')." ;;
  esac
  shift
done

[[ -n $name ]] || die "--name (or TPU_NAME) is required: the TPU VM name."
[[ -n $zone ]] || die "--zone (or TPU_ZONE) is required, e.g. us-central2-b."
if [[ $dry_run == 0 ]] && ! command -v "$gcloud_bin" >/dev/null 2>&1; then
  die "'$gcloud_bin' not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or set GCLOUD to its path."
fi

# One argument as the shell reads it back: bare when safe, else in single quotes.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (copy-pasteable) under --dry-run.
run() {
  if [[ $dry_run == 1 ]]; then
    local line="[dry-run]" arg
    for arg in "$@"; do
      line+=" $(quote "$arg")"
    done
    echo "$line"
  else
    "$@"
  fi
}

tpu() {
  local sub="$1"
  shift
  run "$gcloud_bin" compute tpus tpu-vm "$sub" "$@" --zone="$zone" ${project:+"--project=$project"}
}

exists() {
  "$gcloud_bin" compute tpus tpu-vm describe "$name" --zone="$zone" ${project:+"--project=$project"} \
    >/dev/null 2>&1
}

create() {
  [[ -n $accelerator ]] || die "--accelerator (or TPU_ACCELERATOR) is required to create a slice, e.g. v4-32."
  local extra=()
  [[ $spot == 1 ]] && extra+=(--spot)
  if [[ $dry_run == 1 ]]; then
    echo "[dry-run] reuse $name if \`$gcloud_bin compute tpus tpu-vm describe $name\` succeeds, else:"
  elif exists; then
    echo "TPU VM $name exists in $zone: reusing it."
    return
  fi
  tpu create "$name" --accelerator-type="$accelerator" --version="$version" "${extra[@]}"
}

setup() {
  command -v git >/dev/null 2>&1 || die "git not found: setup copies the files git tracks (plus untracked, not ignored)."
  local jax_version
  jax_version="$(sed -n 's/^jax==//p' "$repo/requirements.txt")"
  [[ -n $jax_version ]] || die "$repo/requirements.txt pins no jax==VERSION."
  local archive="${TMPDIR:-/tmp}/spikingformer-code-$name.tgz"
  if [[ $dry_run == 1 ]]; then
    echo "[dry-run] (cd $repo && git ls-files -z -co --exclude-standard | tar --null -T - -czf $archive)"
  else
    (cd "$repo" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$archive")
  fi
  tpu scp "$archive" "$name:spikingformer-code.tgz" --worker=all
  local install="set -e; mkdir -p ~/$remote_dir; tar -xzf ~/spikingformer-code.tgz -C ~/$remote_dir; cd ~/$remote_dir"
  install+="; python3 -m pip install --user --quiet 'uv==$uv_version'"
  install+="; ~/.local/bin/uv venv --quiet --allow-existing --python $python_version .venv"
  install+="; grep -v '^torch==' requirements.txt > requirements-pod.txt"
  install+="; ~/.local/bin/uv pip install --quiet --python .venv/bin/python -r requirements-pod.txt"
  install+=" -r requirements-tpu.txt 'jax[tpu]==$jax_version'"
  tpu ssh "$name" --worker=all --command="$install"
}

train_command() {
  local have_config=0 have_workdir=0 arg line=".venv/bin/python -m $module"
  if [[ $module != spikingformer_jax.main ]]; then
    for arg in "${train_args[@]}"; do
      line+=" $(quote "$arg")"
    done
    echo "$line"
    return
  fi
  for arg in "${train_args[@]}"; do
    case "$arg" in
      --config=*) have_config=1 ;;
      --workdir=gs://*) have_workdir=1 ;;
      --workdir=*) have_workdir=1
        echo "launch/tpu_pod.sh: warning: $arg is not gs://; on a multi-host slice all hosts must share the workdir." >&2 ;;
    esac
  done
  [[ $have_config == 1 && $have_workdir == 1 ]] || \
    die "'$cmd' needs the training flags after '--': --config=experiments/<benchmark>.py[:args] --workdir=gs://..."
  for arg in "${train_args[@]}"; do
    line+=" $(quote "$arg")"
  done
  echo "$line --config.distributed=True"
}

# Compiles the training step for the --aot-check topology on worker 0 (on its CPU: no chip is
# touched); stops here when it fails, e.g. when the step does not fit the chips' memory.
aot_check() {
  [[ -n $aot_topology ]] || return 0
  local line="JAX_PLATFORMS=cpu .venv/bin/python -m spikingformer_jax.aot" arg
  for arg in "${train_args[@]}"; do
    case "$arg" in
      --workdir=*|--mode=*) ;;
      *) line+=" $(quote "$arg")" ;;
    esac
  done
  line+=" $(quote "--topology=$aot_topology")"
  tpu ssh "$name" --worker=0 --command="cd ~/$remote_dir || exit 1; $line" || \
    die "the AOT compile check for $aot_topology failed (see above); nothing was started."
}

case "$cmd" in
  up) create; setup ;;
  create) create ;;
  setup) setup ;;
  run)
    main="$(train_command)"
    aot_check
    tpu ssh "$name" --worker=all --command="cd ~/$remote_dir || exit 1; set -o pipefail; \
{ $main & echo \$! > train.pid; wait \$!; } 2>&1 | tee train.log" ;;
  start)
    main="$(train_command)"
    aot_check
    tpu ssh "$name" --worker=all --command="cd ~/$remote_dir || exit 1; \
nohup $main > train.log 2>&1 < /dev/null & echo \$! > train.pid" ;;
  logs) tpu ssh "$name" --worker="$worker" --command="tail -n 200 -F ~/$remote_dir/train.log" ;;
  stop) tpu ssh "$name" --worker=all \
      --command="if [ -f ~/$remote_dir/train.pid ]; then kill -TERM \$(cat ~/$remote_dir/train.pid) 2>/dev/null || true; fi" ;;
  status) tpu describe "$name" ;;
  delete) tpu delete "$name" --quiet ;;
esac
