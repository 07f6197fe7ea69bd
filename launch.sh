#!/usr/bin/env bash
# Train through `accelerate launch -m train` on every local GPU, on one or many machines.
#
#   ./launch.sh [hydra overrides]      e.g. ./launch.sh experiment=sdxl_style data.shards='/data/{00000..00999}.tar'
#   ./launch.sh                        the CPU demo: synthetic shards -> toy base -> train -> export -> style grid
#
# Runs in the folder you call it from: relative data.shards and output_dir mean what you typed there.
# Environment (all optional; every number must be a whole number, checked before use; docs/cluster.md):
#   NUM_MACHINES, MACHINE_RANK, MAIN_ADDRESS   multi-machine rendezvous (filled from SLURM when present)
#   MAIN_PORT (or MASTER_PORT)  rendezvous port (default: a free one on one machine, 20000 + SLURM_JOB_ID % 20000
#                       under SLURM, else 29500)
#   ACCELERATE_CONFIG   ddp (default) | fsdp | a path to an Accelerate YAML
#   NUM_GPUS            processes per machine (default: the GPUs CUDA_VISIBLE_DEVICES shows, else nvidia-smi's count)
#   NUM_CPU_PROCESSES   processes on a machine without GPUs (default 1; >1 uses gloo)
#   NUM_CPU_THREADS     threads per CPU process (default: OMP_NUM_THREADS, else the idle cores: instantstyle.threads)
#   RUN_NAME            run folder name under outputs/ (default: the time, or slurm-JOBID); same on every node
#   LAUNCH_DRY_RUN=1    print the accelerate command (its last line) instead of running it; 0 or unset runs
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, wherever we run

fail() { echo "error: $*" >&2; exit 2; }

# Every number read from the environment passes here before any arithmetic: bash evaluates a variable's
# value as an expression inside (( )), so 'x[$(cmd)]' would run cmd and 'abc' would read a variable of
# that name. NAME MIN [MAX]: the variable must hold a whole number in range; it is rewritten in base 10
# ('08' is not octal). Unset or empty variables are left alone (their defaults apply).
check_number() {
  local name=$1 min=$2 max=${3:-999999999} value=${!1:-}
  [[ -z "$value" ]] && return 0
  if [[ ! "$value" =~ ^[0-9]{1,9}$ ]] || (( 10#$value < min || 10#$value > max )); then
    local range="≥ $min"
    (( max < 999999999 )) && range="from $min to $max"
    fail "$name=$value — give a whole number $range"
  fi
  printf -v "$name" '%d' "$(( 10#$value ))"
}

for var in SLURM_JOB_ID SLURM_NODEID SLURM_STEP_NUM_TASKS SLURM_NTASKS SLURM_NTASKS_PER_NODE; do check_number "$var" 0; done
for var in SLURM_NNODES SLURM_STEP_NUM_NODES NUM_MACHINES NUM_CPU_PROCESSES NUM_CPU_THREADS; do
  check_number "$var" 1
done
check_number NUM_GPUS 0
check_number MAIN_PORT 1 65535
check_number MASTER_PORT 1 65535
[[ "${LAUNCH_DRY_RUN:-0}" =~ ^[01]$ ]] || fail "LAUNCH_DRY_RUN=$LAUNCH_DRY_RUN — give 1 (print the command) or 0 (run)"
DRY_RUN=${LAUNCH_DRY_RUN:-0}

# What the machine has: nvidia-smi lists every GPU (none without a driver).
machine_gpus() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}

# The processes only see CUDA_VISIBLE_DEVICES (SLURM sets it to the allocated ones); set-but-empty hides all,
# and CUDA stops reading the list at the first invalid entry.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local id n=0 ids
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    for id in "${ids[@]}"; do
      [[ -z "$id" || "$id" == -* || "$id" == NoDevFiles ]] && break
      n=$(( n + 1 ))
    done
    echo "$n"
  else machine_gpus; fi
}

# accelerate spawns one process per GPU itself: a second srun task on a node would start a second, clashing
# set of ranks. The srun step's own counts describe what runs us; the job's apply when called from the batch script.
check_one_task_per_node() {
  local tasks=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}} nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
  local per_node=1
  [[ -z "${SLURM_STEP_NUM_TASKS:-}" ]] && per_node=${SLURM_NTASKS_PER_NODE:-1}
  if (( tasks > nodes || per_node > 1 )); then
    fail "launch.sh needs one SLURM task per node (srun --ntasks-per-node=1); accelerate starts one process per GPU itself"
  fi
}

# SLURM: one `srun ./launch.sh ...` task per node; the first host of the allocation is the main one.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
  check_one_task_per_node
  NUM_MACHINES=${NUM_MACHINES:-${SLURM_NNODES:-1}}
  MACHINE_RANK=${MACHINE_RANK:-${SLURM_NODEID:-0}}
  if [[ -z "${MAIN_ADDRESS:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MAIN_ADDRESS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  RUN_NAME=${RUN_NAME:-slurm-${SLURM_JOB_ID}}
fi
NUM_MACHINES=${NUM_MACHINES:-1}
MACHINE_RANK=${MACHINE_RANK:-0}
check_number MACHINE_RANK 0 $(( NUM_MACHINES - 1 ))
MAIN_ADDRESS=${MAIN_ADDRESS:-127.0.0.1}
export RUN_NAME=${RUN_NAME:-$(date +%Y-%m-%d_%H-%M-%S)}  # Hydra's run dir: one folder for every rank

GPUS=${NUM_GPUS:-$(visible_gpus)}
CONFIG=${ACCELERATE_CONFIG:-ddp}
[[ -f "$CONFIG" ]] || CONFIG="$REPO/configs/accelerate/${CONFIG}.yaml"
[[ -f "$CONFIG" ]] || fail "ACCELERATE_CONFIG=${ACCELERATE_CONFIG} — use ddp, fsdp or a file"

# Asked-for GPUs must exist (a dry run only prints the command, perhaps for another machine).
check_gpus() {
  (( GPUS == 0 || DRY_RUN )) && return 0
  local have asked
  have=$(machine_gpus)
  asked="NUM_GPUS=$GPUS"
  [[ -z "${NUM_GPUS:-}" ]] && asked="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  if (( have == 0 )); then
    fail "$asked, but this machine has no GPU (nvidia-smi finds none); NUM_GPUS=0 trains on the CPU"
  elif (( GPUS > have )); then
    fail "$asked, but this machine has $have GPU(s); use NUM_GPUS=$have or fewer"
  fi
}

# Every node must compute the same port, so only a lone machine may pick a random free one (another job on the
# same host may hold 29500); SLURM jobs get one from the job id that all their nodes share.
rendezvous_port() {
  if [[ -n "${MAIN_PORT:-${MASTER_PORT:-}}" ]]; then echo "${MAIN_PORT:-$MASTER_PORT}"
  elif (( NUM_MACHINES == 1 )); then
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null ||
      echo 29500
  elif [[ -n "${SLURM_JOB_ID:-}" ]]; then echo $(( 20000 + SLURM_JOB_ID % 20000 ))
  else echo 29500; fi
}

# Fills ACCEL_ARGS (and ACCELERATE_USE_CPU for multi-process CPU runs) in this shell.
set_accelerate_args() {
  if (( GPUS == 0 )); then
    local procs=${NUM_CPU_PROCESSES:-1}
    # accelerate gives a lone --cpu process every core as threads; with busy cores that costs more than it gains
    # (2-core machine shared with other jobs: 69-79 samples/s with 1 thread, 5.4-5.8 with 2). The library's
    # choice (the idle cores shared by the processes) is the one python -m train makes by itself.
    [[ -z "${NUM_CPU_THREADS:-}" ]] && check_number OMP_NUM_THREADS 1  # only read here (OpenMP also takes lists)
    local threads=${NUM_CPU_THREADS:-${OMP_NUM_THREADS:-$(python -m instantstyle.threads --processes "$procs" || echo 1)}}
    export OMP_NUM_THREADS=$threads  # also for the launcher and the demo's other steps
    if (( procs > 1 )); then
      # accelerate's --cpu multi-processes only through MPI; torchrun + gloo needs ACCELERATE_USE_CPU instead.
      export ACCELERATE_USE_CPU=1
      ACCEL_ARGS=(--multi_gpu --num_processes "$procs" --main_process_port "$(rendezvous_port)")
    else
      ACCEL_ARGS=(--cpu --num_processes 1)
    fi
    ACCEL_ARGS+=(--num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process "$threads")
  else
    ACCEL_ARGS=(--config_file "$CONFIG" --num_processes $(( GPUS * NUM_MACHINES )) --num_machines "$NUM_MACHINES"
                --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_ADDRESS"
                --main_process_port "$(rendezvous_port)")
  fi
}

# Bash runs no trap while a foreground child runs, so SLURM's or torchrun's SIGTERM would kill this shell and
# orphan training. Instead the child runs in the background in its own process group (set -m) and every
# TERM/INT goes to that whole group: each rank checkpoints and exits, and we exit with the launcher's status.
# The traps go in before the child starts: a signal that came in between would otherwise be lost and
# `wait` would never return. One that comes before the child exists is passed on once it does.
run_forwarding_signals() {
  local rc again
  CAUGHT=0 CHILD="" PENDING=""
  trap 'forward_signal TERM' TERM
  trap 'forward_signal INT' INT
  set -m
  "$@" </dev/null &  # a background group that read the terminal would stop (SIGTTIN); training reads no input
  CHILD=$!
  set +m
  if [[ -n "$PENDING" ]]; then
    kill -s "$PENDING" -- "-$CHILD" 2>/dev/null || true
  fi
  wait "$CHILD" && rc=0 || rc=$?
  if (( CAUGHT )); then
    while (( CAUGHT )); do  # a trapped signal makes `wait` return early while the child still runs
      CAUGHT=0
      wait "$CHILD" 2>/dev/null && again=0 || again=$?
      (( again == 127 )) || rc=$again  # 127: the child's status was already collected just before the signal
    done
    # accelerate's one-process launcher dies at once, while the trainer it started (same group) still
    # writes its checkpoint: return only when the whole group is gone, before SLURM cleans up the step.
    while kill -0 -- "-$CHILD" 2>/dev/null; do sleep 0.2; done
  fi
  trap - TERM INT
  return "$rc"
}

forward_signal() {
  CAUGHT=1
  if [[ -z "$CHILD" ]]; then
    PENDING=$1
    return
  fi
  kill -s "$1" -- "-$CHILD" 2>/dev/null || true
}

# accelerate --quiet drops the launcher's own traceback (CalledProcessError, ChildFailedError) when training
# fails; a mistake the trainer reports (config, checkpoint) goes to INSTANTSTYLE_ERROR_FILE instead of stderr,
# and is the last line we print.
launch() {
  set_accelerate_args
  local cmd=(accelerate launch --quiet "${ACCEL_ARGS[@]}" -m train "$@")
  if (( DRY_RUN )); then
    [[ -n "${ACCELERATE_USE_CPU:-}" ]] && printf 'ACCELERATE_USE_CPU=1 '
    printf '%q ' "${cmd[@]}"; echo
    return 0
  fi
  check_gpus
  # Every check a run makes before loading models, once here: a mistake is one line, not a failure per rank
  # under the launcher's report (that report remains for errors only training can meet).
  INSTANTSTYLE_ERROR_FILE="" python -m train.preflight "$@" || return 2
  local rc=0
  export INSTANTSTYLE_ERROR_FILE
  INSTANTSTYLE_ERROR_FILE=$(mktemp "${TMPDIR:-/tmp}/launch-error.XXXXXX")
  run_forwarding_signals "${cmd[@]}" || rc=$?
  if (( rc != 0 )) && [[ -s "$INSTANTSTYLE_ERROR_FILE" ]]; then
    head -n 1 "$INSTANTSTYLE_ERROR_FILE" >&2
    rc=2
  fi
  rm -f "$INSTANTSTYLE_ERROR_FILE"
  return "$rc"
}

demo() {
  # Toy world (the committed toy base, 64 px): shards -> style-block adapter -> export -> style x prompt grid.
  local shards=demo/shards out="outputs/demo-${RUN_NAME}"
  local args=(experiment=demo data.shards="$shards/*.tar" output_dir="$out")
  if (( DRY_RUN )); then launch "${args[@]}"; return; fi
  [[ -f "$shards/manifest.json" ]] ||
    python -m data_tools.synthetic --out "$shards" --num 2000 --size 64 --per-shard 500 --captions content
  [[ -f demo/prompts.txt ]] || python -m data_tools.toy_demo_assets --out demo
  launch "${args[@]}"
  python -m instantstyle.evaluate --base "$REPO/data_tools/toy_base" --adapter "$out/ip-adapter.safetensors" \
    --styles demo/styles --prompts demo/prompts.txt --content-scale 0,0.5 --steps 20 --height 64 --width 64 \
    --cell 96 --out "$out/eval"
  echo "demo done: adapter $out/ip-adapter.safetensors; grid (style x prompt, without/with content subtraction):"
  echo "  $out/eval/grid.png   (metrics: $out/eval/metrics.md)"
}

if (( $# == 0 )); then demo; else launch "$@"; fi
