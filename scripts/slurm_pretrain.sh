#!/usr/bin/env bash
# Pretrain on SLURM: one task per node, torchrun starts one process per GPU on each node.
#   sbatch --nodes 4 scripts/slurm_pretrain.sh configs/pretrain/mae_vit_large_in1k.yaml [KEY=VALUE ...]
#SBATCH --job-name=mimkit-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=72:00:00
#SBATCH --requeue
set -euo pipefail
config=${1:?usage: sbatch scripts/slurm_pretrain.sh CONFIG [KEY=VALUE ...]}
shift
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_PER_NODE:-8}
resume=()
# a requeued job (preempted or failed node) continues from the run's latest complete checkpoint
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then resume=(--resume); fi
srun torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "${gpus##*:}" \
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:29500" \
    --max-restarts 3 \
    -m mimkit.cli pretrain -c "$config" "$@" "${resume[@]}"
