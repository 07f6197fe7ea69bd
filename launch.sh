#!/usr/bin/env bash
# Train through `accelerate launch -m train` on every local GPU, on one or many machines.
#
#   ./launch.sh [hydra overrides]      e.g. ./launch.sh experiment=sdxl_style data.shards='/data/{00000..00999}.tar'
#   ./launch.sh                        the CPU demo: synthetic shards -> toy base -> train -> export -> style grid
#
# Environment (all optional):
#   NUM_MACHINES, MACHINE_RANK, MAIN_ADDRESS   multi-machine rendezvous (filled from SLURM when present)
#   MAIN_PORT (or MASTER_PORT)  rendezvous port (default: a free one on one machine, 20000 + SLURM_JOB_ID % 20000
#                       under SLURM, else 29500)
#   ACCELERATE_CONFIG   ddp (default) | fsdp | deepspeed_zero2 | a path to an Accelerate YAML
#   NUM_GPUS            processes per machine (default: the GPUs CUDA_VISIBLE_DEVICES shows, else nvidia-smi's count)
#   NUM_CPU_PROCESSES   processes on a machine without GPUs (default 1; >1 uses gloo)
#   NUM_CPU_THREADS     threads per CPU process (default: OMP_NUM_THREADS, else 1)
#   RUN_NAME            run folder name under outputs/ (default: the time, or slurm-JOBID); same on every node
#   LAUNCH_DRY_RUN=1    print the accelerate command instead of running it
set -euo pipefail
cd "$(dirname "$0")"

# nvidia-smi lists every GPU of the machine, but the processes only see CUDA_VISIBLE_DEVICES (SLURM sets it to
# the allocated ones); set-but-empty hides all, and CUDA stops reading the list at the first invalid entry.
gpu_count() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local id n=0 ids
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    for id in "${ids[@]}"; do
      [[ -z "$id" || "$id" == -* || "$id" == NoDevFiles ]] && break
      n=$(( n + 1 ))
    done
    echo "$n"
  elif command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}

# accelerate spawns one process per GPU itself: a second srun task on a node would start a second, clashing
# set of ranks. The srun step's own counts describe what runs us; the job's apply when called from the batch script.
check_one_task_per_node() {
  local tasks=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}} nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}
  local per_node=1
  [[ -z "${SLURM_STEP_NUM_TASKS:-}" ]] && per_node=${SLURM_NTASKS_PER_NODE:-1}
  if (( tasks > nodes || per_node > 1 )); then
    echo "error: launch.sh needs one SLURM task per node (srun --ntasks-per-node=1);" \
         "accelerate starts one process per GPU itself" >&2
    exit 2
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
MAIN_ADDRESS=${MAIN_ADDRESS:-127.0.0.1}
export RUN_NAME=${RUN_NAME:-$(date +%Y-%m-%d_%H-%M-%S)}  # Hydra's run dir: one folder for every rank

GPUS=${NUM_GPUS:-$(gpu_count)}
CONFIG=${ACCELERATE_CONFIG:-ddp}
[[ -f "$CONFIG" ]] || CONFIG="configs/accelerate/${CONFIG}.yaml"
[[ -f "$CONFIG" ]] || { echo "error: ACCELERATE_CONFIG=${ACCELERATE_CONFIG} — use ddp, fsdp, deepspeed_zero2 or a file" >&2; exit 2; }

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
    # accelerate gives a lone --cpu process every core as threads; on the small demo model that costs more than it
    # gains (2-core machine shared with other jobs: 69-79 samples/s with 1 thread, 5.4-5.8 with 2).
    local threads=${NUM_CPU_THREADS:-${OMP_NUM_THREADS:-1}}
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
run_forwarding_signals() {
  set -m
  "$@" </dev/null &  # a background group that read the terminal would stop (SIGTTIN); training reads no input
  CHILD=$!
  set +m
  trap 'forward_signal TERM' TERM
  trap 'forward_signal INT' INT
  local rc again
  CAUGHT=0
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
  kill -s "$1" -- "-$CHILD" 2>/dev/null || true
}

launch() {
  set_accelerate_args
  local cmd=(accelerate launch "${ACCEL_ARGS[@]}" -m train "$@")
  if [[ -n "${LAUNCH_DRY_RUN:-}" ]]; then
    [[ -n "${ACCELERATE_USE_CPU:-}" ]] && printf 'ACCELERATE_USE_CPU=1 '
    printf '%q ' "${cmd[@]}"; echo
  else
    run_forwarding_signals "${cmd[@]}"
  fi
}

demo() {
  # Toy world (data_tools/toy_base, 64 px): shards -> style-block adapter -> export -> style x prompt grid.
  local shards=demo/shards out="outputs/demo-${RUN_NAME}"
  local args=(experiment=demo data.shards="$shards/*.tar" output_dir="$out")
  if [[ -n "${LAUNCH_DRY_RUN:-}" ]]; then launch "${args[@]}"; return; fi
  [[ -f "$shards/manifest.json" ]] ||
    python -m data_tools.synthetic --out "$shards" --num 2000 --size 64 --per-shard 500 --captions content
  [[ -f demo/prompts.txt ]] || python -m data_tools.toy_demo_assets --out demo
  launch "${args[@]}"
  python -m instantstyle.evaluate --base data_tools/toy_base --adapter "$out/ip-adapter.safetensors" \
    --styles demo/styles --prompts demo/prompts.txt --content-scale 0,0.5 --steps 20 --height 64 --width 64 \
    --cell 96 --out "$out/eval"
  echo "demo done: adapter $out/ip-adapter.safetensors; grid (style x prompt, without/with content subtraction):"
  echo "  $out/eval/grid.png   (metrics: $out/eval/metrics.md)"
}

if (( $# == 0 )); then demo; else launch "$@"; fi
