"""Run one stage's commands as children and record their time and peak memory.

    python -m rehearsal.measure RESULT.json '[["python", "-m", "x"], [...]]'

A fresh process per stage, so that RUSAGE_CHILDREN's ru_maxrss is that stage's own peak: the
largest resident set of any process the stage started (its workers included; concurrent
workers are not summed). RESULT.json: seconds, peak_mib, returncode.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    result, commands = Path(argv[0]), json.loads(argv[1])
    t0, rc = time.perf_counter(), 0
    for command in commands:
        rc = subprocess.run(command).returncode
        if rc:
            break
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    result.write_text(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": peak_kib / 1024, "returncode": rc}))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
