#!/usr/bin/env bash
# Train through `accelerate launch -m train` on every local GPU, on one or many machines.
#
#   ./launch.sh [hydra overrides]      e.g. ./launch.sh experiment=sdxl_style data.shards='/data/{00000..00999}.tar'
#   ./launch.sh                        the CPU demo: synthetic shards -> toy base -> train -> export -> style grid
#
# Environment (all optional):
#   NUM_MACHINES, MACHINE_RANK, MAIN_ADDRESS, MAIN_PORT   multi-machine rendezvous (filled from SLURM when present)
#   ACCELERATE_CONFIG   ddp (default) | fsdp | deepspeed_zero2 | a path to an Accelerate YAML
#   NUM_GPUS            processes per machine (default: nvidia-smi's GPU count)
#   NUM_CPU_PROCESSES   processes on a machine without GPUs (default 1; >1 uses gloo)
#   RUN_NAME            run folder name under outputs/ (default: the time, or slurm-JOBID); same on every node
#   LAUNCH_DRY_RUN=1    print the accelerate command instead of running it
set -euo pipefail
cd "$(dirname "$0")"

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  else echo 0; fi
}

# SLURM: one `srun ./launch.sh ...` task per node; the first host of the allocation is the main one.
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
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
MAIN_PORT=${MAIN_PORT:-29500}
export RUN_NAME=${RUN_NAME:-$(date +%Y-%m-%d_%H-%M-%S)}  # Hydra's run dir: one folder for every rank

GPUS=${NUM_GPUS:-$(gpu_count)}
CONFIG=${ACCELERATE_CONFIG:-ddp}
[[ -f "$CONFIG" ]] || CONFIG="configs/accelerate/${CONFIG}.yaml"
[[ -f "$CONFIG" ]] || { echo "error: ACCELERATE_CONFIG=${ACCELERATE_CONFIG} — use ddp, fsdp, deepspeed_zero2 or a file" >&2; exit 2; }

# Fills ACCEL_ARGS (and ACCELERATE_USE_CPU for multi-process CPU runs) in this shell.
set_accelerate_args() {
  if (( GPUS == 0 )); then
    local procs=${NUM_CPU_PROCESSES:-1}
    if (( procs > 1 )); then
      # accelerate's --cpu multi-processes only through MPI; torchrun + gloo needs ACCELERATE_USE_CPU instead.
      export ACCELERATE_USE_CPU=1
      ACCEL_ARGS=(--multi_gpu --num_processes "$procs" --main_process_port "$MAIN_PORT")
    else
      ACCEL_ARGS=(--cpu --num_processes 1)
    fi
    ACCEL_ARGS+=(--num_machines 1 --mixed_precision no --dynamo_backend no)
  else
    ACCEL_ARGS=(--config_file "$CONFIG" --num_processes $(( GPUS * NUM_MACHINES )) --num_machines "$NUM_MACHINES"
                --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_ADDRESS" --main_process_port "$MAIN_PORT")
  fi
}

launch() {
  set_accelerate_args
  local cmd=(accelerate launch "${ACCEL_ARGS[@]}" -m train "$@")
  if [[ -n "${LAUNCH_DRY_RUN:-}" ]]; then
    [[ -n "${ACCELERATE_USE_CPU:-}" ]] && printf 'ACCELERATE_USE_CPU=1 '
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}"
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
