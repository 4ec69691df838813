#!/bin/bash
# Pretraining on a Slurm cluster: one torchrun per node, meeting at a c10d rendezvous on the first node.
#
#   sbatch examples/slurm_pretrain.sh                   # the gpt2-124m recipe on 2 nodes x 8 GPUs
#   sbatch --nodes 4 examples/slurm_pretrain.sh         # more nodes: the same script
#
# Edit DATA, OUT and RECIPE below (or export them before sbatch). Rerunning (or a requeue after a node
# failure) resumes from the last complete checkpoint, on any number of nodes: the checkpoint keeps the
# tokens per step and rescales the accumulation (README: "From laptop to cluster").
#SBATCH --job-name=lmforge-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out

set -euo pipefail
RECIPE=${RECIPE:-gpt2-124m}          # a packaged config (lmforge/recipes) or a YAML path
DATA=${DATA:-runs/gpt2/shards}       # made by `lmforge data tokenize` on a shared filesystem
OUT=${OUT:-runs/gpt2/run}            # on the shared filesystem too: rank 0 writes checkpoints there
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
# Keep the tokens per step of a recipe written for 8 GPUs: divide its grad_accum by the number of nodes
# (gpt2-124m: 4 on one node -> 2 on 2 nodes -> 1 on 4 nodes).
ACCUM=${ACCUM:-}
EXTRA=()
[ -n "$ACCUM" ] && EXTRA+=(--grad-accum "$ACCUM")

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m lmforge pretrain --config "$RECIPE" --data "$DATA" --out "$OUT" "${EXTRA[@]}"
