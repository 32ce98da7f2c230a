#!/usr/bin/env bash
# Train one experiment on this machine (all its local accelerators, or the CPU).
#
#   launch/local.sh --config=experiments/cifar10.py:variant=4-384 --workdir=/runs/cifar10 [--config.key=value ...]
#   launch/local.sh --dry-run --config=experiments/digits.py --workdir=/tmp/digits
#
# Options (before the training flags): --dry-run prints the command instead of running it;
# --python=PATH picks the interpreter (default: $PYTHON, else python3). Every other argument goes to
# `python -m spikingformer_jax.main` unchanged; --config and --workdir are required. The run resumes
# from the workdir's checkpoint when there is one, and writes <workdir>/summary.json when it ends.
# On the CPU, glibc's malloc is told to back its large blocks with transparent huge pages
# (GLIBC_TUNABLES=glibc.malloc.hugetlb=1): XLA allocates a fresh temporary buffer every step, and faulting
# it in 4 KiB pages costs ~8% of a CIFAR training step (BENCHMARKS.md). On one CPU, add
# --config.model.spike_kernels=True for the sparse spike kernels (README.md, BENCHMARKS.md).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dry_run=0
args=()
have_config=0
have_workdir=0

die() { echo "launch/local.sh: error: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) dry_run=1 ;;
    --python=*) python="${arg#--python=}" ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *)
      case "$arg" in
        --config=*) have_config=1 ;;
        --workdir=*) have_workdir=1 ;;
      esac
      args+=("$arg") ;;
  esac
done

[[ $have_config == 1 ]] || die "--config=experiments/<benchmark>.py[:args] is required."
[[ $have_workdir == 1 ]] || die "--workdir=DIR is required."

cmd=("$python" -m spikingformer_jax.main "${args[@]}")
if [[ $dry_run == 1 ]]; then
  echo "[dry-run] cd $(printf '%q' "$repo") && PYTHONPATH=$(printf '%q' "$repo") $(printf '%q ' "${cmd[@]}")"
  exit 0
fi
command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON or --python=)."
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb* ]]; then
  export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
fi
exec "${cmd[@]}"
