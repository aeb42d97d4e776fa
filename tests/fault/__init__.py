"""Fault tests: many worker processes, killed workers, a database cut off mid-run.

A workload of causal chains is delivered, jumbled and partly duplicated, to worker
processes (``python -m tests.fault.worker``) that each run the consumer loop a user
would write; every handling is recorded durably in the test database; then a checker
reads the records and the ordering tables back.

CI runs small sizes.  A bigger run by hand multiplies the number of chains::

    ORDERING_FAULT_SCALE=10 pytest tests/fault -q -s

``ORDERING_FAULT_SEED`` picks the delivery order (the summary line prints the seed
used), and ``ORDERING_FAULT_PG_RESTART=1`` enables the test that restarts the whole
PostgreSQL cluster (it disturbs every database on the server, so it is opt-in); the
machine's Debian cluster, or the server that ``ORDERING_FAULT_PG_RESTART_COMMAND``
restarts (``.ci/postgres-server restart PORT`` for a throwaway one).

The previous release's workers beside this code's (test_previous_release.py), by hand,
with this checkout's virtualenv active::

    ORDERING_PREVIOUS_RELEASE_PYTHON="$(.ci/previous-release)" \
        pytest tests/fault/test_previous_release.py -s
"""
