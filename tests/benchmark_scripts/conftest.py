import pytest


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder for one test module's benchmark runs (checkpoints, pictures, results)."""
    return tmp_path_factory.mktemp("bench")
