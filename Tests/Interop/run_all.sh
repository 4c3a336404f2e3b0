#!/usr/bin/env bash
# Runs Braid's interop suites (slixmpp clients, then bad input over raw sockets) against
# $BRAID_BINARY (default: /work/main/.build/debug/braid) with Debian's Python, which has
# slixmpp. Exits non-zero if either suite fails; ends with each suite's closing line.
# BRAID_INTEROP_STORAGE=postgresql runs them on PostgreSQL (see harness.py).
set -u
here=$(cd "$(dirname "$0")" && pwd)
python=/usr/bin/python3
export PYTHONDONTWRITEBYTECODE=1  # keep the source tree free of __pycache__
output=$(mktemp)
trap 'rm -f "$output"' EXIT

status=0
summary=()
for suite in test_clients.py test_account_data.py test_blocking.py test_pep.py test_mobile.py test_upload.py test_bad_input.py test_browser.py; do
    echo "== $suite"
    "$python" "$here/$suite" | tee "$output"
    code=${PIPESTATUS[0]}
    summary+=("$suite: $(tail -n 1 "$output") (exit $code)")
    [ "$code" -eq 0 ] || status=1
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
