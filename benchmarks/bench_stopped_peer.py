"""How long a run takes to end when one rank is stopped (SIGSTOP) or killed (SIGKILL).

    python benchmarks/bench_stopped_peer.py --timeout-minutes 1 --signal STOP
    python benchmarks/bench_stopped_peer.py --timeout-minutes 1 --signal KILL

Starts examples/pretrain_gpt.py under torchrun (2 ranks, tp=2, mock data), signals rank 1
at iteration 3 and prints torchrun's exit status, the seconds until every process was
gone, and the one-line failure report of the surviving rank.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
         "--max-position-embeddings 16 --micro-batch-size 2 --global-batch-size 4 --lr 1e-3 "
         "--mock-data --vocab-size 97 --log-interval 1 --eval-iters 0 --train-iters 100000 "
         "--tensor-model-parallel-size 2").split()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout-minutes", default="1")
    parser.add_argument("--signal", choices=["STOP", "KILL"], default="STOP")
    args = parser.parse_args()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", os.path.join(ROOT, "examples", "pretrain_gpt.py"), *FLAGS,
           "--distributed-timeout-minutes", args.timeout_minutes]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    for line in proc.stdout:
        if "iteration        3/" in line:
            break
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        workers = sorted(int(pid) for pid in f.read().split())
    os.kill(workers[1], getattr(signal, f"SIG{args.signal}"))
    start = time.monotonic()
    rest = proc.stdout.read()
    rc = proc.wait()
    while any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    print(f"SIG{args.signal} rank 1: torchrun exit {rc}, every process gone after "
          f"{time.monotonic() - start:.1f} s")
    print("".join(line for line in rest.splitlines(True) if "failed or timed out" in line))


if __name__ == "__main__":
    main()
