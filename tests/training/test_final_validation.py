"""The validation loss at the last iteration is evaluated once: when the last iteration
is a multiple of --eval-interval the loop's evaluation is the final one (a second one
on the next batches printed a different loss for the same weights)."""

import json
import shlex

from tests.multirank import run_distributed
from tests.training.test_pretrain_gpt import _run_pretrain

MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 2 --lr 1e-2 "
         "--mock-data --vocab-size 97 --log-interval 1 --eval-iters 1 --eval-interval 2")


def _validation_records(tmp_path, iters):
    log = tmp_path / f"{iters}.jsonl"
    run_distributed(_run_pretrain, 1, args=(shlex.split(f"{MODEL} --train-iters {iters} "
                                                         f"--log-jsonl {log}"),), timeout=120)
    with open(log) as f:
        return [(r["iteration"], sorted(k for k in r if k.startswith("validation")))
                for r in map(json.loads, f) if any(k.startswith("validation") for k in r)]


def test_one_validation_at_the_last_iteration(tmp_path):
    # 4 is a multiple of --eval-interval 2: evaluated at 2 and 4, not again at the end.
    assert [it for it, _ in _validation_records(tmp_path, 4)] == [2, 4]
    # 3 is not: evaluated at 2, then once at the end of training.
    records = _validation_records(tmp_path, 3)
    assert [it for it, _ in records] == [2, 3]
    assert any("end of training" in key for key in records[1][1])
