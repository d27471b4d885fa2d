import pytest

from tests.conftest import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as the stage subprocesses (:func:`tests.reliability.harness.stage_env`)."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def reference_pipeline(tmp_path_factory):
    """Every stage run once, uninterrupted, on three tiny synthetic cases (shared by the slow kill tests)."""
    from tests.reliability.stages import build_reference

    return build_reference(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def fast_inputs(tmp_path_factory):
    """Two tiny cases with cache, descriptions, a one-epoch CLIP, a constant-output checkpoint and predictions."""
    from tests.reliability.stages import build_fast_inputs

    with one_thread():  # made before the module's one-thread fixture: set here too
        return build_fast_inputs(tmp_path_factory.mktemp("fast"))


@pytest.fixture(scope="session")
def stage_server():
    """A warm interpreter that forks the fast kill tests' stage processes (None where there is no fork)."""
    import os

    from tests.reliability.harness import ForkServer

    if not hasattr(os, "fork"):
        yield None
        return
    server = ForkServer()
    yield server
    server.close()
