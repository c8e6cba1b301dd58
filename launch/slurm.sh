#!/usr/bin/env bash
# shellcheck disable=SC2016  # the batch script's $VARIABLES are written unexpanded on purpose
# Write an sbatch script that runs one command on N nodes x G GPUs under SLURM, and submit it.
#
# Usage:
#   launch/slurm.sh --nodes=N [--gpus-per-node=G] [FLAGS] [--dry-run] -- COMMAND...
#
# One JAX process per node (default, --one-process-per=node): srun starts one task per node and
# that process drives all G local GPUs. This is the simplest layout for JAX: one
# jax.distributed client per host, one data-loading pipeline per host (the input pipeline
# shards by jax.process_index()), and no per-GPU process bookkeeping.
# --one-process-per=gpu starts G tasks per node, each owning one GPU (what JAX's own SLURM
# auto-detection assumes); use it where the cluster binds one GPU per task.
#
# The batch script sets, for every task (see launch/README.md):
#   JAX_COORDINATOR_ADDRESS  first host of $SLURM_JOB_NODELIST (scontrol show hostnames):PORT
#   JAX_COORDINATOR_PORT     PORT (--port, default 61440 + SLURM_JOB_ID % 4096, as JAX picks it)
#   JAX_LOCAL_DEVICE_IDS     0,...,G-1 per node, or SLURM_LOCALID per GPU task
#   JAX_NUM_PROCESSES        SLURM_NTASKS          } read by the trainer; jax.distributed.initialize()
#   JAX_PROCESS_ID           SLURM_PROCID          } itself takes them from SLURM_NTASKS/SLURM_PROCID
#
# Flags (--flag=value or --flag value):
#   --nodes=N              number of nodes (required)
#   --gpus-per-node=G      GPUs per node (default: 8)
#   --one-process-per=M    node (default) or gpu
#   --job-name=NAME        (default: coordtok)
#   --partition=P  --account=A  --qos=Q  --time=T (e.g. 48:00:00)  --cpus-per-task=C  --mem=M
#   --exclusive            whole nodes
#   --output=PATH          SLURM log (default: slurm-%x-%j.out in --chdir)
#   --chdir=DIR            directory the job runs in (default: the current directory)
#   --port=PORT            coordinator port (default: derived from the job id)
#   --setup=CMD            shell line run in the batch script before srun (repeatable), e.g.
#                          --setup='source ~/venvs/coordtok/bin/activate'
#   --env=KEY=VALUE        export in the batch script (repeatable; srun passes it on)
#   --sbatch-arg=ARG       extra '#SBATCH ARG' line (repeatable), e.g. --sbatch-arg=--constraint=h100
#   --srun-arg=ARG         extra srun flag (repeatable), e.g. --srun-arg=--cpu-bind=none
#   --script=PATH          where to write the batch script (default: a new file under $TMPDIR)
#   --dry-run              print the batch script and the sbatch command; write and submit nothing
#   -h, --help             this text
#
# Examples:
#   # 4 nodes x 8 H100, stage 1 of the paper's L run
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=72:00:00 \
#       --setup='source ~/venvs/coordtok/bin/activate' -- \
#       python -m coordtok_jax.train --config=configs/coordtok.py:L,stage=1 \
#       --workdir=/checkpoints/coordtok/L_stage1 --config.model.dtype=bfloat16
#   # inspect first
#   launch/slurm.sh --nodes=2 --dry-run -- python -m coordtok_jax.train --config=configs/coordtok.py:tiny --workdir=/tmp/w
set -euo pipefail

PROG="launch/slurm.sh"

usage() { sed -n '3,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

nodes="" gpus=8 per="node" job_name="coordtok" partition="" account="" qos="" time_limit=""
cpus="" mem="" exclusive=0 output="slurm-%x-%j.out" chdir="$PWD" port="" script="" dry_run=0
setups=() envs=() sbatch_args=() srun_args=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift; continue ;;
    --exclusive) exclusive=1; shift; continue ;;
    --*=*) key="${arg%%=*}" val="${arg#*=}"; shift ;;
    --sbatch-arg|--srun-arg) [[ $# -ge 2 ]] || die_usage "$arg needs a value"
         key="$arg" val="$2"; shift 2 ;;
    --*) [[ $# -ge 2 && "$2" != --* ]] || die_usage "$arg needs a value ($arg=VALUE)"
         key="$arg" val="$2"; shift 2 ;;
    *) die_usage "unknown argument '$arg' (put the command after --)" ;;
  esac
  case "$key" in
    --nodes) nodes="$val" ;;
    --gpus-per-node) gpus="$val" ;;
    --one-process-per) per="$val" ;;
    --job-name) job_name="$val" ;;
    --partition) partition="$val" ;;
    --account) account="$val" ;;
    --qos) qos="$val" ;;
    --time) time_limit="$val" ;;
    --cpus-per-task) cpus="$val" ;;
    --mem) mem="$val" ;;
    --output) output="$val" ;;
    --chdir) chdir="$val" ;;
    --port) port="$val" ;;
    --setup) setups+=("$val") ;;
    --env)
      [[ "$val" == *=* && "${val%%=*}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die_usage "--env needs KEY=VALUE, got '$val'"
      envs+=("$val") ;;
    --sbatch-arg) sbatch_args+=("$val") ;;
    --srun-arg) srun_args+=("$val") ;;
    --script) script="$val" ;;
    *) die_usage "unknown flag '$key'" ;;
  esac
done

[[ -n "$nodes" ]] || die_usage "--nodes=N is required"
is_uint "$nodes" && [[ "$nodes" -ge 1 ]] || die_usage "--nodes must be a positive integer, got '$nodes'"
is_uint "$gpus" && [[ "$gpus" -ge 1 ]] || die_usage "--gpus-per-node must be a positive integer, got '$gpus'"
[[ "$per" == node || "$per" == gpu ]] || die_usage "--one-process-per must be 'node' or 'gpu', got '$per'"
[[ -z "$port" ]] || { is_uint "$port" && [[ "$port" -ge 1 && "$port" -le 65535 ]]; } \
  || die_usage "--port must be 1..65535, got '$port'"
[[ $# -gt 0 ]] || die_usage "no command given after --"

if [[ "$per" == node ]]; then tasks_per_node=1; else tasks_per_node=$gpus; fi
num_processes=$((nodes * tasks_per_node))
all_ids=0
for ((i = 1; i < gpus; i++)); do all_ids="$all_ids,$i"; done
[[ -n "$script" ]] || script="${TMPDIR:-/tmp}/${job_name}.$(date +%Y%m%d-%H%M%S).$$.sbatch"

# ---------------------------------------------------------------------------------------------
# The per-task wrapper srun runs: sets the per-process variables, then execs the command.
if [[ "$per" == node ]]; then
  task_env="export JAX_LOCAL_DEVICE_IDS=$all_ids"
else
  # One GPU per task. If SLURM already narrowed CUDA_VISIBLE_DEVICES to this task's GPU, it is
  # device 0 inside the process; otherwise it is device SLURM_LOCALID.
  task_env='case "${CUDA_VISIBLE_DEVICES:-}" in *,*|"") export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID" ;; *) export JAX_LOCAL_DEVICE_IDS=0 ;; esac'
fi
task_script='export JAX_PROCESS_ID="$SLURM_PROCID" JAX_NUM_PROCESSES="${SLURM_NTASKS:-'"$num_processes"'}"; '"$task_env"'; exec "$@"'

generate() {
  local a kv
  echo "#!/usr/bin/env bash"
  echo "# Generated by $PROG on $(date -u +%Y-%m-%dT%H:%M:%SZ): $nodes node(s) x $gpus GPU(s), one JAX process per $per ($num_processes in all)."
  echo "#SBATCH --job-name=$(quote1 "$job_name")"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gres=gpu:$gpus"
  [[ -n "$cpus" ]] && echo "#SBATCH --cpus-per-task=$cpus"
  [[ -n "$mem" ]] && echo "#SBATCH --mem=$mem"
  [[ -n "$partition" ]] && echo "#SBATCH --partition=$partition"
  [[ -n "$account" ]] && echo "#SBATCH --account=$account"
  [[ -n "$qos" ]] && echo "#SBATCH --qos=$qos"
  [[ -n "$time_limit" ]] && echo "#SBATCH --time=$time_limit"
  [[ $exclusive -eq 1 ]] && echo "#SBATCH --exclusive"
  echo "#SBATCH --output=$output"
  for a in ${sbatch_args[@]+"${sbatch_args[@]}"}; do echo "#SBATCH $a"; done
  echo "set -eo pipefail  # -u after the set-up lines (activate scripts and 'module' use unset variables)"
  echo "cd $(quote1 "$chdir")"
  for a in ${setups[@]+"${setups[@]}"}; do echo "$a"; done
  echo "set -u"
  for kv in ${envs[@]+"${envs[@]}"}; do echo "export ${kv%%=*}=$(quote1 "${kv#*=}")"; done
  echo ""
  echo "# JAX coordinator: process 0 runs on the first node of the allocation."
  echo 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
  if [[ -n "$port" ]]; then
    echo "export JAX_COORDINATOR_PORT=$port"
  else
    echo 'export JAX_COORDINATOR_PORT=$((61440 + SLURM_JOB_ID % 4096))'
  fi
  echo 'export JAX_COORDINATOR_ADDRESS="$head_node:$JAX_COORDINATOR_PORT"'
  echo "export JAX_NUM_PROCESSES=$num_processes"
  echo 'export PYTHONUNBUFFERED=1'
  echo 'echo "coordinator $JAX_COORDINATOR_ADDRESS, '"$num_processes"' process(es), nodes $SLURM_JOB_NODELIST"'
  echo ""
  printf 'srun --nodes=%s --ntasks-per-node=%s --kill-on-bad-exit=1' "$nodes" "$tasks_per_node"
  for a in ${srun_args[@]+"${srun_args[@]}"}; do printf ' %s' "$(quote1 "$a")"; done
  printf ' \\\n  bash -c %s coordtok-task \\\n  %s\n' "$(quote1 "$task_script")" "$(quote "$@")"
}

submit=(sbatch "$script")
if [[ $dry_run -eq 1 ]]; then
  generate "$@"
  echo
  quote "${submit[@]}"; echo
  exit 0
fi
command -v sbatch >/dev/null 2>&1 || { echo "$PROG: error: sbatch is not installed (run this on a SLURM login node, or use --dry-run)" >&2; exit 127; }
mkdir -p "$(dirname "$script")"
generate "$@" >"$script"
echo "$PROG: wrote $script" >&2
echo "+ $(quote "${submit[@]}")" >&2
"${submit[@]}"
