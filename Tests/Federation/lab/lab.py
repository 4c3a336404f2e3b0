#!/usr/bin/python3
"""Braid federation lab: real XMPP servers federating inside network namespaces.

The lab builds, on one machine and without touching the host network:

* network namespaces `braidlab-dns` and `braidlab-<provider>` joined by a bridge (living in
  the DNS namespace) through veth pairs, on one private /24 used only inside the lab;
* knot serving a DNSSEC-signed `test.` zone (A, SRV records for every provider domain) and a
  second signed zone `bogus.test.` whose DS in the parent is deliberately wrong, so that
  validating resolvers answer SERVFAIL for every name in it;
* unbound as the validating resolver of every namespace (trust anchor: the DS of `test.`);
* a lab CA and one certificate per provider covering all of its domains (or, with
  ProviderSpec.per_domain_certs, one per domain naming only that domain);
* the providers themselves (Prosody 0.12, ejabberd 23.01 and, on request, Braid), each with
  its domains and users;
* slixmpp clients (agent.py) started inside the providers' namespaces, driven over pipes.

Scenarios then check presence subscriptions, messages and pings across providers, the
dialback fallback and that a DNSSEC-bogus domain fails closed, and report the s2s TCP
connections seen between providers.

Run as root with Debian's Python (it has slixmpp):
    sudo /usr/bin/python3 Tests/Federation/lab/lab.py [--scenarios a,b] [--with-braid]

Everything the lab starts is stopped by PID (SIGTERM, then SIGKILL after a bounded wait),
and the namespaces and /etc/netns entries are removed at the end, on failure and on Ctrl-C.
Namespaces left by a crashed earlier run are removed at start.
"""

import argparse
import contextlib
import dataclasses
import grp
import json
import os
import pwd
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(HERE, "agent.py")
# Debian's interpreter: it has python3-slixmpp; a pyenv `python3` earlier on PATH may not.
PYTHON = "/usr/bin/python3"

# Namespace names start with this prefix. Two labs can run at once (the federation lab and
# the benchmarks, say) when each has its own prefix and subnet: a lab only ever sweeps
# namespaces with its own prefix. Set it with set_namespace_prefix() before building a Lab,
# or with --prefix / BRAID_LAB_PREFIX.
NS_PREFIX = os.environ.get("BRAID_LAB_PREFIX", "braidlab-")
DNS_NS = NS_PREFIX + "dns"


def set_namespace_prefix(prefix):
    """Uses PREFIX (for example "braidbench-") for every namespace this process creates or sweeps."""
    global NS_PREFIX, DNS_NS
    if not prefix.endswith("-"):
        prefix += "-"
    NS_PREFIX = prefix
    DNS_NS = prefix + "dns"
BRIDGE = "br0"
# The lab's /24; nothing outside the lab's namespaces uses it. BRAID_LAB_SUBNET (with
# BRAID_LAB_PREFIX) lets a second lab run beside one already running.
DEFAULT_SUBNET = os.environ.get("BRAID_LAB_SUBNET", "10.77.54")
RESOLVER_HOST = 1                  # unbound, on the bridge
AUTH_DNS_HOST = 2                  # knot, second address on the bridge
FIRST_PROVIDER_HOST = 11           # providers get .11, .12, ...

ZONE = "test."
BOGUS_ZONE = "bogus.test."
S2S_PORT = 5269
S2S_DIRECT_TLS_PORT = 5270
C2S_PORT = 5222
C2S_DIRECT_TLS_PORT = 5223
S2S_PORTS = (S2S_PORT, S2S_DIRECT_TLS_PORT)
CLOSED_PORT = 5299                 # nothing listens here: an SRV target that refuses connections
EJABBERD_DIST_PORT = 4370           # Erlang distribution port, on the namespace's loopback

# Bounds for everything the lab waits for (seconds).
STOP_GRACE = 10.0          # after SIGTERM, before SIGKILL
COMMAND_TIMEOUT = 60.0     # one helper command (ip, openssl, keymgr, prosodyctl, erl ...)
DNS_READY_TIMEOUT = 30.0   # zones signed and resolver answering
SERVER_READY_TIMEOUT = 60.0
AGENT_CALL_MARGIN = 10.0   # on top of the timeout an agent command was given
STEP_TIMEOUT = 25.0        # one protocol step across providers (first s2s connection included)
UNREACHABLE_ERROR_TIMEOUT = 45.0  # until the sender of an undeliverable message gets its error
POLL = 0.1

DEFAULT_BRAID_BINARY = "/work/main/.build/debug/braid"
PASSWORD = "lab-Passw0rd"


class LabError(Exception):
    """The lab could not be built or driven (as opposed to a scenario failing)."""


class ScenarioFailure(Exception):
    """A scenario's check did not hold; the message says which and why."""


def log(message):
    """Progress on stderr, so that stdout carries only the PASS/FAIL lines and the summary."""
    print(f"[lab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- commands and processes --------------------------------------------------------------

def run(argv, *, timeout=COMMAND_TIMEOUT, check=True, input_text=None, env=None, cwd=None):
    """Runs a helper command to completion (bounded); returns the CompletedProcess."""
    try:
        result = subprocess.run(argv, input=input_text, capture_output=True, text=True,
                                timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as error:
        raise LabError(f"{' '.join(argv)} did not finish in {timeout}s") from error
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited with {result.returncode}: "
                       f"{(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def in_netns(ns, argv):
    """`ip netns exec` runs ARGV in NS with /etc/netns/NS/{resolv.conf,hosts} mounted over /etc."""
    return ["ip", "netns", "exec", ns, *argv]


def as_user(user, argv):
    """setpriv switches user without su/PAM, so the raised file limit survives (PAM caps it)."""
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]


def group_members(pgid):
    """PIDs of live (non-zombie) processes in process group PGID, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def stop_pids(pids, grace=STOP_GRACE, label="process"):
    """SIGTERM each PID, wait up to GRACE for them to go, then SIGKILL those left."""
    pids = [pid for pid in pids if pid > 1 and pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        if not pids:
            return
        time.sleep(POLL)
    for pid in pids:
        log(f"{label} pid {pid} ignored SIGTERM for {grace}s; sending SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Service:
    """One long-running program the lab started, in its own session (process group).

    Wrappers such as ejabberdctl keep the real server as a child instead of exec'ing it, so
    the whole process group (identified by the PID we started) is signalled and waited for.
    """

    def __init__(self, name, argv, log_path, *, env=None, cwd=None, nofile=None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")

        def prepare_child():
            # Runs as root in the child before exec: raise the file limit here, because
            # setpriv (unlike su) keeps it across the user switch.
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, preexec_fn=prepare_child)
        self.pid = self.process.pid

    def running(self):
        return self.process.poll() is None

    def stop(self, grace=STOP_GRACE):
        """SIGTERM to the group, bounded wait, SIGKILL; returns the leader's exit code."""
        members = group_members(self.pid)
        if self.running() and self.pid not in members:
            members.append(self.pid)
        if members:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.process.poll()  # reap the leader so it does not linger as a zombie
                if not group_members(self.pid):
                    break
                time.sleep(POLL)
            else:
                log(f"{self.name} (pgid {self.pid}) ignored SIGTERM for {grace}s; sending SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        self._log.close()
        return self.process.returncode


def log_tail(path, lines=30):
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def wait_until(predicate, timeout, what, interval=0.2):
    """Polls PREDICATE until it returns a truthy value (returned) or TIMEOUT runs out."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except LabError as error:
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise LabError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def chown_tree(path, user):
    """Gives PATH and everything below it to USER (and USER's group)."""
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(user).gr_gid
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def write_file(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


# -- network namespaces ------------------------------------------------------------------

def lab_namespaces():
    """Names of existing namespaces that belong to this lab (its prefix, braidlab- by default)."""
    result = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    return [name for name in names if name.startswith(NS_PREFIX)]


def namespace_pids(ns):
    result = run(["ip", "netns", "pids", ns], check=False)
    return [int(pid) for pid in result.stdout.split() if pid.isdigit()]


def remove_namespace(ns):
    """Stops every process still inside NS (by PID), deletes NS and its /etc/netns entry."""
    pids = namespace_pids(ns)
    if pids:
        log(f"stopping {len(pids)} leftover process(es) in {ns}: {pids}")
        stop_pids(pids, label=f"process in {ns}")
    run(["ip", "netns", "delete", ns], check=False)
    shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def remove_stale_lab():
    """Removes namespaces and /etc/netns entries a crashed earlier run left behind."""
    stale = lab_namespaces()
    for ns in stale:
        log(f"removing stale namespace {ns}")
        remove_namespace(ns)
    if os.path.isdir("/etc/netns"):
        for name in os.listdir("/etc/netns"):
            if name.startswith(NS_PREFIX):
                shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)


class Network:
    """The DNS namespace with the bridge, and one namespace per provider joined by veths."""

    def __init__(self, subnet):
        self.subnet = subnet
        self.namespaces = []
        self.resolver_ip = f"{subnet}.{RESOLVER_HOST}"
        self.auth_dns_ip = f"{subnet}.{AUTH_DNS_HOST}"

    def ip(self, host_number):
        return f"{self.subnet}.{host_number}"

    def _add_namespace(self, ns):
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # ip netns exec mounts these over /etc/resolv.conf and /etc/hosts for the command.
        write_file(f"/etc/netns/{ns}/resolv.conf",
                   f"# braid federation lab\nnameserver {self.resolver_ip}\noptions attempts:2 timeout:2\n")
        write_file(f"/etc/netns/{ns}/hosts",
                   "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")

    def create_dns_namespace(self):
        self._add_namespace(DNS_NS)
        run(["ip", "-n", DNS_NS, "link", "add", BRIDGE, "type", "bridge"])
        # A bridge takes the lowest MAC address of its ports unless one is set. A namespace
        # added mid-run (mux:malicious's evil peer) whose veth had a lower one changed it, and
        # every provider's ARP entry for the resolver went stale: DNS and POSH fetches failed
        # for tens of seconds (a POSH proof lapsed and reset a link; Prosody could not find a
        # room's server), in one run of about ten. A set address never changes.
        run(["ip", "-n", DNS_NS, "link", "set", BRIDGE, "address", "02:62:72:61:69:64"])
        run(["ip", "-n", DNS_NS, "addr", "add", f"{self.resolver_ip}/24", "dev", BRIDGE])
        run(["ip", "-n", DNS_NS, "addr", "add", f"{self.auth_dns_ip}/24", "dev", BRIDGE])
        run(["ip", "-n", DNS_NS, "link", "set", BRIDGE, "up"])

    def add_provider_namespace(self, ns, short_name, address):
        """Namespace NS with eth0 at ADDRESS, its veth peer plugged into the bridge."""
        self._add_namespace(ns)
        # Both ends are created directly in their namespaces: the host never sees them.
        bridge_end = f"v-{short_name}"[:15]
        run(["ip", "-n", DNS_NS, "link", "add", bridge_end, "type", "veth",
             "peer", "name", "eth0", "netns", ns])
        run(["ip", "-n", DNS_NS, "link", "set", bridge_end, "master", BRIDGE, "up"])
        run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])

    def teardown(self):
        for ns in reversed(self.namespaces):
            remove_namespace(ns)
        self.namespaces = []


def tcp_connections(ns):
    """Established TCP connections in NS as (local_ip, local_port, peer_ip, peer_port)."""
    result = run(in_netns(ns, ["ss", "-tnH", "state", "established"]), check=False)
    connections = []
    for line in result.stdout.splitlines():
        fields = line.split()
        addresses = [field for field in fields if re.match(r"^[\d.]+:\d+$", field)]
        if len(addresses) >= 2:
            (local_ip, local_port), (peer_ip, peer_port) = (
                address.rsplit(":", 1) for address in addresses[:2])
            connections.append((local_ip, int(local_port), peer_ip, int(peer_port)))
    return connections


def tcp_counters(ns):
    """The namespace's TCP counters from /proc/net/snmp (ActiveOpens, PassiveOpens ...)."""
    result = run(in_netns(ns, ["cat", "/proc/net/snmp"]))
    tcp_lines = [line.split() for line in result.stdout.splitlines() if line.startswith("Tcp:")]
    names, values = tcp_lines[0][1:], tcp_lines[1][1:]
    return {name: int(value) for name, value in zip(names, values)}


def listening(ns, port):
    result = run(in_netns(ns, ["ss", "-ltnH", f"sport = :{port}"]), check=False)
    return bool(result.stdout.strip())


# -- lab CA ------------------------------------------------------------------------------

class CertificateAuthority:
    """A throw-away CA and per-provider leaf certificates (ECDSA P-256), made with openssl."""

    def __init__(self, directory):
        self.directory = directory
        self.cert = os.path.join(directory, "ca.pem")
        self.key = os.path.join(directory, "ca.key")
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "90",
             "-subj", "/O=Braid federation lab/CN=Braid lab CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        os.chmod(self.cert, 0o644)

    def issue(self, name, dns_names, key=None):
        """Certificate NAME.crt / NAME.key whose SANs are DNS_NAMES; returns (cert, key).
        KEY: an existing private key to certify instead of a new one (returned as is)."""
        cert = os.path.join(self.directory, f"{name}.crt")
        csr = os.path.join(self.directory, f"{name}.csr")
        extensions = os.path.join(self.directory, f"{name}.ext")
        write_file(extensions, "\n".join([
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            # s2s certificates authenticate both as TLS server and as TLS client.
            "extendedKeyUsage=serverAuth,clientAuth",
            "subjectAltName=" + ",".join(f"DNS:{dns}" for dns in dns_names),
        ]) + "\n")
        if key is None:
            key = os.path.join(self.directory, f"{name}.key")
            run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", key, "-out", csr, "-subj", f"/O=Braid federation lab/CN={dns_names[0]}"])
        else:
            run(["openssl", "req", "-new", "-key", key, "-out", csr,
                 "-subj", f"/O=Braid federation lab/CN={dns_names[0]}"])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key,
             "-set_serial", str(random.getrandbits(63)), "-days", "90", "-extfile", extensions,
             "-out", cert])
        return cert, key


# -- DNS: knot (authoritative, signing) and unbound (validating) ---------------------------

@dataclasses.dataclass
class DnsRecords:
    """Records for the two zones, as (relative owner, type, rdata) tuples."""
    test: list = dataclasses.field(default_factory=list)
    bogus: list = dataclasses.field(default_factory=list)


def relative(name, zone):
    """Owner NAME relative to ZONE ('@' for the apex), for zone files with $ORIGIN."""
    name = name.rstrip(".") + "."
    if name == zone:
        return "@"
    assert name.endswith("." + zone), (name, zone)
    return name[: -len(zone) - 1]


class Dns:
    """knot serving the signed zones, unbound validating them for the namespaces."""

    def __init__(self, directory, network):
        self.directory = directory
        self.network = network
        self.knot_dir = os.path.join(directory, "knot")
        self.unbound_dir = os.path.join(directory, "unbound")
        self.knot_conf = os.path.join(self.knot_dir, "knot.conf")
        self.unbound_conf = os.path.join(self.unbound_dir, "unbound.conf")
        # The DS of test. in zone-file syntax: unbound's trust anchor, Prosody's
        # lua-unbound trustfile and Braid's dns.trust_anchor_file.
        self.anchor_file = os.path.join(directory, "test.ds")
        self.knot = None
        self.unbound = None
        self.test_serial = 1
        self.records = None
        self.bogus_ds = None

    # -- zone files --

    def _zone_text(self, zone, records, serial):
        lines = [f"$ORIGIN {zone}", "$TTL 60",
                 f"@ SOA ns.{ZONE} hostmaster.{ZONE} {serial} 3600 600 86400 60",
                 f"@ NS ns.{ZONE}"]
        if zone == ZONE:
            lines.append(f"ns A {self.network.auth_dns_ip}")
        lines += [f"{owner} {rtype} {rdata}" for owner, rtype, rdata in records]
        return "\n".join(lines) + "\n"

    def _write_test_zone(self):
        records = list(self.records.test)
        # Delegation of bogus.test.: same server, but the DS (once known) is corrupted.
        records.append((relative(BOGUS_ZONE, ZONE), "NS", f"ns.{ZONE}"))
        if self.bogus_ds:
            records.append((relative(BOGUS_ZONE, ZONE), "DS", self.bogus_ds))
        write_file(os.path.join(self.knot_dir, "zones", "test.zone"),
                   self._zone_text(ZONE, records, self.test_serial))

    def _write_knot_conf(self):
        write_file(self.knot_conf, f"""# braid federation lab: authoritative, signing server
server:
    rundir: "{self.knot_dir}/run"
    listen: {self.network.auth_dns_ip}@53
control:
    listen: "{self.knot_dir}/run/knot.sock"
log:
  - target: "{self.knot_dir}/knot.log"
    any: info
database:
    storage: "{self.knot_dir}/db"
policy:
  - id: lab
    algorithm: ecdsap256sha256
    single-type-signing: on
    nsec3: off
template:
  - id: default
    storage: "{self.knot_dir}/zones"
    file: "%s.zone"
    # Keep the unsigned files as written; the signed zone lives in knot's journal.
    zonefile-sync: -1
    journal-content: changes
    dnssec-signing: on
    dnssec-policy: lab
zone:
  - domain: {ZONE}
  - domain: {BOGUS_ZONE}
""")

    def _write_unbound_conf(self):
        write_file(self.unbound_conf, f"""# braid federation lab: validating resolver for the namespaces
server:
    interface: {self.network.resolver_ip}
    port: 53
    access-control: {self.network.subnet}.0/24 allow
    access-control: 127.0.0.0/8 allow
    username: ""
    chroot: ""
    directory: "{self.unbound_dir}"
    pidfile: "{self.unbound_dir}/unbound.pid"
    logfile: "{self.unbound_dir}/unbound.log"
    use-syslog: no
    verbosity: 1
    val-log-level: 2
    num-threads: 1
    module-config: "validator iterator"
    # test. is one of unbound's built-in (RFC 6761) local zones; serve it from knot instead.
    local-zone: "test." nodefault
    trust-anchor-file: "{self.anchor_file}"
    # Short negative caching, so a scenario sees what the zones say now.
    cache-max-negative-ttl: 5
    do-not-query-localhost: no
    harden-dnssec-stripped: yes
stub-zone:
    name: "{ZONE}"
    stub-addr: {self.network.auth_dns_ip}@53
remote-control:
    control-enable: no
""")

    # -- helpers --

    def kdig(self, ns, *args, timeout=10):
        return run(in_netns(ns, ["kdig", "+time=2", "+retry=1", *args]), check=False,
                   timeout=timeout).stdout

    def _signed(self, zone):
        answer = self.kdig(DNS_NS, f"@{self.network.auth_dns_ip}", zone, "DNSKEY", "+short")
        return bool(answer.strip())

    def _keymgr_ds(self, zone):
        """DS records of ZONE's signing key, as printed by keymgr ('zone. DS tag alg type hex')."""
        output = run(["keymgr", "-c", self.knot_conf, zone, "ds"]).stdout
        return [line.strip() for line in output.splitlines() if " DS " in line]

    # -- lifecycle --

    def start(self, records):
        self.records = records
        for sub in ("run", "db", "zones"):
            os.makedirs(os.path.join(self.knot_dir, sub), exist_ok=True)
        os.makedirs(self.unbound_dir, exist_ok=True)
        self._write_knot_conf()
        self._write_test_zone()
        write_file(os.path.join(self.knot_dir, "zones", "bogus.test.zone"),
                   self._zone_text(BOGUS_ZONE, records.bogus, 1))
        run(["knotc", "-c", self.knot_conf, "conf-check"])
        self.knot = Service("knotd", in_netns(DNS_NS, ["knotd", "-c", self.knot_conf]),
                            os.path.join(self.knot_dir, "knotd.out"))
        # knot creates the keys and signs both zones on first load.
        wait_until(lambda: self._signed(ZONE) and self._signed(BOGUS_ZONE),
                   DNS_READY_TIMEOUT, "knot to sign test. and bogus.test.")
        # Now the child's real DS is known: publish it in the parent with its digest
        # corrupted. The delegation is then bogus: the chain of trust is broken at
        # bogus.test. and every answer below it fails validation ("DS hash mismatches key").
        real = [ds for ds in self._keymgr_ds(BOGUS_ZONE) if ds.split()[4] == "2"][0]
        owner, _, tag, algorithm, digest_type, digest = real.split(maxsplit=5)
        digest = digest.replace(" ", "")
        digest = digest[:-1] + ("0" if digest[-1] != "0" else "1")
        self.bogus_ds = f"{tag} {algorithm} {digest_type} {digest}"
        self.test_serial += 1
        self._write_test_zone()
        run(["knotc", "-c", self.knot_conf, "zone-reload", ZONE])
        wait_until(lambda: digest.lower() in self.kdig(
            DNS_NS, f"@{self.network.auth_dns_ip}", BOGUS_ZONE, "DS", "+short").lower().replace(" ", ""),
            DNS_READY_TIMEOUT, "the corrupted DS of bogus.test. in test.")
        anchors = self._keymgr_ds(ZONE)
        if not anchors:
            raise LabError("keymgr printed no DS for test.")
        write_file(self.anchor_file, "\n".join(anchors) + "\n")
        self._write_unbound_conf()
        run(["unbound-checkconf", self.unbound_conf])
        self.unbound = Service("unbound", in_netns(DNS_NS, ["unbound", "-d", "-c", self.unbound_conf]),
                               os.path.join(self.unbound_dir, "unbound.out"))
        wait_until(self._resolver_validates, DNS_READY_TIMEOUT,
                   "unbound to answer with validated (AD) data")

    def _resolver_validates(self):
        rcode, flags = dig_flags(self.kdig(DNS_NS, f"@{self.network.resolver_ip}", "+dnssec",
                                           f"ns.{ZONE}", "A"))
        return rcode == "NOERROR" and "ad" in flags

    def stop(self):
        for service in (self.unbound, self.knot):
            if service is not None:
                service.stop()
        self.unbound = self.knot = None


def dig_flags(output):
    """(rcode, set of header flags) from kdig's output."""
    status = re.search(r"status: (\w+)", output)
    flags = re.search(r"Flags: ([^;]*);", output)
    return (status.group(1) if status else "NO-ANSWER",
            set(flags.group(1).split()) if flags else set())


# -- providers ---------------------------------------------------------------------------

@dataclasses.dataclass
class ProviderSpec:
    """A provider described as data: which server, its name, domains and users, and switches.

    name          namespace suffix and host label: host NAME.test, namespace braidlab-NAME
    prefix        domain prefix: PREFIX1.test ... PREFIXn.test, plus PREFIX.bogus.test
    direct_tls    also listen for XEP-0368 direct TLS s2s (5270) and publish _xmpps-server
    trust_lab_ca  trust the lab CA for s2s; False forces dialback (certificates unusable)
    bidi          Prosody: load mod_s2s_bidi (XEP-0288)
    secure_auth   Prosody: s2s_secure_auth (certificates required, no dialback);
                  Braid: s2s.require_certificates
    extra_domains hosted (with users) but NOT named in the provider's certificate and given
                  no DNS records by the lab: whoever adds them (mux.py) publishes their
                  records through Lab(extra_records=...) and proves them otherwise (POSH,
                  DANE, dialback)
    cert_names    further DNS names for the certificate (e.g. a domain added at runtime)
    settings      Braid only: {section: {key: value}} merged into braid.yaml (for example
                  {"s2s": {"revalidation_interval_seconds": 5}}); values are written as JSON
    per_domain_certs  one lab-CA certificate (and key) per hosted domain, naming only that
                  domain, as at a host whose customers each bring their own (issue 9):
                  Braid gets one tls.certificates entry per domain (`domains: [DOMAIN]`)
                  plus one for its host name, Prosody DOMAIN.crt/DOMAIN.key in its
                  certificates folder, ejabberd every per-domain PEM in `certfiles`
    dialback      Prosody and ejabberd: load the dialback module (mod_dialback,
                  mod_s2s_dialback); False leaves SASL EXTERNAL as the only s2s
                  authentication, and no dialback is offered or answered
    per_domain_hosts  each normal domain D's SRV records point at a host name of its own,
                  `LABEL-host.test` (LABEL: D without `.test`), with an A record to the
                  provider: room for per-domain TLSA records (DANE), which the caller adds
    per_domain_shared_key  with per_domain_certs: every per-domain certificate certifies the
                  same key (the provider's own), as with ACME key reuse; a DANE-EE `3 1 1`
                  record of one domain then matches the certificates of all of them
    muc_domains   Prosody and ejabberd: a group chat (XEP-0045) service `conference.D` for
                  each domain D listed (one of the provider's domains): a `muc` Component in
                  Prosody, mod_muc for D's host in ejabberd. The service is named in the
                  provider's certificate (or gets one of its own with per_domain_certs) and
                  has SRV records like a domain's, so that peers can reach and authenticate it
    pep           Prosody and ejabberd: personal eventing (XEP-0163), for the OMEMO scenarios
                  (mux:omemo-*): Prosody loads mod_pep; ejabberd gets mod_caps and mod_pubsub
                  with the `pep` plugin (Braid always has PEP)
    """
    kind: str
    name: str
    prefix: str
    domains: int = 3
    users_per_domain: int = 3
    direct_tls: bool = False
    trust_lab_ca: bool = True
    bidi: bool = True
    secure_auth: bool = False
    extra_domains: tuple = ()
    cert_names: tuple = ()
    settings: dict = dataclasses.field(default_factory=dict)
    per_domain_certs: bool = False
    dialback: bool = True
    per_domain_hosts: bool = False
    per_domain_shared_key: bool = False
    muc_domains: tuple = ()
    pep: bool = False
    # A Provider subclass to build this provider with instead of the kind's own class
    # (cluster.py's nodes of one clustered provider); None: PROVIDER_CLASSES[kind].
    provider_class: object = None


def default_specs(with_braid, domains=3, users=3):
    specs = [ProviderSpec("prosody", "prosody", "p", domains, users),
             ProviderSpec("ejabberd", "ejabberd", "e", domains, users)]
    if with_braid:
        specs.append(ProviderSpec("braid", "braid", "b", domains, users, direct_tls=True))
    return specs


class Provider:
    """Common part of a running provider: namespace, address, domains, users, certificate."""

    kind = None

    def __init__(self, lab, spec, address):
        self.lab = lab
        self.spec = spec
        self.name = spec.name
        self.ns = NS_PREFIX + spec.name
        self.ip = address
        self.host = f"{spec.name}.{ZONE}".rstrip(".")
        self.domains = [f"{spec.prefix}{index}.{ZONE}".rstrip(".") for index in range(1, spec.domains + 1)]
        # Hosted like any other domain, but its DNS is DNSSEC-bogus: nobody may reach it.
        self.bogus_domain = f"{spec.prefix}.{BOGUS_ZONE}".rstrip(".")
        # Hosted too, with validly signed DNS that must not lead peers here (RFC 6120 §3.2,
        # digest §1.3 item 26): an SRV record whose only target port is closed, and an SRV
        # record "." (no service). Both names also have an A record pointing at this
        # provider, where port 5269 is open: only a peer that wrongly falls back from SRV to
        # A/AAAA can deliver.
        self.srv_dead_domain = f"{spec.prefix}-srvdead.{ZONE}".rstrip(".")
        self.srv_dot_domain = f"{spec.prefix}-srvdot.{ZONE}".rstrip(".")
        self.directory = os.path.join(lab.workdir, spec.name)
        self.service = None
        self.cert = self.key = None
        # With spec.per_domain_certs: {domain: (certificate, key)}, one per hosted domain
        # (self.cert then names only the host name and spec.cert_names).
        self.domain_certs = {}

    # -- identity --

    def all_domains(self):
        return (self.domains + list(self.spec.extra_domains)
                + [self.bogus_domain, self.srv_dead_domain, self.srv_dot_domain])

    def muc_services(self):
        """The group chat services (spec.muc_domains): `conference.D` for each D."""
        return [f"conference.{domain}" for domain in self.spec.muc_domains]

    def certificate_names(self):
        """DNS names of the provider's certificate: its domains (not the extra ones), its
        group chat services, its host name and the spec's cert_names. With per_domain_certs
        only the host name and cert_names: each domain and service has a certificate of its
        own (domain_certs)."""
        if self.spec.per_domain_certs:
            return [self.host] + list(self.spec.cert_names)
        return ([domain for domain in self.all_domains() if domain not in self.spec.extra_domains]
                + self.muc_services() + [self.host] + list(self.spec.cert_names))

    def per_domain_certificate_domains(self):
        """The domains (and group chat services) that get a certificate of their own with
        per_domain_certs."""
        return ([domain for domain in self.all_domains() if domain not in self.spec.extra_domains]
                + self.muc_services())

    def srv_host(self, domain):
        """The SRV target host name of DOMAIN: the provider's host name, or with
        per_domain_hosts a name of the domain's own (`LABEL-host.test`)."""
        if self.spec.per_domain_hosts and domain in self.domains:
            label = domain[: -len("." + ZONE.rstrip("."))] if domain.endswith("." + ZONE.rstrip(".")) else domain
            return f"{label}-host.{ZONE}".rstrip(".")
        return self.host

    def users(self, domain):
        return [f"user{index}@{domain}" for index in range(1, self.spec.users_per_domain + 1)]

    def quiet_user(self):
        """A user kept out of subscriptions (sender of the must-fail messages)."""
        return self.users(self.domains[-1])[-1]

    def all_users(self):
        return [jid for domain in self.all_domains() for jid in self.users(domain)]

    def dns_records(self):
        """(zone, owner, type, rdata) records that make this provider reachable."""
        target = f"{self.host}."
        records = [(ZONE, self.host, "A", self.ip)]
        records.append((ZONE, f"_xmpp-server._tcp.{self.srv_dead_domain}", "SRV", f"0 5 {CLOSED_PORT} {target}"))
        records.append((ZONE, f"_xmpp-server._tcp.{self.srv_dot_domain}", "SRV", "0 0 0 ."))
        for domain in (self.srv_dead_domain, self.srv_dot_domain):
            records.append((ZONE, domain, "A", self.ip))
            records.append((ZONE, f"_xmpp-client._tcp.{domain}", "SRV", f"0 5 {C2S_PORT} {target}"))
        for domain in self.domains + [self.bogus_domain]:
            zone = BOGUS_ZONE if domain == self.bogus_domain else ZONE
            s2s_target = f"{self.srv_host(domain)}."
            if s2s_target != target:
                records.append((ZONE, s2s_target.rstrip("."), "A", self.ip))
            records.append((zone, f"_xmpp-server._tcp.{domain}", "SRV", f"0 5 {S2S_PORT} {s2s_target}"))
            records.append((zone, f"_xmpp-client._tcp.{domain}", "SRV", f"0 5 {C2S_PORT} {target}"))
            if self.spec.direct_tls:
                # XEP-0368: same priority, preferred by weight.
                records.append((zone, f"_xmpps-server._tcp.{domain}", "SRV",
                                f"0 10 {S2S_DIRECT_TLS_PORT} {s2s_target}"))
        # Group chat services are reached like domains: SRV to the provider's host name
        # (whose A record is above), no A record of their own.
        for service in self.muc_services():
            records.append((ZONE, f"_xmpp-server._tcp.{service}", "SRV", f"0 5 {S2S_PORT} {target}"))
            if self.spec.direct_tls:
                records.append((ZONE, f"_xmpps-server._tcp.{service}", "SRV",
                                f"0 10 {S2S_DIRECT_TLS_PORT} {target}"))
        # The bogus domain also gets an address record, so that a server falling back from
        # SRV to A/AAAA would find the provider too: fail-closed must hold either way.
        records.append((BOGUS_ZONE, self.bogus_domain, "A", self.ip))
        return records

    def listen_ports(self):
        return [C2S_PORT, S2S_PORT] + ([S2S_DIRECT_TLS_PORT] if self.spec.direct_tls else [])

    # -- lifecycle (specialised per kind) --

    def prepare(self):
        raise NotImplementedError

    def start(self):
        raise NotImplementedError

    def register_users(self):
        raise NotImplementedError

    def wait_ready(self):
        deadline = time.monotonic() + SERVER_READY_TIMEOUT

        def ready():
            if not self.service.running():
                raise LabError(f"{self.name} exited with {self.service.process.returncode} during "
                               f"start-up:\n{self.log_excerpt()}")
            return all(listening(self.ns, port) for port in self.listen_ports())

        wait_until(ready, max(1.0, deadline - time.monotonic()), f"{self.name} to listen on {self.listen_ports()}")

    def stop(self):
        if self.service is not None:
            code = self.service.stop()
            self.service = None
            return code
        return None

    def release(self):
        """After the last stop (teardown): what the provider needed beside its server."""

    def restart(self, **switches):
        """Stops the server, changes spec switches (e.g. trust_lab_ca=False), starts it again."""
        self.stop()
        for key, value in switches.items():
            setattr(self.spec, key, value)
        self.write_config()
        self.start()
        self.wait_ready()

    def write_config(self):
        raise NotImplementedError

    def log_paths(self):
        return [self.service.log_path] if self.service else []

    def log_excerpt(self, lines=25):
        return "\n".join(f"--- {path}\n{log_tail(path, lines)}" for path in self.log_paths())

    def s2s_evidence(self, remote_domains):
        """How this server authenticated s2s sessions with REMOTE_DOMAINS, if it can tell."""
        return None

    def dialback_evidence(self, remote):
        """Lines proving that this server authenticated REMOTE by dialback (empty: none)."""
        return []

    def main_log(self):
        return self.log_paths()[0] if self.log_paths() else None

    def mark_log(self):
        """Remembers the main log's size: evidence is then read from there on."""
        path = self.main_log()
        self._log_mark = os.path.getsize(path) if path and os.path.exists(path) else 0

    def log_since_mark(self):
        path = self.main_log()
        if not path:
            return ""
        try:
            with open(path, "rb") as handle:
                handle.seek(getattr(self, "_log_mark", 0))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return ""


class ProsodyProvider(Provider):
    """Prosody 0.12, run in the foreground as the prosody user with a generated config."""

    kind = "prosody"

    def __init__(self, lab, spec, address):
        super().__init__(lab, spec, address)
        self.config = os.path.join(self.directory, "prosody.cfg.lua")
        self.data = os.path.join(self.directory, "data")
        self.certs = os.path.join(self.directory, "certs")
        self.log_file = os.path.join(self.directory, "prosody.log")
        self.admin_socket = os.path.join(self.directory, "prosody.sock")

    def prepare(self):
        os.makedirs(self.data, exist_ok=True)
        os.makedirs(self.certs, exist_ok=True)
        if self.spec.per_domain_certs:
            # One certificate per VirtualHost: Prosody finds certs/DOMAIN.crt and DOMAIN.key.
            files = [(domain, cert, key) for domain, (cert, key) in self.domain_certs.items()]
        else:
            # One multi-SAN certificate: Prosody indexes its certificates folder by SAN.
            files = [(self.name, self.cert, self.key)]
        for name, cert, key in files:
            shutil.copy(cert, os.path.join(self.certs, f"{name}.crt"))
            shutil.copy(key, os.path.join(self.certs, f"{name}.key"))
            os.chmod(os.path.join(self.certs, f"{name}.key"), 0o640)
        # libunbound (which Prosody uses through lua-unbound when it is installed) answers
        # test. from its built-in RFC 6761 local zone, NXDOMAIN, before asking any
        # forwarder, and lua-unbound has no way to set `local-zone: "test." nodefault`.
        # A lunbound.lua that fails to load makes Prosody fall back to its own resolver,
        # which asks the lab's validating unbound (SERVFAIL for the bogus zone).
        write_file(os.path.join(self.directory, "lua", "lunbound.lua"),
                   'error("lua-unbound hidden by the braid federation lab: libunbound serves test. '
                   'from a built-in local zone")\n')
        self.write_config()
        chown_tree(self.directory, "prosody")
        os.chmod(self.directory, 0o750)

    def _env(self):
        env = dict(os.environ)
        env["LUA_PATH_5_4"] = os.path.join(self.directory, "lua", "?.lua") + ";;"
        return env

    def write_config(self):
        spec = self.spec
        modules = ["roster", "saslauth", "tls", "disco", "ping", "posix", "admin_shell"]
        if spec.dialback:
            modules.append("dialback")
        if spec.bidi:
            modules.append("s2s_bidi")
        if spec.pep:
            modules.append("pep")
        # Without cafile Prosody uses the system store, where the lab CA is not: the peer's
        # certificate then cannot authenticate it and dialback has to.
        ssl = f'{{ cafile = "{self.lab.ca.cert}" }}' if spec.trust_lab_ca else "{ }"
        text = f"""-- braid federation lab: generated, do not edit
pidfile = "{self.directory}/prosody.pid"
daemonize = false
data_path = "{self.data}"
admin_socket = "{self.admin_socket}"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{self.log_file}" }} }}
modules_enabled = {{ {", ".join(f'"{module}"' for module in modules)} }}
interfaces = {{ "{self.ip}" }}
c2s_ports = {{ {C2S_PORT} }}
s2s_ports = {{ {S2S_PORT} }}
{f"s2s_direct_tls_ports = {{ {S2S_DIRECT_TLS_PORT} }}" if spec.direct_tls else ""}
-- The default listen backlog (128) loses stanzas under bursts of new s2s connections.
network_settings = {{ tcp_backlog = 1024 }}
certificates = "{self.certs}"
ssl = {ssl}
c2s_require_encryption = true
s2s_require_encryption = true
s2s_secure_auth = {"true" if spec.secure_auth else "false"}
authentication = "internal_hashed"
storage = "internal"
allow_registration = false
-- Used only if lua-unbound is loaded (the lab hides it, see prepare()): its own
-- validation needs the lab's anchor, the root key cannot validate test.
unbound = {{ trustfile = "{self.lab.dns.anchor_file}" }}
"""
        for domain in self.all_domains():
            text += f'\nVirtualHost "{domain}"\n'
        # Group chat services (spec.muc_domains). Components inherit tls, dialback, s2s and
        # s2s_bidi from the global modules, so they federate like the VirtualHosts. Anyone,
        # remote users too, may create rooms; a new room stays locked until its owner
        # accepts the configuration (the lab's owners submit the instant-room form).
        for service in self.muc_services():
            text += f'\nComponent "{service}" "muc"\n    restrict_room_creation = false\n'
        write_file(self.config, text, 0o640)
        if os.path.isdir(self.directory):
            chown_tree(self.directory, "prosody")

    def prosodyctl(self, *args, input_text=None, timeout=COMMAND_TIMEOUT):
        return run(as_user("prosody", ["prosodyctl", "--config", self.config, *args]),
                   input_text=input_text, timeout=timeout)

    def register_users(self):
        # prosodyctl writes the account files directly; it does not need the server running.
        for jid in self.all_users():
            user, domain = jid.split("@")
            self.prosodyctl("register", user, domain, PASSWORD)

    def start(self):
        self.service = Service(
            "prosody", in_netns(self.ns, as_user("prosody", ["prosody", "--config", self.config, "-F"])),
            os.path.join(self.directory, "prosody.out"), env=self._env(), cwd=self.directory)

    def log_paths(self):
        return [self.log_file] + super().log_paths()

    def s2s_sessions(self):
        """The table `s2s:show()` prints through the admin shell (mod_admin_shell)."""
        return self.prosodyctl(
            "shell", "s2s:show(nil, {'host','dir','remote','secure','cert','s2s_sasl','dialback'})").stdout

    def s2s_evidence(self, remote_domains):
        # Columns: local host | dir (--> outgoing, <-- incoming) | remote | TLS | peer
        # certificate | SASL EXTERNAL | dialback key sent by us (outgoing only).
        output = self.s2s_sessions()
        wanted = [line for line in output.splitlines() if any(domain in line for domain in remote_domains)]
        return "\n".join(wanted) or output.strip()

    def dialback_evidence(self, remote):
        # mod_dialback (debug log): an incoming db:result makes Prosody verify the key with
        # the sender's authoritative server ("asking REMOTE if key ... belongs to them").
        lines = [line.strip()[:200] for line in self.log_since_mark().splitlines()
                 if f"asking {remote} if key" in line]
        incoming_without_sasl = [line.strip() for line in self.s2s_evidence([remote]).splitlines()
                                 if "<--" in line and remote in line and "Succeeded" not in line]
        if lines:
            return ([f"prosody verified a dialback key of {remote} (db:verify round trip): {lines[0]}"]
                    + [f"prosody session from {remote} without SASL EXTERNAL: {row}"
                       for row in incoming_without_sasl])
        # With XEP-0288 the peer may answer over Prosody's own outgoing stream, which Prosody
        # authenticated for REMOTE the dialback way (DNS, since the certificate failed
        # validation), so no db:verify round trip happens. Prosody logs per session id.
        log_text = self.log_since_mark().splitlines()
        untrusted = {line.split()[3] for line in log_text
                     if "s2sout" in line and "certificate chain validation result: invalid" in line and len(line.split()) > 3}
        for line in log_text:
            parts = line.split()
            if len(parts) > 3 and parts[3] in untrusted and f"->{remote} is now authenticated for {remote}" in line:
                return [f"prosody's outgoing bidi stream to {remote} was authenticated without its certificate "
                        f"(dialback trust, XEP-0288 reverse direction): {line.strip()[:200]}"]
        return []


class EjabberdProvider(Provider):
    """ejabberd 23.01 via ejabberdctl foreground, with its own config, spool, logs and node.

    It is started as the ejabberd user through setpriv, not su: as root, ejabberdctl uses su,
    and PAM then caps open files at 1024. Erlang distribution uses a fixed port on the
    namespace's loopback (ERL_DIST_PORT), so no epmd daemon is started.
    """

    kind = "ejabberd"
    node = "ejabberd@localhost"

    def __init__(self, lab, spec, address):
        super().__init__(lab, spec, address)
        self.config_dir = os.path.join(self.directory, "etc")
        self.config = os.path.join(self.config_dir, "ejabberd.yml")
        self.ctl_config = os.path.join(self.config_dir, "ejabberdctl.cfg")
        self.spool = os.path.join(self.directory, "spool")
        self.logs = os.path.join(self.directory, "logs")
        self.certfile = os.path.join(self.config_dir, "server.pem")
        self.certfiles = [self.certfile]

    def prepare(self):
        for path in (self.config_dir, self.spool, self.logs):
            os.makedirs(path, exist_ok=True)
        bundles = [(self.certfile, self.cert, self.key)]
        if self.spec.per_domain_certs:
            # One PEM (certificate + key) per domain; ejabberd picks the one naming the host.
            bundles = [(os.path.join(self.config_dir, f"{domain}.pem"), cert, key)
                       for domain, (cert, key) in self.domain_certs.items()]
        self.certfiles = [path for path, _, _ in bundles]
        for target, cert, key in bundles:
            with open(target, "w") as pem:
                for path in (cert, key):
                    with open(path) as part:
                        pem.write(part.read())
            os.chmod(target, 0o640)
        # A fixed cookie, so that the registration client (same HOME) can talk to the node.
        write_file(os.path.join(self.spool, ".erlang.cookie"), "braidlabcookie", 0o400)
        write_file(self.ctl_config, f"""# braid federation lab: generated
ERLANG_NODE={self.node}
ERL_DIST_PORT={EJABBERD_DIST_PORT}
INET_DIST_INTERFACE=127.0.0.1
EJABBERD_PID_PATH={self.directory}/ejabberd.pid
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
ERL_MAX_PORTS=65536
EJABBERD_BYPASS_WARNINGS=true
""")
        self.write_config()
        chown_tree(self.directory, "ejabberd")
        os.chmod(self.directory, 0o750)

    def write_config(self):
        spec = self.spec
        hosts = "\n".join(f"  - {domain}" for domain in self.all_domains())
        certfiles = "\n".join(f'  - "{path}"' for path in self.certfiles)
        # Without mod_s2s_dialback ejabberd neither offers nor answers dialback: SASL
        # EXTERNAL is its only s2s authentication.
        dialback = "  mod_s2s_dialback: {}\n" if spec.dialback else ""
        modules = "  mod_disco: {}\n  mod_ping: {}\n  mod_roster: {}\n" + dialback
        if spec.pep:
            # PEP is mod_pubsub's `pep` plugin; mod_caps learns which contacts want which
            # nodes (`NODE+notify` in their XEP-0115 caps).
            modules += '  mod_caps: {}\n  mod_pubsub:\n    plugins: ["flat", "pep"]\n'
        # Group chat (spec.muc_domains): mod_muc only for those hosts, as `conference.HOST`.
        # host_config's modules are merged with the global ones; listing them all again
        # keeps the host's modules the same whichever way a version merges.
        muc_hosts = ""
        if spec.muc_domains:
            muc_hosts = "host_config:\n" + "".join(
                f"  {domain}:\n    modules:\n"
                + "".join(f"    {line}\n" for line in modules.splitlines())
                + '      mod_muc:\n        hosts: ["conference.@HOST@"]\n        access_create: all\n'
                for domain in spec.muc_domains)
        # Without ca_file ejabberd uses the system bundle, where the lab CA is not.
        ca_line = f'ca_file: "{self.lab.ca.cert}"' if spec.trust_lab_ca else ""
        direct_tls = f"""  - port: {S2S_DIRECT_TLS_PORT}
    ip: "{self.ip}"
    module: ejabberd_s2s_in
    tls: true
    backlog: 1024
""" if spec.direct_tls else ""
        write_file(self.config, f"""# braid federation lab: generated, do not edit
hosts:
{hosts}
loglevel: info
log_rotate_count: 0
certfiles:
{certfiles}
{ca_line}
# The listen backlog defaults to 5: bursts of s2s connects overflow it.
listen:
  - port: {C2S_PORT}
    ip: "{self.ip}"
    module: ejabberd_c2s
    starttls_required: true
    backlog: 1024
  - port: {S2S_PORT}
    ip: "{self.ip}"
    module: ejabberd_s2s_in
    backlog: 1024
{direct_tls}
s2s_use_starttls: required
s2s_dns_timeout: 2
s2s_dns_retries: 1
auth_method: internal
auth_password_format: scram
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
  s2s:
    allow: all
s2s_access: s2s
modules:
{modules}{muc_hosts}""", 0o640)
        if os.path.isdir(self.directory):
            chown_tree(self.directory, "ejabberd")

    def _env(self):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("ERL", "EJABBERD"))}
        env["HOME"] = self.spool  # where the Erlang cookie is
        return env

    def start(self):
        argv = ["ejabberdctl", "--config-dir", self.config_dir, "--ctl-config", self.ctl_config,
                "--config", self.config, "--spool", self.spool, "--logs", self.logs,
                "--node", self.node, "foreground"]
        self.service = Service("ejabberd", in_netns(self.ns, as_user("ejabberd", argv)),
                               os.path.join(self.logs, "ejabberd.out"), env=self._env(),
                               cwd=self.spool, nofile=20000)

    def register_users(self):
        """All accounts in one Erlang VM (each `ejabberdctl register` would boot a VM, ~2 s)."""
        users = ",".join(f'{{<<"{jid.split("@")[0]}">>,<<"{jid.split("@")[1]}">>,<<"{PASSWORD}">>}}'
                         for jid in self.all_users())
        program = (
            f"Node = '{self.node}', "
            f"Results = [{{U, S, rpc:call(Node, ejabberd_auth, try_register, [U, S, P], 20000)}} "
            f"|| {{U, S, P}} <- [{users}]], "
            "Bad = [R || {_, _, Status} = R <- Results, Status =/= ok], "
            "io:format(\"~p~n\", [Bad]), "
            "halt(case Bad of [] -> 0; _ -> 1 end).")
        argv = ["erl", "-sname", f"labreg{random.randint(0, 99999)}@localhost", "-hidden", "-noinput",
                "-erl_epmd_port", str(EJABBERD_DIST_PORT), "-start_epmd", "false",
                "-dist_listen", "false", "-eval", program]
        result = run(in_netns(self.ns, as_user("ejabberd", argv)), check=False, env=self._env(),
                     cwd=self.spool)
        if result.returncode != 0:
            raise LabError(f"registering ejabberd users failed: {(result.stdout + result.stderr).strip()[-2000:]}")

    def log_paths(self):
        return [os.path.join(self.logs, "ejabberd.log"), os.path.join(self.logs, "error.log")] + super().log_paths()

    def s2s_evidence(self, remote_domains):
        """ejabberd logs, at info level, how each s2s stream was authenticated."""
        lines = []
        for line in self.log_since_mark().splitlines():
            lowered = line.lower()
            if ("s2s" in lowered and any(domain in line for domain in remote_domains)
                    and ("accepted" in lowered or "authentication" in lowered or "failed" in lowered)):
                # Drop the timestamp and the Erlang location: the message is what matters.
                lines.append(re.sub(r"^\S+ \S+ \[(\w+)\] \S+ ", r"[\1] ", line.strip())[:300])
        return "\n".join(lines[-12:])

    def dialback_evidence(self, remote):
        # Only streams from REMOTE into this server: that is where this server decided how
        # to authenticate the peer.
        return [f"ejabberd: {line}" for line in self.s2s_evidence([remote]).splitlines()
                if f"Accepted inbound s2s dialback authentication {remote} ->" in line]


class LabPostgres:
    """A PostgreSQL cluster for one Braid provider (BRAID_LAB_STORAGE=postgresql): in the
    provider's directory, reached by Unix socket only (the socket directory is shared with
    the provider's namespace through the file system), run as the `postgres` user, stopped
    by PID at teardown."""

    def __init__(self, directory):
        versions = sorted(int(name) for name in os.listdir("/usr/lib/postgresql") if name.isdigit()) \
            if os.path.isdir("/usr/lib/postgresql") else []
        if not versions:
            raise LabError("BRAID_LAB_STORAGE=postgresql needs PostgreSQL (apt-get install postgresql)")
        self.bin = f"/usr/lib/postgresql/{versions[-1]}/bin"
        self.directory = directory
        self.service = None

    def _as_postgres(self, argv):
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"] + argv

    def start(self):
        os.makedirs(self.directory, exist_ok=True)
        os.chmod(self.directory, 0o777)
        data = os.path.join(self.directory, "data")
        # Started again after a stop (cluster.py's PostgreSQL restart): the same data.
        fresh = not os.path.exists(os.path.join(data, "PG_VERSION"))
        if fresh:
            run(self._as_postgres([f"{self.bin}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]))
        self.service = Service("postgres", self._as_postgres([f"{self.bin}/postgres", "-D", data, "-k", self.directory,
                                                              "-c", "listen_addresses=", "-c", "fsync=off"]),
                               os.path.join(self.directory, "postgres.log"))
        wait_until(lambda: subprocess.run([f"{self.bin}/pg_isready", "-h", self.directory, "-U", "postgres"],
                                          capture_output=True).returncode == 0, 30, "PostgreSQL to accept connections")
        if fresh:
            run(["psql", "-h", self.directory, "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-c", "CREATE DATABASE braid"])

    @property
    def url(self):
        return f"postgresql://postgres@/braid?host={self.directory}"

    def stop(self):
        if self.service is not None:
            self.service.stop()
            self.service = None


class BraidProvider(Provider):
    """Braid from $BRAID_BINARY: `braid serve --config braid.yaml` inside its namespace.

    The s2s and dns keys are what the lab expects of Braid's federation support (they are
    being implemented); until then Braid rejects them as unknown keys and fails to start.
    """

    kind = "braid"

    def __init__(self, lab, spec, address):
        super().__init__(lab, spec, address)
        self.binary = os.environ.get("BRAID_BINARY", DEFAULT_BRAID_BINARY)
        self.config = os.path.join(self.directory, "braid.yaml")
        self.data = os.path.join(self.directory, "data")
        self.peers = {}  # remote domain -> per-peer overrides, written under s2s.peers
        # BRAID_LAB_STORAGE=postgresql: the provider keeps its data in PostgreSQL.
        self.postgres = LabPostgres(os.path.join(self.directory, "pg")) \
            if os.environ.get("BRAID_LAB_STORAGE", "sqlite") == "postgresql" else None

    def prepare(self):
        if not os.access(self.binary, os.X_OK):
            raise LabError(f"Braid binary {self.binary} is missing or not executable (set BRAID_BINARY)")
        os.makedirs(self.data, exist_ok=True)
        if self.postgres is not None and self.postgres.service is None:
            self.postgres.start()
        self.write_config()
        write_file(os.path.join(self.directory, "domains.txt"), "\n".join(self.all_domains()) + "\n")
        self.cli("domain", "add", "--file", os.path.join(self.directory, "domains.txt"))

    def write_config(self):
        write_file(self.config, braid_config_yaml(self), 0o600)

    def _env(self):
        # Stray BRAID_* variables from the caller would override the file.
        return {key: value for key, value in os.environ.items() if not key.startswith("BRAID_")}

    def cli(self, *args):
        return run([self.binary, *args, "--config", self.config], env=self._env(), cwd=self.directory).stdout

    def register_users(self):
        for jid in self.all_users():
            self.cli("user", "add", jid, "--password", PASSWORD)

    def start(self):
        self.service = Service("braid", in_netns(self.ns, [self.binary, "serve", "--config", self.config]),
                               os.path.join(self.directory, "braid.log"), env=self._env(), cwd=self.directory)

    def listen_ports(self):
        return [C2S_PORT, S2S_PORT, S2S_DIRECT_TLS_PORT]

    def release(self):
        if self.postgres is not None:
            self.postgres.stop()

    def s2s_evidence(self, remote_domains):
        """Braid's own log lines (log_level debug) about s2s with REMOTE_DOMAINS.

        Braid's log format for federation is not settled yet: this is a plain filter on
        lines naming the remote domain and s2s, dialback, SASL or EXTERNAL."""
        lines = [line.strip()[:300] for line in self.log_since_mark().splitlines()
                 if any(domain in line for domain in remote_domains)
                 and re.search(r"s2s|dialback|sasl|external|federation|link", line, re.I)]
        return "\n".join(lines[-12:])

    def dialback_evidence(self, remote):
        return [f"braid: {line}" for line in self.s2s_evidence([remote]).splitlines()
                if re.search(r"dialback", line, re.I)]


def yaml_string(value):
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def braid_config_yaml(provider):
    """Braid's configuration for the lab, including the s2s and dns sections."""
    spec, lab = provider.spec, provider.lab
    anchors = [lab.ca.cert] if spec.trust_lab_ca else []
    extra = {section: dict(values) for section, values in spec.settings.items()}
    self_sign = extra.get("tls", {}).pop("self_sign_missing", False)
    # tls.domains: the domains the certificate serves (default: every name it covers), e.g.
    # hosted domains it does not name, which peers then prove by POSH, DANE or dialback.
    served = extra.get("tls", {}).pop("domains", None)
    if not extra.get("tls", True):
        del extra["tls"]
    lines = [
        "# braid federation lab: generated, do not edit",
        f"data_directory: {yaml_string(provider.data)}",
        f"default_domain: {yaml_string(provider.domains[0])}",
        "log_level: debug",
        "c2s:",
        f"  address: {yaml_string(provider.ip)}",
        f"  starttls_port: {C2S_PORT}",
        f"  direct_tls_port: {C2S_DIRECT_TLS_PORT}",
        "tls:",
        f"  self_sign_missing: {json.dumps(self_sign)}",
        "  certificates:",
    ]
    # With per_domain_certs: one entry per hosted domain, serving that domain only; the
    # provider's own certificate (host name and cert_names) comes last.
    for domain, (cert, key) in provider.domain_certs.items():
        lines += [f"    - certificate: {yaml_string(cert)}",
                  f"      key: {yaml_string(key)}",
                  f"      domains: {json.dumps([domain])}"]
    lines += [
        f"    - certificate: {yaml_string(provider.cert)}",
        f"      key: {yaml_string(provider.key)}",
        *([f"      domains: {json.dumps(served)}"] if served else []),
        "s2s:",
        f"  address: {yaml_string(provider.ip)}",
        f"  starttls_port: {S2S_PORT}",
        f"  direct_tls_port: {S2S_DIRECT_TLS_PORT}",
        f"  require_certificates: {'true' if spec.secure_auth else 'false'}",
        "  trust_anchor_files: [" + ", ".join(yaml_string(path) for path in anchors) + "]",
    ]
    peers = dict(provider.peers)
    for domain, settings in extra.get("s2s", {}).pop("peers", {}).items():
        peers[domain] = {**peers.get(domain, {}), **settings}
    if peers:
        lines.append("  peers:")
        for domain, settings in sorted(peers.items()):
            lines.append(f"    {yaml_string(domain)}:")
            for key, value in settings.items():
                lines.append(f"      {key}: {json.dumps(value)}")
    else:
        lines.append("  peers: {}")
    # Further keys from the spec (JSON is valid YAML flow syntax).
    lines += [f"  {key}: {json.dumps(value)}" for key, value in extra.pop("s2s", {}).items()]
    lines += [
        "dns:",
        f"  forwarders: [{yaml_string(lab.network.resolver_ip)}]",
        f"  trust_anchor_file: {yaml_string(lab.dns.anchor_file)}",
    ]
    if provider.postgres is not None:
        lines += ["storage:", "  backend: postgresql", f"  url: {yaml_string(provider.postgres.url)}"]
    for section, values in extra.items():
        lines.append(f"{section}:")
        lines += [f"  {key}: {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


PROVIDER_CLASSES = {"prosody": ProsodyProvider, "ejabberd": EjabberdProvider, "braid": BraidProvider}


# -- XMPP client agents ------------------------------------------------------------------

class AgentError(Exception):
    pass


class Agent:
    """One agent.py process (one XMPP client) inside a provider's namespace.

    Commands go as JSON lines to its stdin; each gets exactly one JSON line back. Every read
    is bounded by the command's own timeout plus a margin.
    """

    def __init__(self, lab, provider, jid, quiet=False):
        """QUIET: the agent logs warnings only (no XML transcript), for agents carrying
        thousands of stanzas (mux.py's client pools)."""
        self.lab = lab
        self.provider = provider
        self.jid = jid
        self.full_jid = None
        log_path = os.path.join(lab.workdir, "agents", f"{jid}-{len(lab.agents)}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        self.log_path = log_path
        self._stderr = open(log_path + ".err", "ab")
        self.process = subprocess.Popen(
            in_netns(provider.ns, [PYTHON, AGENT, log_path] + (["--quiet"] if quiet else [])),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, start_new_session=True)
        self._buffer = b""
        lab.agents.append(self)

    def call(self, cmd, timeout=STEP_TIMEOUT, **fields):
        """Sends CMD; returns the reply dict, raises AgentError on an error reply."""
        payload = {"cmd": cmd, **fields}
        if cmd in ("connect", "wait", "roster", "ping", "unroster", "disconnect") or cmd.startswith(("pool_", "omemo_")):
            payload["timeout"] = timeout
        try:
            self.process.stdin.write((json.dumps(payload) + "\n").encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            raise AgentError(f"agent for {self.jid} is gone: {log_tail(self.log_path + '.err', 10)}") from None
        deadline = time.monotonic() + timeout + AGENT_CALL_MARGIN
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"agent for {self.jid} did not answer {cmd} in {timeout + AGENT_CALL_MARGIN}s")
            ready, _, _ = select.select([self.process.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                if not chunk:
                    raise AgentError(f"agent for {self.jid} exited: {log_tail(self.log_path + '.err', 10)}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise AgentError(f"{self.jid}: {cmd} failed: {reply.get('error')}")
        return reply

    def connect(self, **options):
        """Logs in; OPTIONS go to agent.py's connect (e.g. omemo=True)."""
        reply = self.call("connect", jid=self.jid, password=PASSWORD, host=self.provider.ip,
                          port=C2S_PORT, ca=self.lab.ca.cert, **options)
        self.full_jid = reply["full_jid"]
        return self.full_jid

    def wait(self, kind, timeout=STEP_TIMEOUT, **match):
        return self.call("wait", timeout=timeout, kind=kind, **match)["event"]

    def close(self):
        """Asks the agent to log out, closes its stdin, and stops it by PID if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(AgentError, OSError, ValueError):
                self.call("disconnect", timeout=3)
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop_pids([self.process.pid], label=f"agent {self.jid}")
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=STOP_GRACE)
        self._stderr.close()
        if self in self.lab.agents:
            self.lab.agents.remove(self)


# -- the lab -----------------------------------------------------------------------------

@contextlib.contextmanager
def provider_context(provider, doing):
    """Names the provider in a setup error."""
    try:
        yield
    except LabError as error:
        raise LabError(f"{doing} {provider.name}: {error}") from None

class Lab:
    """Builds the whole lab (setup) and takes it down again (teardown); use as a context manager."""

    def __init__(self, specs, subnet=DEFAULT_SUBNET, workdir=None, keep_workdir=False, extra_records=None):
        """EXTRA_RECORDS: None, or a function (called with the lab once the certificates
        exist) returning more (zone, owner, type, rdata) records for the signed zones."""
        self.specs = specs
        self.extra_records = extra_records
        # Further programs a scenario module started (stopped first at teardown).
        self.extra_services = []
        self.subnet = subnet
        self.keep_workdir = keep_workdir
        self.workdir = workdir
        self._own_workdir = workdir is None
        self.network = Network(subnet)
        self.ca = None
        self.dns = None
        self.providers = []
        self.agents = []
        self.failed = False

    def __enter__(self):
        try:
            self.setup()
        except BaseException:
            self.failed = True
            self.teardown()
            raise
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            self.failed = True
        self.teardown()
        return False

    def setup(self):
        started = time.monotonic()
        remove_stale_lab()
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="braidlab-")
        os.makedirs(self.workdir, exist_ok=True)
        # Prosody and ejabberd run as their own users and must traverse into their dirs.
        os.chmod(self.workdir, 0o755)
        log(f"work directory {self.workdir}")

        self.network.create_dns_namespace()
        for index, spec in enumerate(self.specs):
            address = self.network.ip(FIRST_PROVIDER_HOST + index)
            provider = (spec.provider_class or PROVIDER_CLASSES[spec.kind])(self, spec, address)
            self.network.add_provider_namespace(provider.ns, spec.name, address)
            self.providers.append(provider)
        log(f"namespaces up: {', '.join(self.network.namespaces)}")

        self.ca = CertificateAuthority(os.path.join(self.workdir, "pki"))
        for provider in self.providers:
            provider.cert, provider.key = self.ca.issue(provider.name, provider.certificate_names())
            if provider.spec.per_domain_certs:
                shared = provider.key if provider.spec.per_domain_shared_key else None
                for domain in provider.per_domain_certificate_domains():
                    provider.domain_certs[domain] = self.ca.issue(f"{provider.name}-{domain}", [domain], key=shared)

        self.dns = Dns(os.path.join(self.workdir, "dns"), self.network)
        records = DnsRecords()
        for provider in self.providers:
            for zone, owner, rtype, rdata in provider.dns_records():
                target = records.test if zone == ZONE else records.bogus
                target.append((relative(owner, zone), rtype, rdata))
        if self.extra_records is not None:
            for zone, owner, rtype, rdata in self.extra_records(self):
                target = records.test if zone == ZONE else records.bogus
                target.append((relative(owner, zone), rtype, rdata))
        self.dns.start(records)
        log("DNS up: test. signed, bogus.test. delegated with a wrong DS, unbound validating")

        for provider in self.providers:
            with provider_context(provider, "preparing"):
                provider.prepare()
                if provider.kind != "ejabberd":  # these write accounts without a running server
                    provider.register_users()
        for provider in self.providers:
            with provider_context(provider, "starting"):
                provider.start()
        for provider in self.providers:
            with provider_context(provider, "starting"):
                provider.wait_ready()
                if provider.kind == "ejabberd":
                    provider.register_users()
        log(f"providers up: {', '.join(f'{p.name} ({p.ip})' for p in self.providers)}; "
            f"setup took {time.monotonic() - started:.1f}s")

    def teardown(self):
        """Stops everything by PID and removes the namespaces; safe to call more than once.

        SIGINT and SIGTERM are held off meanwhile: a second Ctrl-C must not cut the cleanup
        short (whatever is left would be removed by the next run's stale sweep anyway)."""
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._teardown()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)

    def _teardown(self):
        for agent in list(self.agents):
            with contextlib.suppress(Exception):
                agent.close()
        for service in reversed(self.extra_services):
            try:
                service.stop()
            except Exception as error:  # noqa: BLE001 - keep tearing down
                log(f"stopping {service.name}: {error}")
        self.extra_services = []
        for provider in self.providers:
            try:
                provider.stop()
            except Exception as error:  # noqa: BLE001 - keep tearing down
                log(f"stopping {provider.name}: {error}")
            try:
                provider.release()
            except Exception as error:  # noqa: BLE001 - keep tearing down
                log(f"releasing {provider.name}: {error}")
        if self.dns is not None:
            self.dns.stop()
        self.network.teardown()
        # A last sweep: nothing of the lab may survive, whatever happened above.
        remove_stale_lab()
        if self.workdir and self._own_workdir and not self.keep_workdir and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self.workdir:
            log(f"work directory kept: {self.workdir}")

    def provider(self, kind):
        for provider in self.providers:
            if provider.kind == kind:
                return provider
        raise LabError(f"no provider of kind {kind}")

    def agent(self, provider, jid):
        return self.connect_agents([(provider, jid)])[0]

    def connect_agents(self, wanted):
        """Agents for [(provider, jid)], started together (their start-up overlaps), then
        logged in one by one."""
        agents = [Agent(self, provider, jid) for provider, jid in wanted]
        for agent in agents:
            step(f"log in {agent.jid}", agent.connect)
        return agents

    def connections(self, a, b):
        """S2S connections between providers A and B, seen from A's namespace."""
        out, into = [], []
        for local_ip, local_port, peer_ip, peer_port in tcp_connections(a.ns):
            if peer_ip != b.ip:
                continue
            if peer_port in S2S_PORTS:
                out.append((local_ip, local_port, peer_ip, peer_port))
            elif local_port in S2S_PORTS:
                into.append((local_ip, local_port, peer_ip, peer_port))
        return out, into


# -- scenarios ---------------------------------------------------------------------------

UNICODE_BODY = "Grüße aus {src} → {dst}: 你好, Ελληνικά, עִבְרִית, emoji 🧵🪢, ﬁ-ligature, Å/Å"


class Connections:
    """Before/after snapshots of the s2s TCP connections between two providers."""

    def __init__(self, lab, a, b):
        self.lab, self.a, self.b = lab, a, b
        self.before = self._snapshot()

    def _snapshot(self):
        out, into = self.lab.connections(self.a, self.b)
        return set(out), set(into)

    def report(self, moment):
        out, into = self._snapshot()
        new = len(out - self.before[0]) + len(into - self.before[1])
        return (f"s2s TCP connections {moment}: {self.a.name}→{self.b.name} {len(out)}, "
                f"{self.b.name}→{self.a.name} {len(into)} (total {len(out) + len(into)}, "
                f"{new} opened during the scenario)")

    def opened_from_a(self):
        out, _ = self._snapshot()
        return out - self.before[0]


def expect(condition, message):
    if not condition:
        raise ScenarioFailure(message)


def step(description, function, *args, **kwargs):
    """Runs one step; an agent error becomes a scenario failure naming the step."""
    try:
        return function(*args, **kwargs)
    except AgentError as error:
        raise ScenarioFailure(f"{description}: {error}") from None


def exchange(lab, a, a_jid, b, b_jid, details):
    """The federation checks between user A_JID (at provider A) and B_JID (at B).

    A subscribes to B, then B to A (each approves), ending in mutual subscription with each
    side seeing the other's presence; then a message each way with a Unicode body, then IQ
    pings both ways, to the remote user's full JID and to the remote domain.
    """
    conns = Connections(lab, a, b)
    details.append(conns.report("before"))
    for provider in (a, b):
        provider.mark_log()
    agent_a, agent_b = lab.connect_agents([(a, a_jid), (b, b_jid)])
    subscribe_mutually(details, agent_a, agent_b)
    for agent, other in ((agent_a, b_jid), (agent_b, a_jid)):
        roster = step(f"roster of {agent.jid}", agent.call, "roster")["roster"]
        expect(roster.get(other) == "both",
               f"{agent.jid}'s roster has {other} as {roster.get(other)!r}, expected 'both'")

    for (x, x_jid), (y, y_jid) in (((agent_a, a_jid), (agent_b, b_jid)), ((agent_b, b_jid), (agent_a, a_jid))):
        body = UNICODE_BODY.format(src=x_jid, dst=y_jid)
        message_id = f"lab-{random.getrandbits(40):x}"
        sent = time.monotonic()
        step(f"message {x_jid} → {y_jid}", x.call, "message", to=y_jid, body=body, id=message_id)
        event = step(f"{y_jid} receives the message", y.wait, "message", **{"from": x_jid})
        expect(event["body"] == body, f"{y_jid} received {event['body']!r}, sent {body!r}")
        details.append(f"message {x_jid} → {y_jid} delivered intact in {time.monotonic() - sent:.2f}s")

    for x, target in ((agent_a, agent_b.full_jid), (agent_a, b_jid.split("@")[1]),
                      (agent_b, agent_a.full_jid), (agent_b, a_jid.split("@")[1])):
        reply = step(f"ping {x.jid} → {target}", x.call, "ping", to=target)
        expect(reply["type"] == "result", f"ping {x.jid} → {target}: {reply}")
        details.append(f"ping {x.jid} → {target}: result in {reply['rtt']:.3f}s")
    details.append(conns.report("during (clients online)"))
    for agent in (agent_a, agent_b):
        agent.close()
    details.append(conns.report("after (clients gone)"))


def subscribe_mutually(details, agent_a, agent_b):
    """AGENT_A subscribes to AGENT_B and B approves, then the other way round; each step
    waits for its effect (request, `subscribed`, the other's available presence)."""
    started = time.monotonic()
    for x, y in ((agent_a, agent_b), (agent_b, agent_a)):
        step(f"{x.jid} subscribes to {y.jid}", x.call, "subscribe", to=y.jid)
        step(f"{y.jid} gets the subscription request", y.wait, "subscribe", **{"from": x.jid})
        step(f"{y.jid} approves", y.call, "approve", to=x.jid)
        step(f"{x.jid} gets subscribed", x.wait, "subscribed", **{"from": y.jid})
        # Approval makes Y's server send Y's current presence to X.
        step(f"{x.jid} sees {y.jid}'s presence", x.wait, "available", full_from=y.full_jid)
    details.append(f"mutual presence subscription {agent_a.jid} ⇄ {agent_b.jid} in {time.monotonic() - started:.2f}s")


class UserAllocator:
    """Hands each exchange scenario users not used before on that provider.

    Roster state persists: a second subscription between users who are already subscribed
    is answered by the server itself (RFC 6121 §3.1.3) and never reaches the client, so
    each exchange needs fresh users. Users are taken domain by domain (user1@X1, user1@X2,
    ..., user2@X1, ...), so that successive scenarios also use fresh domain pairs where
    possible. The provider's quiet user is never handed out.
    """

    def __init__(self):
        self.next_index = {}

    def take(self, provider):
        candidates = [jid for number in range(1, provider.spec.users_per_domain + 1)
                      for domain in provider.domains
                      for jid in [f"user{number}@{domain}"] if jid != provider.quiet_user()]
        index = self.next_index.get(provider.name, 0)
        self.next_index[provider.name] = index + 1
        if index >= len(candidates):
            raise ScenarioFailure(f"{provider.name} has no unused user left: raise --users or --domains")
        return candidates[index]


def quiesce(lab, providers, quiet_for=1.0, limit=10.0):
    """Waits (bounded) until nothing moves between PROVIDERS: the same s2s connections and
    TCP counters for QUIET_FOR seconds. Logouts at the end of a scenario make servers send
    presence to contacts, and that traffic must not be counted in the next scenario."""
    def state():
        return [(sorted(tcp_connections(p.ns)), tcp_counters(p.ns)["ActiveOpens"],
                 tcp_counters(p.ns)["PassiveOpens"]) for p in providers]

    deadline = time.monotonic() + limit
    previous = state()
    while time.monotonic() < deadline:
        time.sleep(quiet_for)
        current = state()
        if current == previous:
            return True
        previous = current
    log(f"traffic between {', '.join(p.name for p in providers)} did not settle in {limit}s")
    return False


def scenario_dns(lab, details):
    """kdig +dnssec from every provider namespace (via its resolv.conf): AD on the lab's
    answers, SERVFAIL for the bogus zone."""
    for provider in lab.providers:
        for other in lab.providers:
            for domain in other.domains + [other.srv_dead_domain, other.srv_dot_domain]:
                name = f"_xmpp-server._tcp.{domain}"
                rcode, flags = dig_flags(lab.dns.kdig(provider.ns, "+dnssec", name, "SRV"))
                expect(rcode == "NOERROR" and "ad" in flags,
                       f"{name} SRV from {provider.ns}: {rcode}, flags {sorted(flags)} (want NOERROR with ad)")
            rcode, flags = dig_flags(lab.dns.kdig(provider.ns, "+dnssec", other.host, "A"))
            expect(rcode == "NOERROR" and "ad" in flags, f"{other.host} A from {provider.ns}: {rcode} {sorted(flags)}")
            for name, rtype in ((f"_xmpp-server._tcp.{other.bogus_domain}", "SRV"), (other.bogus_domain, "A")):
                rcode, flags = dig_flags(lab.dns.kdig(provider.ns, "+dnssec", name, rtype))
                expect(rcode == "SERVFAIL", f"{name} {rtype} from {provider.ns}: {rcode}, expected SERVFAIL")
                # Sanity: with checking disabled (+cd) the data is there, so the SERVFAIL
                # above is the validator's verdict and not a missing record.
                rcode_cd, _ = dig_flags(lab.dns.kdig(provider.ns, "+dnssec", "+cdflag", name, rtype))
                expect(rcode_cd == "NOERROR", f"{name} {rtype} with +cd: {rcode_cd}, expected NOERROR")
        details.append(f"{provider.ns}: SRV/A answers for all lab domains carry AD; "
                       f"*.{BOGUS_ZONE.rstrip('.')} names are SERVFAIL (NOERROR with +cd)")
    # The evidence, as kdig prints it, for one good and one bogus name.
    viewer, other = lab.providers[0], lab.providers[-1]
    for name in (f"_xmpp-server._tcp.{other.domains[0]}", f"_xmpp-server._tcp.{other.bogus_domain}"):
        output = lab.dns.kdig(viewer.ns, "+dnssec", name, "SRV")
        rcode, flags = dig_flags(output)
        answers = [" ".join(line.split()) for line in output.splitlines()
                   if not line.startswith(";") and "\tSRV\t" in line]
        details.append(f"ip netns exec {viewer.ns} kdig +dnssec {name} SRV → status {rcode}, "
                       f"flags {' '.join(sorted(flags))}" + (f"; {answers[0]}" if answers else ""))


def scenario_federation(lab, details, a, b, allocator):
    """Users of A and B (A initiating) subscribe, chat and ping each other."""
    a_jid, b_jid = allocator.take(a), allocator.take(b)
    exchange(lab, a, a_jid, b, b_jid, details)
    for provider, remote in ((a, b_jid.split("@")[1]), (b, a_jid.split("@")[1])):
        evidence = provider.s2s_evidence([remote])
        if evidence:
            details.append(f"{provider.name}'s view of its s2s sessions with {remote}:")
            details.extend("    " + line for line in evidence.splitlines())


def scenario_dialback_only(lab, details, untrusting, other, allocator):
    """UNTRUSTING no longer trusts the lab CA: the peer's certificate cannot authenticate it,
    so dialback must. The full exchange must still work."""
    log(f"restarting {untrusting.name} without the lab CA")
    untrusting.restart(trust_lab_ca=False)
    try:
        a_jid, b_jid = allocator.take(untrusting), allocator.take(other)
        a_domain, b_domain = a_jid.split("@")[1], b_jid.split("@")[1]
        exchange(lab, untrusting, a_jid, other, b_jid, details)
        for provider, remote in ((untrusting, b_domain), (other, a_domain)):
            sessions = provider.s2s_evidence([remote])
            if sessions:
                details.append(f"{provider.name}'s view of its s2s sessions with {remote}:")
                details.extend("    " + line for line in sessions.splitlines())
        # The untrusting side cannot validate the peer's certificate, so it must have
        # authenticated the peer's domain on the incoming stream by dialback. (The other
        # direction may still use SASL EXTERNAL: the peer trusts the lab CA.)
        evidence = untrusting.dialback_evidence(b_domain)
        details.extend(f"dialback: {line}" for line in evidence)
        expect(evidence, f"{untrusting.name} shows no dialback authentication of {b_domain}")
    finally:
        # Clients first: their logout presence must go out before the server restarts.
        for agent in list(lab.agents):
            agent.close()
        log(f"restarting {untrusting.name} with the lab CA again")
        untrusting.restart(trust_lab_ca=True)


def expect_unreachable(lab, details, sender, target, to_domain, conditions):
    """A message from SENDER to a user at TO_DOMAIN (hosted by TARGET, which is online) must
    bounce: an error with one of CONDITIONS comes back, nothing is delivered, and SENDER
    opens no s2s connection to TARGET (TARGET accepts no TCP connection at all meanwhile)."""
    # The quiet user has no contacts: its logins and logouts cause no s2s traffic.
    from_jid = sender.quiet_user()
    to_jid = target.users(to_domain)[0]
    agent_from, agent_to = lab.connect_agents([(sender, from_jid), (target, to_jid)])
    quiesce(lab, [sender, target])
    conns = Connections(lab, sender, target)
    accepted_before = tcp_counters(target.ns)["PassiveOpens"]
    refused_before = tcp_counters(sender.ns)["AttemptFails"]
    details.append(conns.report("before"))
    message_id = f"unreachable-{random.getrandbits(40):x}"
    sent = time.monotonic()
    step(f"send to {to_jid}", agent_from.call, "message", to=to_jid,
         body=UNICODE_BODY.format(src=from_jid, dst=to_jid), id=message_id)
    try:
        event = agent_from.wait("message_error", timeout=UNREACHABLE_ERROR_TIMEOUT, id=message_id)
    except AgentError as error:
        # No bounce: say whether the message went through, which is the worse failure.
        with contextlib.suppress(AgentError):
            agent_to.wait("message", timeout=1, **{"from": from_jid})
            raise ScenarioFailure(f"{to_jid} received the message (no error came back): "
                                  f"{sender.name} reached {to_domain} anyway") from None
        raise ScenarioFailure(f"{from_jid} gets an error back: {error}") from None
    details.append(f"{from_jid} → {to_jid}: error back after {time.monotonic() - sent:.2f}s: "
                   f"<{event['condition']}/>" + (f" text {event['text']!r}" if event.get("text") else ""))
    leaked = None
    with contextlib.suppress(AgentError):
        leaked = agent_to.wait("message", timeout=2, **{"from": from_jid})
    expect(leaked is None, f"{to_jid} received the message: {sender.name} reached {to_domain} anyway")
    opened = conns.opened_from_a()
    accepted = tcp_counters(target.ns)["PassiveOpens"] - accepted_before
    refused = tcp_counters(sender.ns)["AttemptFails"] - refused_before
    details.append(conns.report("after"))
    details.append(f"TCP connections {target.name} accepted meanwhile: {accepted}; "
                   f"connection attempts of {sender.name} refused meanwhile: {refused}")
    expect(not opened, f"{sender.name} connected to {target.name} anyway: {sorted(opened)}")
    expect(accepted == 0, f"{target.name} accepted {accepted} TCP connection(s) during the scenario")
    expect(event["condition"] in conditions,
           f"error condition <{event['condition']}/>, expected one of {', '.join(conditions)}")
    for agent in (agent_from, agent_to):
        agent.close()
    return refused


def scenario_dnssec_bogus(lab, details, sender, target):
    """A message to a user at TARGET's bogus domain must fail closed (RFC 6120 §10.4.3: a
    DNS failure is remote-server-not-found). TARGET does host that domain, so a sender that
    ignored the validation failure, or reused a link it already has, would deliver."""
    expect_unreachable(lab, details, sender, target, target.bogus_domain, ("remote-server-not-found",))


def scenario_srv_rules(lab, details, sender, target):
    """RFC 6120 §3.2 (digest §1.3 item 26): no fallback to A/AAAA when SRV answered.

    - TARGET-srvdead: SRV points at a closed port; the A record points at TARGET's open
      5269. After the SRV target fails, the sender must give up.
    - TARGET-srvdot: SRV "." means no service; the sender must not try at all.
    """
    refused = expect_unreachable(lab, details, sender, target, target.srv_dead_domain,
                                 ("remote-server-not-found", "remote-server-timeout"))
    expect(refused > 0, f"{sender.name} never tried the SRV target port {CLOSED_PORT} of {target.srv_dead_domain}")
    expect_unreachable(lab, details, sender, target, target.srv_dot_domain,
                       ("remote-server-not-found", "remote-server-timeout"))


def scenario_fanout(lab, details, a, b):
    """Every domain of A messages every domain of B and back; reports what that costs in
    s2s connections (per-pair servers: one per pair and direction; a multiplexed link: 1)."""
    conns = Connections(lab, a, b)
    details.append(conns.report("before"))
    users_a = [a.users(domain)[0] for domain in a.domains]
    users_b = [b.users(domain)[0] for domain in b.domains]
    agents = lab.connect_agents([(a, jid) for jid in users_a] + [(b, jid) for jid in users_b])
    agents_a, agents_b = agents[:len(users_a)], agents[len(users_a):]
    started = time.monotonic()
    count = 0
    for senders, receivers in ((agents_a, agents_b), (agents_b, agents_a)):
        for sender in senders:
            for receiver in receivers:
                body = UNICODE_BODY.format(src=sender.jid, dst=receiver.jid)
                step(f"message {sender.jid} → {receiver.jid}", sender.call, "message", to=receiver.jid,
                     body=body, id=f"fanout-{count}")
                count += 1
    for senders, receivers in ((agents_a, agents_b), (agents_b, agents_a)):
        for receiver in receivers:
            for sender in senders:
                event = step(f"{receiver.jid} receives from {sender.jid}", receiver.wait, "message",
                             **{"from": sender.jid})
                expect(event["body"] == UNICODE_BODY.format(src=sender.jid, dst=receiver.jid),
                       f"{receiver.jid} got a wrong body from {sender.jid}: {event['body']!r}")
    pairs = len(users_a) * len(users_b)
    details.append(f"{pairs} domain pairs × 2 directions: all {count} messages delivered in "
                   f"{time.monotonic() - started:.2f}s")
    details.append(conns.report("during (clients online)"))
    for agent in agents:
        agent.close()


def build_scenarios(lab, untrusting_kinds=("prosody", "ejabberd")):
    """(name, function) for every scenario applicable to the providers present."""
    allocator = UserAllocator()
    scenarios = [("dns", scenario_dns)]
    pairs = [(a, b) for a in lab.providers for b in lab.providers if a is not b]
    for a, b in pairs:
        scenarios.append((f"federation:{a.name}->{b.name}",
                          lambda lab, details, a=a, b=b: scenario_federation(lab, details, a, b, allocator)))
    for kind in untrusting_kinds:
        untrusting = [p for p in lab.providers if p.kind == kind]
        if not untrusting:
            continue
        for other in lab.providers:
            if other is not untrusting[0]:
                scenarios.append((f"dialback_only:{kind}-untrusting-{other.name}",
                                  lambda lab, details, u=untrusting[0], o=other:
                                  scenario_dialback_only(lab, details, u, o, allocator)))
    for a, b in pairs:
        scenarios.append((f"dnssec_bogus:{a.name}->{b.name}",
                          lambda lab, details, a=a, b=b: scenario_dnssec_bogus(lab, details, a, b)))
    for a, b in pairs:
        scenarios.append((f"srv_rules:{a.name}->{b.name}",
                          lambda lab, details, a=a, b=b: scenario_srv_rules(lab, details, a, b)))
    # Last: by now the restarts of the dialback scenarios have closed the earlier links, so
    # the count shows what the fan-out itself needs.
    for index, a in enumerate(lab.providers):
        for b in lab.providers[index + 1:]:
            scenarios.append((f"fanout:{a.name}-{b.name}",
                              lambda lab, details, a=a, b=b: scenario_fanout(lab, details, a, b)))
    return scenarios


class ScenarioTimeout(Exception):
    pass


def repeated(scenarios, times):
    """SCENARIOS (name, function) TIMES times in a row: all of them, then all again, ...
    Each run counts on its own; with TIMES > 1 the names get ` [run k/K]`."""
    if times <= 1:
        return list(scenarios)
    return [(f"{name} [run {run}/{times}]", function)
            for run in range(1, times + 1) for name, function in scenarios]


def run_scenarios(lab, scenarios, time_limit=240):
    """Runs each scenario under an overall time limit; prints PASS/FAIL and the summary."""
    passed = failed = 0

    def on_alarm(signum, frame):
        raise ScenarioTimeout(f"scenario exceeded {time_limit}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for name, function in scenarios:
            details = []
            started = time.monotonic()
            log(f"scenario {name}")
            signal.alarm(time_limit)
            try:
                quiesce(lab, lab.providers)
                function(lab, details)
                reason = None
            except (ScenarioFailure, ScenarioTimeout, LabError, AgentError) as error:
                reason = str(error)
            except Exception as error:  # noqa: BLE001 - a bug in a scenario fails that scenario
                reason = f"{type(error).__name__}: {error}"
            finally:
                signal.alarm(0)
                for agent in list(lab.agents):
                    with contextlib.suppress(Exception):
                        agent.close()
            elapsed = time.monotonic() - started
            for line in details:
                print(f"    {line}")
            if reason is None:
                passed += 1
                print(f"PASS {name} ({elapsed:.1f}s)", flush=True)
            else:
                failed += 1
                print(f"FAIL {name}: {reason} ({elapsed:.1f}s)", flush=True)
                for provider in lab.providers:
                    print(textwrap_indent(provider.log_excerpt(15)), flush=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return passed, failed


def textwrap_indent(text, prefix="      | "):
    return "\n".join(prefix + line for line in text.splitlines())


# -- command line ------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", "--only", default="",
                        help="comma-separated scenario names or prefixes (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit (no lab is built)")
    parser.add_argument("--with-braid", action="store_true",
                        default=os.environ.get("BRAID_LAB_WITH_BRAID") == "1",
                        help="add a Braid provider ($BRAID_BINARY); also BRAID_LAB_WITH_BRAID=1")
    parser.add_argument("--domains", type=int, default=3, help="domains per provider (default 3)")
    parser.add_argument("--users", type=int, default=None,
                        help="users per domain (default 3, times --repeat: the classic scenarios take fresh users each run)")
    parser.add_argument("--no-bidi", action="store_true", help="Prosody without mod_s2s_bidi")
    parser.add_argument("--secure-auth", action="store_true",
                        help="Prosody s2s_secure_auth / Braid require_certificates (the dialback "
                             "scenario then cannot pass)")
    parser.add_argument("--untrusting", default="prosody,ejabberd",
                        help="comma-separated provider kinds that, in turn, stop trusting the lab CA "
                             "in the dialback scenarios (default: prosody,ejabberd)")
    parser.add_argument("--prefix", default=None, help="namespace name prefix (default braidlab-, or $BRAID_LAB_PREFIX); "
                        "give a second concurrent lab its own prefix and --subnet")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"first three octets of the lab /24 (default {DEFAULT_SUBNET})")
    parser.add_argument("--workdir", help="work directory (default: a new /tmp/braidlab-*)")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs after a passing run")
    parser.add_argument("--hold", action="store_true",
                        help="after the scenarios, keep the lab up until Ctrl-C (for poking around)")
    parser.add_argument("--repeat", type=int, default=int(os.environ.get("BRAID_LAB_REPEAT", "1") or 1),
                        help="run the selected scenarios K times in a row in the same lab, each run "
                             "counted on its own (default 1, or $BRAID_LAB_REPEAT). The classic "
                             "federation:* and dialback_only:* scenarios take fresh users each time, "
                             "so --users defaults to 3 per run")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.prefix:
        set_namespace_prefix(args.prefix)
    if os.geteuid() != 0 and not args.list:
        print("the lab needs root (network namespaces, setpriv)", file=sys.stderr)
        return 2
    if args.users is None:
        args.users = 3 * max(1, args.repeat)
    specs = default_specs(args.with_braid, args.domains, args.users)
    for spec in specs:
        spec.bidi = not args.no_bidi
        spec.secure_auth = args.secure_auth
    # mux.py (the multiplexing scenarios) imports this module as `lab`: run as a script,
    # this module is __main__, and a second copy would not see set_namespace_prefix().
    sys.modules.setdefault("lab", sys.modules[__name__])
    import cluster
    import fallback
    import mux
    # Scenario names depend only on the providers' names and kinds: no lab needed.
    stand_in = types.SimpleNamespace(providers=[types.SimpleNamespace(name=spec.name, kind=spec.kind)
                                                for spec in specs])
    classic_names = [name for name, _ in build_scenarios(stand_in, args.untrusting.split(","))]
    mux_names = list(mux.SCENARIO_NAMES) if args.with_braid else []
    fallback_names = list(fallback.SCENARIO_NAMES) if args.with_braid else []
    cluster_names = list(cluster.SCENARIO_NAMES) if args.with_braid else []
    if args.list:
        for name in classic_names + mux_names + fallback_names + cluster_names:
            print(name)
        return 0
    if args.repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    wanted = [item.strip() for item in args.scenarios.split(",") if item.strip()]

    def selected(name):
        return not wanted or any(name == w or name.startswith(w + ":") or (w.endswith(":") and name.startswith(w))
                                 for w in wanted)
    wanted_classic = [name for name in classic_names if selected(name)]
    wanted_mux = [name for name in mux_names if selected(name)]
    wanted_fallback = [name for name in fallback_names if selected(name)]
    # The cluster lab always runs on a PostgreSQL of its own, whatever BRAID_LAB_STORAGE says:
    # without --scenarios it is part of the PostgreSQL run only, so that CI (which runs the
    # lab on SQLite, then on PostgreSQL) runs it once. Named in --scenarios, it always runs.
    wanted_cluster = [name for name in cluster_names if selected(name)
                      and (wanted or os.environ.get("BRAID_LAB_STORAGE", "sqlite") == "postgresql")]
    if not wanted_classic and not wanted_mux and not wanted_fallback and not wanted_cluster:
        print(f"no scenario matches {args.scenarios!r}", file=sys.stderr)
        return 2

    # SIGTERM (CI cancelling the job) takes the same way out as Ctrl-C: through teardown.
    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    # Explicitly: a shell starting us in the background makes us inherit SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    started = time.monotonic()
    passed = failed = 0
    try:
        if wanted_classic:
            with Lab(specs, subnet=args.subnet, workdir=args.workdir, keep_workdir=args.keep_workdir) as lab:
                scenarios = [(name, function) for name, function in build_scenarios(lab, args.untrusting.split(","))
                             if name in wanted_classic]
                passed, failed = run_scenarios(lab, repeated(scenarios, args.repeat))
                lab.failed = failed > 0
                if args.hold and not wanted_mux and not wanted_fallback and not wanted_cluster:
                    log("lab is up; Ctrl-C (or SIGTERM) tears it down")
                    with contextlib.suppress(KeyboardInterrupt):
                        while True:
                            time.sleep(3600)
        if wanted_mux:
            args.fallback_follows = bool(wanted_fallback or wanted_cluster)  # --hold waits for the last lab
            # The multiplexing scenarios have a lab of their own (two Braid providers with
            # 50 domains each, ...), built once the classic one is gone.
            log(f"multiplexing lab: {', '.join(wanted_mux)}")
            try:
                mux_passed, mux_failed = mux.build(args, wanted_mux)
            except LabError as error:
                print(f"FAIL mux setup: {error}", flush=True)
                mux_passed, mux_failed = 0, 1
            passed, failed = passed + mux_passed, failed + mux_failed
        if wanted_fallback:
            args.fallback_follows = False
            # The graceful-fallback scenarios (issue 9): per-domain certificates, in a lab
            # of their own, built once the multiplexing one is gone.
            log(f"fallback lab: {', '.join(wanted_fallback)}")
            try:
                fb_passed, fb_failed = fallback.build(args, wanted_fallback)
            except LabError as error:
                print(f"FAIL fallback setup: {error}", flush=True)
                fb_passed, fb_failed = 0, 1
            passed, failed = passed + fb_passed, failed + fb_failed
        if wanted_cluster:
            args.fallback_follows = False
            # The cluster scenarios (issue 18): provider A on three Braid nodes sharing one
            # PostgreSQL, in a lab of their own, built once the fallback one is gone.
            log(f"cluster lab: {', '.join(wanted_cluster)}")
            try:
                cl_passed, cl_failed = cluster.build(args, wanted_cluster)
            except LabError as error:
                print(f"FAIL cluster setup: {error}", flush=True)
                cl_passed, cl_failed = 0, 1
            passed, failed = passed + cl_passed, failed + cl_failed
    except KeyboardInterrupt:
        log("interrupted; lab torn down")
        print(f"{passed} passed, {failed + 1} failed")
        return 130
    except LabError as error:
        print(f"FAIL setup: {error}", flush=True)
        failed += 1
    log(f"run took {time.monotonic() - started:.1f}s")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
