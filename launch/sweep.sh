#!/usr/bin/env bash
# Run a sweep's unfinished trials, here (several at once on shares of this host's devices, or many
# small ones vmapped into one step) or on TPU VM slices, and report what they found.
#
#   launch/sweep.sh --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/digits_sweep --parallel=2
#   launch/sweep.sh --sweep=experiments/sweeps/digits_lr_wd.py --root=/tmp/digits_sweep --vmap=4
#   launch/sweep.sh --sweep=experiments/sweeps/cifar10_lr_wd.py --root=gs://bucket/lr_wd --target=tpu \
#       --tpu-names=pod-a,pod-b --tpu-args="--zone=us-central2-b"
#   launch/sweep.sh --sweep=... --root=... --report      writes report.md/.csv/.png into the root
#   launch/sweep.sh --dry-run ...      prints each trial's command, skips finished trials, starts nothing
#
# A thin wrapper around `python -m spikingformer_jax.sweep` (see its docstring): trials are named by
# their overrides, each gets <root>/<name> as workdir, and a trial whose summary.json says
# "completed": true (or that early stopping stopped) is never launched again. Also passed through:
# --devices_per_trial=N, --accelerator=auto|cpu|gpu|tpu, --poll_seconds=S, --report_dir=DIR.
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
    --tpu-names=*) args+=("--tpu_names=${arg#--tpu-names=}") ;;
    --sweep=*) have_sweep=1; args+=("$arg") ;;
    --root=*) have_root=1; args+=("$arg") ;;
    --target=*|--tpu_args=*|--tpu_names=*|--parallel=*|--vmap=*|--devices_per_trial=*|--accelerator=*|\
--poll_seconds=*|--report|--report_dir=*) args+=("$arg") ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown argument '$arg' (see --help)." ;;
  esac
done

[[ $have_sweep == 1 ]] || die "--sweep=experiments/sweeps/<name>.py is required."
[[ $have_root == 1 ]] || die "--root=DIR (local path or gs://...) is required."
command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON)."

cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m spikingformer_jax.sweep "${args[@]}"
