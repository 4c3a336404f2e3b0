#!/usr/bin/python3
"""Multiplexing scenarios (issue 5): one link per provider pair, per-domain proofs, fallbacks.

These scenarios need two Braid providers with many domains, so they run in a lab of their
own, built after the classic one (lab.py's main() does it when Braid is in the lab):

  braid    b1…b50.test (+ blate1.test in its certificate and DNS, added at runtime)
  braid2   c1…c50.test (certificate), plus domains its certificate does NOT name:
           cposh1…3 (proven by POSH), cdane1…3 (DANE: secure SRV to danehost.test and a
           DANE-EE TLSA record there), cdb1…3 (dialback only), cbad1 (POSH with a wrong
           fingerprint until the posh-failure scenario fixes it)
  prosody, prosody2, ejabberd, ejabberd2   5 domains each, for the classic comparisons;
           prosody and ejabberd also run a group chat service, conference.p1.test and
           conference.e1.test (mux:muc-at-prosody, mux:muc-at-ejabberd); prosody2 and
           ejabberd2 run PEP and have a sixth domain, q6 and f6, for mux:omemo-prosody and
           mux:omemo-ejabberd (OMEMO with a braid user, Tests/Interop/omemo_client.py)
  web      a small HTTPS server (this file, `posh-server`) serving the customers' POSH
           documents, with a lab-CA certificate for those names
  evil     made by mux:malicious: a scripted s2s peer (this file, `evil-peer`)

Clients: one agent.py process per provider holds all of that provider's clients (a pool),
logging warnings only; 100 slixmpp processes would not fit two cores.

Also a command: `mux.py posh-server DIR CERT KEY ADDRESS PORT` and `mux.py evil-peer JSON`
(both run inside lab namespaces by the scenarios).
"""

import base64
import contextlib
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import lab as L

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIO_NAMES = ["mux:scale", "mux:mixed-proofs", "mux:posh-failure", "mux:prosody", "mux:ejabberd",
                  "mux:malicious", "mux:lifecycle", "mux:cert-reload", "mux:muc", "mux:muc-classic",
                  "mux:muc-at-prosody", "mux:muc-at-ejabberd", "mux:omemo-prosody", "mux:omemo-ejabberd"]
SCALE_DOMAINS = 50
CLASSIC_DOMAINS = 5
POSH_DOMAINS = [f"cposh{index}.test" for index in (1, 2, 3)]
DANE_DOMAINS = [f"cdane{index}.test" for index in (1, 2, 3)]
DIALBACK_DOMAINS = [f"cdb{index}.test" for index in (1, 2, 3)]
BAD_POSH_DOMAIN = "cbad1.test"
LATE_DOMAIN = "blate1.test"
# Group chat (issue 11): braid's first domains' conference services, named by its certificate
# and published in DNS as a provider would, so braid2's users reach them on the one link.
MUC_HOSTS = [f"b{index}.test" for index in range(1, 6)]
MUC_SERVICES = [f"conference.{domain}" for domain in MUC_HOSTS]
MUC_GUEST_DOMAINS = 20
# The other way round (mux:muc-at-prosody, mux:muc-at-ejabberd): Prosody's and ejabberd's own
# group chat services, on their first domain, with braid's users as remote occupants.
REMOTE_MUC_DOMAIN_INDEX = 0
REMOTE_MUC_GUESTS = 4
DANE_HOST = "danehost.test"
WEB_HOST_NUMBER = 40
EVIL_HOST_NUMBER = 41
EVIL_DOMAIN = "evil.test"
BAD_POSH_EXPIRES = 8        # seconds: the wrong document must not be cached for long
# The fixed document's lifetime: short, so that a repeated posh-failure run (--repeat) can
# write the wrong one again and see the previous run's POSH proof lapse (RFC 7711 §6).
FIXED_POSH_EXPIRES = 20
BAD_FINGERPRINT = None      # the web server's own certificate, set by start_web
RUN_TAG = f"{random.getrandbits(32):08x}"
PEER_SETTINGS = True         # set by build(): whether braid accepts s2s.peers entries
S2S_FILTER = ["(", "sport", "=", ":5269", "or", "dport", "=", ":5269", "or", "sport", "=", ":5270",
              "or", "dport", "=", ":5270", ")"]


# -- the lab -----------------------------------------------------------------------------

def braid_accepts_map_settings(binary):
    """Whether BINARY accepts entries under s2s.peers (keyed by domain) in its YAML.

    The build of Nov 22 does not: its unknown-key check compares every key with the
    defaults, where s2s.peers and s2s.posh_connect_overrides are empty mappings, so any
    domain under them is "unknown key 's2s.peers.DOMAIN'" and the server does not start."""
    directory = tempfile.mkdtemp(prefix="braidlab-probe-")
    try:
        config = os.path.join(directory, "braid.yaml")
        L.write_file(config, f'data_directory: "{directory}/data"\ns2s:\n  peers:\n    "probe.test":\n'
                             '      require_certificates: true\n')
        result = L.run([binary, "user", "add", "probe@probe.test", "--password", "x", "--config", config],
                       check=False, cwd=directory)
        # The account itself may fail (probe.test is not hosted): only the key check matters.
        return "unknown key" not in (result.stdout + result.stderr)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def specs(domains=SCALE_DOMAINS, subnet=L.DEFAULT_SUBNET, peer_settings=True):
    """The providers. POSH documents are found through DNS (A records of the POSH domains
    point at the web server), not s2s.posh_connect_overrides. PEER_SETTINGS: write
    s2s.peers.cbad1.test.require_certificates (see braid_accepts_map_settings)."""
    common = {"revalidation_interval_seconds": 5, "posh_timeout_seconds": 5, "retry_base_seconds": 1}
    braid_s2s = dict(common)
    if peer_settings:
        braid_s2s["peers"] = {BAD_POSH_DOMAIN: {"require_certificates": True}}
    braid = L.ProviderSpec("braid", "braid", "b", domains, 1, direct_tls=True, cert_names=(LATE_DOMAIN, *MUC_SERVICES),
                           settings={"s2s": braid_s2s})
    braid2 = L.ProviderSpec("braid", "braid2", "c", domains, 1, direct_tls=True,
                            extra_domains=tuple(POSH_DOMAINS + DANE_DOMAINS + DIALBACK_DOMAINS + [BAD_POSH_DOMAIN]),
                            settings={"s2s": dict(common), "tls": {"domains": braid2_served(domains)}})
    return [braid, braid2,
            # A group chat service at p1.test and e1.test (mux:muc-at-prosody, -ejabberd):
            # named in the certificate and published in DNS like a domain.
            L.ProviderSpec("prosody", "prosody", "p", CLASSIC_DOMAINS, 1,
                           muc_domains=(f"p{REMOTE_MUC_DOMAIN_INDEX + 1}.test",)),
            # prosody2 and ejabberd2 run PEP and have a sixth domain (q6, f6) for the OMEMO
            # scenarios, which the classic comparisons (first five domains) do not use.
            L.ProviderSpec("prosody", "prosody2", "q", CLASSIC_DOMAINS + 1, 1, pep=True),
            L.ProviderSpec("ejabberd", "ejabberd", "e", CLASSIC_DOMAINS, 1,
                           muc_domains=(f"e{REMOTE_MUC_DOMAIN_INDEX + 1}.test",)),
            L.ProviderSpec("ejabberd", "ejabberd2", "f", CLASSIC_DOMAINS + 1, 1, pep=True)]


def braid2_served(domains):
    """braid2's certificate serves all its domains, also those it does not name: that is how
    a provider hosts a customer domain without the customer's certificate (it presents its
    own, which the customer's POSH document or TLSA record vouches for). Without this Braid
    refuses the domain's streams ("no certificate for hosted domain")."""
    names = [f"c{index}.test" for index in range(1, domains + 1)]
    return names + POSH_DOMAINS + DANE_DOMAINS + DIALBACK_DOMAINS + [BAD_POSH_DOMAIN, "c.bogus.test",
                                                                     "c-srvdead.test", "c-srvdot.test"]


def spki_sha256(cert_path):
    """Hex SHA-256 of the certificate's SubjectPublicKeyInfo (TLSA 3 1 1)."""
    pem = L.run(["openssl", "x509", "-in", cert_path, "-pubkey", "-noout"]).stdout
    der = base64.b64decode("".join(line for line in pem.splitlines() if "-----" not in line))
    return hashlib.sha256(der).hexdigest()


def cert_sha256_b64(cert_path):
    with open(cert_path) as handle:
        der = ssl.PEM_cert_to_DER_cert(handle.read())
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def extra_records(lab):
    """SRV records for braid2's extra domains and the late domain, DANE's target and TLSA."""
    braid, braid2 = named(lab, "braid"), named(lab, "braid2")
    records = []

    def srv(domain, host, provider):
        target = f"{host}."
        records.extend([
            (L.ZONE, f"_xmpp-server._tcp.{domain}", "SRV", f"0 5 {L.S2S_PORT} {target}"),
            (L.ZONE, f"_xmpps-server._tcp.{domain}", "SRV", f"0 10 {L.S2S_DIRECT_TLS_PORT} {target}"),
            (L.ZONE, f"_xmpp-client._tcp.{domain}", "SRV", f"0 5 {L.C2S_PORT} {provider.host}."),
        ])

    for domain in POSH_DOMAINS + DIALBACK_DOMAINS + [BAD_POSH_DOMAIN]:
        srv(domain, braid2.host, braid2)
    # The customers' web sites (https://DOMAIN/.well-known/posh/...) are on the web server.
    for domain in POSH_DOMAINS + [BAD_POSH_DOMAIN]:
        records.append((L.ZONE, domain, "A", lab.network.ip(WEB_HOST_NUMBER)))
    # DANE domains delegate to a host name of their own, where the TLSA records are: a TLSA
    # record at braid2.test would make DANE the proof of every domain served there.
    for domain in DANE_DOMAINS:
        srv(domain, DANE_HOST, braid2)
    records.append((L.ZONE, DANE_HOST, "A", braid2.ip))
    digest = spki_sha256(braid2.cert)
    for port in (L.S2S_PORT, L.S2S_DIRECT_TLS_PORT):
        records.append((L.ZONE, f"_{port}._tcp.{DANE_HOST}", "TLSA", f"3 1 1 {digest}"))
    srv(LATE_DOMAIN, braid.host, braid)
    for service in MUC_SERVICES:
        srv(service, braid.host, braid)
    return records


def named(lab, name):
    for provider in lab.providers:
        if provider.name == name:
            return provider
    raise L.LabError(f"no provider named {name}")


def start_web(lab):
    """The customers' web server: POSH documents over HTTPS (lab CA certificate for them)."""
    web_ns = L.NS_PREFIX + "web"
    web_ip = lab.network.ip(WEB_HOST_NUMBER)
    lab.network.add_provider_namespace(web_ns, "web", web_ip)
    directory = os.path.join(lab.workdir, "web")
    os.makedirs(directory, exist_ok=True)
    cert, key = lab.ca.issue("web", POSH_DOMAINS + [BAD_POSH_DOMAIN])
    braid2 = named(lab, "braid2")
    for domain in POSH_DOMAINS:
        write_posh(lab, domain, cert_sha256_b64(braid2.cert), 3600)
    # The wrong fingerprint: the web server's own certificate, not the one braid2 presents.
    global BAD_FINGERPRINT
    BAD_FINGERPRINT = cert_sha256_b64(cert)
    write_posh(lab, BAD_POSH_DOMAIN, BAD_FINGERPRINT, BAD_POSH_EXPIRES)
    service = L.Service("posh-server", L.in_netns(web_ns, [L.PYTHON, os.path.abspath(__file__), "posh-server",
                                                           directory, cert, key, web_ip, "443"]),
                        os.path.join(directory, "posh-server.log"))
    lab.extra_services.append(service)
    L.wait_until(lambda: L.listening(web_ns, 443), 20, "the POSH web server")


def write_posh(lab, domain, fingerprint, expires):
    path = os.path.join(lab.workdir, "web", f"{domain}.json")
    L.write_file(path, json.dumps({"fingerprints": [{"sha-256": fingerprint}], "expires": expires}) + "\n")
    return path


def build(args, wanted):
    """Builds the multiplexing lab, runs the WANTED mux scenarios; returns (passed, failed)."""
    domains = int(os.environ.get("BRAID_MUX_DOMAINS", SCALE_DOMAINS))
    workdir = os.path.join(args.workdir, "mux") if args.workdir else None
    binary = os.environ.get("BRAID_BINARY", L.DEFAULT_BRAID_BINARY)
    peer_settings = braid_accepts_map_settings(binary)
    if not peer_settings:
        L.log("this braid rejects s2s.peers entries (unknown key): mux:posh-failure runs without "
              f"s2s.peers.{BAD_POSH_DOMAIN}.require_certificates")
    global PEER_SETTINGS
    PEER_SETTINGS = peer_settings
    with L.Lab(specs(domains, args.subnet, peer_settings), subnet=args.subnet, workdir=workdir,
               keep_workdir=args.keep_workdir, extra_records=extra_records) as lab:
        start_web(lab)
        scenarios = [(name, function) for name, function in build_scenarios(lab) if name in wanted]
        passed, failed = L.run_scenarios(lab, L.repeated(scenarios, getattr(args, "repeat", 1)))
        lab.failed = failed > 0
        if args.hold and not getattr(args, "fallback_follows", False):
            L.log("mux lab is up; Ctrl-C (or SIGTERM) tears it down")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return passed, failed


def build_scenarios(lab):
    braid, braid2 = named(lab, "braid"), named(lab, "braid2")
    return [
        ("mux:scale", lambda lab, details: scenario_scale(lab, details, braid, braid2)),
        ("mux:mixed-proofs", lambda lab, details: scenario_mixed_proofs(lab, details, braid, braid2)),
        ("mux:posh-failure", lambda lab, details: scenario_posh_failure(lab, details, braid, braid2)),
        ("mux:prosody", lambda lab, details: scenario_classic(lab, details, braid, "prosody")),
        ("mux:ejabberd", lambda lab, details: scenario_classic(lab, details, braid, "ejabberd")),
        ("mux:malicious", lambda lab, details: scenario_malicious(lab, details, braid, braid2)),
        ("mux:lifecycle", lambda lab, details: scenario_lifecycle(lab, details, braid, braid2)),
        ("mux:cert-reload", lambda lab, details: scenario_cert_reload(lab, details, braid, braid2)),
        ("mux:muc", lambda lab, details: scenario_muc(lab, details, braid, braid2)),
        ("mux:muc-classic", lambda lab, details: scenario_muc_classic(lab, details, braid)),
        # Braid's users in rooms of the others: distinct braid domains for each, from the end
        # of the list (the other scenarios use the first ones).
        ("mux:muc-at-prosody", lambda lab, details: scenario_muc_remote(
            lab, details, braid, "prosody", braid.domains[-2 * REMOTE_MUC_GUESTS:-REMOTE_MUC_GUESTS])),
        ("mux:muc-at-ejabberd", lambda lab, details: scenario_muc_remote(
            lab, details, braid, "ejabberd", braid.domains[-REMOTE_MUC_GUESTS:])),
        # OMEMO across federation (issue 13): braid's user of b42 (b41) and q6 at prosody2
        # (f6 at ejabberd2), domains no other scenario's checks depend on.
        ("mux:omemo-prosody", lambda lab, details: scenario_omemo(lab, details, braid, "prosody")),
        ("mux:omemo-ejabberd", lambda lab, details: scenario_omemo(lab, details, braid, "ejabberd")),
    ]


# -- helpers -----------------------------------------------------------------------------

class Pool:
    """One agent.py process holding the clients JIDS of PROVIDER."""

    def __init__(self, lab, provider, jids, no_name_check=False, timeout=120):
        self.provider = provider
        self.jids = list(jids)
        self.agent = L.Agent(lab, provider, f"pool-{provider.name}-{len(lab.agents)}", quiet=True)
        try:
            L.step(f"log in {len(self.jids)} clients at {provider.name}", self.agent.call, "pool_connect",
                   timeout=timeout, jids=self.jids, password=L.PASSWORD, host=provider.ip, port=L.C2S_PORT,
                   ca=lab.ca.cert, no_name_check=no_name_check)
        except BaseException:
            self.agent.close()
            raise

    def send(self, messages):
        return L.step(f"send from {self.provider.name}", self.agent.call, "pool_send", messages=messages)

    def stream(self, messages, interval):
        return L.step(f"stream from {self.provider.name}", self.agent.call, "pool_stream",
                      messages=messages, interval=interval)

    def count(self, expected, timeout):
        return L.step(f"wait at {self.provider.name}", self.agent.call, "pool_wait", timeout=timeout,
                      count=expected)

    def muc_create(self, rooms, timeout=60):
        return L.step(f"create rooms at {self.provider.name}", self.agent.call, "pool_muc_create", timeout=timeout, rooms=rooms)

    def muc_join(self, joins, timeout=90):
        return L.step(f"enter rooms from {self.provider.name}", self.agent.call, "pool_muc_join", timeout=timeout, joins=joins)

    def groupchat(self, messages):
        return L.step(f"groupchat from {self.provider.name}", self.agent.call, "pool_groupchat", messages=messages)

    def take(self, clear=True):
        return L.step(f"received at {self.provider.name}", self.agent.call, "pool_received", clear=clear)


def messages_between(senders, receivers, label):
    """[[from, to, id, body]] for every sender × receiver."""
    out = []
    for sender in senders:
        for receiver in receivers:
            message_id = f"{label}-{RUN_TAG}-{len(out)}"
            out.append([sender, receiver, message_id, f"mux {message_id} {sender} → {receiver}"])
    return out


def wait_all(expectations, timeout, on_poll=None, stall=40):
    """EXPECTATIONS: [(pool, count)]. Polls until every pool has COUNT messages (bounded by
    TIMEOUT, and by STALL seconds without any new message); calls ON_POLL between polls.
    Returns seconds taken, or None when the time ran out."""
    started = time.monotonic()
    deadline = started + timeout
    done = set()
    progress, moved = None, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - moved < stall:
        totals = []
        for index, (pool, count) in enumerate(expectations):
            reply = pool.count(count, timeout=0.1 if index in done else
                               min(1.0, max(0.1, deadline - time.monotonic())))
            totals.append(reply["received"] + reply["errors"])
            # Every message accounted for: delivered, or bounced back to its sender (the
            # errors come back to the other pool, so this is only a stopping rule; the
            # checks go by message id).
            if reply["received"] >= count:
                done.add(index)
        if sum(totals) >= sum(count for _, count in expectations):
            done = set(range(len(expectations)))
        if totals != progress:
            progress, moved = totals, time.monotonic()
        if on_poll:
            on_poll()
        if len(done) == len(expectations):
            return time.monotonic() - started
    return None


def check_delivery(details, label, sent, received, errors=()):
    """Every message of SENT arrived exactly once at its recipient with its body."""
    expected = {message_id: (sender, receiver, body) for sender, receiver, message_id, body in sent}
    others = [error for error in errors if error[2] not in expected]
    errors = [error for error in errors if error[2] in expected]
    seen = {}
    for to, sender, message_id, body in received:
        if message_id in expected:
            seen.setdefault(message_id, []).append((sender, to, body))
    lost = [message_id for message_id in expected if message_id not in seen]
    bounced = {error[2]: error for error in errors}
    silent = [message_id for message_id in lost if message_id not in bounced]
    conditions = {}
    for error in bounced.values():
        conditions[error[3]] = conditions.get(error[3], 0) + 1
    duplicated = [message_id for message_id, copies in seen.items() if len(copies) > 1]
    wrong = [message_id for message_id, copies in seen.items()
             if copies[0] != (expected[message_id][0], expected[message_id][1], expected[message_id][2])]
    details.append(f"{label}: {len(expected)} sent, {len(seen)} delivered, {len(lost)} not delivered "
                   f"({len(lost) - len(silent)} bounced"
                   + (f": {', '.join(f'<{c}/> {n}' for c, n in sorted(conditions.items()))}" if conditions else "")
                   + f", {len(silent)} lost without an error), {len(duplicated)} duplicated"
                   + (f"; {len(others)} other errors at the senders, e.g. {others[:2]}" if others else ""))
    L.expect(not wrong, f"{label}: {len(wrong)} message(s) arrived altered or at the wrong recipient, e.g. {wrong[:3]}")
    L.expect(not lost, f"{label}: {len(lost)} of {len(expected)} not delivered ({len(lost) - len(silent)} bounced, "
             f"{len(silent)} lost without an error), e.g. {lost[:5]}"
             + (f"; errors back, e.g. {list(bounced.values())[:2]}" if bounced else ""))
    L.expect(not duplicated, f"{label}: {len(duplicated)} delivered more than once, e.g. {duplicated[:5]}")


def links_between(lab, a, b):
    """Established s2s TCP connections between A and B, counted in A's and in B's namespace."""
    out_a, in_a = lab.connections(a, b)
    out_b, in_b = lab.connections(b, a)
    return set(out_a) | set(in_a), len(out_a) + len(in_a), len(out_b) + len(in_b)


def admin_get(provider, path):
    code = ("import sys, urllib.request; "
            f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:5280{path}', timeout=10).read().decode())")
    return L.run(L.in_netns(provider.ns, [L.PYTHON, "-c", code]), timeout=20).stdout


def api_links(provider):
    text = admin_get(provider, "/api/links")
    # Kept in the work directory (a failing run keeps it): what the checks were made on.
    L.write_file(os.path.join(provider.directory, f"api-links-{time.strftime('%H%M%S')}.json"), text)
    return json.loads(text)


def wait_ids(pool, ids, timeout):
    """Polls POOL (without clearing) until every message id in IDS arrived, bounded."""
    ids = set(ids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = {message[2] for message in pool.take(clear=False)["received"]}
        if ids <= got:
            return True
        time.sleep(0.5)
    return False


def metrics(provider, names):
    """{sample line: value} for the metric families NAMES (Prometheus text)."""
    found = {}
    for line in admin_get(provider, "/metrics").splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = re.split(r"[{ ]", line, 1)[0]
        if name in names:
            sample, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[sample] = float(value)
    return found


def metric_total(provider, name):
    return sum(metrics(provider, [name]).values())


def metrics_line(provider, names):
    samples = metrics(provider, names)
    return ", ".join(f"{sample}={value:g}" for sample, value in sorted(samples.items())) or "(none)"


def link_list(document):
    if isinstance(document, dict):
        for key in ("links", "items"):
            if isinstance(document.get(key), list):
                return document[key]
    return document if isinstance(document, list) else []


def link_pairs(provider, peer=None):
    """[(link, pair)] from PROVIDER's /api/links (only links with PEER, a Provider, when
    given: its address or host name, or DANE's target host, in the link's peer_address)."""
    out = []
    for link in link_list(api_links(provider)):
        address = str(link.get("peer_address", link.get("peer", "")))
        if peer and not any(name in address for name in (peer.ip, peer.host, DANE_HOST)):
            continue
        for pair in link.get("pairs", []):
            out.append((link, pair))
    return out


def pair_field(pair, *names):
    for name in names:
        if name in pair:
            return pair[name]
    return None


def pair_method(pair):
    return str(pair_field(pair, "method", "proof", "proofMethod", "proof_method")).lower()


def process_usage(provider):
    """(RSS in MiB, CPU seconds) of the provider's server process, from /proc."""
    pid = provider.service.pid
    with open(f"/proc/{pid}/status") as handle:
        rss = int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1)) / 1024
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def kill_links(lab, a, b):
    """Cuts every s2s TCP connection between A and B (ss -K in A's namespace)."""
    L.run(L.in_netns(a.ns, ["ss", "-K", "-tn", "state", "established", "dst", b.ip, *S2S_FILTER]), check=False)


def first_users(provider, domains):
    return [provider.users(domain)[0] for domain in domains]


def deliver(pool_from, pool_to, messages, timeout=30):
    """Sends MESSAGES from POOL_FROM and waits (bounded) until POOL_TO received them."""
    before = pool_to.count(0, timeout=0.1)["received"]
    pool_from.send(messages)
    pool_to.count(before + len(messages), timeout=timeout)


# -- scenarios ---------------------------------------------------------------------------

def scenario_scale(lab, details, a, b):
    """A and B, 50 domains each: every pair both ways over one connection, cold and warm."""
    users_a, users_b = first_users(a, a.domains), first_users(b, b.domains)
    started = time.monotonic()
    pool_a, pool_b = Pool(lab, a, users_a), Pool(lab, b, users_b)
    details.append(f"{len(users_a) + len(users_b)} clients logged in (2 agent processes) in "
                   f"{time.monotonic() - started:.1f}s")
    L.quiesce(lab, [a, b])
    a.mark_log()
    b.mark_log()
    _, before_a, before_b = links_between(lab, a, b)
    details.append(f"s2s connections before: {before_a} ({a.name}'s count), {before_b} ({b.name}'s)")
    opens = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] for p in (a, b)}
    peak = [0, 0]
    problems = []

    def sample():
        _, count_a, count_b = links_between(lab, a, b)
        peak[0], peak[1] = max(peak[0], count_a), max(peak[1], count_b)

    for round_name in ("cold", "warm"):
        usage = {p.name: process_usage(p) for p in (a, b)}
        sent_ab = messages_between(users_a, users_b, f"scale-{round_name}-ab")
        sent_ba = messages_between(users_b, users_a, f"scale-{round_name}-ba")
        t0 = time.monotonic()
        pool_a.send(sent_ab)
        pool_b.send(sent_ba)
        # A pair that cannot be set up bounces after s2s.negotiation_timeout_seconds (30 s):
        # wait for those errors too (40 s without any news).
        elapsed = wait_all([(pool_b, len(sent_ab)), (pool_a, len(sent_ba))], 150, sample)
        got_b, got_a = pool_b.take(), pool_a.take()
        took = (f"all delivered or bounced after {elapsed:.1f}s" if elapsed is not None
                else "NOT all delivered or bounced (gave up after 40s without news)")
        details.append(f"{round_name}: {len(sent_ab) + len(sent_ba)} messages over "
                       f"{len(users_a) * len(users_b)} domain pairs × 2 directions: {took}")
        for provider in (a, b):
            rss, cpu = process_usage(provider)
            details.append(f"  {provider.name}: RSS {rss:.0f} MiB, CPU {cpu - usage[provider.name][1]:.1f}s "
                           f"during the {round_name} round")
        for label, sent, got, senders in ((f"{round_name} {a.name}→{b.name}", sent_ab, got_b, got_a),
                                          (f"{round_name} {b.name}→{a.name}", sent_ba, got_a, got_b)):
            try:
                # Errors come back to the senders.
                check_delivery(details, label, sent, got["received"], senders["errors"])
            except L.ScenarioFailure as failure:
                problems.append(str(failure))
    sample()
    tuples, count_a, count_b = links_between(lab, a, b)
    opened = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] - opens[p.name] for p in (a, b)}
    details.append(f"s2s connections after: {count_a} ({a.name}'s count), {count_b} ({b.name}'s); "
                   f"most seen at once while sampling: {peak[0]}/{peak[1]}; TCP connections opened: "
                   + ", ".join(f"{name} {value}" for name, value in opened.items()))
    for provider in (a, b):
        details.append(f"{provider.name} metrics: " + metrics_line(provider, [
            "braid_s2s_links", "braid_s2s_pairs", "braid_s2s_pairs_per_link_max", "braid_s2s_connections_saved_total",
            "braid_s2s_dialback_verifications_total"]))
    security = [line for line in a.log_since_mark().splitlines() + b.log_since_mark().splitlines()
                if "security: refused stanza" in line or "handled count too high" in line]
    details.append(f"security refusals and SM errors logged between the two Braids: {len(security)}")
    details.extend(f"  e.g. {line.strip()[:400]}" for line in security[:3])
    if count_a != 1 or count_b != 1:
        problems.append(f"{count_a} ({a.name}) / {count_b} ({b.name}) established s2s connections between them, "
                        f"expected exactly 1")
    if peak[0] > 1 or peak[1] > 1:
        # Both sides dialling at the same moment (the cold round sends both ways at once) is
        # a simultaneous open: one TCP connection opened by each, and one of the two links
        # retired as soon as both carry pairs. The sampler may see both for that moment.
        # Anything more (a side dialling twice, or a third connection) is a failure.
        crossing = peak[0] <= 2 and peak[1] <= 2 and all(value <= 1 for value in opened.values())
        if crossing:
            details.append(f"NOTE: {peak[0]}/{peak[1]} s2s connections seen at once: a simultaneous open "
                           f"(each side opened one), retired to one")
        else:
            problems.append(f"up to {peak[0]}/{peak[1]} s2s connections at once during the rounds, expected 1 "
                            f"(or 2 for a moment when both dial at once, one opened by each)")
    L.expect(not problems, "; ".join(problems))


def scenario_mixed_proofs(lab, details, a, b):
    """B's domains proven to A by certificate SAN, POSH, DANE and dialback, on one link."""
    groups = {"pkix": b.domains[:2], "posh": POSH_DOMAINS, "dane": DANE_DOMAINS, "dialback": DIALBACK_DOMAINS}
    locals_a = a.domains[:2]
    # B must open the link: the DANE domains' SRV target is danehost.test, not braid2.test,
    # so a link A opened to braid2.test could not take them (RFC 7712 §4.4.2).
    kill_links(lab, a, b)
    L.wait_until(lambda: links_between(lab, a, b)[1] == 0, 15, "the old links to close")
    users_a = first_users(a, locals_a)
    users_b = [b.users(domain)[0] for group in groups.values() for domain in group]
    pool_a = Pool(lab, a, users_a)
    pool_b = Pool(lab, b, users_b, no_name_check=True)
    L.quiesce(lab, [a, b])
    opens = L.tcp_counters(a.ns)["ActiveOpens"]
    a.mark_log()
    first = messages_between(users_b[:1], users_a[:1], "mixed-open")
    deliver(pool_b, pool_a, first)
    # One pair at a time (each message waits for the one before): this scenario is about
    # the proofs; mux:scale is the one that sets up thousands of pairs at once.
    sent_ab = messages_between(users_a, users_b, "mixed-ab")
    sent_ba = messages_between(users_b, users_a, "mixed-ba")[1:]
    # B's domains first: B asserts each on its link and A proves it (POSH, DANE, or
    # dialback on a separate short-lived connection); A's answers then ride the same
    # bidirectional link (XEP-0288 §2.2). The other order would need a connection of A's
    # own for every domain no certificate, DANE or POSH proves (RFC 7712 §4.4.2).
    started = time.monotonic()
    for message in sent_ba:
        pool_b.send([message])
        wait_ids(pool_a, [message[2]], 10)
    for message in sent_ab:
        pool_a.send([message])
        wait_ids(pool_b, [message[2]], 10)
    got_b, got_a = pool_b.take(), pool_a.take()
    details.append(f"{len(sent_ab) + len(sent_ba) + 1} messages, {len(users_a)}×{len(users_b)} pairs, one after "
                   f"the other: {time.monotonic() - started:.1f}s")
    pairs = link_pairs(a, b)
    table = {}
    for link, pair in pairs:
        remote = pair_field(pair, "remote", "remoteDomain", "remote_domain")
        for group, domains in groups.items():
            if remote in domains:
                direction = str(pair_field(pair, "direction"))
                table.setdefault(group, {}).setdefault((pair_method(pair), direction), 0)
                table[group][(pair_method(pair), direction)] += 1
    for group in groups:
        found = ", ".join(f"{method}/{direction} {count}" for (method, direction), count
                          in sorted(table.get(group, {}).items()))
        details.append(f"{a.name}'s /api/links, pairs with {group} domains of {b.name} "
                       f"({', '.join(groups[group])}): {found or 'none'}")
    tuples, count_a, count_b = links_between(lab, a, b)
    details.append(f"s2s connections between {a.name} and {b.name}: {count_a}/{count_b}; TCP connections "
                   f"{a.name} opened meanwhile (db:verify, POSH fetches): {L.tcp_counters(a.ns)['ActiveOpens'] - opens}")
    details.append(f"{a.name} metrics: " + metrics_line(a, ["braid_s2s_pairs_authorized_total",
                                                         "braid_s2s_dialback_verifications_total"]))
    check_delivery(details, f"{a.name}→{b.name}", sent_ab, got_b["received"], got_a["errors"])
    check_delivery(details, f"{b.name}→{a.name}", first + sent_ba, got_a["received"], got_b["errors"])
    for group, domains in groups.items():
        expected = len(domains) * len(locals_a)
        found = table.get(group, {})
        for direction in ("inbound", "outbound"):
            count = found.get((group, direction), 0)
            L.expect(count == expected,
                     f"{group} domains: {count} {direction} pairs proven by {group} on {a.name}'s links, "
                     f"expected {expected}; found {found}")
    L.expect(count_a == 1 and count_b == 1, f"{count_a}/{count_b} s2s connections between {a.name} and {b.name}, "
                                            f"expected 1")


def scenario_posh_failure(lab, details, a, b):
    """A domain of B with a wrong POSH fingerprint, A requiring certificates for it: refused
    with a dialback error while the link and its other pairs flow; fixed, it joins the link."""
    if not PEER_SETTINGS:
        details.append(f"NOTE: {a.name} cannot be configured with s2s.peers.{BAD_POSH_DOMAIN}.require_certificates "
                       "(this braid rejects every s2s.peers entry as an unknown key); the refusal rests on the "
                       "mismatching POSH document alone (RFC 7711 §3.3, docs/federation.md)")
    legit_a, legit_b = a.users(a.domains[2])[0], b.users(b.domains[2])[0]
    bad_user = b.users(BAD_POSH_DOMAIN)[0]
    # A repeated run starts from the wrong document again. The previous run left the domain
    # proven by POSH on the live link until the fixed document's expiry; wait for that proof
    # to lapse (the link is reset and every domain proven afresh) before measuring.
    write_posh(lab, BAD_POSH_DOMAIN, BAD_FINGERPRINT, BAD_POSH_EXPIRES)

    def bad_domain_on_link():
        return any(pair_field(pair, "remote", "remoteDomain", "remote_domain") == BAD_POSH_DOMAIN
                   for _, pair in link_pairs(a, b))
    if bad_domain_on_link():
        started = time.monotonic()
        L.wait_until(lambda: not bad_domain_on_link(), FIXED_POSH_EXPIRES + 90,
                     f"the previous run's POSH proof of {BAD_POSH_DOMAIN} to lapse", interval=1.0)
        details.append(f"repeat: the previous run's POSH proof of {BAD_POSH_DOMAIN} lapsed after "
                       f"{time.monotonic() - started:.1f}s")
    pool_a = Pool(lab, a, [legit_a])
    pool_b = Pool(lab, b, [legit_b, bad_user], no_name_check=True)
    deliver(pool_b, pool_a, messages_between([legit_b], [legit_a], "poshfail-open"))
    L.quiesce(lab, [a, b])
    link_before, count_a, count_b = links_between(lab, a, b)
    details.append(f"link before: {sorted(link_before)} ({count_a}/{count_b} connections)")
    a.mark_log()
    # Legitimate traffic all along: one message every 0.25 s each way for 40 s.
    during_ba = [[legit_b, legit_a, f"poshfail-during-ba-{RUN_TAG}-{index}", f"during {index}"] for index in range(160)]
    during_ab = [[legit_a, legit_b, f"poshfail-during-ab-{RUN_TAG}-{index}", f"during {index}"] for index in range(160)]
    pool_b.stream(during_ba, 0.25)
    pool_a.stream(during_ab, 0.25)
    # The refused addition.
    refused = messages_between([bad_user], [legit_a], "poshfail-bad")
    pool_b.send(refused)
    deadline = time.monotonic() + 25
    bad_errors = []
    while time.monotonic() < deadline and not bad_errors:
        time.sleep(0.5)
        taken = pool_b.take(clear=False)
        bad_errors = [error for error in taken["errors"] if error[2] == refused[0][2]]
    refusal_lines = [line.strip() for line in a.log_since_mark().splitlines()
                     if BAD_POSH_DOMAIN in line and "dialback request refused" in line]
    details.append(f"{bad_user} → {legit_a}: " + (f"bounced with <{bad_errors[0][3]}/> {bad_errors[0][4]!r}"
                                                  if bad_errors else "no error back in 25s"))
    details.extend(f"{a.name} log: {line[:400]}" for line in refusal_lines[:2])
    details.append(f"{a.name} metrics: " + metrics_line(a, ["braid_s2s_dialback_refused_total"]))
    # The other direction: A must not send to the unproven domain either.
    reverse = messages_between([legit_a], [bad_user], "poshfail-reverse")
    pool_a.send(reverse)
    time.sleep(5)
    taken_a = pool_a.take(clear=False)
    reverse_errors = [error for error in taken_a["errors"] if error[2] == reverse[0][2]]
    details.append(f"{legit_a} → {bad_user} meanwhile: " + (f"bounced with <{reverse_errors[0][3]}/> "
                                                              f"{reverse_errors[0][4]!r}" if reverse_errors
                                                              else "no error back in 5s"))
    link_during, count_a, count_b = links_between(lab, a, b)
    details.append(f"connections after the refusal: {count_a}/{count_b}; same link: {link_before <= link_during}")
    taken_b = pool_b.take(clear=False)
    L.expect(not any(m[2] == refused[0][2] for m in pool_a.take(clear=False)["received"]),
             f"{legit_a} received the message from the unproven {BAD_POSH_DOMAIN}")
    L.expect(not any(m[2] == reverse[0][2] for m in taken_b["received"]),
             f"{bad_user} received a message although {a.name} cannot prove {BAD_POSH_DOMAIN}")
    L.expect(bad_errors, f"{bad_user} got no error for its refused message in 25s")
    L.expect(refusal_lines, f"{a.name} logged no \"dialback request refused\" naming {BAD_POSH_DOMAIN}")
    L.expect(link_before <= link_during, f"the link changed when the addition was refused: {sorted(link_during)}")
    # Fix the document; after its expiry and the retry backoff the pair joins the same link.
    write_posh(lab, BAD_POSH_DOMAIN, cert_sha256_b64(b.cert), FIXED_POSH_EXPIRES)
    fixed_at = time.monotonic()
    time.sleep(BAD_POSH_EXPIRES + 1)
    delivered_after = None
    attempt = 0
    while time.monotonic() - fixed_at < 90 and delivered_after is None:
        retry = [[bad_user, legit_a, f"poshfail-retry-{RUN_TAG}-{attempt}", f"retry {attempt}"]]
        pool_b.send(retry)
        attempt += 1
        for _ in range(8):
            time.sleep(0.5)
            if any(m[2] == retry[0][2] for m in pool_a.take(clear=False)["received"]):
                delivered_after = time.monotonic() - fixed_at
                break
    details.append(f"after fixing the POSH document: " + (f"{bad_user} → {legit_a} delivered {delivered_after:.1f}s "
                                                          f"later, attempt {attempt}" if delivered_after else
                                                          f"not delivered in 90s ({attempt} attempts)"))
    L.expect(delivered_after is not None, f"{BAD_POSH_DOMAIN} still refused 90s after its POSH document was fixed")
    back = messages_between([legit_a], [bad_user], "poshfail-back")
    deliver(pool_a, pool_b, back)
    # Let the legitimate streams finish.
    wait_ids(pool_a, [m[2] for m in during_ba], 60)
    wait_ids(pool_b, [m[2] for m in during_ab], 30)
    got_a, got_b = pool_a.take(), pool_b.take()
    link_after, count_a, count_b = links_between(lab, a, b)
    methods = sorted({f"{pair_field(pair, 'direction')}:{pair_method(pair)}" for _, pair in link_pairs(a, b)
                      if pair_field(pair, "remote", "remoteDomain", "remote_domain") == BAD_POSH_DOMAIN})
    details.append(f"{a.name}'s /api/links for {BAD_POSH_DOMAIN}: {methods}; connections {count_a}/{count_b}, "
                   f"same link as before: {link_after == link_before}")
    check_delivery(details, f"legitimate {b.name}→{a.name} during and after", during_ba, got_a["received"], got_b["errors"])
    check_delivery(details, f"legitimate {a.name}→{b.name} during and after", during_ab, got_b["received"], got_a["errors"])
    L.expect(any(m[2] == back[0][2] for m in got_b["received"]), f"{legit_a} → {bad_user} not delivered after the fix")
    L.expect(link_after == link_before and count_a == 1 and count_b == 1,
             f"the pair was not added on the same link: before {sorted(link_before)}, after {sorted(link_after)}")
    L.expect(any("posh" in method for method in methods), f"{BAD_POSH_DOMAIN} is not proven by POSH: {methods}")


def fanout(lab, details, a, b, label):
    """Every domain of A messages every domain of B and back (clients in pools); returns
    (established connections between them afterwards, TCP connections each side opened)."""
    users_a, users_b = first_users(a, a.domains[:CLASSIC_DOMAINS]), first_users(b, b.domains[:CLASSIC_DOMAINS])
    pool_a, pool_b = Pool(lab, a, users_a), Pool(lab, b, users_b)
    L.quiesce(lab, [a, b])
    opens = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] for p in (a, b)}
    sent_ab = messages_between(users_a, users_b, f"{label}-ab")
    sent_ba = messages_between(users_b, users_a, f"{label}-ba")
    started = time.monotonic()
    pool_a.send(sent_ab)
    pool_b.send(sent_ba)
    elapsed = wait_all([(pool_b, len(sent_ab)), (pool_a, len(sent_ba))], 90)
    got_b, got_a = pool_b.take(), pool_a.take()
    out, into = lab.connections(a, b)
    opened = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] - opens[p.name] for p in (a, b)}
    details.append(f"{a.name}⇄{b.name} {len(users_a)}×{len(users_b)}: {len(sent_ab) + len(sent_ba)} messages "
                   + (f"delivered in {elapsed:.1f}s" if elapsed is not None else "NOT all delivered in 90s")
                   + f"; s2s connections established: {a.name}→{b.name} {len(out)}, {b.name}→{a.name} {len(into)} "
                   f"(total {len(out) + len(into)}); TCP connections opened: {a.name} {opened[a.name]}, "
                   f"{b.name} {opened[b.name]}")
    check_delivery(details, f"{a.name}→{b.name}", sent_ab, got_b["received"], got_a["errors"])
    check_delivery(details, f"{b.name}→{a.name}", sent_ba, got_a["received"], got_b["errors"])
    for agent in list(lab.agents):
        agent.close()
    return len(out) + len(into), opened


def scenario_classic(lab, details, braid, kind):
    """Braid ⇄ KIND with 5×5 domains, next to KIND ⇄ KIND2 (the classic pairwise baseline)."""
    first, second = named(lab, kind), named(lab, f"{kind}2")
    try:
        baseline, baseline_opened = fanout(lab, details, first, second, f"{kind}-baseline")
    except L.ScenarioFailure as failure:
        # The baseline involves no Braid: it only gives the classic connection count. Once in
        # a while ejabberd's own resolver reports "no data available" for lab names (seen in
        # CI, Dec 6); one retry keeps that flake from failing a scenario about Braid.
        details.append(f"baseline {kind}⇄{kind}2 failed once, retried: {str(failure)[:300]}")
        for agent in list(lab.agents):
            agent.close()
        L.quiesce(lab, [first, second])
        try:
            baseline, baseline_opened = fanout(lab, details, first, second, f"{kind}-baseline-retry")
        except L.ScenarioFailure as again:
            # Twice in a row in clean-clone CI runs (Dec 6): ejabberd's resolver kept
            # answering "no data available" for lab names it had resolved before (a cached
            # negative answer, it seems). The comparison below needs only the classic count,
            # which is at most one connection per pair each way.
            details.append(f"NOTE: baseline {kind}⇄{kind}2 unavailable (its own DNS failed twice: "
                           f"{str(again)[:200]}); comparing with the classic bound of 2×{CLASSIC_DOMAINS * CLASSIC_DOMAINS}")
            for agent in list(lab.agents):
                agent.close()
            L.quiesce(lab, [first, second])
            baseline, baseline_opened = 2 * CLASSIC_DOMAINS * CLASSIC_DOMAINS, {}
    total, opened = fanout(lab, details, braid, first, f"{kind}-braid")
    pairs = CLASSIC_DOMAINS * CLASSIC_DOMAINS
    details.append(f"connections for {pairs} domain pairs both ways: {kind}⇄{kind} {baseline} established "
                   f"({sum(baseline_opened.values())} opened), braid⇄{kind} {total} established "
                   f"({opened[braid.name]} opened by braid, {opened[first.name]} by {kind})")
    if braid.kind == "braid":
        details.append("braid metrics: " + metrics_line(braid, ["braid_s2s_links", "braid_s2s_pairs"]))
    L.expect(opened[braid.name] <= pairs,
             f"braid opened {opened[braid.name]} connections to {kind}, more than the {pairs} of classic s2s")
    L.expect(total <= max(baseline, 2 * pairs), f"braid⇄{kind} needed {total} connections, {kind}⇄{kind} {baseline}")


def scenario_malicious(lab, details, braid, braid2):
    """A scripted peer authenticated for evil.test sends a stanza with a forged `from`, and
    one for a pair not authorised on its stream: never routed, stream error, security log."""
    evil_ns = L.NS_PREFIX + "evil"
    evil_ip = lab.network.ip(EVIL_HOST_NUMBER)
    if evil_ns not in lab.network.namespaces:
        lab.network.add_provider_namespace(evil_ns, "evil", evil_ip)
    cert, key = lab.ca.issue("evil", [EVIL_DOMAIN])
    victim_domain, other_domain = braid.domains[5], braid.domains[6]
    victim, other = braid.users(victim_domain)[0], braid.users(other_domain)[0]
    legit = braid2.users(braid2.domains[5])[0]
    pool_a = Pool(lab, braid, [victim, other])
    pool_b = Pool(lab, braid2, [legit])
    deliver(pool_b, pool_a, messages_between([legit], [victim], "evil-before"))
    link_before, _, _ = links_between(lab, braid, braid2)
    stream = [[legit, victim, f"evil-legit-{RUN_TAG}-{index}", f"legit {index}"] for index in range(60)]
    pool_b.stream(stream, 0.2)
    braid.mark_log()
    cases = [
        ("forged from", {"stream_to": victim_domain, "from": f"mallory@{braid2.domains[5]}", "to": victim},
         ("invalid-from",)),
        ("pair not authorised", {"stream_to": victim_domain, "from": f"mallory@{EVIL_DOMAIN}", "to": other},
         ("host-unknown",)),
    ]
    outcomes = []
    for label, case, conditions in cases:
        request = {"host": braid.ip, "port": L.S2S_PORT, "own": EVIL_DOMAIN, "cert": cert, "key": key,
                   "ca": lab.ca.cert, "id": f"evil-{RUN_TAG}-{len(outcomes)}", **case}
        result = L.run(L.in_netns(evil_ns, [L.PYTHON, os.path.abspath(__file__), "evil-peer", json.dumps(request)]),
                       check=False, timeout=60)
        try:
            outcome = json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise L.ScenarioFailure(f"evil peer ({label}) failed: {result.stderr.strip()[-500:]}") from None
        outcomes.append((label, request, outcome, conditions))
        details.append(f"evil peer, {label}: authenticated {outcome.get('auth')}; sent {outcome.get('sent', '')[:160]}")
        details.append(f"  received: {outcome.get('error_xml') or outcome.get('tail', '')[-300:]!r}; "
                       f"stream error <{outcome.get('condition')}/>, closed: {outcome.get('closed')}")
    time.sleep(2)
    wait_all([(pool_a, len(stream) + 1)], 30)
    got = pool_a.take()
    evil_ids = {request["id"] for _, request, _, _ in outcomes}
    leaked = [m for m in got["received"] if m[2] in evil_ids or "mallory" in m[1]]
    security = [line.strip()[:300] for line in braid.log_since_mark().splitlines() if "security" in line.lower()]
    details.extend(f"braid log: {line}" for line in security[:4])
    details.append("braid metrics: " + metrics_line(braid, ["braid_s2s_security_violations_total",
                                                          "braid_stream_errors_sent_total"]))
    link_after, count_a, count_b = links_between(lab, braid, braid2)
    details.append(f"braid⇄braid2 link unchanged: {link_after == link_before} ({count_a}/{count_b} connections)")
    L.expect(not leaked, f"the forged stanza(s) were delivered: {leaked}")
    for label, request, outcome, conditions in outcomes:
        L.expect(outcome.get("auth") == "success", f"{label}: the evil peer could not authenticate: {outcome}")
        L.expect(outcome.get("condition") in conditions,
                 f"{label}: stream error <{outcome.get('condition')}/>, expected <{'/> or <'.join(conditions)}/>")
        L.expect(outcome.get("closed"), f"{label}: braid did not close the stream")
    L.expect(len([line for line in security if evil_ip in line]) >= len(outcomes),
             f"braid logged {len([l for l in security if evil_ip in l])} security events naming {evil_ip}, "
             f"expected {len(outcomes)}")
    check_delivery(details, "legitimate braid2→braid during and after", stream, got["received"])
    L.expect(link_after == link_before, "the braid⇄braid2 link changed")


def issue_short_cert(lab, provider, seconds):
    """A certificate for PROVIDER's names and key, valid from 2 minutes ago for SECONDS more."""
    directory = os.path.join(lab.ca.directory, "short")
    os.makedirs(os.path.join(directory, "new"), exist_ok=True)
    L.write_file(os.path.join(directory, "index.txt"), "")
    L.write_file(os.path.join(directory, "serial"), f"{random.getrandbits(60):016X}\n")
    L.write_file(os.path.join(directory, "ca.cnf"), f"""[ca]
default_ca = lab
[lab]
database = {directory}/index.txt
new_certs_dir = {directory}/new
serial = {directory}/serial
default_md = sha256
policy = anything
unique_subject = no
[anything]
organizationName = optional
commonName = supplied
""")
    names = provider.certificate_names()
    L.write_file(os.path.join(directory, "ext"), "\n".join([
        "basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
        "extendedKeyUsage=serverAuth,clientAuth",
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in names)]) + "\n")
    csr = os.path.join(directory, "short.csr")
    cert = os.path.join(directory, f"{provider.name}-short.crt")
    L.run(["openssl", "req", "-new", "-key", provider.key, "-out", csr, "-subj",
           f"/O=Braid federation lab/CN={names[0]}"])
    now = time.time()
    stamp = lambda t: time.strftime("%Y%m%d%H%M%SZ", time.gmtime(t))
    L.run(["openssl", "ca", "-batch", "-config", os.path.join(directory, "ca.cnf"), "-cert", lab.ca.cert,
           "-keyfile", lab.ca.key, "-in", csr, "-out", cert, "-notext", "-startdate", stamp(now - 120),
           "-enddate", stamp(now + seconds), "-extfile", os.path.join(directory, "ext")])
    return cert, now + seconds


def scenario_lifecycle(lab, details, a, b):
    """(a) a domain added at runtime joins the link; (b) a link cut mid-traffic loses
    nothing; (c) a peer certificate expiring mid-test resets the link, nothing lost."""
    # (a) braid domain add
    ua, ub = a.users(a.domains[3])[0], b.users(b.domains[3])[0]
    late_user = f"user1@{LATE_DOMAIN}"
    pool_a, pool_b = Pool(lab, a, [ua]), Pool(lab, b, [ub])
    deliver(pool_a, pool_b, messages_between([ua], [ub], "life-open"))
    L.quiesce(lab, [a, b])
    link_before, count_a, count_b = links_between(lab, a, b)
    a.cli("domain", "add", LATE_DOMAIN)
    a.cli("user", "add", late_user, "--password", L.PASSWORD)
    added = time.monotonic()
    pool_late = L.wait_until(lambda: _try_pool(lab, a, [late_user]), 15, f"{late_user} to log in")
    sent = messages_between([late_user], [ub], "life-late-ab")
    deliver(pool_late, pool_b, sent)
    back = messages_between([ub], [late_user], "life-late-ba")
    deliver(pool_b, pool_late, back)
    got_b, got_late = pool_b.take(), pool_late.take()
    link_after, count_a, count_b = links_between(lab, a, b)
    methods = sorted({f"{pair_field(pair, 'direction')}:{pair_method(pair)}" for _, pair in link_pairs(a, b)
                      if pair_field(pair, "local", "localDomain", "local_domain") == LATE_DOMAIN})
    details.append(f"(a) {LATE_DOMAIN} added at runtime; both ways delivered {time.monotonic() - added:.1f}s later; "
                   f"pairs on {a.name}'s links: {methods}; connections {count_a}/{count_b}, same link: "
                   f"{link_after == link_before}")
    check_delivery(details, f"(a) {LATE_DOMAIN}→{b.name}", sent, got_b["received"], got_late["errors"])
    check_delivery(details, f"(a) {b.name}→{LATE_DOMAIN}", back, got_late["received"], got_b["errors"])
    L.expect(link_after == link_before and count_a == 1,
             f"(a) the new domain did not join the existing link: before {sorted(link_before)}, after {sorted(link_after)}")
    a.cli("domain", "remove", LATE_DOMAIN)
    time.sleep(2)
    gone = messages_between([ub], [late_user], "life-removed")
    pool_b.send(gone)
    time.sleep(4)
    taken = pool_b.take()
    errors = [error for error in taken["errors"] if error[2] == gone[0][2]]
    link_removed, count_a, _ = links_between(lab, a, b)
    details.append(f"(a) after `braid domain remove {LATE_DOMAIN}`: {ub} → {late_user} "
                   + (f"bounced <{errors[0][3]}/> {errors[0][4]!r}" if errors else "got no error in 4s")
                   + f"; link kept: {link_removed == link_before}")
    L.expect(link_removed == link_before, "(a) removing a domain dropped the link")

    # (b) cut the connection mid-traffic
    L.quiesce(lab, [a, b])
    stream_ab = [[ua, ub, f"life-cut-ab-{RUN_TAG}-{index}", f"cut {index}"] for index in range(150)]
    stream_ba = [[ub, ua, f"life-cut-ba-{RUN_TAG}-{index}", f"cut {index}"] for index in range(150)]
    pool_a.take()
    pool_a.stream(stream_ab, 0.04)
    pool_b.stream(stream_ba, 0.04)
    time.sleep(2.5)
    cut_before, _, _ = links_between(lab, a, b)
    kill_links(lab, a, b)
    details.append(f"(b) cut {len(cut_before)} connection(s) with ss -K after 2.5s of a 6s stream each way")
    elapsed = wait_all([(pool_b, len(stream_ab)), (pool_a, len(stream_ba))], 60)
    got_b, got_a = pool_b.take(), pool_a.take()
    cut_after, count_a, count_b = links_between(lab, a, b)
    details.append(f"(b) new link: {cut_after != cut_before} ({count_a}/{count_b} connections); "
                   + metrics_line(a, ["braid_s2s_resent_total", "braid_s2s_duplicates_dropped_total"]) + "; "
                   + metrics_line(b, ["braid_s2s_resent_total", "braid_s2s_duplicates_dropped_total"]))
    check_delivery(details, f"(b) {a.name}→{b.name} across the cut", stream_ab, got_b["received"], got_a["errors"])
    check_delivery(details, f"(b) {b.name}→{a.name} across the cut", stream_ba, got_a["received"], got_b["errors"])

    # (c) a peer certificate that expires mid-test
    for agent in list(lab.agents):
        agent.close()
    original_cert = b.cert
    lifetime = 75
    short_cert, expires_at = issue_short_cert(lab, b, lifetime)
    try:
        b.cert = short_cert
        L.log(f"restarting {b.name} with a certificate valid for {lifetime}s")
        b.restart()
        pool_a, pool_b = Pool(lab, a, [ua]), Pool(lab, b, [ub])
        deliver(pool_b, pool_a, messages_between([ub], [ua], "life-exp-open"))
        deliver(pool_a, pool_b, messages_between([ua], [ub], "life-exp-open2"))
        link_valid, _, _ = links_between(lab, a, b)
        before = {f"{pair_field(p, 'direction')}:{pair_method(p)}" for _, p in link_pairs(a, b)
                  if pair_field(p, "remote", "remoteDomain", "remote_domain") == b.domains[3]}
        resets_before = metric_total(a, "braid_s2s_link_resets_total")
        a.mark_log()
        remaining = expires_at - time.time()
        count = int((remaining + 25) / 0.5)
        details.append(f"(c) {b.name} restarted with a certificate expiring in {remaining:.0f}s; {a.name} "
                       f"proves {b.domains[3]} by {sorted(before)}; streaming {count} messages each way, one per 0.5s")
        stream_ab = [[ua, ub, f"life-exp-ab-{RUN_TAG}-{index}", f"exp {index}"] for index in range(count)]
        stream_ba = [[ub, ua, f"life-exp-ba-{RUN_TAG}-{index}", f"exp {index}"] for index in range(count)]
        pool_a.take()
        pool_b.take()
        pool_a.stream(stream_ab, 0.5)
        pool_b.stream(stream_ba, 0.5)
        elapsed = wait_all([(pool_b, len(stream_ab)), (pool_a, len(stream_ba))], remaining + 60)
        got_b, got_a = pool_b.take(), pool_a.take()
        link_later, count_a, count_b = links_between(lab, a, b)
        after = {f"{pair_field(p, 'direction')}:{pair_method(p)}" for _, p in link_pairs(a, b)
                 if pair_field(p, "remote", "remoteDomain", "remote_domain") == b.domains[3]}
        resets = metric_total(a, "braid_s2s_link_resets_total") - resets_before
        reset_lines = [line.strip()[:300] for line in a.log_since_mark().splitlines()
                       if re.search(r"reset|lapsed|expired", line, re.I)]
        details.extend(f"(c) {a.name} log: {line}" for line in reset_lines[:3])
        details.append(f"(c) link resets counted by {a.name}: {resets:g}; new link: {link_later != link_valid} "
                       f"({count_a}/{count_b} connections); {b.domains[3]} now proven by {sorted(after)}")
        check_delivery(details, f"(c) {a.name}→{b.name} across the expiry", stream_ab, got_b["received"], got_a["errors"])
        check_delivery(details, f"(c) {b.name}→{a.name} across the expiry", stream_ba, got_a["received"], got_b["errors"])
        L.expect(resets >= 1 or reset_lines, f"(c) {a.name} did not reset the link when {b.name}'s certificate expired")
        L.expect(link_later != link_valid, f"(c) the link with the expired certificate is still up: {sorted(link_later)}")
        L.expect(not any("pkix" in method for method in after),
                 f"(c) {b.domains[3]} is still proven by PKIX with an expired certificate: {sorted(after)}")
        details.append("(c) certificate renewal with SIGHUP before the expiry: see mux:cert-reload")
    finally:
        for agent in list(lab.agents):
            agent.close()
        b.cert = original_cert
        L.log(f"restarting {b.name} with its normal certificate")
        b.restart()


def supports_sighup_reload(binary):
    return "SIGHUP" in L.run([binary, "serve", "--help"], check=False).stdout


def pairs_of(provider, peer, remote):
    return sorted({f"{pair_field(p, 'direction')}:{pair_method(p)}" for _, p in link_pairs(provider, peer)
                   if pair_field(p, "remote", "remoteDomain", "remote_domain") == remote})


def scenario_cert_reload(lab, details, a, b):
    """Lifecycle, continued: B's certificate is renewed (same file, new content) and B gets
    SIGHUP before the old one expires. When it expires A resets the link, and the new link
    is certificate-authenticated again (PKIX); nothing lost. Skipped (said so) when braid
    has no SIGHUP reload."""
    if not supports_sighup_reload(b.binary):
        details.append("skipped: this braid has no certificate reload on SIGHUP (`braid serve --help` does not "
                       "mention it)")
        return
    ua, ub = a.users(a.domains[4])[0], b.users(b.domains[4])[0]
    original_cert = b.cert
    lifetime = 45
    short_cert, expires_at = issue_short_cert(lab, b, lifetime)
    try:
        b.cert = short_cert
        L.log(f"restarting {b.name} with a certificate valid for {lifetime}s")
        b.restart()
        pool_a, pool_b = Pool(lab, a, [ua]), Pool(lab, b, [ub])
        deliver(pool_b, pool_a, messages_between([ub], [ua], "reload-open"))
        deliver(pool_a, pool_b, messages_between([ua], [ub], "reload-open2"))
        before = pairs_of(a, b, b.domains[4])
        link_old, _, _ = links_between(lab, a, b)
        # Renewal: a 90-day certificate for the same names and key, over the same file.
        b.mark_log()
        a.mark_log()
        issue_short_cert(lab, b, 90 * 86400)
        os.kill(b.service.pid, signal.SIGHUP)
        time.sleep(2)
        reload_lines = [line.strip()[:300] for line in b.log_since_mark().splitlines()
                        if "certificates reloaded" in line]
        remaining = expires_at - time.time()
        details.append(f"{b.name} got a renewed certificate and SIGHUP {remaining:.0f}s before the old one expires; "
                       f"{a.name} proved {b.domains[4]} by {before}")
        details.extend(f"{b.name} log: {line}" for line in reload_lines[:3])
        count = int((remaining + 20) / 0.5)
        stream_ab = [[ua, ub, f"reload-ab-{RUN_TAG}-{index}", f"reload {index}"] for index in range(count)]
        stream_ba = [[ub, ua, f"reload-ba-{RUN_TAG}-{index}", f"reload {index}"] for index in range(count)]
        pool_a.take()
        pool_b.take()
        pool_a.stream(stream_ab, 0.5)
        pool_b.stream(stream_ba, 0.5)
        wait_all([(pool_b, len(stream_ab)), (pool_a, len(stream_ba))], remaining + 60)
        got_b, got_a = pool_b.take(), pool_a.take()
        link_new, count_a, count_b = links_between(lab, a, b)
        after = pairs_of(a, b, b.domains[4])
        resets = [line.strip()[:300] for line in a.log_since_mark().splitlines() if "lapsed" in line]
        details.extend(f"{a.name} log: {line}" for line in resets[:2])
        details.append(f"after the old certificate's expiry: new link {link_new != link_old} ({count_a}/{count_b} "
                       f"connections); {b.domains[4]} proven by {after}")
        check_delivery(details, f"{a.name}→{b.name} across the renewal", stream_ab, got_b["received"], got_a["errors"])
        check_delivery(details, f"{b.name}→{a.name} across the renewal", stream_ba, got_a["received"], got_b["errors"])
        L.expect(reload_lines, f"{b.name} did not log \"certificates reloaded\" after SIGHUP")
        L.expect(after and all("pkix" in method for method in after),
                 f"{b.domains[4]} is not certificate-authenticated after the renewal: {after}")
    finally:
        for agent in list(lab.agents):
            agent.close()
        b.cert = original_cert
        L.log(f"restarting {b.name} with its normal certificate")
        b.restart()


def _try_pool(lab, provider, jids):
    try:
        return Pool(lab, provider, jids, timeout=5)
    except L.ScenarioFailure:
        return None


# -- the POSH web server and the evil peer (run inside lab namespaces) --------------------

def posh_server(directory, cert, key, address, port):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            host = (self.headers.get("Host") or "").split(":")[0].lower()
            path = os.path.join(directory, f"{host}.json")
            if self.path != "/.well-known/posh/xmpp-server.json" or not os.path.exists(path):
                self.send_error(404)
                return
            with open(path, "rb") as handle:
                body = handle.read()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            sys.stderr.write(f"{time.strftime('%H:%M:%S')} {self.headers.get('Host')} {fmt % args}\n")
            sys.stderr.flush()

    server = http.server.ThreadingHTTPServer((address, int(port)), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


def evil_peer(request):
    """Authenticates as REQUEST['own'] with SASL EXTERNAL, sends one stanza, reports what
    came back (JSON on stdout)."""
    result = {"auth": None, "condition": None, "closed": False}
    header = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
              "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
              f"from='{request['own']}' to='{request['stream_to']}' version='1.0'>")
    sock = socket.create_connection((request["host"], request["port"]), timeout=10)
    buffer = [b""]

    def read_until(pattern, timeout=10):
        deadline = time.monotonic() + timeout
        while not re.search(pattern, buffer[0]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waiting for {pattern!r}; have {buffer[0][-300:]!r}")
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                result["closed"] = True
                raise ConnectionError(f"closed while waiting for {pattern!r}; have {buffer[0][-300:]!r}")
            buffer[0] += chunk
        text = buffer[0]
        buffer[0] = b""
        return text.decode("utf-8", "replace")

    try:
        sock.sendall(header.encode())
        read_until(rb"</stream:features>")
        sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        read_until(rb"<proceed")
        context = ssl.create_default_context(cafile=request["ca"])
        context.load_cert_chain(request["cert"], request["key"])
        sock = context.wrap_socket(sock, server_hostname=request["stream_to"])
        sock.sendall(header.encode())
        features = read_until(rb"</stream:features>")
        if "EXTERNAL" not in features:
            result["auth"] = f"no EXTERNAL offered: {features[-300:]}"
            raise RuntimeError("no EXTERNAL")
        sock.sendall(("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
                      + base64.b64encode(request["own"].encode()).decode() + "</auth>").encode())
        answer = read_until(rb"<success|<failure[^>]*>.*</failure>")
        result["auth"] = "success" if "<success" in answer else f"failed: {answer[-200:]}"
        if "<success" not in answer:
            raise RuntimeError("auth failed")
        sock.sendall(header.encode())
        read_until(rb"</stream:features>")
        stanza = (f"<message from='{request['from']}' to='{request['to']}' id='{request['id']}' type='chat'>"
                  f"<body>forged by the evil peer</body></message>")
        result["sent"] = stanza
        sock.sendall(stanza.encode())
        try:
            text = read_until(rb"</stream:stream>", timeout=10)
            result["closed"] = True
        except (ConnectionError, TimeoutError) as error:
            text = buffer[0].decode("utf-8", "replace")
            result["note"] = str(error)[:200]
        result["tail"] = text[-600:]
        match = re.search(r"<stream:error>.*?</stream:error>", text, re.S)
        if match:
            result["error_xml"] = match.group(0)
            condition = re.search(r"<([a-z-]+)[^>]*xmlns=['\"]urn:ietf:params:xml:ns:xmpp-streams['\"]", match.group(0))
            result["condition"] = condition.group(1) if condition else None
        # After </stream:stream> the server closes TCP: check the socket ends.
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.settimeout(5)
            while sock.recv(65536):
                pass
            result["closed"] = True
    except (OSError, RuntimeError, TimeoutError, ConnectionError, ssl.SSLError) as error:
        result.setdefault("error", str(error)[:300])
    finally:
        with contextlib.suppress(OSError):
            sock.close()
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["posh-server"]:
        posh_server(*sys.argv[2:7])
    elif sys.argv[1:2] == ["evil-peer"]:
        evil_peer(json.loads(sys.argv[2]))
    else:
        print(__doc__)
        sys.exit(2)


def scenario_muc(lab, details, a, b):
    """Issue 11: A's customers' group chats, B's customers in them. Every user of B's first 20
    domains enters a room at each of 5 of A's conference services (`conference.bN.test`, no
    setup per domain) and writes to each; everyone in a room gets every message. All of it
    over exactly one TCP connection between the providers, nothing lost."""
    rooms = [f"lab-{RUN_TAG}@{service}" for service in MUC_SERVICES]
    owners = first_users(a, MUC_HOSTS)
    guests = first_users(b, b.domains[:MUC_GUEST_DOMAINS])
    pool_a, pool_b = Pool(lab, a, owners), Pool(lab, b, guests)
    L.quiesce(lab, [a, b])
    _, before_a, before_b = links_between(lab, a, b)
    opens = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] for p in (a, b)}
    details.append(f"s2s connections before: {before_a} ({a.name}'s count), {before_b} ({b.name}'s)")
    peak = [0, 0]

    def sample():
        _, count_a, count_b = links_between(lab, a, b)
        peak[0], peak[1] = max(peak[0], count_a), max(peak[1], count_b)

    created = pool_a.muc_create([[owner, room, "owner"] for owner, room in zip(owners, rooms)])
    if created["entered"] != len(rooms):
        raise L.ScenarioFailure(f"{created['entered']} of {len(rooms)} rooms created: {created['errors'][:5]}")
    started = time.monotonic()
    joined = pool_b.muc_join([[guest, room, guest.split("@")[1]] for guest in guests for room in rooms])
    sample()
    details.append(f"{joined['entered']} of {len(guests) * len(rooms)} entries from {b.name} confirmed in "
                   f"{time.monotonic() - started:.1f}s")
    if joined["entered"] != len(guests) * len(rooms):
        raise L.ScenarioFailure(f"only {joined['entered']} of {len(guests) * len(rooms)} entries confirmed: {joined['errors'][:5]}")
    pool_a.take()
    pool_b.take()
    messages = [[guest, room, f"muc-{RUN_TAG}-{index}-{number}", f"{guest} in {room}"]
                for index, guest in enumerate(guests) for number, room in enumerate(rooms)]
    pool_b.groupchat(messages)
    # Each message reaches every occupant: the other guests and the sender (reflected), and
    # the room's owner at A.
    expected_b, expected_a = len(messages) * len(guests), len(messages)
    elapsed = wait_all([(pool_b, expected_b), (pool_a, expected_a)], 120, sample)
    got_b, got_a = pool_b.take(), pool_a.take()
    details.append(f"groupchat: {len(messages)} messages, {len(got_b['received'])} of {expected_b} deliveries at {b.name}, "
                   f"{len(got_a['received'])} of {expected_a} at {a.name}, "
                   + (f"after {elapsed:.1f}s" if elapsed is not None else "NOT all delivered"))
    problems = []
    for label, got, expected in ((b.name, got_b, expected_b), (a.name, got_a, expected_a)):
        unique_deliveries = {(to, message_id) for to, _, message_id, _ in got["received"]}
        if len(got["received"]) != expected or len(unique_deliveries) != expected:
            problems.append(f"{label}: {len(got['received'])} deliveries ({len(unique_deliveries)} distinct), expected {expected}")
        if got["errors"]:
            problems.append(f"{label}: errors {got['errors'][:3]}")
    _, count_a, count_b = links_between(lab, a, b)
    opened = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] - opens[p.name] for p in (a, b)}
    details.append(f"s2s connections after: {count_a} / {count_b}; most at once: {peak[0]}/{peak[1]}; "
                   f"TCP connections opened: " + ", ".join(f"{name} {value}" for name, value in opened.items()))
    if count_a != 1 or count_b != 1 or peak[0] > 1 or peak[1] > 1:
        problems.append(f"expected exactly 1 s2s connection between {a.name} and {b.name}, saw {count_a}/{count_b} (peak {peak[0]}/{peak[1]})")
    for pool in (pool_a, pool_b):
        pool.agent.close()
    if problems:
        raise L.ScenarioFailure("; ".join(problems))


def scenario_muc_classic(lab, details, braid):
    """Issue 11: users of Prosody and ejabberd servers enter a Braid room (classic federation:
    a connection per pair, dialback where they do not trust the lab CA) and talk with its
    owner and each other."""
    room = f"classic-{RUN_TAG}@{MUC_SERVICES[0]}"
    owner = first_users(braid, MUC_HOSTS[:1])[0]
    pool_braid = Pool(lab, braid, [owner])
    guests = {kind: first_users(named(lab, kind), named(lab, kind).domains[:3]) for kind in ("prosody", "ejabberd")}
    pools = {kind: Pool(lab, named(lab, kind), jids) for kind, jids in guests.items()}
    created = pool_braid.muc_create([[owner, room, "owner"]])
    if created["entered"] != 1:
        raise L.ScenarioFailure(f"room not created: {created['errors'][:3]}")
    for provider in pools:
        named(lab, provider).mark_log()
    for kind, pool in list(pools.items()):
        joined = pool.muc_join([[guest, room, guest.replace("@", "-at-")] for guest in guests[kind]])
        details.append(f"{kind}: {joined['entered']} of {len(guests[kind])} entries confirmed")
        if joined["entered"] != len(guests[kind]):
            dns = [line.strip()[:200] for line in named(lab, kind).log_since_mark().splitlines()
                   if "DNS lookup failed" in line and MUC_SERVICES[0] in line]
            if kind == "ejabberd" and dns:
                # ejabberd's own resolver (not Braid) failed to resolve the service, as it
                # does now and then in this lab (see mux:ejabberd's baseline): said, and the
                # check goes on with the servers that could reach the room.
                details.append(f"NOTE: ejabberd could not resolve {MUC_SERVICES[0]} itself: {dns[0]}")
                del pools[kind]
                del guests[kind]
                continue
            raise L.ScenarioFailure(f"{kind} users could not all enter: {joined['errors'][:3]}")
    for pool in [pool_braid, *pools.values()]:
        pool.take()
    everyone = [owner] + [jid for jids in guests.values() for jid in jids]
    messages = {kind: [[guest, room, f"mucc-{RUN_TAG}-{guest}", f"hello from {guest}"] for guest in guests[kind]] for kind in pools}
    for kind, pool in pools.items():
        pool.groupchat(messages[kind])
    sent = sum(len(m) for m in messages.values())
    expectations = [(pool_braid, sent)] + [(pools[kind], sent * len(guests[kind])) for kind in pools]
    elapsed = wait_all(expectations, 90)
    problems = []
    for label, pool, expected in [("braid", pool_braid, sent)] + [(kind, pools[kind], sent * len(guests[kind])) for kind in pools]:
        got = pool.take()
        details.append(f"{label}: {len(got['received'])} of {expected} deliveries" + (f", errors {got['errors'][:2]}" if got["errors"] else ""))
        if len(got["received"]) != expected or got["errors"]:
            problems.append(f"{label}: {len(got['received'])} of {expected} deliveries")
    details.append(f"{len(everyone)} occupants, {sent} messages, " + (f"all delivered after {elapsed:.1f}s" if elapsed is not None else "NOT all delivered"))
    if problems:
        raise L.ScenarioFailure("; ".join(problems))


def scenario_muc_remote(lab, details, braid, kind, braid_domains):
    """Issue 11 §3: braid's users in a room of KIND's own group chat service. A user of KIND
    creates an instant room at `conference.<its domain>`, a second local user and the first
    users of BRAID_DOMAINS enter it, everyone writes once, and every occupant must get every
    message exactly once (counted per recipient and message). Each braid domain ⇄ the service
    is a domain pair of classic s2s: the new connections between braid and KIND must stay
    within the classic bound (one per pair and direction; braid opens at most one per pair).

    ejabberd's own resolver now and then fails to resolve lab names (see mux:ejabberd): a
    braid user whose entry is lost that way, while the lab's resolver answers the same name
    validated from ejabberd's namespace, is left out with a NOTE."""
    host = named(lab, kind)
    service = host.muc_services()[0]
    # A room of its own per run (--repeat): new, so that its creation (status 201) and the
    # instant-room form are part of every run, whatever became of the previous run's room.
    room = f"remote-{RUN_TAG}-{random.getrandbits(24):06x}@{service}"
    owner, local_guest = first_users(host, host.domains[:2])
    guests = first_users(braid, braid_domains)
    pool_host, pool_braid = Pool(lab, host, [owner, local_guest]), Pool(lab, braid, guests)
    L.quiesce(lab, [braid, host])
    for provider in (braid, host):
        provider.mark_log()
    out_before, in_before = (set(side) for side in lab.connections(braid, host))
    opens = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] for p in (braid, host)}
    seen_out, seen_in, peak = set(out_before), set(in_before), [0]

    def sample():
        out, into = lab.connections(braid, host)
        seen_out.update(out)
        seen_in.update(into)
        peak[0] = max(peak[0], len(out) + len(into), links_between(lab, braid, host)[2])

    details.append(f"s2s connections between {braid.name} and {kind} before: {len(out_before) + len(in_before)} "
                   f"({braid.name} opened {len(out_before)}, {kind} {len(in_before)})")
    created = pool_host.muc_create([[owner, room, "owner"]])
    if created["entered"] != 1:
        raise L.ScenarioFailure(f"{owner} could not create {room}: {created['errors'][:3]}")
    local = pool_host.muc_join([[local_guest, room, "local"]], timeout=30)
    if local["entered"] != 1:
        raise L.ScenarioFailure(f"{local_guest} could not enter {room}: {local['errors'][:3]}")
    started = time.monotonic()
    joined = pool_braid.muc_join([[guest, room, guest.split("@")[1]] for guest in guests], timeout=45)
    sample()
    confirmed = {jid for jid, _ in joined["confirmed"]}
    details.append(f"{room} created by {owner} (instant room), {local_guest} entered; {len(confirmed)} of "
                   f"{len(guests)} {braid.name} users entered (status 110 over federation) in "
                   f"{time.monotonic() - started:.1f}s")
    missing = [guest for guest in guests if guest not in confirmed]
    if missing:
        missing_domains = [guest.split("@")[1] for guest in missing]
        errors = [error for error in joined["errors"] if error[0] in missing]
        dns = [line.strip()[:240] for line in host.log_since_mark().splitlines()
               if "DNS lookup failed" in line and any(domain in line for domain in missing_domains)]
        # Only ejabberd's own resolver: the lab's DNS must answer the same names, validated,
        # in ejabberd's namespace, and every missing user's domain must be among the failures.
        lab_dns_fine = all(dig_validated(lab, host, f"_xmpp-server._tcp.{domain}") for domain in missing_domains)
        own_failure = kind == "ejabberd" and lab_dns_fine and all(
            any(domain in line for line in dns) for domain in missing_domains)
        if not own_failure:
            braid_lines = [line.strip()[:300] for line in braid.log_since_mark().splitlines()
                           if service in line and re.search(r"error|fail|refus|timeout|bounce", line, re.I)]
            details.extend(f"{braid.name} log: {line}" for line in braid_lines[:5])
            details.extend(f"{kind} log: {line}" for line in dns[:3])
            raise L.ScenarioFailure(f"{len(missing)} of {len(guests)} {braid.name} users could not enter {room}: "
                                    f"{missing}; errors {errors[:3]}")
        details.append(f"NOTE: ejabberd could not resolve {', '.join(missing_domains)} itself (the lab's resolver "
                       f"answers them validated from its namespace): {dns[0]}; left out: {', '.join(missing)}")
        guests = [guest for guest in guests if guest in confirmed]
        if not guests:
            details.append(f"NOTE: no {braid.name} user in the room; nothing to exchange")
            return
    pool_host.take()
    pool_braid.take()
    locals_ = [owner, local_guest]
    occupants = locals_ + guests
    messages = [[sender, room, f"mucr-{kind}-{RUN_TAG}-{index}", f"{sender} in {room} #{index}"]
                for index, sender in enumerate(occupants)]
    by_sender = {jid: [m for m in messages if m[0] == jid] for jid in occupants}
    pool_host.groupchat([m for jid in locals_ for m in by_sender[jid]])
    pool_braid.groupchat([m for jid in guests for m in by_sender[jid]])
    expected_host, expected_braid = len(messages) * len(locals_), len(messages) * len(guests)
    elapsed = wait_all([(pool_host, expected_host), (pool_braid, expected_braid)], 90, sample)
    sample()
    got_host, got_braid = pool_host.take(), pool_braid.take()
    details.append(f"groupchat: {len(occupants)} occupants ({len(locals_)} at {kind}, {len(guests)} at {braid.name}), "
                   f"{len(messages)} messages, {len(got_host['received'])} of {expected_host} deliveries at {kind}, "
                   f"{len(got_braid['received'])} of {expected_braid} at {braid.name}, "
                   + (f"after {elapsed:.1f}s" if elapsed is not None else "NOT all delivered"))
    problems = []
    for label, got, recipients in ((kind, got_host, locals_), (braid.name, got_braid, guests)):
        problems += check_room_deliveries(details, label, room, messages, recipients, got)
    out_after, in_after = (set(side) for side in lab.connections(braid, host))
    opened = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] - opens[p.name] for p in (braid, host)}
    new_out, new_in = out_after - out_before, in_after - in_before
    pairs = len(braid_domains)
    details.append(f"s2s connections between {braid.name} and {kind} after: {len(out_after) + len(in_after)} "
                   f"established, {len(new_out) + len(new_in)} of them new ({braid.name} opened {len(new_out)}, "
                   f"{kind} {len(new_in)}); {len(seen_out - out_before) + len(seen_in - in_before)} new seen in all, "
                   f"most at once {peak[0]}; TCP connections opened: {braid.name} {opened[braid.name]}, "
                   f"{kind} {opened[host.name]}; {pairs} domain pairs ({braid.name} domain ⇄ {service}), "
                   f"classic bound {2 * pairs}")
    samples = metrics(braid, ["braid_s2s_links", "braid_s2s_pairs"])
    details.append(f"{braid.name} metrics (all peers): " + (", ".join(
        f"{sample}={value:g}" for sample, value in sorted(samples.items()) if value) or "(none)"))
    details.append(f"{kind}: " + (host.s2s_evidence([service] + list(braid_domains)).replace("\n", " | ")[:600]
                                  or "no s2s evidence"))
    refusals = [line.strip()[:300] for line in braid.log_since_mark().splitlines()
                if "security: refused stanza" in line or (service in line and "error" in line.lower())]
    if refusals:
        details.append(f"{braid.name} logged {len(refusals)} refusals/errors naming {service}, e.g. {refusals[0]}")
    if len(new_out) + len(new_in) > 2 * pairs:
        problems.append(f"{len(new_out) + len(new_in)} new s2s connections between {braid.name} and {kind} for "
                        f"{pairs} domain pairs, more than the classic {2 * pairs}")
    if opened[braid.name] > pairs:
        problems.append(f"{braid.name} opened {opened[braid.name]} TCP connections for {pairs} domain pairs")
    for pool in (pool_host, pool_braid):
        pool.agent.close()
    if problems:
        raise L.ScenarioFailure("; ".join(problems))


def dig_validated(lab, provider, name, rtype="SRV"):
    """Whether the lab's resolver answers NAME in PROVIDER's namespace, NOERROR and validated."""
    rcode, flags = L.dig_flags(lab.dns.kdig(provider.ns, "+dnssec", name, rtype))
    return rcode == "NOERROR" and "ad" in flags


def check_room_deliveries(details, label, room, messages, recipients, got):
    """Every message of MESSAGES ([[from, room, id, body]]) reached each of RECIPIENTS exactly
    once from ROOM. Counted by body (unique per message), so a room that rewrote message ids
    would still be counted right; whether the ids came through is reported. Returns problems."""
    bodies = {body: message_id for _, _, message_id, body in messages}
    counts, ids_kept, others = {}, 0, []
    for to, sender, message_id, body in got["received"]:
        if sender != room or body not in bodies:
            others.append([to, sender, message_id, body[:60]])
            continue
        counts[(to, body)] = counts.get((to, body), 0) + 1
        ids_kept += message_id == bodies[body]
    expected = [(to, body) for to in recipients for body in bodies]
    lost = [key for key in expected if key not in counts]
    duplicated = [key for key, count in counts.items() if count > 1]
    strays = [key for key in counts if key not in set(expected)]
    details.append(f"{label}: {len(expected)} expected deliveries to {len(recipients)} occupants, "
                   f"{len(expected) - len(lost)} delivered, {len(lost)} lost, {len(duplicated)} duplicated; "
                   f"message ids kept by the room: {ids_kept} of {sum(counts.values())}"
                   + (f"; {len(others)} other messages, e.g. {others[:2]}" if others else "")
                   + (f"; errors {got['errors'][:2]}" if got["errors"] else ""))
    problems = []
    if lost:
        problems.append(f"{label}: {len(lost)} of {len(expected)} deliveries lost, e.g. {lost[:3]}")
    if duplicated:
        problems.append(f"{label}: {len(duplicated)} delivered more than once, e.g. {duplicated[:3]}")
    if strays:
        problems.append(f"{label}: delivered to a non-occupant: {strays[:3]}")
    if got["errors"]:
        problems.append(f"{label}: {len(got['errors'])} message errors, e.g. {got['errors'][:2]}")
    return problems


# -- OMEMO across federation (issue 13) --------------------------------------------------

OMEMO_KINDS = ("prosody", "ejabberd")
OMEMO_DEVICELIST = "eu.siacs.conversations.axolotl.devicelist"


def omemo_users(braid, host, kind):
    """(braid's user, the peer's user). Braid's: a domain from the end of its list, just before
    the eight of mux:muc-at-prosody and -ejabberd (b42 with Prosody, b41 with ejabberd at 50
    domains). The peer's: the first user of its provider's sixth domain (q6, f6), which the
    classic comparison (the first five) never uses. Only mux:scale logs braid's user in too,
    and it counts braid⇄braid2 connections only."""
    offset = 2 * REMOTE_MUC_GUESTS + 1 + OMEMO_KINDS.index(kind)
    return braid.users(braid.domains[-offset])[0], host.users(host.domains[CLASSIC_DOMAINS])[0]


def forget_each_other(details, a, b, timeout=20):
    """Removes A and B from each other's roster if either lists the other (a repeated run, or
    an earlier failure, leaves the subscription: a second one would be answered by the server,
    RFC 6121 §3.1.3, and never reach the client), waits (bounded) until neither does, then
    forgets the events that caused. Returns True if there was anything to remove."""
    def listed():
        return {agent.jid: L.step(f"roster of {agent.jid}", agent.call, "roster")["roster"].get(other.jid)
                for agent, other in ((a, b), (b, a))}
    found = listed()
    if not any(found.values()):
        return False
    first = dict(found)
    deadline = time.monotonic() + timeout
    while any(found.values()):
        if time.monotonic() > deadline:
            raise L.ScenarioFailure(f"HARNESS: roster entries left from an earlier run could not be removed "
                                    f"in {timeout}s: {found}")
        # The removal sends unsubscribe and unsubscribed to the other side, whose entry then
        # stays as 'none' until it is removed as well.
        for agent, other in ((a, b), (b, a)):
            if found[agent.jid]:
                L.step(f"{agent.jid} removes {other.jid} from its roster", agent.call, "unroster", to=other.jid)
        time.sleep(0.3)
        found = listed()
    for agent in (a, b):
        agent.call("events", clear=True)
    details.append(f"roster entries from an earlier run removed first: {first}")
    return True


def omemo_evidence(braid, host, agents, jids):
    """On failure: the last PEP/OMEMO stanzas (and errors) of each client's transcript, and
    the servers' log lines naming the other side's JIDs."""
    lines = []
    for agent in agents:
        text = L.log_tail(agent.log_path, 3000)
        stanzas = [line.strip() for line in text.splitlines()
                   if ("SEND:" in line or "RECV:" in line)
                   and re.search(r"pubsub|axolotl|type=.error|caps", line)]
        lines += [f"{agent.jid} transcript: {line[:900]}" for line in stanzas[-8:]]
    for provider in (braid, host):
        named_lines = [line.strip()[:400] for line in provider.log_since_mark().splitlines()
                       if any(jid in line for jid in jids)
                       and re.search(r"pep|pubsub|error|refus|fail|caps|disco", line, re.I)]
        lines += [f"{provider.name} log: {line}" for line in named_lines[-8:]]
    return lines


def scenario_omemo(lab, details, braid, kind):
    """Issue 13: OMEMO (XEP-0384 0.3, `eu.siacs.conversations.axolotl`) between a user of a
    braid customer domain and a user of a KIND provider (prosody2 or ejabberd2, which run
    PEP), each in its own provider's namespace, with Tests/Interop/omemo_client.py inside
    agent.py. Caps with devicelist+notify before the initial presence; mutual presence
    subscription over s2s; each publishes its bundle and device list to its own server's PEP
    with publish-options access_model=open; each fetches the other's device list and bundle
    from the other server's PEP across s2s (the bundle's identity key must be the one its
    owner generated); an encrypted message each way must decrypt to the text sent, from the
    sender's device; each must have had a PEP notification of the other's device list,
    sent by the other's server across s2s."""
    host = named(lab, f"{kind}2")
    braid_jid, peer_jid = omemo_users(braid, host, kind)
    L.quiesce(lab, [braid, host])
    for provider in (braid, host):
        provider.mark_log()
    out_before, in_before = (set(side) for side in lab.connections(braid, host))
    opens = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] for p in (braid, host)}
    details.append(f"s2s connections between {braid.name} and {host.name} before: "
                   f"{len(out_before) + len(in_before)} ({braid.name} opened {len(out_before)}, "
                   f"{host.name} {len(in_before)})")
    agent_braid = L.Agent(lab, braid, braid_jid)
    agent_peer = L.Agent(lab, host, peer_jid)
    agents = (agent_braid, agent_peer)
    server = {braid_jid: braid.name, peer_jid: host.name}
    started = time.monotonic()
    passed = False
    try:
        for agent in agents:
            L.step(f"log in {agent.jid} (OMEMO client, caps with {OMEMO_DEVICELIST}+notify)",
                   agent.connect, omemo=True)
        forget_each_other(details, agent_braid, agent_peer)
        L.subscribe_mutually(details, agent_braid, agent_peer)

        device, identity = {}, {}
        for agent in agents:
            t0 = time.monotonic()
            reply = L.step(f"{agent.jid} publishes its OMEMO bundle and device list to {server[agent.jid]}'s PEP "
                           f"(publish-options access_model=open)", agent.call, "omemo_start", timeout=30)
            device[agent.jid], identity[agent.jid] = reply["device"], reply["identity"]
            elapsed = time.monotonic() - t0
            # publish-options are a precondition (XEP-0060 §7.1.5): the server either applies
            # them or refuses the publish. What it applied, from the nodes' configuration:
            access = L.step(f"{agent.jid} reads its nodes' access model", agent.call, "omemo_access")["access"]
            models = {node.rsplit(".", 1)[-1]: value.get("access_model", value.get("error")) for node, value in access.items()}
            details.append(f"{agent.jid}: device {reply['device']}, bundle and device list published to "
                           f"{server[agent.jid]}'s PEP in {elapsed:.2f}s; pubsub#access_model of its nodes: {models}")
            wrong = {node: value for node, value in access.items() if "access_model" in value and value["access_model"] != "open"}
            L.expect(not wrong, f"{server[agent.jid]} accepted publish-options access_model=open for {agent.jid} "
                                f"but configured {wrong}")

        for agent, other in ((agent_braid, agent_peer), (agent_peer, agent_braid)):
            what = f"{agent.jid} ({server[agent.jid]}) fetches from {other.jid}'s PEP at {server[other.jid]}"
            t0 = time.monotonic()
            devices = L.step(f"{what}: device list", agent.call, "omemo_devices", jid=other.jid, timeout=30)["devices"]
            L.expect(device[other.jid] in devices,
                     f"{what}: the device list is {devices}, without device {device[other.jid]}")
            bundle = L.step(f"{what}: bundle of device {device[other.jid]}", agent.call, "omemo_bundle",
                            jid=other.jid, device=device[other.jid], timeout=30)
            L.expect(bundle["identity"] == identity[other.jid],
                     f"{what}: the bundle's identity key {bundle['identity'][:16]}… is not the one "
                     f"{other.jid} generated ({identity[other.jid][:16]}…)")
            details.append(f"{what} across s2s: device list {devices}, bundle of device {device[other.jid]} "
                           f"(identity key {bundle['identity'][:16]}…, as generated; signed pre-key "
                           f"{bundle['signed_pre_key']}, {bundle['pre_keys']} pre-keys) in {time.monotonic() - t0:.2f}s")

        texts = {agent_braid.jid: f"OMEMO {braid_jid} → {peer_jid}: Grüße 🔐 <&> {RUN_TAG}",
                 agent_peer.jid: f"OMEMO {peer_jid} → {braid_jid}: ça marche ✓ 你好 {RUN_TAG}"}
        decrypted = 0
        for x, y in ((agent_braid, agent_peer), (agent_peer, agent_braid)):
            t0 = time.monotonic()
            sent = L.step(f"{x.jid} encrypts for {y.jid}", x.call, "omemo_send", to=y.jid, text=texts[x.jid], timeout=30)
            got = L.step(f"{y.jid} decrypts {x.jid}'s message", y.call, "omemo_receive", timeout=30, **{"from": x.jid})
            L.expect(got["plaintext"] == texts[x.jid],
                     f"{y.jid} decrypted {got['plaintext']!r}, {x.jid} sent {texts[x.jid]!r}")
            L.expect(got["device"] == device[x.jid],
                     f"{y.jid}: the message came from device {got['device']}, {x.jid}'s is {device[x.jid]}")
            decrypted += 1
            details.append(f"{x.jid} → {y.jid}: {sent['messages']} OMEMO message, key encrypted for "
                           f"{sent['keys']} device(s); decrypted to the text sent ({got['plaintext']!r}) from "
                           f"device {got['device']} in {time.monotonic() - t0:.2f}s")

        notified = 0
        for agent, other in ((agent_braid, agent_peer), (agent_peer, agent_braid)):
            got = L.step(f"{agent.jid} gets a PEP notification of {other.jid}'s device list from {server[other.jid]}",
                         agent.call, "omemo_notification", jid=other.jid, device=device[other.jid], timeout=30)
            from_other = [n for n in got["notifications"] if n["from"].split("/")[0] == other.jid]
            own = [n for n in got["notifications"] if n["from"].split("/")[0] == agent.jid]
            notified += 1
            details.append(f"{agent.jid} had {len(from_other)} device-list notification(s) of {other.jid} from "
                           f"{server[other.jid]} across s2s (" + "; ".join(f"{n['devices']} at {n['at']:.2f}s"
                                                                        for n in from_other)
                           + f"; seconds since its login) and {len(own)} of its own from {server[agent.jid]}")
        details.append(f"OMEMO {braid.name} ⇄ {host.name}: {decrypted} of 2 messages decrypted, {notified} of 2 "
                       f"device-list notifications across s2s, in {time.monotonic() - started:.1f}s")
        passed = True
    finally:
        if not passed:
            details.extend(omemo_evidence(braid, host, agents, [braid_jid, peer_jid]))
        out_after, in_after = (set(side) for side in lab.connections(braid, host))
        opened = {p.name: L.tcp_counters(p.ns)["ActiveOpens"] - opens[p.name] for p in (braid, host)}
        details.append(f"s2s connections between {braid.name} and {host.name} after: "
                       f"{len(out_after) + len(in_after)} established ({braid.name} opened "
                       f"{len(out_after - out_before)} new, {host.name} {len(in_after - in_before)} new); "
                       f"TCP connections opened in each namespace: {braid.name} {opened[braid.name]}, "
                       f"{host.name} {opened[host.name]} (each counts its client's own c2s connection)")
        domain = braid_jid.split("@")[1]
        with contextlib.suppress(L.LabError):
            evidence = host.s2s_evidence([domain])
            details.append(f"{host.name}'s view of its s2s sessions with {domain}: "
                           + (evidence.replace("\n", " | ")[:600] if evidence else
                              "no new authentication logged (the previous run's connections were reused)"))
        # Leave no state behind for the next run or scenario: empty device lists, no bundle
        # nodes, no subscription. Best effort; a repeated run cleans the roster up anyway.
        cleanup = []
        for agent in agents:
            with contextlib.suppress(L.AgentError):
                if agent.full_jid:
                    cleanup += agent.call("omemo_reset", timeout=15)["done"]
        try:
            if all(agent.full_jid for agent in agents):
                for agent, other in ((agent_braid, agent_peer), (agent_peer, agent_braid)):
                    agent.call("unroster", to=other.jid)
                cleanup.append("roster entries removed")
        except L.AgentError as error:
            cleanup.append(f"NOTE: roster clean-up failed: {error}")
        if cleanup:
            details.append("clean-up: " + "; ".join(cleanup))
        for agent in agents:
            agent.close()
