#!/usr/bin/env bash
# Run every unfinished run of a sweep, here or on a TPU VM pod slice, one after another.
#
#   launch/sweep.sh --sweep=experiments/sweeps/cifar10_lr_wd.py --root=/runs/lr_wd
#   launch/sweep.sh --sweep=experiments/sweeps/cifar10_lr_wd.py --root=gs://bucket/lr_wd --target=tpu \
#       --tpu-args="--name=my-pod --zone=us-central2-b"
#   launch/sweep.sh --dry-run ...      prints each run's command, skips finished runs, starts nothing
#
# A thin wrapper around `python -m spikingformer_jax.sweep` (see its docstring): runs are named by
# their overrides, each gets <root>/<name> as workdir, and a workdir whose summary.json says
# "completed": true is never launched again. --target=tpu sends each run through launch/tpu_pod.sh run.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
args=()
have_sweep=0
have_root=0

die() { echo "launch/sweep.sh: error: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) args+=(--dry_run) ;;
    --tpu-args=*) args+=("--tpu_args=${arg#--tpu-args=}") ;;
    --sweep=*) have_sweep=1; args+=("$arg") ;;
    --root=*) have_root=1; args+=("$arg") ;;
    --target=*|--tpu_args=*) args+=("$arg") ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)." ;;
  esac
done

[[ $have_sweep == 1 ]] || die "--sweep=experiments/sweeps/<name>.py is required."
[[ $have_root == 1 ]] || die "--root=DIR (local path or gs://...) is required."
command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON)."

cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m spikingformer_jax.sweep "${args[@]}"
