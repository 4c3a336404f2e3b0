#!/usr/bin/python3
"""Graceful-fallback scenarios (issue 9): a hosting provider whose customer domains each have
a certificate of their own, naming only that domain.

A certificate then proves one domain, so the pairs of the other domains cannot simply join a
link opened for the first one (RFC 7712 §4.4.2): a server must prove them otherwise (dialback,
DANE) or open further connections, and must never lose or bounce a message because of it.
These scenarios run in a lab of their own, built after the classic and multiplexing ones
(lab.py's main() does it when Braid is in the lab; only the providers the selected
scenarios need are started):

  braid, braid2     b1…bN, c1…cN (N = $BRAID_FALLBACK_DOMAINS, default 10): one lab-CA
                    certificate per domain (and one for the host name); direct TLS as well
  braid3, braid4    d1…dN, g1…gN: the same, require_certificates on, and every domain's SRV
                    records point at a host name of its own (`d1-host.test`, A → the
                    provider) with DNSSEC-secure DANE-EE `3 1 1` TLSA records there; all of
                    a provider's certificates certify one key (ACME key reuse), so one
                    domain's TLSA record matches the certificate of every other
  prosody, prosody2 p1…p5, q1…q5, per-domain certificates (certs/DOMAIN.crt), bidi on
  ejabberd, ejabberd2  e1…e5, f1…f5, per-domain certificates (all of them in certfiles)
  ejabberd3         h1…h5, the same without mod_s2s_dialback: SASL EXTERNAL only

Every scenario: one user per domain, one client pool (agent.py) per provider, one message
per ordered domain pair, in four phases: cold A→B (from no s2s connection between the two),
reverse B→A, warm A→B, and simultaneous (links cut with ss -K first, both sides at once).
Each phase asserts that every message arrived exactly once and none bounced, and reports
the s2s connections between the two providers (established at the end, and the most seen
while sampling), the TCP connections each side opened, and Braid's link metrics.

$BRAID_LAB_RESULTS=FILE appends one JSON line per phase and direction (for tables).
"""

import contextlib
import json
import os
import re
import time

import lab as L
import mux as M

SCENARIO_NAMES = ["fallback:percert-strict", "fallback:percert-dialback", "fallback:percert-dane",
                  "fallback:prosody", "fallback:ejabberd", "fallback:ejabberd-nodialback"]
DEFAULT_DOMAINS = 10
CLASSIC_DOMAINS = 5
# A pair that cannot be set up bounces after s2s.negotiation_timeout_seconds (30 s): a phase
# waits for at most PHASE_TIMEOUT, and gives up after PHASE_STALL without any news; it stops
# as soon as every message is delivered or bounced.
PHASE_TIMEOUT = 90
PHASE_STALL = 40
CUT_TIMEOUT = 20
SCENARIO_TIME_LIMIT = 900
LOG_PATTERNS = ["pair could not be set up", "no answer from", "not-authorized", "remote-server-timeout",
                "dialback request refused", "security: refused stanza"]
BRAID_METRICS = ["braid_s2s_links", "braid_s2s_pairs"]

# Which providers each scenario needs: only those are started.
NEEDS = {
    "fallback:percert-strict": ("braid", "braid2"),
    "fallback:percert-dialback": ("braid", "braid2"),
    "fallback:percert-dane": ("braid3", "braid4"),
    "fallback:prosody": ("braid", "prosody", "prosody2"),
    "fallback:ejabberd": ("braid", "ejabberd", "ejabberd2"),
    "fallback:ejabberd-nodialback": ("braid", "ejabberd3", "ejabberd2"),
}
_runs = {}


def all_specs(domains):
    braid = {"direct_tls": True, "per_domain_certs": True}
    dane = {**braid, "secure_auth": True, "per_domain_hosts": True, "per_domain_shared_key": True}
    classic = {"per_domain_certs": True}
    return [
        L.ProviderSpec("braid", "braid", "b", domains, 1, **braid),
        L.ProviderSpec("braid", "braid2", "c", domains, 1, **braid),
        L.ProviderSpec("braid", "braid3", "d", domains, 1, **dane),
        L.ProviderSpec("braid", "braid4", "g", domains, 1, **dane),
        L.ProviderSpec("prosody", "prosody", "p", CLASSIC_DOMAINS, 1, **classic),
        L.ProviderSpec("prosody", "prosody2", "q", CLASSIC_DOMAINS, 1, **classic),
        L.ProviderSpec("ejabberd", "ejabberd", "e", CLASSIC_DOMAINS, 1, **classic),
        L.ProviderSpec("ejabberd", "ejabberd2", "f", CLASSIC_DOMAINS, 1, **classic),
        L.ProviderSpec("ejabberd", "ejabberd3", "h", CLASSIC_DOMAINS, 1, dialback=False, **classic),
    ]


def extra_records(lab):
    """DANE-EE TLSA records (3 1 1, SPKI SHA-256 of the domain's own certificate) at each
    per-domain SRV target host, for the STARTTLS and the direct TLS port."""
    records = []
    for provider in lab.providers:
        if not provider.spec.per_domain_hosts:
            continue
        for domain in provider.domains:
            digest = M.spki_sha256(provider.domain_certs[domain][0])
            for port in L.S2S_PORTS if provider.spec.direct_tls else (L.S2S_PORT,):
                records.append((L.ZONE, f"_{port}._tcp.{provider.srv_host(domain)}", "TLSA", f"3 1 1 {digest}"))
    return records


def build(args, wanted):
    """Builds the fallback lab with the providers WANTED needs, runs WANTED (each
    args.repeat times); returns (passed, failed)."""
    domains = int(os.environ.get("BRAID_FALLBACK_DOMAINS", DEFAULT_DOMAINS))
    if domains < CLASSIC_DOMAINS:
        raise L.LabError(f"BRAID_FALLBACK_DOMAINS={domains}: at least {CLASSIC_DOMAINS} needed")
    needed = {name for scenario in wanted for name in NEEDS[scenario]}
    specs = [spec for spec in all_specs(domains) if spec.name in needed]
    workdir = os.path.join(args.workdir, "fallback") if args.workdir else None
    with L.Lab(specs, subnet=args.subnet, workdir=workdir, keep_workdir=args.keep_workdir,
               extra_records=extra_records) as lab:
        scenarios = [(name, function) for name, function in build_scenarios(lab) if name in wanted]
        passed, failed = L.run_scenarios(lab, L.repeated(scenarios, getattr(args, "repeat", 1)),
                                         time_limit=SCENARIO_TIME_LIMIT)
        lab.failed = failed > 0
        if args.hold:
            L.log("fallback lab is up; Ctrl-C (or SIGTERM) tears it down")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return passed, failed


def build_scenarios(lab):
    present = {provider.name: provider for provider in lab.providers}

    def scenario(name, a, b, **options):
        def run(lab, details):
            return scenario_fallback(lab, details, name, present[a], present[b], **options)
        return (name, run)

    scenarios = []
    wanted = [name for name in SCENARIO_NAMES if all(needed in present for needed in NEEDS[name])]
    for name in wanted:
        if name == "fallback:percert-strict":
            scenarios.append(scenario(name, "braid", "braid2", secure=True))
        elif name == "fallback:percert-dialback":
            scenarios.append(scenario(name, "braid", "braid2", secure=False))
        elif name == "fallback:percert-dane":
            scenarios.append(scenario(name, "braid3", "braid4"))
        elif name == "fallback:prosody":
            scenarios.append(scenario(name, "braid", "prosody", secure=False, baseline=("prosody", "prosody2")))
        elif name == "fallback:ejabberd":
            scenarios.append(scenario(name, "braid", "ejabberd", secure=False, baseline=("ejabberd", "ejabberd2")))
        elif name == "fallback:ejabberd-nodialback":
            scenarios.append(scenario(name, "braid", "ejabberd3", secure=False, baseline=("ejabberd3", "ejabberd2")))
    return scenarios


# -- helpers -----------------------------------------------------------------------------

def cut(lab, details, a, b, moment):
    """Cuts every s2s connection between A and B and waits (bounded) until none is left."""
    for attempt in range(2):
        M.kill_links(lab, a, b)
        M.kill_links(lab, b, a)
        deadline = time.monotonic() + CUT_TIMEOUT / 2
        while time.monotonic() < deadline:
            _, count_a, count_b = M.links_between(lab, a, b)
            if count_a == 0 and count_b == 0:
                L.quiesce(lab, [a, b], limit=5)
                return
            time.sleep(0.2)
    _, count_a, count_b = M.links_between(lab, a, b)
    details.append(f"  NOTE {moment}: {count_a}/{count_b} s2s connections still up after ss -K")
    raise L.LabError(f"could not cut the s2s connections between {a.name} and {b.name} before the {moment} phase")


def cut_everything(lab, provider):
    """Cuts every s2s connection of PROVIDER (to any peer), so that its link gauges describe
    the scenario's own pair only; waits (bounded) until they are gone."""
    for attempt in range(2):
        L.run(L.in_netns(provider.ns, ["ss", "-K", "-tn", "state", "established", *M.S2S_FILTER]), check=False)
        deadline = time.monotonic() + CUT_TIMEOUT / 2
        while time.monotonic() < deadline:
            if not any(local_port in L.S2S_PORTS or peer_port in L.S2S_PORTS
                       for _, local_port, _, peer_port in L.tcp_connections(provider.ns)):
                return
            time.sleep(0.2)
    raise L.LabError(f"could not cut the s2s connections of {provider.name}")


def tally(sent, received, errors):
    """(sent, delivered, bounced, lost without an error, duplicated) by message id."""
    expected = {message[2] for message in sent}
    seen = {}
    for _, _, message_id, _ in received:
        if message_id in expected:
            seen[message_id] = seen.get(message_id, 0) + 1
    bounced = {error[2] for error in errors if error[2] in expected and error[2] not in seen}
    lost = len(expected) - len(seen) - len(bounced)
    missing = sorted(message_id for message_id in expected if message_id not in seen and message_id not in bounced)
    # The first few lost messages with their sender and recipient, to trace in the logs.
    lost_examples = [f"{m[0]}→{m[1]} {m[2]}" for m in sent if m[2] in set(missing[:5])]
    return {"sent": len(expected), "delivered": len(seen), "bounced": len(bounced), "lost": lost,
            "duplicated": sum(1 for count in seen.values() if count > 1), "lost_examples": lost_examples}


def record(result):
    path = os.environ.get("BRAID_LAB_RESULTS")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(result) + "\n")


def braid_state(provider):
    """(connections opened so far, {metric sample: value} of the link gauges) of a Braid."""
    opened = M.metric_total(provider, "braid_s2s_connections_opened_total")
    return opened, M.metrics(provider, BRAID_METRICS)


def gauges_text(samples):
    links = sum(value for sample, value in samples.items() if sample.startswith("braid_s2s_links"))
    pairs = {}
    for sample, value in samples.items():
        if sample.startswith("braid_s2s_pairs") and value:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', sample))
            key = f"{labels.get('direction', '?')}/{labels.get('method', '?')}"
            pairs[key] = pairs.get(key, 0) + value
    return (f"links {links:g}, pairs " + (", ".join(f"{key} {value:g}" for key, value in sorted(pairs.items()))
                                         or "none"))


def run_phase(lab, details, name, run, a, b, pools, users, phase, directions):
    """One phase: DIRECTIONS ("ab", "ba" or both) sent at once; returns the problems found."""
    (pool_a, pool_b), (users_a, users_b) = pools, users
    # Stragglers of an earlier phase must not count here.
    stale = sum(len(reply["received"]) + len(reply["errors"]) for reply in (pool_a.take(), pool_b.take()))
    braids = [provider for provider in (a, b) if provider.kind == "braid"]
    before = {provider.name: braid_state(provider)[0] for provider in braids}
    active = {provider.name: L.tcp_counters(provider.ns)["ActiveOpens"] for provider in (a, b)}
    _, start_a, start_b = M.links_between(lab, a, b)
    peak = [start_a, start_b]

    def sample():
        _, count_a, count_b = M.links_between(lab, a, b)
        peak[0], peak[1] = max(peak[0], count_a), max(peak[1], count_b)

    tag = f"fb{run}-{name.split(':')[1]}-{phase}"
    sent_ab = M.messages_between(users_a, users_b, f"{tag}-ab") if "ab" in directions else []
    sent_ba = M.messages_between(users_b, users_a, f"{tag}-ba") if "ba" in directions else []
    started = time.monotonic()
    if sent_ab:
        pool_a.send(sent_ab)
    if sent_ba:
        pool_b.send(sent_ba)
    # Bounces come back to the senders: both pools count towards the stopping rule.
    elapsed = M.wait_all([(pool_b, len(sent_ab)), (pool_a, len(sent_ba))], PHASE_TIMEOUT, sample,
                         stall=PHASE_STALL)
    runtime = time.monotonic() - started
    got_a, got_b = pool_a.take(), pool_b.take()
    sample()
    _, end_a, end_b = M.links_between(lab, a, b)
    opened_tcp = {provider.name: L.tcp_counters(provider.ns)["ActiveOpens"] - active[provider.name]
                  for provider in (a, b)}
    arrows = {"ab": f"{a.name}→{b.name}", "ba": f"{b.name}→{a.name}", "abba": f"{a.name}⇄{b.name}"}
    details.append(f"{phase} {arrows[directions]}: {len(sent_ab) + len(sent_ba)} messages, "
                   + (f"all delivered or bounced in {elapsed:.1f}s" if elapsed is not None
                      else f"NOT all delivered or bounced (gave up after {runtime:.0f}s)")
                   + (f" ({stale} stragglers of the phase before dropped)" if stale else ""))
    details.append(f"  s2s connections {a.name}⇄{b.name}: {start_a} before, {end_a} established after "
                   f"({end_b} counted at {b.name}), peak {peak[0]}/{peak[1]}; TCP connections opened: "
                   + ", ".join(f"{provider} {count}" for provider, count in opened_tcp.items()))
    braid_numbers = {}
    for provider in braids:
        opened, samples = braid_state(provider)
        braid_numbers[provider.name] = {"connections_opened": opened - before[provider.name],
                                        "gauges": samples}
        details.append(f"  {provider.name}: braid_s2s_connections_opened_total +{opened - before[provider.name]:g}; "
                       + gauges_text(samples))
    problems = []
    for label, sent, received, errors in ((arrows["ab"], sent_ab, got_b["received"], got_a["errors"]),
                                          (arrows["ba"], sent_ba, got_a["received"], got_b["errors"])):
        if not sent:
            continue
        counts = tally(sent, received, errors)
        record({"scenario": name, "run": run, "phase": phase, "direction": label, **counts,
                "seconds": round(runtime, 1), "complete": elapsed is not None,
                "connections_after": end_a, "connections_after_at_peer": end_b, "peak": peak[0],
                "peak_at_peer": peak[1], "tcp_opened": opened_tcp, "braid": braid_numbers,
                "binary": os.environ.get("BRAID_BINARY", L.DEFAULT_BRAID_BINARY),
                "domains": [len(users_a), len(users_b)]})
        try:
            M.check_delivery(details, f"  {phase} {label}", sent, received, errors)
        except L.ScenarioFailure:
            pass  # summed up below, shorter
        if counts["delivered"] != counts["sent"] or counts["duplicated"] or counts["bounced"]:
            conditions = sorted({error[3] for error in errors if error[2] in {m[2] for m in sent}})
            problems.append(f"{phase} {label}: {counts['delivered']}/{counts['sent']} delivered, "
                            f"{counts['bounced']} bounced" + (f" ({', '.join(conditions)})" if conditions else "")
                            + f", {counts['lost']} lost, {counts['duplicated']} duplicated"
                            + (f"; lost e.g. {counts['lost_examples']}" if counts["lost_examples"] else ""))
    return problems


def baseline_check(lab, details, x, y):
    """X ⇄ Y (no Braid), both directions at once from cold: shows that the per-domain
    certificates and the rest of the harness work. A failure here is the lab's, not Braid's."""
    users_x, users_y = M.first_users(x, x.domains[:CLASSIC_DOMAINS]), M.first_users(y, y.domains[:CLASSIC_DOMAINS])
    pool_x, pool_y = M.Pool(lab, x, users_x), M.Pool(lab, y, users_y)
    try:
        cut(lab, details, x, y, "baseline")
        x.mark_log()
        sent_xy = M.messages_between(users_x, users_y, f"fb-baseline-{x.name}-{y.name}-xy")
        sent_yx = M.messages_between(users_y, users_x, f"fb-baseline-{x.name}-{y.name}-yx")
        peak = [0]

        def sample():
            peak[0] = max(peak[0], M.links_between(lab, x, y)[1])

        pool_x.send(sent_xy)
        pool_y.send(sent_yx)
        elapsed = M.wait_all([(pool_y, len(sent_xy)), (pool_x, len(sent_yx))], PHASE_TIMEOUT, sample,
                             stall=PHASE_STALL)
        got_x, got_y = pool_x.take(), pool_y.take()
        _, count, _ = M.links_between(lab, x, y)
        details.append(f"baseline {x.name}⇄{y.name} (per-domain certificates, no Braid), "
                       f"{len(users_x)}×{len(users_y)} both ways from cold: "
                       + (f"{elapsed:.1f}s" if elapsed is not None else "NOT complete")
                       + f"; {count} s2s connections established, peak {peak[0]}")
        if not x.spec.dialback:
            dialback = [line for line in x.log_since_mark().splitlines() if "dialback" in line.lower()]
            details.append(f"  {x.name} (no mod_s2s_dialback) logged {len(dialback)} dialback lines")
        try:
            M.check_delivery(details, f"  baseline {x.name}→{y.name}", sent_xy, got_y["received"], got_x["errors"])
            M.check_delivery(details, f"  baseline {y.name}→{x.name}", sent_yx, got_x["received"], got_y["errors"])
        except L.ScenarioFailure as failure:
            raise L.ScenarioFailure(f"HARNESS: the baseline without Braid failed: {failure}") from None
    finally:
        for pool in (pool_x, pool_y):
            pool.agent.close()


def log_evidence(details, providers):
    for provider in providers:
        if provider.kind != "braid":
            continue
        # c2s logins where slixmpp's SCRAM-*-PLUS attempt fails first (README, trap 7) log
        # "authentication failed" with not-authorized: not federation.
        text = [line for line in provider.log_since_mark().splitlines() if "[Server] authentication failed" not in line]
        counts = []
        examples = []
        for pattern in LOG_PATTERNS:
            lines = [line for line in text if pattern in line]
            if lines:
                counts.append(f"{pattern!r} ×{len(lines)}")
                example = f"    e.g. {lines[0].strip()[:400]}"
                if example not in examples:
                    examples.append(example)
        details.append(f"{provider.name} log: " + (", ".join(counts) if counts else
                                                   f"none of {', '.join(repr(p) for p in LOG_PATTERNS)}"))
        details.extend(examples)


# -- the scenario ------------------------------------------------------------------------

def scenario_fallback(lab, details, name, a, b, secure=None, baseline=None):
    """A (Braid, per-domain certificates) and B, one message per ordered domain pair in four
    phases (cold A→B, reverse B→A, warm A→B, simultaneous); every message must arrive once,
    none may bounce. SECURE: s2s.require_certificates of the Braids (restarted if it
    changes). BASELINE: (X, Y) classic providers checked first, without Braid."""
    run = _runs[name] = _runs.get(name, 0) + 1
    if secure is not None:
        for provider in (a, b):
            if provider.kind == "braid" and provider.spec.secure_auth != secure:
                L.log(f"restarting {provider.name} with require_certificates {str(secure).lower()}")
                provider.restart(secure_auth=secure)
    if baseline:
        present = {provider.name: provider for provider in lab.providers}
        baseline_check(lab, details, present[baseline[0]], present[baseline[1]])
    count = CLASSIC_DOMAINS if b.kind != "braid" else len(a.domains)
    domains_a, domains_b = a.domains[:count], b.domains[:count]
    policy = []
    for provider in (a, b):
        if provider.kind == "braid":
            policy.append(f"{provider.name} require_certificates {str(provider.spec.secure_auth).lower()}")
        else:
            policy.append(f"{provider.name} {provider.kind} dialback {'on' if provider.spec.dialback else 'OFF'}"
                          + (", bidi" if provider.kind == "prosody" and provider.spec.bidi else ""))
    dane = [provider.name for provider in (a, b) if provider.spec.per_domain_hosts]
    details.append(f"{a.name} ({len(domains_a)} domains) ⇄ {b.name} ({len(domains_b)}): a certificate per domain "
                   f"naming only it; {'; '.join(policy)}"
                   + (f"; DANE-EE TLSA per domain at DOMAIN-host.test for {', '.join(dane)} (a provider's "
                      f"certificates share one key)" if dane else ""))
    users = (M.first_users(a, domains_a), M.first_users(b, domains_b))
    pools = (M.Pool(lab, a, users[0]), M.Pool(lab, b, users[1]))
    for provider in (a, b):
        if provider.kind == "braid":
            cut_everything(lab, provider)
    for provider in (a, b):
        provider.mark_log()
    problems = []
    started = time.monotonic()
    for phase, directions in (("cold", "ab"), ("reverse", "ba"), ("warm", "ab"), ("simultaneous", "abba")):
        if phase in ("cold", "simultaneous"):
            cut(lab, details, a, b, phase)
        problems += run_phase(lab, details, name, run, a, b, pools, users, phase, directions)
    details.append(f"four phases in {time.monotonic() - started:.1f}s")
    log_evidence(details, (a, b))
    L.expect(not problems, "; ".join(problems))
