"""Fixtures shared by tests/ and benchmarks/ (pytest loads this file for both)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module's tests: on a shared 2-core machine, two threads running tiny GEMVs only wait on
    each other's time slices (10x slower on a busy CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
