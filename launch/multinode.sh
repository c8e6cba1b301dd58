#!/usr/bin/env bash
# Multi-process JAX without a scheduler: set the JAX coordinator variables and start the command,
# on this host (one process), on several hosts over ssh, or as several local processes.
#
# Usage:
#   launch/multinode.sh --coordinator=HOST:PORT --num-processes=N --process-id=I [FLAGS] -- COMMAND...
#       Export the variables below and exec COMMAND here (run this once on every host, I = 0..N-1;
#       process 0 must run on HOST).
#   launch/multinode.sh --hosts=h1,h2,... [--port=PORT] [--dir=DIR] [FLAGS] -- COMMAND...
#       ssh to every host and start process i on host i (coordinator: h1:PORT); wait for all.
#   launch/multinode.sh --local=N [--gpus=LIST|none] [--port=PORT] [FLAGS] -- COMMAND...
#       Start N processes on this host, coordinator 127.0.0.1:PORT (a free port by default);
#       the visible GPUs (--gpus, else CUDA_VISIBLE_DEVICES, else nvidia-smi) are split evenly
#       with CUDA_VISIBLE_DEVICES; with no GPUs (CPU) nothing is split. Waits for all.
#
# Variables set for each process:
#   JAX_COORDINATOR_ADDRESS  HOST:PORT of process 0   (read by jax.distributed.initialize())
#   JAX_NUM_PROCESSES        N                         (read by the trainer, passed as num_processes=)
#   JAX_PROCESS_ID           I                         (read by the trainer, passed as process_id=)
#   JAX_LOCAL_DEVICE_IDS     with --local-device-ids, or 0..k-1 when --local splits k GPUs per
#                            process (read by jax.distributed.initialize())
#   CUDA_VISIBLE_DEVICES     --local with GPUs: this process's share
# In --hosts and --local mode every output line is prefixed with [i]; when one process fails the
# others are stopped and the launcher exits with the failing process's status.
#
# Flags (--flag=value or --flag value):
#   --coordinator=HOST:PORT  process 0's address (--hosts: default first host:PORT)
#   --num-processes=N  --process-id=I   single-process mode
#   --hosts=H1,H2,...    ssh mode (user@host works; the coordinator is the host part)
#   --local=N            N local processes
#   --port=PORT          coordinator port (default: 12345 for --hosts, a free one for --local)
#   --gpus=LIST|none     --local: GPU ids to split (default: CUDA_VISIBLE_DEVICES, else nvidia-smi)
#   --local-device-ids=IDS  export JAX_LOCAL_DEVICE_IDS=IDS (single-process and --hosts mode)
#   --env=KEY=VALUE      export for every process (repeatable)
#   --dir=DIR            --hosts: directory to cd to on each host (default: the current directory)
#   --setup=CMD          --hosts: shell line run on each host before the command (repeatable),
#                        e.g. --setup='source ~/venvs/coordtok/bin/activate'
#   --ssh=PROGRAM        --hosts: ssh program (default: ssh)
#   --ssh-opt=OPT        --hosts: extra ssh option (repeatable), e.g. --ssh-opt=-p2222
#   --no-prefix          do not prefix output lines with [i]
#   --dry-run            print the commands (one per process, shell-quoted); run nothing
#   -h, --help           this text
#
# Examples:
#   # two 8xH100 hosts, by hand: on gpu-a and on gpu-b respectively
#   launch/multinode.sh --coordinator=gpu-a:12345 --num-processes=2 --process-id=0 -- python -m coordtok_jax.train ...
#   launch/multinode.sh --coordinator=gpu-a:12345 --num-processes=2 --process-id=1 -- python -m coordtok_jax.train ...
#   # the same from one shell (passwordless ssh, same checkout path on both hosts)
#   launch/multinode.sh --hosts=gpu-a,gpu-b --setup='source ~/venvs/coordtok/bin/activate' -- \
#       python -m coordtok_jax.train --config=configs/coordtok.py:L,stage=1 --workdir=/shared/coordtok/L_stage1
#   # an 8-GPU host as 2 processes x 4 GPUs (tests the multi-process path on one machine)
#   launch/multinode.sh --local=2 -- python -m coordtok_jax.train --config=configs/coordtok.py:tiny --workdir=/tmp/w
#   # CPU only
#   JAX_PLATFORMS=cpu launch/multinode.sh --local=2 --gpus=none -- python -c 'import jax, os; print(os.environ["JAX_PROCESS_ID"])'
set -euo pipefail

PROG="launch/multinode.sh"

usage() { sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

coordinator="" num_processes="" process_id="" hosts="" local_n="" port="" gpus_opt=""
local_ids="" dir="$PWD" ssh_prog="ssh" prefix=1 dry_run=0
envs=() setups=() ssh_opts=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --no-prefix) prefix=0; shift; continue ;;
    --*=*) key="${arg%%=*}" val="${arg#*=}"; shift ;;
    --ssh-opt) [[ $# -ge 2 ]] || die_usage "$arg needs a value"
         key="$arg" val="$2"; shift 2 ;;
    --*) [[ $# -ge 2 && "$2" != --* ]] || die_usage "$arg needs a value ($arg=VALUE)"
         key="$arg" val="$2"; shift 2 ;;
    *) die_usage "unknown argument '$arg' (put the command after --)" ;;
  esac
  case "$key" in
    --coordinator) coordinator="$val" ;;
    --num-processes) num_processes="$val" ;;
    --process-id) process_id="$val" ;;
    --hosts) hosts="$val" ;;
    --local) local_n="$val" ;;
    --port) port="$val" ;;
    --gpus) gpus_opt="$val" ;;
    --local-device-ids) local_ids="$val" ;;
    --env)
      [[ "$val" == *=* && "${val%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die_usage "--env needs KEY=VALUE, got '$val'"
      envs+=("$val") ;;
    --dir) dir="$val" ;;
    --setup) setups+=("$val") ;;
    --ssh) ssh_prog="$val" ;;
    --ssh-opt) ssh_opts+=("$val") ;;
    *) die_usage "unknown flag '$key'" ;;
  esac
done

[[ $# -gt 0 ]] || die_usage "no command given after --"
modes=0
[[ -n "$hosts" ]] && modes=$((modes + 1))
[[ -n "$local_n" ]] && modes=$((modes + 1))
[[ $modes -le 1 ]] || die_usage "--hosts and --local are exclusive"
[[ -z "$port" ]] || { is_uint "$port" && [[ "$port" -ge 1 && "$port" -le 65535 ]]; } \
  || die_usage "--port must be 1..65535, got '$port'"
[[ -z "$local_ids" || "$local_ids" =~ ^[0-9]+(,[0-9]+)*$ ]] \
  || die_usage "--local-device-ids must look like 0,1,2,3, got '$local_ids'"

free_port() {
  python3 - 2>/dev/null <<'EOF' || echo $((20000 + RANDOM % 20000))
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

# ---------------------------------------------------------------------------------------------
# Starting and waiting for several processes. Job control gives every process its own process
# group, so stopping one stops its whole pipeline (and only it).
prefix_lines() {  # line by line, so nothing waits in a buffer
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do printf '%s%s\n' "$1" "$line"; done
}

pids=() labels=()
start_proc() {  # start_proc LABEL COMMAND...   (stdin: /dev/null)
  local label="$1"; shift
  if [[ $prefix -eq 1 ]]; then
    ( set +e; "$@" </dev/null 2>&1 | prefix_lines "[$label] "
      exit "${PIPESTATUS[0]}" ) &
  else
    "$@" </dev/null &
  fi
  pids+=("$!")
  labels+=("$label")
}

stop_all() {  # signal every process group still running
  local p
  for p in ${pids[@]+"${pids[@]}"}; do
    [[ -n "$p" ]] && kill -TERM -- "-$p" 2>/dev/null || true
  done
}

wait_all() {  # returns the first failing process's status (0 if all succeeded)
  local n=${#pids[@]} left=${#pids[@]} status=0 i rc
  local done_=()
  for ((i = 0; i < n; i++)); do done_+=(0); done
  while [[ $left -gt 0 ]]; do
    for ((i = 0; i < n; i++)); do
      [[ ${done_[i]} -eq 0 ]] || continue
      if ! kill -0 "${pids[i]}" 2>/dev/null; then
        rc=0
        wait "${pids[i]}" 2>/dev/null || rc=$?
        done_[i]=1
        left=$((left - 1))
        if [[ $rc -ne 0 && $status -eq 0 ]]; then
          status=$rc
          note "process ${labels[i]} exited with status $rc; stopping the others"
          stop_all
        fi
      fi
    done
    [[ $left -eq 0 ]] || sleep 0.2
  done
  return $status
}

begin_group() {  # before the first start_proc: own process groups, Ctrl-C stops them all
  set -m
  trap 'stop_all; exit 130' INT
  trap 'stop_all; exit 143' TERM
}

finish_group() {  # wait for the processes; exit with the first failure's status
  local status=0
  set +m  # the process groups exist now; without job control bash prints no job notices
  wait_all || status=$?
  trap - INT TERM
  [[ $status -ne 0 ]] || note "all ${#pids[@]} processes finished"
  exit $status
}

jax_env() {  # jax_env ADDRESS N I -> KEY=VALUE words
  printf '%s\n' "JAX_COORDINATOR_ADDRESS=$1" "JAX_NUM_PROCESSES=$2" "JAX_PROCESS_ID=$3"
}

# ---------------------------------------------------------------------------------------------
if [[ -n "$local_n" ]]; then
  is_uint "$local_n" && [[ "$local_n" -ge 1 ]] || die_usage "--local must be a positive integer, got '$local_n'"
  [[ -z "$coordinator" && -z "$num_processes" && -z "$process_id" ]] \
    || die_usage "--local sets --coordinator/--num-processes/--process-id itself"
  [[ -n "$port" ]] || port=$(free_port)
  address="127.0.0.1:$port"
  # GPUs to split.
  gpu_list=""
  if [[ -n "$gpus_opt" ]]; then
    [[ "$gpus_opt" == none ]] || gpu_list="$gpus_opt"
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpu_list="$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    gpu_list=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, - || true)
  fi
  gpu_arr=()
  if [[ -n "$gpu_list" ]]; then
    IFS=, read -r -a gpu_arr <<<"$gpu_list"
    ng=${#gpu_arr[@]}
    [[ $((ng % local_n)) -eq 0 ]] \
      || die_usage "cannot split $ng GPU(s) ($gpu_list) evenly over --local=$local_n processes (use --gpus=LIST)"
    per=$((ng / local_n))
  fi
  [[ $dry_run -eq 1 ]] || begin_group
  for ((i = 0; i < local_n; i++)); do
    words=(env)
    if [[ ${#gpu_arr[@]} -gt 0 ]]; then
      share="${gpu_arr[i * per]}" ids=0
      for ((j = 1; j < per; j++)); do share="$share,${gpu_arr[i * per + j]}"; ids="$ids,$j"; done
      words+=("CUDA_VISIBLE_DEVICES=$share" "JAX_LOCAL_DEVICE_IDS=$ids")
    fi
    while IFS= read -r kv; do words+=("$kv"); done < <(jax_env "$address" "$local_n" "$i")
    words+=(${envs[@]+"${envs[@]}"} "$@")
    if [[ $dry_run -eq 1 ]]; then
      quote "${words[@]}"; echo
    else
      start_proc "$i" "${words[@]}"
    fi
  done
  [[ $dry_run -eq 0 ]] || exit 0
  note "started $local_n local processes, coordinator $address"
  finish_group
fi

if [[ -n "$hosts" ]]; then
  IFS=, read -r -a host_arr <<<"$hosts"
  n=${#host_arr[@]}
  [[ $n -ge 1 ]] || die_usage "--hosts is empty"
  [[ -z "$num_processes" || "$num_processes" == "$n" ]] \
    || die_usage "--num-processes=$num_processes but --hosts lists $n hosts"
  [[ -z "$process_id" ]] || die_usage "--hosts sets --process-id itself (process i runs on host i)"
  if [[ -z "$coordinator" ]]; then
    first="${host_arr[0]##*@}"
    coordinator="$first:${port:-12345}"
  fi
  remote_dir="$(quote1 "$dir")"
  [[ $dry_run -eq 1 ]] || begin_group
  for ((i = 0; i < n; i++)); do
    host="${host_arr[i]}"
    [[ -n "$host" ]] || die_usage "--hosts has an empty entry: '$hosts'"
    exports=""
    while IFS= read -r kv; do exports="$exports ${kv%%=*}=$(quote1 "${kv#*=}")"; done < <(
      jax_env "$coordinator" "$n" "$i"
      [[ -z "$local_ids" ]] || echo "JAX_LOCAL_DEVICE_IDS=$local_ids"
      for kv in ${envs[@]+"${envs[@]}"}; do echo "$kv"; done
    )
    remote="cd $remote_dir"
    for s in ${setups[@]+"${setups[@]}"}; do remote="$remote && $s"; done
    remote="$remote && export$exports && exec $(quote "$@")"
    words=("$ssh_prog" -n -o BatchMode=yes ${ssh_opts[@]+"${ssh_opts[@]}"} "$host" "$remote")
    if [[ $dry_run -eq 1 ]]; then
      quote "${words[@]}"; echo
    else
      start_proc "$i" "${words[@]}"
    fi
  done
  [[ $dry_run -eq 0 ]] || exit 0
  note "started $n processes over ssh, coordinator $coordinator"
  finish_group
fi

# Single-process mode: this host is process I of N.
[[ -n "$coordinator" ]] || die_usage "--coordinator=HOST:PORT is required (or use --hosts / --local)"
if [[ "$coordinator" != ?*:* ]] || ! is_uint "${coordinator##*:}"; then
  die_usage "--coordinator must be HOST:PORT, got '$coordinator'"
fi
[[ -n "$num_processes" ]] || die_usage "--num-processes=N is required"
[[ -n "$process_id" ]] || die_usage "--process-id=I is required"
is_uint "$num_processes" && [[ "$num_processes" -ge 1 ]] \
  || die_usage "--num-processes must be a positive integer, got '$num_processes'"
is_uint "$process_id" && [[ "$process_id" -lt "$num_processes" ]] \
  || die_usage "--process-id must be in 0..$((num_processes - 1)), got '$process_id'"
words=(env)
while IFS= read -r kv; do words+=("$kv"); done < <(jax_env "$coordinator" "$num_processes" "$process_id")
[[ -z "$local_ids" ]] || words+=("JAX_LOCAL_DEVICE_IDS=$local_ids")
words+=(${envs[@]+"${envs[@]}"} "$@")
if [[ $dry_run -eq 1 ]]; then
  quote "${words[@]}"; echo
  exit 0
fi
exec "${words[@]}"
