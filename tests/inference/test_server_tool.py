"""tools/run_text_generation_server.py and tools/text_generation_cli.py end to end.

A checkpoint is trained for a few steps by examples/pretrain_gpt.py (tp=1, pp=1,
distributed format), then served under torchrun at pp=2 with only ``--load`` and the
layout given (model flags come from the checkpoint). The CLI's greedy text must equal
what a single process generates from the same checkpoint, and the server must shut
down all ranks on SIGINT.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from megacore.training.arguments import ArgumentValidationError, parse_args, run_config_to_dict
from tests.multirank import run_distributed
from tools import run_text_generation_server as tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "examples", "data")
TRAIN = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "64", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr", "1e-2", "--train-iters", "3", "--mock-data",
         "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
         os.path.join(DATA, "vocab.json"), "--merge-file", os.path.join(DATA, "merges.txt"),
         "--eval-iters", "0", "--ckpt-format", "torch_dist", "--swiglu",
         "--position-embedding-type", "rope", "--normalization", "RMSNorm",
         "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
PROMPT = "def parse"


def test_checkpoint_config_becomes_the_same_model():
    run = parse_args(TRAIN + ["--num-query-groups", "2", "--group-query-attention",
                              "--qk-layernorm", "--bf16"], world_size=1)
    saved = run_config_to_dict(run)
    again = parse_args([], world_size=1, checkpoint_config=saved, for_inference=True)
    restored = run_config_to_dict(again)
    for section in ("model", "gpt"):
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                      "num_query_groups", "kv_channels", "normalization", "gated_linear_unit",
                      "activation_func", "add_bias_linear", "qk_layernorm", "params_dtype",
                      "bf16", "position_embedding_type", "max_position_embeddings",
                      "untie_embeddings_and_output_weights", "rotary_base"):
            if field in saved[section]:
                assert restored[section][field] == saved[section][field], (section, field)
    assert restored["data"]["vocab_file"] == saved["data"]["vocab_file"]
    # Model flags that agree with the checkpoint are fine; one that does not is an error.
    parse_args(["--hidden-size", "32"], world_size=1, checkpoint_config=saved,
               for_inference=True)
    with pytest.raises(ArgumentValidationError,
                       match=r"--hidden-size 64 does not match the value 32 saved in ckpt/x"):
        parse_args(["--hidden-size", "64"], world_size=1, checkpoint_config=saved,
                   checkpoint_path="ckpt/x", for_inference=True)


def _reference_tokens(load_dir):
    run, args = tool.parse_serving_args(["--load", load_dir, "--max-batch-size", "2"])
    controller = tool.build_controller(run, args)
    from megacore.inference import GenerationRequest, SamplingParams

    tokenizer = tool.get_tokenizer(run)
    result = controller.generate([GenerationRequest(tokenizer.tokenize(PROMPT), 12,
                                                    SamplingParams(temperature=0.0))])[0]
    return tokenizer.detokenize(result.tokens)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port, process, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early:\n{process.stdout.read()[-4000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    pytest.fail("server did not become healthy")


@pytest.mark.slow
def test_serve_a_checkpoint_at_pp2_and_query_it_with_the_cli(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    ckpt = str(tmp_path / "ckpt")
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_gpt.py"), *TRAIN,
                    "--save", ckpt], check=True, env=env, capture_output=True, timeout=120)
    expected = run_distributed(_reference_tokens, world_size=1, args=(ckpt,), timeout=120)[0]

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(ROOT, "tools", "run_text_generation_server.py"), "--load", ckpt,
         "--pipeline-model-parallel-size", "2", "--port", str(port), "--max-batch-size", "4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        _wait_healthy(port, server)
        cli = [sys.executable, os.path.join(ROOT, "tools", "text_generation_cli.py"),
               f"127.0.0.1:{port}", "--prompt", PROMPT, "--tokens", "12", "--temperature", "0"]
        out = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.rstrip("\n") == expected
        bad = subprocess.run(cli[:-4] + ["--tokens", "1000"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 1 and "tokens_to_generate" in bad.stderr
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
            pytest.fail("server did not shut down on SIGINT")
    # Ctrl-C reaches torchrun, which passes it to both ranks: they stop in order (rank 0's
    # server tells the follower), so no rank prints a traceback; only torchrun's own
    # report of the signal remains.
    log = server.stdout.read()
    assert f"serving on http://127.0.0.1:{port}" in log
    assert "Connection closed" not in log and "KeyboardInterrupt" not in log, log[-4000:]
    assert log.count("Traceback (most recent call last)") <= 1, log[-4000:]
