#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite twice: with the default backend choice,
# and with FLASHPACK_BACKEND=threads (so both readers pass every test). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh || exit 1

run() {
    .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
    rc=$?
    if [ "$rc" = 5 ]; then echo "test.sh: pytest collected no tests: failing" >&2; return 1; fi
    return "$rc"
}

echo "== tests, backend=auto" >&2
run "$@" || exit 1
echo "== tests, FLASHPACK_BACKEND=threads" >&2
FLASHPACK_BACKEND=threads run "$@" || exit 1
