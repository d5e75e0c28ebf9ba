"""The service's state on PostgreSQL: the same tests as on SQLite, against the database POST_TEST_PG_URL names.

Skipped unless ``POST_TEST_PG_URL`` is set (e.g. ``postgresql+psycopg://postgres@127.0.0.1:55432/posttest``;
needs ``pip install 'post[postgres]'``). Each test starts from an empty schema.
"""

import os

import pytest
from sqlalchemy import text

from post.service.db import Base, open_db, open_engine
from test_service_state import (  # noqa: F401 - collected again here, with this module's ``sessions`` fixture
    test_a_job_is_claimed_by_exactly_one_server,
    test_an_expired_lease_is_taken_over_and_a_live_one_is_not,
    test_claims_stop_after_max_attempts_and_cancelled_jobs_are_not_run,
    test_keys_are_shown_once_and_stored_hashed,
)

URL = os.environ.get("POST_TEST_PG_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set POST_TEST_PG_URL to run the PostgreSQL tests")


@pytest.fixture
def sessions():
    engine = open_engine(URL)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    return open_db(URL)
