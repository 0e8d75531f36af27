#!/usr/bin/env python
"""Interactive client of tools/run_text_generation_server.py (Megatron's PUT /api).

    python tools/text_generation_cli.py localhost:5000
    python tools/text_generation_cli.py localhost:5000 --prompt "def main" --tokens 32

Without --prompt it asks for a prompt and a token count in a loop (empty token count:
--tokens); end with Ctrl-D or Ctrl-C. Errors from the server are printed with the
field they name, and the loop goes on.
"""

import argparse
import json
import sys
import urllib.error
import urllib.request


def put_api(url: str, body: dict, timeout: float) -> dict:
    """PUT body to url; the decoded JSON answer (raises RuntimeError on errors)."""
    data = json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="PUT",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            detail = json.loads(error.read()).get("error", {})
            message = f"{detail.get('message')} (field: {detail.get('param')})"
        except ValueError:
            message = str(error)
        raise RuntimeError(f"HTTP {error.code}: {message}") from error
    except urllib.error.URLError as error:
        raise RuntimeError(f"cannot reach {url}: {error.reason}") from error


def _body(args, prompt: str, tokens: int) -> dict:
    body = {"prompts": [prompt], "tokens_to_generate": tokens,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "add_BOS": args.add_bos}
    if args.seed is not None:
        body["random_seed"] = args.seed
    return body


def _ask(question: str) -> str:
    return input(question)


def interactive(args, url: str) -> None:
    while True:
        try:
            prompt = _ask("Enter prompt: ")
            count = _ask(f"Enter number of tokens to generate [{args.tokens}]: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        try:
            tokens = int(count) if count else args.tokens
            print("Megacore Response: ")
            print(put_api(url, _body(args, prompt, tokens), args.timeout)["text"][0])
        except (ValueError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("server", help="HOST:PORT of the server")
    parser.add_argument("--prompt", help="generate once for this prompt and exit")
    parser.add_argument("--tokens", type=int, default=64,
                        help="tokens to generate (default: 64)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature; 0 is greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="sample among the k most likely tokens; 0 is off (default: 0)")
    parser.add_argument("--top-p", type=float, default=0.0,
                        help="sample within this cumulative probability; 0 is off "
                             "(default: 0.0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed of the sampling (default: the server's)")
    parser.add_argument("--add-bos", action="store_true",
                        help="prepend the tokenizer's beginning-of-sequence token")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for each request (default: 300)")
    args = parser.parse_args(argv)
    url = f"http://{args.server}/api"
    if args.prompt is None:
        interactive(args, url)
        return 0
    try:
        print(put_api(url, _body(args, args.prompt, args.tokens), args.timeout)["text"][0])
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
