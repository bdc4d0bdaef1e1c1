"""Command line (placeholder until the CLI issue lands)."""

import sys


def main(argv=None) -> int:
    print("usage: flashpack (convert | metadata | revert | verify) ...", file=sys.stderr)
    return 2
