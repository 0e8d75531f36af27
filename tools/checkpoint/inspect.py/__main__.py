#!/usr/bin/env python
"""Print what a megacore checkpoint holds, without building a model.

    python tools/checkpoint/inspect.py CHECKPOINT            # format, versions, layout,
                                                             # config, iteration, tensors
    python tools/checkpoint/inspect.py CHECKPOINT --verify   # also read every file
    python tools/checkpoint/inspect.py CHECKPOINT --json     # machine-readable

CHECKPOINT is a save directory (its latest_checkpointed_iteration.txt is followed) or one
iter_XXXXXXX directory. Exit status: 0 fine, 1 verification found problems, 2 unreadable.
"""

# Why this file is tools/checkpoint/inspect.py/__main__.py: `python
# tools/checkpoint/inspect.py` runs a directory's __main__.py, and Python puts that
# directory first on sys.path. A plain file named inspect.py would put tools/checkpoint/
# there instead, and the file itself would then shadow the standard library's `inspect`
# (which torch and dataclasses import). This directory holds nothing that can shadow a
# module, and tools/checkpoint/ holds no inspect module for convert.py to trip over: no
# program needs to edit sys.path.

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="save directory or iter_XXXXXXX directory")
    parser.add_argument("--verify", action="store_true",
                        help="read every file and report missing or unreadable ones")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--no-tensors", action="store_true", help="omit the tensor list")
    args = parser.parse_args(argv)

    from megacore.checkpointing import (
        CheckpointError,
        format_checkpoint_info,
        read_checkpoint_info,
        verify_checkpoint,
    )

    try:
        info = read_checkpoint_info(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problems = verify_checkpoint(args.checkpoint) if args.verify else None
    if args.json:
        out = info.to_dict()
        if args.no_tensors:
            out.pop("tensors")
        if problems is not None:
            out["problems"] = problems
        print(json.dumps(out, indent=1, default=str))
    else:
        print(format_checkpoint_info(info, show_tensors=not args.no_tensors))
        if problems is not None:
            from megacore.checkpointing.integrity import has_digests

            if not has_digests(info.path):
                print("digests: none recorded (saved by an older megacore): files were "
                      "read and parsed but not checked byte for byte")
            print("verify: OK" if not problems else
                  "verify: FAILED\n" + "\n".join(f"  {p}" for p in problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
