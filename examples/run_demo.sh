#!/usr/bin/env bash
# megacore end to end on the bundled corpus, offline, on CPU:
#   1. tokenize examples/data/demo_corpus.jsonl into Megatron's .bin/.idx
#   2. pretrain a small GPT with tensor parallel 2 x pipeline parallel 2 on 4 gloo ranks,
#      saving a distributed (torch_dist) checkpoint
#   3. generate text greedily from that checkpoint in one process (resharded on load)
#
# Environment: DEMO_OUTPUT (default demo_output), DEMO_TRAIN_ITERS (default 300).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUTPUT:-demo_output}
ITERS=${DEMO_TRAIN_ITERS:-300}
DATA=examples/data
export OMP_NUM_THREADS=1
# Print as it happens when this script's output is piped (python block-buffers a pipe).
export PYTHONUNBUFFERED=1

mkdir -p "$OUT/data"
rm -rf "$OUT/checkpoints" "$OUT/train_log.jsonl"

echo "== 1/3 preprocess: $DATA/demo_corpus.jsonl -> $OUT/data/demo_text_document.{bin,idx}"
python tools/preprocess_data.py --input "$DATA/demo_corpus.jsonl" --output-prefix "$OUT/data/demo" \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/vocab.json" \
  --merge-file "$DATA/merges.txt" --append-eod --workers 2

echo "== 2/3 pretrain: $ITERS iterations, tp=2 x pp=2 on 4 gloo ranks"
python -m torch.distributed.run --standalone --nproc-per-node 4 examples/pretrain_gpt.py \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 \
  --group-query-attention --swiglu --normalization RMSNorm --position-embedding-type rope \
  --untie-embeddings-and-output-weights --disable-bias-linear \
  --seq-length 128 --max-position-embeddings 128 --hidden-dropout 0 --attention-dropout 0 \
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS" \
  --lr 5e-3 --min-lr 5e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.01 \
  --use-distributed-optimizer \
  --data-path "$OUT/data/demo_text_document" --split 95,5,0 \
  --tokenizer-type GPT2BPETokenizer --vocab-file "$DATA/vocab.json" \
  --merge-file "$DATA/merges.txt" \
  --log-interval 10 --eval-interval 100 --eval-iters 2 --log-jsonl "$OUT/train_log.jsonl" \
  --save "$OUT/checkpoints" --save-interval "$ITERS" --ckpt-format torch_dist

python - "$OUT/train_log.jsonl" <<'PY'
import json, sys
losses = [r["lm_loss"] for r in map(json.loads, open(sys.argv[1])) if "lm_loss" in r]
first, last = losses[0], losses[-1]
print(f"training loss: {first:.3f} (iteration 10) -> {last:.3f} (last logged)")
if not last < 0.8 * first:
    sys.exit(f"the loss did not fall clearly ({first:.3f} -> {last:.3f})")
PY

echo "== 3/3 generate: greedy, from the checkpoint, in one process (tp=1 x pp=1)"
python examples/generate_from_checkpoint.py --load "$OUT/checkpoints" --tokens-to-generate 32 \
  --prompt "Return the" --prompt "This module provides" 2>&1 \
  | grep --line-buffered -v "^W1\|UserWarning\|warnings.warn"

echo
echo "outputs:"
echo "  tokenized corpus   $OUT/data/demo_text_document.{bin,idx}"
echo "  training log       $OUT/train_log.jsonl (resolved configuration: $OUT/resolved_config.json)"
echo "  checkpoint         $OUT/checkpoints (inspect: python tools/checkpoint/inspect.py $OUT/checkpoints)"
