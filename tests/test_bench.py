"""tools/bench.py: its shapes fit the methods it benchmarks, and its pruned rows run on the shipped weights."""

import os

import pytest

from dyrate_ref.loading import DEFAULT_WEIGHTS
from helpers import python_run


@pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_WEIGHTS, "model.safetensors")),
                    reason="the embedded weights are not in this checkout")
def test_bench_prune_runs_on_the_shipped_weights():
    """Its prompt ids are drawn from the checkpoint's own vocabulary (they were drawn up to 31,000 on a
    400-token one, an IndexError)."""
    r = python_run("-m", "dyrate_ref.tools.bench", "--prune", "--weights", DEFAULT_WEIGHTS, "--new-tokens", "2",
                   "--repeats", "1", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "| dyrate_ref none |" in r.stdout and "| dyrate_ref fastv R=0.5 |" in r.stdout


def test_bench_tiny_shape_fits_every_benchmarked_method(tmp_path):
    """bench --shape tiny, a listed choice: its decoder is deep enough for the methods' K = 2."""
    from dyrate_ref.loading import read_config
    from dyrate_ref.tools.bench import bench_methods, write_random_checkpoint
    write_random_checkpoint(str(tmp_path), "tiny")
    assert len(bench_methods(str(tmp_path), read_config(str(tmp_path)))) >= 7
