import pytest

from dldr.store import RunStore


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(str(tmp_path / "run"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every Ray test: loopback only, token auth on, stopped at the end.

    dldr's commands see this process already connected and run on it instead of starting one.
    """
    from dldr import ray_train

    with ray_train.cluster("", report=False):  # Ray's output stays in the tests' captured output
        yield
