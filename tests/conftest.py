import os

import pytest

from dldr.store import RunStore
from tests.helpers import s3_server

S3_BUCKET = "dldr-tests"


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(str(tmp_path / "run"))


@pytest.fixture(scope="session")
def s3():
    """An S3 server on 127.0.0.1 for the whole session, reached as a user would: AWS_ENDPOINT_URL and
    credentials in the environment (set before Ray starts, so its workers see them). Yields a bucket's URL."""
    import s3fs

    env = {
        "AWS_ENDPOINT_URL": None,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {name: os.environ.get(name) for name in env}
    with s3_server() as (endpoint, _):
        os.environ.update({**env, "AWS_ENDPOINT_URL": endpoint})
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(S3_BUCKET)
            yield f"s3://{S3_BUCKET}"
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """One local Ray instance for every Ray test: loopback only, token auth on, stopped at the end.

    dldr's commands see this process already connected and run on it instead of starting one. The
    S3 server starts first, so that the Ray workers inherit its endpoint.
    """
    from dldr import ray_train

    with ray_train.cluster("", report=False):  # Ray's output stays in the tests' captured output
        yield
