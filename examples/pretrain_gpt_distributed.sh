#!/usr/bin/env bash
# Multi-node GPT pretraining with torchrun. Run this script on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/pretrain_gpt_distributed.sh  # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash examples/pretrain_gpt_distributed.sh  # node 1
#
# Variables (defaults in brackets): GPUS_PER_NODE [8], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [localhost], MASTER_PORT [6000], DATA_PATH, VOCAB_FILE, MERGE_FILE,
# CHECKPOINT_PATH, TP [2], PP [2]. On CPU machines set GPUS_PER_NODE to the ranks per
# node you want; the backend follows the hardware (nccl with GPUs, gloo without).
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
DATA_PATH=${DATA_PATH:?set DATA_PATH to a .bin/.idx prefix, e.g. data/my_text_document}
VOCAB_FILE=${VOCAB_FILE:?set VOCAB_FILE (vocab.json)}
MERGE_FILE=${MERGE_FILE:?set MERGE_FILE (merges.txt)}
CHECKPOINT_PATH=${CHECKPOINT_PATH:-checkpoints/gpt}
TP=${TP:-2}
PP=${PP:-2}

cd "$(dirname "$0")/.."

torchrun \
  --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  examples/pretrain_gpt.py \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \
  --seq-length 2048 --max-position-embeddings 2048 \
  --micro-batch-size 4 --global-batch-size 256 \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 \
  --train-iters 500000 --weight-decay 0.1 --clip-grad 1.0 --bf16 \
  --use-distributed-optimizer --overlap-grad-reduce \
  --data-path "$DATA_PATH" --split 949,50,1 \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
  --log-interval 10 --eval-interval 1000 --eval-iters 10 \
  --save "$CHECKPOINT_PATH" --load "$CHECKPOINT_PATH" --save-interval 1000 \
  --ckpt-format torch_dist --exit-signal-handler
