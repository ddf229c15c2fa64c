# lit configuration of mpqc's FileCheck tests (docs/TESTING_PASSES.md).
# Run from the repository: .venv/bin/lit tests/filecheck (tests/test_filecheck.py does, under pytest).
# The `mpqc` and `filecheck` of RUN lines are the ones installed next to the Python running lit.
import os
import sys
import tempfile

import lit.formats

config.name = "mpqc-filecheck"
config.test_format = lit.formats.ShTest(execute_external=False)
config.suffixes = [".mir"]
config.test_source_root = os.path.dirname(__file__)
config.excludes = ["Inputs", "lit.cfg.py"]
# %t files go to a scratch folder, not into the source tree
config.test_exec_root = os.environ.get("MPQC_LIT_OUT") or os.path.join(tempfile.gettempdir(), "mpqc-filecheck")

bindir = os.path.dirname(sys.executable)
config.environment["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
for var in ("HOME", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_CACHE_DIR",
            "PYTHONPATH", "MPQC_BENCH"):
    if var in os.environ:
        config.environment[var] = os.environ[var]
config.environment.setdefault("OPENBLAS_NUM_THREADS", "1")
