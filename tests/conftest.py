"""Hypothesis profiles: "ci" (the default) is derandomized with bounded example counts and no deadline,
so the suite is deterministic and quick; HYPOTHESIS_PROFILE=thorough searches harder."""
import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("NANOCOCA_TEST_THREADS"):  # CI sets it; elsewhere torch uses the machine as it chooses
    torch.set_num_threads(int(os.environ["NANOCOCA_TEST_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (run tests/gpu_check.sh on a GPU)")
