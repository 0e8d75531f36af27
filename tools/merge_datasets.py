"""Concatenate indexed datasets into one (Megatron's tools/merge_datasets.py flags).

    python tools/merge_datasets.py --input out/parts --output-prefix out/merged_text_document

merges every .bin/.idx pair in --input (in file-name order) into
{output-prefix}.bin/.idx. Documents keep their order; the .bin bytes are copied
verbatim, so all inputs must share one dtype. The output appears only when complete.

The output may not lie in the input directory: the next merge would take it as one
of its own inputs and double every document, so that is refused with an error.
Temporary files of an earlier merge that was killed are removed first.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megacore.datasets.indexed_dataset import IndexedDatasetError, data_file_path, index_file_path
from megacore.datasets.preprocess import (
    PreprocessError,
    check_output_outside_inputs,
    check_output_prefix,
    find_prefixes,
    merge,
    remove_stale_temporaries,
)


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="directory holding the .bin/.idx pairs to merge")
    parser.add_argument("--output-prefix", required=True,
                        help="path of the merged dataset, without .bin/.idx")
    parser.add_argument("--multimodal", action="store_true",
                        help="not supported: multimodal datasets cannot be merged")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args(argv)
    if args.multimodal:
        print("error: merging multimodal datasets is not supported", file=sys.stderr)
        return 1
    try:
        check_output_outside_inputs(args.input, args.output_prefix)
        prefixes = find_prefixes(args.input)
        finals = [data_file_path(args.output_prefix), index_file_path(args.output_prefix)]
        check_output_prefix(finals)
        remove_stale_temporaries(finals, sys.stderr)
        merge(prefixes, args.output_prefix)
    except OSError as err:
        print(f"error: {err.filename or args.output_prefix}: cannot write output "
              f"({err.strerror or err}); no output written", file=sys.stderr)
        return 1
    except (IndexedDatasetError, PreprocessError) as err:
        print(f"error: {err}; no output written", file=sys.stderr)
        return 1
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
