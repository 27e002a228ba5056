"""Hypothesis profiles: "ci" (the default) is derandomized with bounded example counts and no deadline,
so the suite is deterministic and quick; HYPOTHESIS_PROFILE=thorough searches harder."""
import os
import signal
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A suite started in the background (`nohup pytest &`) inherits Ctrl-C ignored, and so would every script
# it starts; the Ctrl-C tests need it delivered as in a terminal (a Python handler resets to the default
# in child processes, an ignored signal stays ignored).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if os.environ.get("NANOCOCA_TEST_THREADS"):  # CI sets it; elsewhere torch uses the machine as it chooses
    torch.set_num_threads(int(os.environ["NANOCOCA_TEST_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it (.ci/gpu_check.sh runs them on "
                                       "a GPU)")
    config.addinivalue_line("markers", "slow: seconds each (32K prefills, T = 4096, torchrun, bench, "
                                       "subprocesses); "
                            "pytest -m 'not slow' leaves them out")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One data cache for the whole session: the corpora the tests train on are tokenized once."""
    return str(tmp_path_factory.mktemp("data"))
