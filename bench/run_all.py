"""Run every benchmark in turn and print their tables; figures go to docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SCRIPTS = (
    ["bench_journal.py"],
    ["bench_replay.py"],
    ["bench_checkpoint.py"],
    ["bench_supervisor_scale.py", "--jobs", "1000", "10000"],
)


def main() -> int:
    failed = []
    for script, *args in SCRIPTS:
        print(f"\n## {script} {' '.join(args)}\n", flush=True)
        done = subprocess.run([sys.executable, str(BENCH_DIR / script), *args])
        if done.returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
