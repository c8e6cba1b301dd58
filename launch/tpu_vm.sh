#!/usr/bin/env bash
# shellcheck disable=SC2088  # ~ in worker paths is meant literally here; it expands on the worker
# Cloud TPU VM / pod slice: create (or reuse) it, install coordtok-jax on every worker, and run
# one command on all workers at once (as JAX requires on a multi-host slice).
#
# Usage:
#   launch/tpu_vm.sh SUBCOMMAND --tpu=NAME --zone=ZONE [--project=P] [FLAGS] [--dry-run] [-- COMMAND...]
#
# Subcommands:
#   create     create the TPU VM unless it exists (describe first; a STOPPED one is started,
#              a PREEMPTED/TERMINATED spot one is deleted and re-created only with --recreate)
#   install    on every worker: git clone --repo-url (or fetch + check out --branch when the
#              clone is there), then pip install -U 'jax[tpu]' -e .
#   up         create, then install
#   run        run COMMAND (after --) in --dir on every worker (--worker=all)
#   describe   print the TPU VM's description
#   delete     delete the TPU VM
#   (no subcommand with "-- COMMAND" = run, as the earlier version of this script did)
#
# Flags (--flag=value or --flag value):
#   --tpu=NAME            TPU VM name (required; alias --name)
#   --zone=ZONE           zone, e.g. us-central2-b (v4), us-east5-a (v5p) (required)
#   --project=PROJECT     GCP project (default: gcloud's configured project)
#   --accelerator-type=T  create/up: v4-32, v5p-64, v5litepod-16, v6e-16, ... (required there)
#   --version=V           create/up: TPU runtime image; default by generation: v2/v3/v4
#                         tpu-ubuntu2204-base, v5p v2-alpha-tpuv5, v5e (v5litepod)
#                         v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e
#   --spot | --preemptible  create/up: spot (no time limit) or preemptible (24 h) capacity
#   --recreate            create/up: delete and re-create a PREEMPTED/TERMINATED TPU VM
#   --create-arg=ARG      create/up: extra flag for 'gcloud ... create' (repeatable), e.g.
#                         --create-arg=--reserved --create-arg=--service-account=SA
#   --repo-url=URL        install/up: git URL of coordtok-jax (required there)
#   --branch=B            install/up: branch or tag (default: main)
#   --dir=DIR             checkout on every worker (default: ~/coordtok-jax; alias --repo)
#   --extras=E            install/up: pip extras of the project, e.g. tfds -> -e '.[tfds]'
#   --jax=SPEC            install/up: the JAX requirement (default: 'jax[tpu]')
#   --python=PY           interpreter on the workers (default: python3)
#   --env=KEY=VALUE       run: export this on every worker first (repeatable)
#   --detach              run: nohup the command on every worker (survives the ssh session);
#                         its output goes to --log on each worker
#   --log=PATH            run --detach: log file on each worker (default: ~/coordtok.log)
#   --worker=W            install/run: workers to use (default: all; e.g. 0 or 0,2)
#   --ssh-arg=ARG         install/run: extra flag for 'gcloud ... ssh' (repeatable), e.g.
#                         --ssh-arg=--internal-ip
#   --dry-run             print every gcloud command (one per line, shell-quoted), run none;
#                         create then assumes the TPU VM does not exist yet
#   -h, --help            this text
#
# Examples:
#   # v4-32 (4 hosts): create, install, train stage 1 with a gs:// workdir
#   launch/tpu_vm.sh up --tpu=coordtok-v4-32 --zone=us-central2-b --accelerator-type=v4-32 \
#       --repo-url=https://github.com/ORG/coordtok-jax.git
#   launch/tpu_vm.sh run --tpu=coordtok-v4-32 --zone=us-central2-b --detach -- \
#       python3 -m coordtok_jax.train --config=configs/coordtok.py:L,stage=1 \
#       --workdir=gs://BUCKET/coordtok/L_stage1 --config.distributed=on \
#       --config.data.source=array_record --config.data.path=gs://BUCKET/ucf101_128
#   # v5p-64 on spot capacity; see what would run first
#   launch/tpu_vm.sh up --tpu=coordtok-v5p --zone=us-east5-a --accelerator-type=v5p-64 --spot \
#       --repo-url=https://github.com/ORG/coordtok-jax.git --dry-run
#   # every worker's log, then delete the slice
#   launch/tpu_vm.sh run --tpu=coordtok-v4-32 --zone=us-central2-b -- bash -c 'tail -n 5 ~/coordtok.log'
#   launch/tpu_vm.sh delete --tpu=coordtok-v4-32 --zone=us-central2-b
#
# JAX on a TPU VM finds the other workers itself (metadata server): jax.distributed.initialize()
# needs no arguments or environment variables there; --config.distributed=on makes the trainer
# call it on every slice. The Ubuntu TPU images have python3, not python.
set -euo pipefail

PROG="launch/tpu_vm.sh"

usage() { sed -n '3,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

die_usage() {  # exit 2: the command line is wrong
  echo "$PROG: error: $*" >&2
  echo "run '$PROG --help' for usage" >&2
  exit 2
}

die() { echo "$PROG: error: $*" >&2; exit 1; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Shell-quote the arguments, space-separated (what a shell reads back as the same words).

# A path for the remote shell: a leading ~/ stays unquoted so that it expands on the worker.
remote_path() {
  case "$1" in
    "~") printf '~' ;;
    "~/"*) printf '~/%s' "$(quote1 "${1#\~/}")" ;;
    *) quote1 "$1" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Every gcloud invocation goes through gcloud_cmd. With --dry-run it prints the command (one
# line, shell-quoted) on stdout and runs nothing. --capture: keep stdout/stderr in GCLOUD_OUT /
# GCLOUD_ERR instead of showing them (used for describe).
GCLOUD_OUT="" GCLOUD_ERR=""
gcloud_cmd() {
  local capture=0
  if [[ "${1:-}" == --capture ]]; then capture=1; shift; fi
  GCLOUD_OUT="" GCLOUD_ERR=""
  if [[ $dry_run -eq 1 ]]; then
    printf '%s\n' "$(quote gcloud "$@")"
    return 0
  fi
  command -v gcloud >/dev/null 2>&1 || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
  echo "+ $(quote gcloud "$@")" >&2
  if [[ $capture -eq 0 ]]; then
    gcloud "$@"
    return
  fi
  local out err rc=0
  out=$(mktemp) err=$(mktemp)
  gcloud "$@" >"$out" 2>"$err" || rc=$?
  GCLOUD_OUT=$(cat "$out") GCLOUD_ERR=$(cat "$err")
  rm -f "$out" "$err"
  return $rc
}

# ---------------------------------------------------------------------------------------------
# Arguments.
sub="" tpu="" zone="" project="" accel="" version="" capacity="" recreate=0
repo_url="" branch="main" dir="~/coordtok-jax" extras="" jax_spec="jax[tpu]" python="python3"
worker="all" detach=0 log="~/coordtok.log" dry_run=0
create_args=() ssh_args=() envs=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --spot|--preemptible)
      [[ -z "$capacity" || "$capacity" == "$arg" ]] || die_usage "--spot and --preemptible are exclusive"
      capacity="$arg"; shift; continue ;;
    --recreate) recreate=1; shift; continue ;;
    --detach) detach=1; shift; continue ;;
    --*=*) key="${arg%%=*}" val="${arg#*=}"; shift ;;
    --create-arg|--ssh-arg) [[ $# -ge 2 ]] || die_usage "$arg needs a value"
         key="$arg" val="$2"; shift 2 ;;
    --*) [[ $# -ge 2 && "$2" != --* ]] || die_usage "$arg needs a value ($arg=VALUE)"
         key="$arg" val="$2"; shift 2 ;;
    create|install|up|run|describe|delete)
      [[ -z "$sub" ]] || die_usage "two subcommands given: '$sub' and '$arg'"
      sub="$arg"; shift; continue ;;
    *) die_usage "unknown argument '$arg' (subcommands: create install up run describe delete; put the command after --)" ;;
  esac
  case "$key" in
    --tpu|--name) tpu="$val" ;;
    --zone) zone="$val" ;;
    --project) project="$val" ;;
    --accelerator-type) accel="$val" ;;
    --version) version="$val" ;;
    --create-arg) create_args+=("$val") ;;
    --repo-url) repo_url="$val" ;;
    --branch) branch="$val" ;;
    --dir|--repo) dir="$val" ;;
    --extras) extras="$val" ;;
    --jax) jax_spec="$val" ;;
    --python) python="$val" ;;
    --env)
      [[ "$val" == *=* && "${val%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die_usage "--env needs KEY=VALUE, got '$val'"
      envs+=("$val") ;;
    --log) log="$val" ;;
    --worker) worker="$val" ;;
    --ssh-arg) ssh_args+=("$val") ;;
    *) die_usage "unknown flag '$key'" ;;
  esac
done

if [[ -z "$sub" ]]; then
  [[ $# -gt 0 ]] || die_usage "no subcommand given (create, install, up, run, describe, delete)"
  sub="run"  # the earlier interface: tpu_vm.sh --tpu=... --zone=... -- COMMAND
fi
[[ -n "$tpu" ]] || die_usage "--tpu=NAME is required"
[[ -n "$zone" ]] || die_usage "--zone=ZONE is required"
case "$sub" in
  run) [[ $# -gt 0 ]] || die_usage "run: no command given after --" ;;
  *) [[ $# -eq 0 ]] || die_usage "$sub takes no command after -- (only run does)" ;;
esac
if [[ "$sub" == create || "$sub" == up ]]; then
  [[ -n "$accel" ]] || die_usage "$sub: --accelerator-type is required (e.g. v4-32, v5p-64, v5litepod-16)"
  if [[ -z "$version" ]]; then
    case "$accel" in
      v2-*|v3-*|v4-*) version="tpu-ubuntu2204-base" ;;
      v5p-*) version="v2-alpha-tpuv5" ;;
      v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
      v6e-*) version="v2-alpha-tpuv6e" ;;
      *) die_usage "$sub: --version is required for accelerator type '$accel' (no default known)" ;;
    esac
  fi
fi
if [[ "$sub" == install || "$sub" == up ]]; then
  [[ -n "$repo_url" ]] || die_usage "$sub: --repo-url is required (the git URL to clone on every worker)"
fi

# gcloud flags every TPU command takes.
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

# ---------------------------------------------------------------------------------------------
tpu_describe_state() {  # sets STATE (empty = does not exist) and ACCEL
  STATE="" ACCEL=""
  if gcloud_cmd --capture compute tpus tpu-vm describe "$tpu" "${where[@]}" \
      --format='value(state,acceleratorType)'; then
    read -r STATE ACCEL <<<"$GCLOUD_OUT" || true
    return 0
  fi
  if grep -qiE 'NOT_FOUND|not found|was not found' <<<"$GCLOUD_ERR"; then
    return 0
  fi
  printf '%s\n' "$GCLOUD_ERR" >&2
  die "could not describe TPU VM '$tpu' (see the gcloud error above)"
}

do_create_new() {
  local cmd=(compute tpus tpu-vm create "$tpu" "${where[@]}" --accelerator-type="$accel" --version="$version")
  [[ -n "$capacity" ]] && cmd+=("$capacity")
  gcloud_cmd "${cmd[@]}" ${create_args[@]+"${create_args[@]}"}
}

do_create() {
  tpu_describe_state
  if [[ $dry_run -eq 1 || -z "$STATE" ]]; then
    [[ $dry_run -eq 1 ]] || note "TPU VM '$tpu' does not exist; creating $accel ($version)"
    do_create_new
    return
  fi
  note "TPU VM '$tpu' exists: state $STATE, type ${ACCEL:-?}"
  if [[ -n "$ACCEL" && "$ACCEL" != "$accel" ]]; then
    die "TPU VM '$tpu' is a $ACCEL, not the requested $accel (delete it or pick another --tpu name)"
  fi
  case "$STATE" in
    READY|CREATING|STARTING|RESTARTING|REPAIRING) note "reusing it" ;;
    STOPPED|STOPPING) gcloud_cmd compute tpus tpu-vm start "$tpu" "${where[@]}" ;;
    PREEMPTED|TERMINATED)
      [[ $recreate -eq 1 ]] || die "TPU VM '$tpu' is $STATE and cannot be restarted; pass --recreate to delete and re-create it"
      gcloud_cmd compute tpus tpu-vm delete "$tpu" "${where[@]}" --quiet
      do_create_new ;;
    *) die "TPU VM '$tpu' is in state $STATE; wait, or delete it" ;;
  esac
}

ssh_all() {  # ssh_all REMOTE_COMMAND
  gcloud_cmd compute tpus tpu-vm ssh "$tpu" "${where[@]}" --worker="$worker" --command="$1" \
    ${ssh_args[@]+"${ssh_args[@]}"}
}

do_install() {
  local d py pkg script
  d=$(remote_path "$dir")
  py=$(remote_path "$python")
  pkg="."
  [[ -n "$extras" ]] && pkg=".[$extras]"
  # POSIX sh on the worker; an existing clone is updated without discarding local changes
  # (git checkout refuses to overwrite them).
  script="set -e; "
  script+="if [ -d $d/.git ]; then "
  script+="git -C $d fetch --quiet origin $(quote "$branch") && git -C $d checkout --quiet -B $(quote "$branch") FETCH_HEAD; "
  script+="else git clone --quiet --branch $(quote "$branch") $(quote "$repo_url") $d; fi; "
  script+="cd $d && git log -1 --format='%h %s' && "
  script+="$py -m pip install --quiet --upgrade pip && "
  script+="$py -m pip install --upgrade $(quote "$jax_spec") -e $(quote "$pkg")"
  ssh_all "$script"
}

do_run() {
  local d remote="" kv
  d=$(remote_path "$dir")
  remote="cd $d && "
  for kv in ${envs[@]+"${envs[@]}"}; do
    remote+="export ${kv%%=*}=$(quote "${kv#*=}") && "
  done
  if [[ $detach -eq 1 ]]; then
    local l
    l=$(remote_path "$log")
    remote+="nohup $(quote "$@") > $l 2>&1 < /dev/null & echo \"started on \$(hostname): pid \$!, log $l\""
  else
    remote+="$(quote "$@")"
  fi
  ssh_all "$remote"
}

case "$sub" in
  create) do_create ;;
  install) do_install ;;
  up) do_create; do_install ;;
  run) do_run "$@" ;;
  describe) gcloud_cmd compute tpus tpu-vm describe "$tpu" "${where[@]}" ;;
  delete) gcloud_cmd compute tpus tpu-vm delete "$tpu" "${where[@]}" --quiet ;;
esac
