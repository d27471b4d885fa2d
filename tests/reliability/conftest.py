import pytest


@pytest.fixture(scope="session")
def reference_pipeline(tmp_path_factory):
    """Every stage run once, uninterrupted, on three tiny synthetic cases (shared by the slow kill tests)."""
    from tests.reliability.stages import build_reference

    return build_reference(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def fast_inputs(tmp_path_factory):
    """Two tiny cases with cache, descriptions, a constant-output checkpoint and predictions."""
    from tests.reliability.stages import build_fast_inputs

    return build_fast_inputs(tmp_path_factory.mktemp("fast"))
