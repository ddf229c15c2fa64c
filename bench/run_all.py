"""Run every benchmark and rewrite its section of bench/RESULTS.md (``make bench``).

Each script is run as its own process (one BLAS thread per process, as in the tests), in an
order where later scripts can reuse earlier results (bench_o2 reads bench/out/o1.json).
Expect roughly an hour on 2 cores. ``--only o1,o2`` runs a subset.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "o1": "bench_o1.py",
    "o2": "bench_o2.py",
    "ablation": "ablation.py",
    "weight-diff": "bench_weight_diff.py",
    "finetune": "bench_finetune.py",
    "prune": "bench_prune.py",
    "bdcnn": "bench_bdcnn.py",
    "cache": "bench_cache.py",
    "jobs": "bench_jobs.py",
    "mobile": "bench_mobile.py",
}
#: arguments of each script (default: --write, which rewrites its section of RESULTS.md); the
#: pruning and bdcnn scripts write bench/results/*.md, which merge_results() copies in
ARGS = {"prune": ["--part", "all"], "bdcnn": ["--models", "digits_alexnet,efficientnet_lite0"],
        "cache": ["--models", "digits_resnet,efficientnet_lite0"], "jobs": ["--models", "efficientnet_lite0"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    ap.add_argument("--merge", action="store_true", help="only copy bench/results/*.md into RESULTS.md")
    args = ap.parse_args(argv)
    if args.merge:
        merge_results()
        return 0
    names = list(SCRIPTS) if not args.only else [s.strip() for s in args.only.split(",")]
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    failed = []
    for n in names:
        t0 = time.perf_counter()
        print(f"== {n}: {SCRIPTS[n]} --write", flush=True)
        rc = subprocess.run([sys.executable, str(HERE / SCRIPTS[n]), *ARGS.get(n, ["--write"])], env=env).returncode
        print(f"== {n}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(n)
    merge_results()
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def merge_results() -> None:
    """Copy each bench/results/*.md (a "## " section) into bench/RESULTS.md, replacing its old copy."""
    sys.path.insert(0, str(HERE))
    from common import RESULTS, replace_section  # start-up: a sibling script, not a package
    text = RESULTS.read_text()
    for f in sorted((HERE / "results").glob("*.md")):
        body = f.read_text()
        text = replace_section(text, body.splitlines()[0], body)
    RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
