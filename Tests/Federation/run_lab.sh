#!/usr/bin/env bash
# Runs the default federation lab (Prosody 0.12 ⇄ ejabberd 23.01 in network namespaces, with
# knot + unbound for DNSSEC) and exits with its status: 0 only if every scenario passed.
#
# Needs root and these Debian packages, which it does NOT install (CI does):
#   prosody ejabberd knot knot-dnsutils unbound python3-slixmpp iproute2 openssl
# Extra arguments go to lab.py (see `lab.py --help`); BRAID_LAB_WITH_BRAID=1 adds Braid
# ($BRAID_BINARY, default .build/debug/braid), and with it the multiplexing scenarios (mux:*,
# a second lab with two Braid providers of 50 domains each) and the graceful-fallback ones
# (fallback:*, a third lab where every domain has a certificate of its own); see
# lab/README.md. `--scenarios fallback:` runs only the latter, `--repeat K` K times in a row.
# BRAID_LAB_STORAGE=postgresql gives every Braid provider a PostgreSQL of its own (needs the
# postgresql package), and adds the cluster scenarios (cluster:*, issue 18: provider A on
# three Braid nodes sharing one PostgreSQL, kill -9 of nodes, a PostgreSQL restart) in a
# fourth lab; `--scenarios cluster:` runs only those, with either storage setting.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" -ne 0 ]; then
    echo "run_lab.sh: the lab needs root (network namespaces, setpriv)" >&2
    exit 2
fi

missing=()
for cmd in ip ss setpriv openssl prosody prosodyctl ejabberdctl erl knotd knotc keymgr kdig \
           unbound unbound-checkconf; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
# Debian's interpreter has slixmpp; a `python3` earlier on PATH (pyenv) may not.
/usr/bin/python3 -c 'import slixmpp' >/dev/null 2>&1 || missing+=("python3-slixmpp (for /usr/bin/python3)")
if ((${#missing[@]})); then
    echo "run_lab.sh: missing: ${missing[*]}" >&2
    echo "  install: apt-get install prosody ejabberd knot knot-dnsutils unbound python3-slixmpp iproute2 openssl" >&2
    exit 2
fi

exec /usr/bin/python3 Tests/Federation/lab/lab.py "$@"
