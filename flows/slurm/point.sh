#!/bin/bash
# One grid point's ranks across the tasks of a Slurm job step, as torchrun agents that meet by
# c10d rendezvous at the allocation's first node (flows/launch.py, flows/training/dist.py):
#
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-task=8 flows/slurm/point.sh \
#       --config results/points/<id>/config.json --shards data/shards --workdir results
#
# Each task starts NMM_PROCS_PER_TASK ranks (default: the task's GPUs, else 1); the run
# config's train.processes must equal the ranks in all (the point refuses otherwise). The
# rendezvous port is NMM_RDZV_PORT (default: derived from the job id).
set -euo pipefail
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
port=${NMM_RDZV_PORT:-$((29500 + SLURM_JOB_ID % 10000))}
gpus=${CUDA_VISIBLE_DEVICES:+$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | wc -l)}
per_task=${NMM_PROCS_PER_TASK:-${gpus:-1}}
exec python -m torch.distributed.run --nnodes="$SLURM_NTASKS" --nproc-per-node="$per_task" \
  --rdzv-backend=c10d --rdzv-endpoint="$head:$port" --rdzv-id="nmm-$SLURM_JOB_ID-$SLURM_STEP_ID" \
  -m flows.train "$@"
