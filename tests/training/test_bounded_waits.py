"""A stopped peer never hangs a run: every collective and pipeline exchange, the default
process group's included, is bounded by ``--distributed-timeout-minutes``.

Two ranks of ``examples/pretrain_gpt.py`` (tp=2) rendezvous through the environment as
under torchrun; rank 1 is SIGSTOPped mid-training. Rank 0 must exit non-zero with a line
naming the failed operation within about the timeout (0.25 min here to keep the suite
fast; the 1-minute torchrun version of this check is in docs/hostile_inputs.md).
"""

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_gpt.py")
FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 --lr 1e-3 "
         "--mock-data --vocab-size 97 --log-interval 1 --eval-iters 0 --train-iters 100000 "
         "--tensor-model-parallel-size 2 --distributed-timeout-minutes 0.25").split()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stopped_peer_ends_the_run_within_the_timeout(tmp_path):
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        out = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, SCRIPT] + FLAGS, stdout=out,
                                      stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    try:
        deadline = time.monotonic() + 120
        log1 = tmp_path / "rank1.log"  # the last rank prints the iteration lines
        while "iteration        3/" not in log1.read_text():
            assert time.monotonic() < deadline, log1.read_text()[-3000:]
            assert procs[0].poll() is None and procs[1].poll() is None
            time.sleep(0.2)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        rc = procs[0].wait(timeout=90)  # 15 s timeout + slack for a loaded machine
        waited = time.monotonic() - stopped
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    log0 = (tmp_path / "rank0.log").read_text()
    assert rc != 0
    assert waited >= 14, waited  # the timeout, not some other failure
    assert "failed or timed out (--distributed-timeout-minutes 0.25)" in log0, log0[-3000:]
    assert "Timed out waiting 15000ms" in log0
