"""Build corpus models into the cache and print their paths.

python -m models.build                 # every small model
python -m models.build gpt2-ts17 ...   # just these
python -m models.build --large         # benchmark-size models too (GPT-2 768x12, ViT-B/16)
python -m models.build --path gpt2-ts14  # only the model path (for scripts)
"""

from __future__ import annotations

import argparse
import sys
import time

from models.corpus import CORPUS, LARGE, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.build", description=__doc__.splitlines()[0]
    )
    parser.add_argument("names", nargs="*", help="corpus entries (default: all small ones)")
    parser.add_argument("--large", action="store_true", help="also build the benchmark-size models")
    parser.add_argument("--path", action="store_true", help="print only each model's path")
    args = parser.parse_args(argv)
    names = args.names or [*CORPUS, *(LARGE if args.large else ())]
    failed = 0
    for name in names:
        t = time.perf_counter()
        try:
            paths = build(name)
        except Exception as exc:  # report every failure, then exit non-zero
            failed += 1
            print(
                f"FAILED {name}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}",
                file=sys.stderr,
            )
            continue
        print(
            paths.model
            if args.path
            else f"{name:24s} {time.perf_counter() - t:6.1f}s  {paths.model}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
