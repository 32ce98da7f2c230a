#!/usr/bin/env bash
# Train one experiment on this machine (all its local accelerators, or the CPU), as one process or as a
# multi-process job of N processes.
#
#   launch/local.sh --config=experiments/cifar10.py:variant=4-384 --workdir=/runs/cifar10 [--config.key=value ...]
#   launch/local.sh --processes=2 --cpu-devices=4 --config=experiments/digits.py --workdir=/tmp/digits-2p
#   launch/local.sh --dry-run --config=experiments/digits.py --workdir=/tmp/digits
#
# Options (before the training flags): --dry-run prints the command(s) instead of running them;
# --python=PATH picks the interpreter (default: $PYTHON, else python3); --processes=N starts N processes
# joined into one job through a coordinator on 127.0.0.1 (--port=P, default a free port): each gets
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, loads its own part of every batch and
# writes its shards of the one checkpoint; SIGTERM/SIGINT to this script reaches every process, which
# all stop at the same step after saving. --cpu-devices=K gives each process K CPU devices (XLA's
# host-platform device count). Every other argument goes to `python -m spikingformer_jax.main`
# unchanged; --config and --workdir are required. The run resumes from the workdir's checkpoint when
# there is one, and writes <workdir>/summary.json when it ends. Exit status: the first non-zero one of
# the processes (75: preempted, rerun to resume).
# On the CPU, glibc's malloc is told to back its large blocks with transparent huge pages
# (GLIBC_TUNABLES=glibc.malloc.hugetlb=1): XLA allocates a fresh temporary buffer every step, and faulting
# it in 4 KiB pages costs ~8% of a CIFAR training step (BENCHMARKS.md). On one CPU, add
# --config.model.spike_kernels=True for the sparse spike kernels (README.md, BENCHMARKS.md).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
dry_run=0
processes=1
cpu_devices=0
port=""
args=()
have_config=0
have_workdir=0

die() { echo "launch/local.sh: error: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --dry-run|--dry_run) dry_run=1 ;;
    --python=*) python="${arg#--python=}" ;;
    --processes=*) processes="${arg#--processes=}" ;;
    --cpu-devices=*) cpu_devices="${arg#--cpu-devices=}" ;;
    --port=*) port="${arg#--port=}" ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
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
[[ $processes =~ ^[1-9][0-9]*$ ]] || die "--processes=N needs a positive integer, got '$processes'."
[[ $cpu_devices =~ ^[0-9]+$ ]] || die "--cpu-devices=K needs a non-negative integer, got '$cpu_devices'."
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "--port=P needs a port number, got '$port'."
if [[ $dry_run == 0 ]] || [[ $processes -gt 1 && -z $port ]]; then
  command -v "$python" >/dev/null 2>&1 || die "python interpreter '$python' not found (set PYTHON or --python=)."
fi

cmd=("$python" -m spikingformer_jax.main "${args[@]}")
env=("PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}")
if [[ "${GLIBC_TUNABLES:-}" != *glibc.malloc.hugetlb* ]]; then
  env+=("GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1")
fi
if [[ $cpu_devices -gt 0 ]]; then
  env+=("XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices${XLA_FLAGS:+ $XLA_FLAGS}")
fi
if [[ $processes -gt 1 && -z $port ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# The environment of process $1 (empty for a single process).
process_env() {
  if [[ $processes -gt 1 ]]; then
    echo "JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$processes JAX_PROCESS_ID=$1"
  fi
}

if [[ $dry_run == 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    line="[dry-run] cd $(printf '%q' "$repo") &&"
    for var in "${env[@]}" $(process_env "$i"); do
      line+=" $(printf '%q' "$var")"
    done
    echo "$line $(printf '%q ' "${cmd[@]}")"
  done
  exit 0
fi
cd "$repo"
export "${env[@]}"
if [[ $processes == 1 ]]; then
  exec "${cmd[@]}"
fi

pids=()
for ((i = 0; i < processes; i++)); do
  # shellcheck disable=SC2046  # process_env's words are VAR=value pairs without spaces.
  env $(process_env "$i") "${cmd[@]}" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0
    wait "$pid" || rc=$?
    kill -0 "$pid" 2>/dev/null || break  # Still running: the wait was cut short by a forwarded signal.
  done
  if [[ $rc != 0 && $status == 0 ]]; then
    status=$rc
  fi
done
exit "$status"
