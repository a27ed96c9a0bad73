import os
import sys

# One thread per process, for this process and every subprocess it starts (they inherit the
# environment): the models here are too small for threads to help, and on a busy 2-core machine torch's
# default (one thread per core, in every process) made the suite ~9x slower (docs/tests.md). Set before
# torch is imported; torch.set_num_threads covers the case where it already was.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # the repo, for generate.py runs
