#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM slice (all hosts at once, as JAX requires).
#
#   launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=P] [--repo=DIR] [--dry-run] -- COMMAND...
#
# Example (install on every host, then run the demo on every host):
#   launch/tpu_vm.sh --tpu=coordtok-v4-32 --zone=us-central2-b -- pip install -e '.[test]'
#   launch/tpu_vm.sh --tpu=coordtok-v4-32 --zone=us-central2-b -- \
#       python -m coordtok_jax.demo --config=configs/coordtok.py:L --config.model.dtype=bfloat16
#
# COMMAND runs in --repo (default ~/coordtok-jax) on each worker; it must already be there
# (git clone it on all workers with this same script). JAX on TPU VMs discovers the other hosts
# itself. --dry-run prints the gcloud command instead of running it.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

tpu="" zone="" project="" repo="~/coordtok-jax" dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --dry-run) dry=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "error: unknown argument '$1' (put the command after --)" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$tpu" ]] || { echo "error: --tpu=NAME is required" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "error: --zone=ZONE is required" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "error: no command given after --" >&2; exit 2; }

remote="cd $repo && $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote")
[[ -n "$project" ]] && cmd+=(--project="$project")
if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  command -v gcloud >/dev/null || { echo "error: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 127; }
  exec "${cmd[@]}"
fi
