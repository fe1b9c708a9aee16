"""Convert SAE directories between this project's format, SAELens' and sparsify's.

python -m pipeline.sae.convert --from saelens SRC DST     # SAELens dir -> this project's format
python -m pipeline.sae.convert --to sparsify SRC DST      # this project's dir -> sparsify
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.sae.base import Sae
from pipeline.sae.formats import FormatError, read_saelens, read_sparsify, write_saelens, write_sparsify

READERS = {"saelens": read_saelens, "sparsify": read_sparsify}
WRITERS = {"saelens": write_saelens, "sparsify": write_sparsify}


def convert(src: Path, dst: Path, source: str | None = None, target: str | None = None) -> Path:
    """Read `src` (in `source` format, or this project's) and write `dst` (in `target`, or ours)."""
    sae = READERS[source](src) if source else Sae.load(src)
    return WRITERS[target](sae, dst) if target else sae.save(dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sae.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from", dest="source", choices=sorted(READERS), help="format of SRC (DST: this project's)"
    )
    direction.add_argument(
        "--to", dest="target", choices=sorted(WRITERS), help="format to write (SRC: this project's)"
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, args.source, args.target)
    except (FormatError, FileNotFoundError, ValueError, KeyError) as err:
        sys.stderr.write(f"error: {err}\n")
        return 1
    sys.stdout.write(f"wrote {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
