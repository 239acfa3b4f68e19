#!/usr/bin/env bash
# The whole test suite (offline, CPU): everything on SQLite, then again on PostgreSQL every test
# that uses the database (each in a database of its own, dropped afterwards; tests/conftest.py
# leaves out those that run the same on either). The one slow end-to-end test with the real model
# runs once, on SQLite: it checks the model, not the database.
# Each pass runs on two pytest-xdist workers, a test file per worker at a time (its module-scoped
# servers and trained models shared as before): alone, the suite keeps about one core of two busy,
# waiting on servers, jobs and sandboxes. TUNEHOUSE_TEST_WORKERS sets how many (0: none, in-process).
# Extra arguments go to both pytest runs, e.g. `-k files` or `-m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKERS=(-n "${TUNEHOUSE_TEST_WORKERS:-2}" --dist loadfile)
.venv/bin/python -m pytest -q "${WORKERS[@]}" "$@"

PG_URL=${TUNEHOUSE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/postgres}
if .venv/bin/python -c "import psycopg, sys; psycopg.connect(sys.argv[1].replace('+psycopg', ''), connect_timeout=3).close()" "$PG_URL" 2>/dev/null; then
  echo "--- the tests that use the database, again on PostgreSQL ($PG_URL)"
  TUNEHOUSE_TEST_DATABASE_URL=$PG_URL .venv/bin/python -m pytest -q "${WORKERS[@]}" -m "not slow" "$@"
elif [ "${CI:-}" = "true" ]; then
  echo "PostgreSQL is not reachable at $PG_URL; CI requires it" >&2
  exit 1
else
  echo "--- PostgreSQL not reachable at $PG_URL: skipped the PostgreSQL pass"
fi
