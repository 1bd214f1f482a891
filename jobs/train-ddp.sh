#!/usr/bin/env bash
# Multi-GPU / multi-node fine-tuning with torchrun (PyTorch DDP): the same train/train.py, one process per GPU.
# Run this on every node of the job (e.g. from a Slurm batch script or a Kubernetes indexed Job), with:
#   NNODES        number of nodes                     (default 1)
#   NODE_RANK     this node's index, 0..NNODES-1      (default 0; Slurm: $SLURM_NODEID)
#   MASTER_ADDR   host name of node 0                 (default localhost)
#   GPUS          processes (GPUs) per node           (default: all visible GPUs)
#   DATA          ROOT/<class>/*.jpg on a path every node sees
#   SPLIT         the split manifest from `make train` (runs/train/split.json), so every rank and every
#                 later step use the same train/val/test files
#   OUT           checkpoint folder (rank 0 writes it)
# Extra arguments go to train.train, e.g. --model efficientnet_lite2 --epochs 10 --input_size 224.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
GPUS=${GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" \
  -m train.train --data "${DATA:?set DATA}" --split "${SPLIT:?set SPLIT}" --out_dir "${OUT:-runs/ddp}" "$@"
