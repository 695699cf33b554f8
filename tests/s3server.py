"""A real S3 server for tests: SeaweedFS (see thaw.seaweed). Import the fixtures into a test module:

    from s3server import s3server, s3server_own  # noqa: F401  (pytest fixtures)

``s3server`` is shared by the session; ``s3server_own`` is a private one for a test that freezes it
(:meth:`SeaweedS3.paused`: SIGSTOP/SIGCONT of the weed process, so requests hang exactly like against a
frozen host).
"""

from __future__ import annotations

import pytest

from thaw.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, new_bucket, weed_binary  # noqa: F401


def _need_weed() -> None:
    try:
        weed_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """One SeaweedFS S3 server for the session."""
    _need_weed()
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3server_own(tmp_path_factory):
    """A private SeaweedFS for one test (for tests that pause or break it)."""
    _need_weed()
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs-own"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
