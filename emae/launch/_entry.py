"""``python -m emae.launch._entry MODULE:FUNCTION ARGS...``: how a ``kind: local`` launch runs a
function entry (selftest, sweep workers) in a subprocess, also under torchrun for local DDP; the
default entry, the emae program, runs as ``python -m emae ARGS``."""

from __future__ import annotations

import sys

from emae.launch.job import call_entry


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m emae.launch._entry MODULE:FUNCTION [ARGS...]", file=sys.stderr)
        return 2
    return call_entry(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
