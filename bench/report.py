"""Writes benchmarks.md and the PNG plots from the report dict (benchmarks.json)."""

import os

from common import median

KINDS = ["braid", "prosody", "ejabberd"]
NAMES = {"braid": "Braid", "prosody": "Prosody", "ejabberd": "ejabberd"}
COLORS = {"braid": "tab:blue", "prosody": "tab:orange", "ejabberd": "tab:green"}


def fmt(value, digits=1, unit=""):
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}"
    else:
        text = f"{value:,}"
    return text + unit


def cpu(value):
    """CPU seconds; a negative delta means the server's processes changed (crash, restart)."""
    return "—" if value is None or value < 0 else fmt(value, 2)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def c2s_loadgen_section(cs):
    """braid-load's rate series and the tsung calibration (bench/c2s.py), when they ran."""
    lines = []
    pin = cs.get("pinning") or {}
    if pin:
        lines += [("Pinning: server on CPU " + pin["server"] + ", generator (tsung or braid-load) on CPU " + pin["generator"]
                   + " (taskset), in every c2s step." if pin.get("server") else "Pinning: " + pin.get("note", "none") + "."), ""]
    rows, calib = [], []
    for kind in KINDS:
        e = cs["results"].get(kind, {})
        for x in e.get("loadgen", {}).get("steps", []):
            rows.append((NAMES[kind], fmt(x["offered_per_second"]), fmt(x.get("sent_per_second")), fmt(x.get("delivered_per_second")),
                         fmt(x.get("lost")), fmt(x.get("p50_ms"), 2), fmt(x.get("p99_ms"), 2), fmt(x.get("p99_9_ms"), 2),
                         fmt(x.get("max_ms"), 1), fmt(x.get("cpu_us_per_message")), x.get("mechanism") or "—",
                         fmt(x.get("logins_per_second")), fmt(x.get("login_p50_ms"), 1), fmt(x.get("server_cpu_ms_per_login"), 2),
                         fmt(x.get("generator_busiest_thread_share"), 2)))
        c = e.get("calibration")
        if c:
            t, a, d = c["tsung"], c["braid_load_like_tsung"], c["braid_load_default"]
            calib.append((NAMES[kind], fmt(c["offered_per_second"]), fmt(t.get("delivered_per_second")), fmt(a.get("delivered_per_second")),
                          fmt(d.get("delivered_per_second")), f"{fmt(t.get('p50_ms'), 2)} / {fmt(t.get('p99_ms'), 2)}",
                          f"{fmt(a.get('p50_ms'), 2)} / {fmt(a.get('p99_ms'), 2)}", f"{fmt(d.get('p50_ms'), 2)} / {fmt(d.get('p99_ms'), 2)}",
                          fmt(c.get("delivered_ratio"), 3), "yes" if c.get("agree_within_10_percent") else "no"))
    if rows:
        facts = cs.get("braid_load") or {}
        lines += ["### braid-load (SCRAM, stream management, open loop)", "",
                  f"braid-load ({facts.get('config', '?')} build of {facts.get('built', '?')}): fresh logins per step "
                  "(STARTTLS, the SASL mechanism in the table, bind, XEP-0198), then every session sends 64-byte chat "
                  "messages to random other sessions on a fixed schedule (open loop); latency from the scheduled send "
                  "time to arrival. Generator: the busiest thread's share of a core in the message phase (near 1.0: "
                  "the generator, not the server, is the limit).", "",
                  table(["server", "offered msg/s", "sent msg/s", "delivered msg/s", "lost", "p50 ms", "p99 ms", "p99.9 ms",
                         "max ms", "server CPU µs/msg", "SASL", "logins/s", "login p50 ms", "server CPU ms/login",
                         "generator thread"], rows), ""]
    if calib:
        lines += ["### Calibration: tsung and braid-load against the same server", "",
                  "One server, one offered rate, three runs: tsung; braid-load as tsung drives (PLAIN, no stream "
                  "management, initial presence); braid-load as it drives by default. Ratio: braid-load like tsung / "
                  "tsung, delivered msg/s (issue 16 asks for agreement within 10 %).", "",
                  table(["server", "offered msg/s", "tsung delivered", "braid-load like tsung", "braid-load default",
                         "tsung p50/p99 ms", "like tsung p50/p99 ms", "default p50/p99 ms", "ratio", "within 10 %"], calib), ""]
    return lines


def logins_section(lg):
    """The logins scenario (bench/logins.py)."""
    rows = []
    for kind in KINDS:
        e = lg.get("results", {}).get(kind, {})
        for x in e.get("steps", []):
            rows.append((NAMES[kind], fmt(x.get("login_rate")), fmt(x.get("sessions_logged_in")), fmt(x.get("logins_per_second")),
                         fmt(x.get("login_p50_ms"), 1), fmt(x.get("login_p99_ms"), 1), fmt(x.get("server_cpu_ms_per_login"), 2),
                         fmt(x.get("generator_cpu_ms_per_login"), 2), x.get("mechanism") or "—"))
        t = e.get("tsung") or {}
        if t.get("login_mean_ms") is not None:
            rows.append((NAMES[kind] + " (tsung, Nagle on)", fmt(t.get("login_rate")), fmt(t.get("authenticated")),
                         fmt(t.get("logins_per_second")), f"mean {fmt(t.get('login_mean_ms'), 1)}", "—", "—", "—", "PLAIN"))
        if e.get("error"):
            rows.append((NAMES[kind], "—", "—", "—", "—", "—", "—", "—", e["error"][-120:]))
    if not rows:
        return []
    pin = lg.get("pinning") or {}
    return ["## Logins (braid-load)", "",
            "braid-load logs fresh sessions in at a fixed rate against one server at a time: TCP, STARTTLS, SASL "
            "SCRAM-SHA-256 against stored keys (4096 iterations everywhere), bind, XEP-0198 enable; TCP_NODELAY on the "
            "client. Latency: from connect to the ready session. The tsung rows: a client that leaves Nagle on (SASL PLAIN inside "
            "STARTTLS), at a rate one core serves; the mean of its `authenticate` transaction (SASL, restart, bind, session). Server CPU per login: the server's CPU from just "
            "before the first login to a 300 ms quiet gap after the last, over the sessions logged in. "
            + (f"Server on CPU {pin['server']}, braid-load on CPU {pin['generator']} (taskset)." if pin.get("server") else ""), "",
            table(["server", "offered logins/s", "logged in", "achieved logins/s", "p50 ms", "p99 ms", "server CPU ms/login",
                   "generator CPU ms/login", "SASL"], rows), ""]


# -- goals ---------------------------------------------------------------------------------

def issue16_goals(report, add):
    """The performance issue's rows (issue 16): each measured here, beside the peers from the
    same run; a debug build's CPU and memory figures are shown, not judged."""
    s = report["scenarios"]
    release = report.get("build_config") != "debug"
    c = s.get("c2s", {}).get("results", {})

    def peers_text(values, unit, digits=1):
        return "; ".join(f"{NAMES[k]} {fmt(v, digits)} {unit}" for k, v in values if v is not None)

    # Memory per idle session under whitespace keepalives.
    keep = {k: c.get(k, {}).get("keepalive") or {} for k in KINDS}
    kb = keep["braid"].get("growth_per_session_per_keepalive_kib")
    if keep["braid"]:
        b = keep["braid"]
        add("c2s: memory per idle TLS session flat under whitespace keepalives (≤ 0.05 KiB per session per keepalive)",
            f"Braid {fmt(b.get('rss_per_session_after_login_kib'), 1)} KiB after login, "
            f"{fmt(b.get('rss_per_session_after_keepalives_kib'), 1)} KiB after {fmt(b.get('rounds'))} keepalives "
            f"({fmt(kb, 3)} KiB per keepalive); "
            + peers_text([(k, keep[k].get("growth_per_session_per_keepalive_kib")) for k in ("prosody", "ejabberd")], "KiB per keepalive", 3),
            f"{fmt(kb, 3)} KiB per keepalive" if kb is not None else "—",
            (kb <= 0.05) if kb is not None and release else None)

    # Idle RSS with one hosted domain.
    hosting = s.get("hosting", {}).get("results", {})
    one = {k: next((r.get("idle_rss_kib") for r in hosting.get(k, []) if r.get("domains") == 1 and r.get("idle_rss_kib")), None)
           for k in KINDS}
    if one["braid"]:
        mib = one["braid"] / 1024
        add("idle RSS with one domain ≤ 20 MiB", f"Braid {fmt(mib, 1)} MiB; "
            + peers_text([(k, one[k] / 1024 if one[k] else None) for k in ("prosody", "ejabberd")], "MiB"),
            f"{mib / 20:.2f}× the limit", (mib <= 20) if release else None)

    # Stream parsing against raw expat.
    parse = s.get("micro", {}).get("parse", {})
    share = parse.get("ratio_to_raw")
    if share is not None:
        add("stream parsing ≥ 80 % of raw expat (braid-bench parse)",
            f"Braid {fmt(parse.get('braid_mb_per_s'))} MB/s; raw expat {fmt(parse.get('raw_expat_mb_per_s'))} MB/s",
            f"{share * 100:.0f} %", share >= 0.8)

    # braid-load: CPU per message, per login, login latency, sustained rate.
    steps = {k: c.get(k, {}).get("loadgen", {}).get("steps", []) for k in KINDS}
    braid_steps = [x for x in steps["braid"] if x.get("cpu_us_per_message")]
    if braid_steps:
        # Judged at the issue's rates (2,000 and 4,000/s); every rate is shown. Far below them a
        # message's share of fixed per-wakeup work dominates, far above them the server queues.
        parts, judged = [], []
        for x in braid_steps:
            rate = x["offered_per_second"]
            same = [(k, next((y.get("cpu_us_per_message") for y in steps[k] if y["offered_per_second"] == rate), None))
                    for k in ("prosody", "ejabberd")]
            parts.append(f"@{fmt(rate)}/s: Braid {fmt(x['cpu_us_per_message'])} µs" + (f" ({peers_text(same, 'µs')})" if any(v for _, v in same) else ""))
            if rate in (2000, 4000):
                judged.append(x["cpu_us_per_message"])
        worst = max(judged) if judged else None
        add("c2s: CPU per client message ≤ 40 µs at 2,000 and 4,000 msg/s offered (braid-load, SCRAM, XEP-0198)", "; ".join(parts),
            f"worst {worst / 40:.2f}× the limit" if worst is not None else "—", (worst <= 40) if release and worst is not None else None)
    # Logins: the logins scenario (2,000 sessions per rate) when it ran, else the c2s steps'.
    login_steps = {k: s.get("logins", {}).get("results", {}).get(k, {}).get("steps") or steps[k] for k in KINDS}
    source = "logins scenario" if s.get("logins", {}).get("results") else "c2s braid-load steps"
    logins = {k: median([x.get("server_cpu_ms_per_login") for x in login_steps[k]]) for k in KINDS}
    if logins["braid"] is not None:
        add(f"c2s: server CPU per login ≤ 2 ms (STARTTLS, SCRAM-SHA-256, bind, XEP-0198; median over the {source})",
            f"Braid {fmt(logins['braid'], 2)} ms; " + peers_text([(k, logins[k]) for k in ("prosody", "ejabberd")], "ms", 2),
            f"{logins['braid'] / 2:.2f}× the limit", (logins["braid"] <= 2) if release else None)
    latency = {k: median([x.get("login_p50_ms") for x in login_steps[k]]) for k in KINDS}
    # A client that leaves Nagle on: tsung at a login rate one core serves (the logins
    # scenario); the c2s session steps' tsung mean is mostly queueing and is not judged.
    tsung = {k: (s.get("logins", {}).get("results", {}).get(k, {}).get("tsung") or {}).get("login_mean_ms") for k in KINDS}
    if latency["braid"] is not None:
        add("c2s: login latency p50 < 10 ms with any client (braid-load p50, TCP_NODELAY; tsung mean, Nagle on)",
            f"braid-load p50 Braid {fmt(latency['braid'], 1)} ms; " + peers_text([(k, latency[k]) for k in ("prosody", "ejabberd")], "ms")
            + (f" — tsung mean Braid {fmt(tsung['braid'], 1)} ms; " + peers_text([(k, tsung[k]) for k in ("prosody", "ejabberd")], "ms")
               if tsung["braid"] is not None else " — tsung: not measured"),
            f"{max(latency['braid'], tsung['braid'] or 0) / 10:.2f}× the limit",
            (latency["braid"] < 10 and tsung["braid"] is not None and tsung["braid"] < 10) if release else None)
    if braid_steps:
        kept = [x for x in braid_steps if x.get("delivered_per_second") and x["delivered_per_second"] >= 0.95 * x["offered_per_second"]
                and (x.get("p99_ms") or 0) < 100]
        top = max(kept, key=lambda x: x["offered_per_second"]) if kept else None
        highest = max(braid_steps, key=lambda x: x["offered_per_second"])
        share = highest.get("generator_busiest_thread_share")
        text = (f"Braid sustained {fmt(top['delivered_per_second'])} msg/s (offered {fmt(top['offered_per_second'])}, p99 "
                f"{fmt(top.get('p99_ms'), 1)} ms)" if top else "Braid sustained no offered rate")
        text += (f"; at the highest offered rate ({fmt(highest['offered_per_second'])}/s) braid-load's busiest thread "
                 f"used {fmt(share, 2)} of a core")
        add("c2s: a sustained message rate limited by the server, not the generator", text,
            f"generator {fmt(share, 2)} of a core" if share is not None else "—",
            (share is not None and share < 0.9) if release else None)


def goals(report):
    s = report["scenarios"]
    rows = []

    def add(goal, measured, ratio, met):
        rows.append((goal, measured, ratio, "met" if met is True else ("not met" if met is False else "not measured")))

    fan = s.get("fanout", {}).get("results", [])
    braid_rows = [r for r in fan if r["kind"] == "braid"]
    if braid_rows:
        conns = {r["n"]: r.get("tcp_connections_peak") for r in braid_rows}
        worst = max((c for c in conns.values() if c is not None), default=None)
        add("s2s: Braid⇄Braid uses 1 connection at every N",
            ", ".join(f"{n}×{n}: {fmt(c)}" for n, c in sorted(conns.items())),
            f"{fmt(worst)} / 1 (worst N)" if worst is not None else "—", worst == 1 if worst is not None else None)
        lost = {r["n"]: r.get("messages_lost") for r in braid_rows}
        total = sum(v for v in lost.values() if v is not None)
        add("s2s: Braid⇄Braid loses 0 messages",
            ", ".join(f"{n}×{n}: {fmt(v)}" for n, v in sorted(lost.items())), f"{total} lost in all",
            total == 0 if any(v is not None for v in lost.values()) else None)
        b100 = next((r for r in braid_rows if r["n"] == 100), None) or max(braid_rows, key=lambda r: r["n"])
        p30 = next((r for r in fan if r["kind"] == "prosody" and r["n"] == 30), None)
        reference = p30.get("cold_seconds") if p30 else None
        b_cold = b100.get("cold_seconds")
        label = f"Braid {b100['n']}×{b100['n']} cold: {fmt(b_cold, 2)} s; Prosody 30×30 cold here: {fmt(reference, 2)} s (issue: 10.2 s)"
        if b_cold and reference:
            add("s2s: Braid 100×100 cold delivery faster than Prosody⇄Prosody 30×30", label,
                f"Prosody/Braid = {reference / b_cold:.2f}×", b_cold < reference and b100["n"] == 100)
        elif b_cold:
            add("s2s: Braid 100×100 cold delivery faster than Prosody⇄Prosody 30×30", label,
                f"vs issue's 10.2 s: {10.2 / b_cold:.2f}×", (b_cold < 10.2) if b100["n"] == 100 else None)
        else:
            add("s2s: Braid 100×100 cold delivery faster than Prosody⇄Prosody 30×30", label, "—", None if not b100.get("note") else False)

    newpair = {r.get("combo"): r for r in s.get("newpair", {}).get("results", [])}
    bb = newpair.get("braid-braid")
    if bb:
        judged = report.get("build_config") != "debug" and bb.get("n", 0) >= 10
        median = bb.get("new_median_ms")
        add("s2s: a new domain pair on a live link ≤ 5 ms median (Braid⇄Braid)",
            f"Braid⇄Braid {bb['n']}×{bb['n']}: {fmt(bb.get('new_delivered'))} new pairs, median {fmt(median, 2)} ms, "
            f"p99 {fmt(bb.get('new_p99_ms'), 2)} ms; warm {fmt(bb.get('warm_median_ms'), 2)} ms"
            + ("" if judged else " (debug build or smoke size: not judged)"),
            f"{median / 5:.2f}× the limit" if median is not None else "—",
            (median <= 5) if judged and median is not None else None)

    c = s.get("c2s", {}).get("results", {})
    if c:
        def sustained(kind):
            return c.get(kind, {}).get("messages", {}).get("sustained_per_second")
        others = [(k, sustained(k)) for k in ("prosody", "ejabberd") if sustained(k)]
        best = max(others, key=lambda x: x[1]) if others else None
        b = sustained("braid")
        if b and best:
            add("c2s: message throughput ≥ 2× the better of Prosody and ejabberd",
                f"Braid {fmt(b)} msg/s; {NAMES[best[0]]} {fmt(best[1])} msg/s",
                f"{b / best[1]:.2f}×", b / best[1] >= 2)
        else:
            add("c2s: message throughput ≥ 2× the better of Prosody and ejabberd",
                f"Braid {fmt(b)}; others {others}", "—", None)
        if best:
            step = c[best[0]]["messages"].get("sustained_step")
            bstep = next((x for x in c.get("braid", {}).get("messages", {}).get("steps", []) if x["offered_per_second"] == step), None)
            ostep = next((x for x in c[best[0]]["messages"]["steps"] if x["offered_per_second"] == step), None)
            if bstep and ostep and bstep.get("p99_ms") and ostep.get("p99_ms"):
                add(f"c2s: lower p99 than {NAMES[best[0]]} (at its sustained rate, {step} msg/s offered)",
                    f"Braid {fmt(bstep['p99_ms'], 2)} ms; {NAMES[best[0]]} {fmt(ostep['p99_ms'], 2)} ms",
                    f"{bstep['p99_ms'] / ostep['p99_ms']:.2f}×", bstep["p99_ms"] < ostep["p99_ms"])
        steps = c.get("braid", {}).get("sessions", {}).get("steps", [])
        if steps:
            last = steps[-1]
            per = last.get("rss_per_session_kib")
            kb = per * 1.024 if per is not None else None
            add("c2s: ≤ 15 KB per idle TLS session", f"{fmt(kb, 1)} KB (RSS delta / {fmt(last.get('sessions'))} sessions)",
                f"{kb / 15:.2f}× the goal" if kb is not None else "—", kb <= 15 if kb is not None else None)
            peers = []
            for kind in ("prosody", "ejabberd"):
                ps = c.get(kind, {}).get("sessions", {}).get("steps", [])
                if ps and ps[-1].get("rss_per_session_kib") is not None:
                    peers.append((kind, ps[-1]["rss_per_session_kib"] * 1.024))
            if peers and kb is not None:
                least = min(peers, key=lambda x: x[1])
                add("c2s: no more memory per session than the peers",
                    f"Braid {fmt(kb, 1)} KB; " + "; ".join(f"{NAMES[k]} {fmt(v, 1)} KB" for k, v in peers),
                    f"{kb / least[1]:.2f}× {NAMES[least[0]]}", kb <= least[1])

    issue16_goals(report, add)

    h = s.get("hosting", {}).get("results", {}).get("braid", [])
    big = max((r for r in h if r.get("start_seconds") is not None), key=lambda r: r["domains"], default=None)
    if big:
        n = big["domains"]
        add(f"hosting: {n:,} domains start in < 2 s", f"{fmt(big['start_seconds'], 3)} s",
            f"{big['start_seconds'] / 2:.3f}× the limit", big["start_seconds"] < 2 if n >= 10000 else None)
        add("hosting: add one domain live in < 100 ms", f"{fmt(big.get('live_add_seconds'), 3)} s (CLI included; "
            f"{fmt(big.get('live_add_after_cli_seconds'), 3)} s after the CLI returned)",
            f"{big['live_add_seconds'] / 0.1:.2f}× the limit" if big.get("live_add_seconds") else "—",
            big.get("live_add_seconds") < 0.1 if big.get("live_add_seconds") else None)
        per = big.get("rss_per_domain_bytes")
        add("hosting: < 4 KiB per idle domain", f"{fmt(per)} B", f"{per / 4096:.3f}× the limit" if per is not None else "—",
            per < 4096 if per is not None else None)
    mu = s.get("muc", {})
    if mu.get("rooms"):
        ratios, measured = {}, []
        for n in sorted({r["occupants"] for r in mu["rooms"]}):
            by = {r["kind"]: r.get("deliveries_per_cpu_second") for r in mu["rooms"] if r["occupants"] == n}
            peers = [(k, by.get(k)) for k in ("prosody", "ejabberd") if by.get(k)]
            best = max(peers, key=lambda x: x[1]) if peers else None
            measured.append(f"N={n:,}: Braid {fmt(by.get('braid'), 0)}; " + "; ".join(f"{NAMES[k]} {fmt(v, 0)}" for k, v in peers))
            if by.get("braid") and best:
                ratios[n] = (by["braid"] / best[1], best[0])
        # A debug build's CPU cost says nothing about the goal: measured, not judged.
        judged = report.get("build_config") != "debug"
        add("MUC: deliveries per server CPU-second ≥ 2× the faster peer (every N)",
            " — ".join(measured) + ("" if judged else " (debug build: not judged)"),
            ", ".join(f"N={n:,}: {r:.2f}× {NAMES[k]}" for n, (r, k) in sorted(ratios.items())) or "—",
            all(r >= 2 for r, _ in ratios.values()) if judged and ratios and len(ratios) == len({r["occupants"] for r in mu["rooms"]}) else None)
    service = mu.get("service", {})
    if service.get("domains"):
        per = service.get("rss_per_domain_bytes")
        n = service["domains"]
        add("MUC service: < 100 bytes per hosted domain (10,000 domains)",
            f"{fmt(per)} B at {n:,} domains ((idle RSS on − off) / domains, median of {service.get('repeats')})",
            f"{per / 100:.2f}× the limit" if per is not None else "—",
            (per < 100) if per is not None and n >= 10000 and report.get("build_config") != "debug" else None)
    ma = s.get("mam", {}).get("results", {})
    if ma:
        judged = report.get("build_config") != "debug"
        b = ma.get("braid", {})
        steps = [x for x in b.get("steps", []) if x.get("p99_ms") is not None]
        top = max(steps, key=lambda x: x.get("archived_rows") or 0, default=None)
        peers = []
        for kind in ("prosody", "ejabberd"):
            ps = [x for x in ma.get(kind, {}).get("steps", []) if x.get("p99_ms") is not None]
            if ps:
                last = max(ps, key=lambda x: x.get("archived_rows") or 0)
                peers.append(f"{NAMES[kind]} {fmt(last['p99_ms'], 1)} ms at {fmt(last.get('archived_rows'))} rows")
        if top:
            rows_at = top.get("archived_rows") or 0
            add("MAM: a page of 50 from 1,000,000 archived messages (100 accounts × 10,000) in < 20 ms p99 on SQLite",
                f"Braid p99 {fmt(top['p99_ms'], 1)} ms (p50 {fmt(top['p50_ms'], 1)} ms) at {fmt(rows_at)} rows; " + "; ".join(peers)
                + ("" if judged else " (debug build: not judged)"),
                f"{top['p99_ms'] / 20:.2f}× the limit",
                (top["p99_ms"] < 20) if judged and rows_at >= 1_000_000 else None)
        on = ((b.get("on") or {}).get("saturated") or {})
        off = ((b.get("off") or {}).get("saturated") or {})
        ratio = b.get("on_over_off_messages_per_second")
        if on.get("delivered_per_second") and off.get("delivered_per_second"):
            add("MAM: archiving slows the messaging benchmark by ≤ 10 % (Braid, archive on vs off)",
                f"Braid {fmt(on['delivered_per_second'], 0)} msg/s with the archive, {fmt(off['delivered_per_second'], 0)} without "
                f"({report['sizes']['mam']['throughput']['window']} in flight); messages per server CPU-second "
                f"{fmt(on.get('messages_per_cpu_second'), 0)} / {fmt(off.get('messages_per_cpu_second'), 0)}"
                + ("" if judged else " (debug build: not judged)"),
                f"on ÷ off = {ratio:.2f}×" if ratio else "—", (ratio >= 0.9) if judged and ratio else None)
    tk = (s.get("cluster", {}) or {}).get("takeover") or {}
    if tk.get("runs"):
        # A debug build or a smoke size says nothing about the goal: measured, not judged.
        judged = report.get("build_config") != "debug" and report.get("mode") == "full"
        runs = tk["runs"]
        good = [r for r in runs if r.get("takeover_seconds") is not None]
        limit = tk.get("goal_seconds")
        worst = tk.get("takeover_max_seconds")
        add(f"cluster: federation flows again < 2 × dead_after ({fmt(limit, 1)} s) after kill -9 of the s2s lease holder",
            f"{len(good)} of {len(runs)} kills: " + ", ".join(f"{fmt(r['takeover_seconds'], 2)} s" for r in good)
            + f" (heartbeat {fmt(tk.get('heartbeat_seconds'), 1)} s, dead after {fmt(tk.get('dead_after_seconds'), 1)} s)"
            + ("" if judged else " (debug build or smoke size: not judged)"),
            f"worst {worst / limit:.2f}× the limit" if worst is not None and limit else "—",
            (worst < limit and len(good) == len(runs)) if judged and worst is not None and limit else None)
        finished = [r for r in runs if "error" not in r]
        if finished:
            lost, dup, bounced = tk.get("lost_total", 0), tk.get("duplicates_total", 0), tk.get("bounced_total", 0)
            sent = sum(r.get("sent", 0) for r in finished)
            add("cluster: 0 messages lost in the takeover (every message numbered, sent vs received at the peer)",
                f"{fmt(lost)} lost, {fmt(bounced)} bounced, {fmt(dup)} duplicated of {fmt(sent)} sent over {len(finished)} kills",
                f"{fmt(lost + bounced)} not delivered",
                (lost == 0 and bounced == 0 and len(finished) == len(runs)) if judged else None)
    return rows


# -- plots ---------------------------------------------------------------------------------

def plots(report, directory):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(directory, exist_ok=True)
    made = []
    s = report["scenarios"]

    def save(fig, name):
        path = os.path.join(directory, name)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(name)

    fan = s.get("fanout", {}).get("results", [])
    if fan:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind in KINDS:
            rows = sorted((r for r in fan if r["kind"] == kind), key=lambda r: r["n"])
            xs = [r["n"] for r in rows if r.get("tcp_connections_peak") is not None]
            axes[0].plot(xs, [r["tcp_connections_peak"] for r in rows if r.get("tcp_connections_peak") is not None],
                         "o-", color=COLORS[kind], label=NAMES[kind])
            done = [r for r in rows if r.get("cold_seconds") is not None]
            axes[1].plot([r["n"] for r in done], [r["cold_seconds"] for r in done], "o-", color=COLORS[kind], label=NAMES[kind])
            dnf = [r for r in rows if r.get("cold_seconds") is None and r.get("time_limit_seconds")]
            if dnf:
                axes[1].plot([r["n"] for r in dnf], [r["time_limit_seconds"] for r in dnf], "x", color=COLORS[kind],
                             markersize=10, label=f"{NAMES[kind]}: did not finish (limit)")
        axes[0].set(xlabel="domains per provider (N=M)", ylabel="s2s TCP connections (peak)", yscale="symlog",
                    title="Connections between the providers")
        axes[1].set(xlabel="domains per provider (N=M)", ylabel="seconds", yscale="log",
                    title="Cold: first message on every pair")
        for ax in axes:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        save(fig, "fanout.png")

    c = s.get("c2s", {}).get("results", {})
    if c:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind in KINDS:
            steps = [x for x in c.get(kind, {}).get("messages", {}).get("steps", []) if x.get("p99_ms") is not None]
            if steps:
                axes[0].plot([x["offered_per_second"] for x in steps], [x["p99_ms"] for x in steps], "o-",
                             color=COLORS[kind], label=f"{NAMES[kind]} p99")
                axes[0].plot([x["offered_per_second"] for x in steps], [x["p50_ms"] for x in steps], "o--",
                             color=COLORS[kind], alpha=0.6, label=f"{NAMES[kind]} p50")
            sess = [x for x in c.get(kind, {}).get("sessions", {}).get("steps", []) if x.get("rss_per_session_kib") is not None]
            if sess:
                axes[1].plot([x["sessions"] for x in sess], [x["rss_per_session_kib"] * 1.024 for x in sess], "o-",
                             color=COLORS[kind], label=NAMES[kind])
        axes[0].set(xlabel="offered messages/s", ylabel="latency, ms", xscale="log", yscale="log", title="c2s message latency (tsung)")
        axes[1].axhline(15, color="gray", linestyle=":", label="goal 15 KB")
        axes[1].set(xlabel="idle TLS sessions", ylabel="KB per session (RSS delta / sessions)", title="Memory per idle session")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        save(fig, "c2s.png")

    h = s.get("hosting", {}).get("results", {})
    if h:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind in KINDS:
            rows = [r for r in h.get(kind, []) if r.get("idle_rss_kib")]
            if rows:
                axes[0].plot([r["domains"] for r in rows], [r["idle_rss_kib"] / 1024 for r in rows], "o-", color=COLORS[kind], label=NAMES[kind])
                axes[1].plot([r["domains"] for r in rows], [r["start_seconds"] for r in rows], "o-", color=COLORS[kind], label=NAMES[kind])
        axes[0].set(xlabel="hosted domains", ylabel="idle RSS, MiB", xscale="log", yscale="log", title="Idle memory")
        axes[1].set(xlabel="hosted domains", ylabel="seconds", xscale="log", yscale="log", title="Start until the first domain is served")
        for ax in axes:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        save(fig, "hosting.png")

    ma = s.get("mam", {}).get("results", {})
    if ma:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for kind in KINDS:
            steps = [x for x in ma.get(kind, {}).get("steps", []) if x.get("p99_ms") is not None and x.get("archived_rows")]
            if steps:
                axes[0].plot([x["archived_rows"] for x in steps], [x["p99_ms"] for x in steps], "o-", color=COLORS[kind],
                             label=f"{NAMES[kind]} p99")
                axes[0].plot([x["archived_rows"] for x in steps], [x["p50_ms"] for x in steps], "o--", color=COLORS[kind],
                             alpha=0.6, label=f"{NAMES[kind]} p50")
        axes[0].axhline(20, color="gray", linestyle=":", label="goal: p99 20 ms at 10⁶")
        axes[0].set(xlabel="archived rows (all accounts)", ylabel="ms per page of 50", xscale="log", yscale="log",
                    title="MAM query latency")
        xs = range(len(KINDS))
        for offset, mode, alpha in ((-0.2, "on", 1.0), (0.2, "off", 0.45)):
            values = [(((ma.get(k, {}).get(mode) or {}).get("saturated") or {}).get("delivered_per_second") or 0) for k in KINDS]
            axes[1].bar([x + offset for x in xs], values, width=0.4, color=[COLORS[k] for k in KINDS], alpha=alpha,
                        label=f"archive {mode}")
        axes[1].set_xticks(list(xs), [NAMES[k] for k in KINDS])
        axes[1].set(ylabel="delivered messages/s (saturated)", yscale="log", title="Messaging, archive on (solid) / off (pale)")
        for ax in axes:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        save(fig, "mam.png")
    return made


# -- the note ------------------------------------------------------------------------------

def muc_section(mu, report):
    lines = ["## Group chat (XEP-0045)", "",
             "One room, `bench@conference.muc.test`, N occupants, each a client session of its own (SASL PLAIN inside "
             "STARTTLS) held by bench/mucdriver.py, in a loopback-only namespace. The first occupant creates the room and "
             "submits its configuration (`muc#roomconfig_maxusers` N); the others enter, and timing starts once every "
             "occupant has seen every occupant's presence. **All occupants**: one groupchat message from one occupant "
             "(another each time), time until every occupant, the sender included, has it; median and p95 over the "
             "messages. **Sustained**: several occupants send at a fixed offered rate, the same for every server; "
             "deliveries counted at the receivers, server CPU over the window from /proc, deliveries per CPU-second. "
             "Latency p50/p99 under that load; lost = sent × N − delivered. Driver CPU: the driver's processes over the "
             "same window (busiest: its busiest process's share of one core; near 1 would mean the driver, not the "
             "server, set the pace). Ratios: the other server's all-occupants p50 over Braid's (above 1: Braid is faster), "
             "Braid's deliveries per CPU-second over the other server's (above 1: Braid does more with a CPU-second). "
             "An arrival is stamped when the driver reads that occupant's socket, so the all-occupants time includes the "
             "driver reading N sockets.", ""]
    rooms = mu.get("rooms", [])
    byn = {}
    for r in rooms:
        byn.setdefault(r["occupants"], {})[r["kind"]] = r
    for n in sorted(byn):
        row_of = byn[n]
        braid = row_of.get("braid", {})
        offered = next((r.get("offered_deliveries_per_second") for r in row_of.values() if r.get("offered_deliveries_per_second")), None)
        lines += [f"### {n:,} occupants", "",
                  f"Offered: {fmt(offered, 0)} deliveries/s ({report['sizes']['muc']['sustain']['senders']} senders); "
                  f"{report['sizes']['muc']['probes']} single messages.", ""]
        rows = []
        for kind in KINDS:
            r = row_of.get(kind)
            if not r:
                continue
            if r.get("error") and r.get("deliveries_per_cpu_second") is None:
                rows.append((NAMES[kind], *["—"] * 11, "error: " + r["error"][:160]))
                continue
            dpc, bdpc = r.get("deliveries_per_cpu_second"), braid.get("deliveries_per_cpu_second")
            med, bmed = r.get("probe_all_median_ms"), braid.get("probe_all_median_ms")
            notes = []
            if r.get("second_before_configuration") == "entered":
                notes.append("a second user entered before the owner configured the room")
            if r.get("configuration") not in (None, "result"):
                notes.append(f"configuration answered {r['configuration']}")
            if r.get("out_of_order"):
                notes.append(f"{r['out_of_order']} out of order")
            if r.get("errors_seen"):
                notes.append(f"errors seen by the clients {r['errors_seen']}")
            if r.get("connections_lost"):
                notes.append(f"{len(r['connections_lost'])} connection(s) lost: {r['connections_lost'][0][:80]}")
            if r.get("probes_complete") and r["probes_complete"].split("/")[0] != r["probes_complete"].split("/")[1]:
                notes.append(f"probes complete {r['probes_complete']}")
            if r.get("error"):
                notes.append(r["error"][:120])
            rows.append((NAMES[kind], fmt(r.get("join_seconds"), 2), fmt(med, 2), fmt(r.get("probe_all_p95_ms"), 2),
                         f"{med / bmed:.2f}×" if med and bmed else "—",
                         fmt(r.get("deliveries_per_second"), 0), fmt(r.get("lost")),
                         f"{fmt(r.get('latency_p50_ms'), 1)} / {fmt(r.get('latency_p99_ms'), 1)}",
                         cpu(r.get("server_cpu_seconds")), fmt(dpc, 0),
                         f"{bdpc / dpc:.2f}×" if dpc and bdpc else "—",
                         f"{cpu(r.get('driver_cpu_seconds'))} ({fmt(r.get('driver_busiest_process_share'), 2)})",
                         "; ".join(notes)))
        lines += [table(["server", "join s", "all occupants p50 ms", "p95 ms", "p50 ÷ Braid's", "deliveries/s", "lost",
                         "latency p50 / p99 ms", "server CPU s", "deliveries/CPU-s", "Braid ÷ this",
                         "driver CPU s (busiest)", "note"], rows), ""]
        mem = [f"{NAMES[k]} {fmt(row_of[k].get('rss_per_occupant_kib'), 1)} KiB" for k in KINDS
               if row_of.get(k, {}).get("rss_per_occupant_kib") is not None]
        if mem:
            lines += ["RSS per occupant (session and room, all in, minus the server before any client): " + "; ".join(mem) + ".", ""]
    service = mu.get("service", {})
    if service.get("domains"):
        on, off = service.get("on") or {}, service.get("off") or {}
        lines += ["### Cost of the group-chat service (Braid)", "",
                  f"Braid with {service['domains']:,} hosted domains, `services: muc: enabled: true` and `false` in braid.yaml, "
                  f"alternating, {service.get('repeats')} time(s) each (medians; bench/hosting_scale.py: start until the first "
                  "domain is served, idle RSS 2 s later).", "",
                  table(["Braid", "start s", "idle RSS MiB"], [
                      ("MUC on", fmt(on.get("start_seconds"), 3), fmt((on.get("idle_rss_kib") or 0) / 1024, 1) if on.get("idle_rss_kib") else "—"),
                      ("MUC off", fmt(off.get("start_seconds"), 3), fmt((off.get("idle_rss_kib") or 0) / 1024, 1) if off.get("idle_rss_kib") else "—"),
                      ("the service", f"{fmt(service.get('start_delta_seconds'), 3)} s", f"{fmt(service.get('rss_per_domain_bytes'))} bytes per domain"),
                  ]), ""]
        if service.get("error"):
            lines += [f"- error: {service['error'][:300]}", ""]
    lines += ["Tuning:", ""] + [f"- {NAMES.get(k, k)}: " + "; ".join(t) for k, t in mu.get("tuning", {}).items()] + [""]
    return lines


def mam_section(ma, report, images):
    z = report["sizes"]["mam"]
    t = z["throughput"]
    lines = ["## Message archive (XEP-0313)", "",
             f"{z['accounts']} accounts on mam.test, each a client session of its own (SASL PLAIN inside STARTTLS) held by "
             "bench/mamdriver.py in a loopback-only namespace; all three servers keep the archive in SQLite (Tuning). "
             "**Queries**: the accounts message each other through the server (each account with two contacts, sending as "
             "many as it receives), as fast as the server takes them "
             f"({z['window']} in flight), until the archives hold the step's number of **archived rows**: a message between two "
             "local accounts is archived twice (sender's and recipient's archive), so 10⁶ rows are 500,000 messages, "
             f"10,000 rows in each of {z['accounts']} archives; the rows are counted in the server's database after each step. "
             f"Then {z['queries']} queries for a page of {z['page']} (RSM max), one at a time, from the accounts' sessions, "
             "over four kinds: the latest page (RSM `<before/>`), the latest page with one contact (`with`), the first page "
             "after the middle of the archive (`start`), the page before that one (RSM `before` id). Latency: from sending the "
             "query to reading the final `<iq/>` after the results. Each server has "
             f"{z['populate_limit']} s to populate its archives in all; a step it does not reach in that time is measured at "
             "the size it reached. **On / off**: two fresh servers, the archive on and off, "
             f"{t['rate']} msg/s offered for {t['seconds']} s (latency: send to receipt), then {t['window']} messages in flight "
             f"for {t['saturate_seconds']} s (delivered messages/s); server CPU from /proc over each window; messages per server "
             "CPU-second; driver share: the driver process's share of one core over the window (near 1: the driver set the "
             "pace).", ""]
    rows = []
    for kind in KINDS:
        e = ma.get(kind, {})
        for x in e.get("steps", []):
            if x.get("not_started"):
                rows.append((NAMES[kind], fmt(x["target_rows"]), "not started", "—", "—", "—", "—", "—", "—", "—", "—", "—",
                             x["not_started"]))
                continue
            k = x.get("by_kind") or {}
            notes = []
            if x.get("reached") is False:
                notes.append(f"did not reach {x['target_rows']:,} rows in {z['populate_limit']} s")
            if x.get("stalled"):
                notes.append(x["stalled"])
            if x.get("query_errors"):
                notes.append(f"{x['query_errors']} query errors: {(x.get('query_first_errors') or [''])[0][:100]}")
            if x.get("bounced"):
                notes.append(f"{x['bounced']} bounced")
            short = [f"{n} {v.get('mean_results')}" for n, v in k.items() if v.get("mean_results") is not None and v["mean_results"] < z["page"]]
            if short:
                notes.append("mean results below a page: " + ", ".join(short))
            rows.append((NAMES[kind], fmt(x["target_rows"]), fmt(x.get("archived_rows")),
                         fmt(x.get("elapsed_populating_seconds"), 0), fmt(x.get("populate_messages_per_second"), 0),
                         fmt(x.get("p50_ms"), 2), fmt(x.get("p99_ms"), 2), fmt(x.get("max_ms"), 1),
                         *[f"{fmt((k.get(n) or {}).get('p50_ms'), 1)} / {fmt((k.get(n) or {}).get('p99_ms'), 1)}"
                           for n in ("latest", "with", "start", "before")],
                         fmt((x.get("db_bytes") or 0) / 2**20, 0) if x.get("db_bytes") else "—", "; ".join(notes)))
        if e.get("archive_error"):
            rows.append((NAMES[kind], *["—"] * 12, "error: " + e["archive_error"][:200]))
    lines += ["### Query latency, a page of 50", "",
              table(["server", "target rows", "rows in the database", "populating s (so far)", "populating msg/s",
                     "p50 ms", "p99 ms", "max ms", "latest p50 / p99", "with p50 / p99", "start p50 / p99",
                     "before-id p50 / p99", "database MiB", "note"], rows), ""]
    rows = []
    for kind in KINDS:
        e = ma.get(kind, {})
        for mode in ("on", "off"):
            m = e.get(mode) or {}
            f, sat = m.get("fixed") or {}, m.get("saturated") or {}
            if not f and not sat:
                rows.append((NAMES[kind], mode, *["—"] * 9, "error: " + (m.get("error") or "no figures")[:200]))
                continue
            ratio = ""
            if mode == "on" and e.get("on_over_off_messages_per_second"):
                ratio = f"{e['on_over_off_messages_per_second']:.2f}× msg/s, {fmt(e.get('on_over_off_messages_per_cpu_second'), 2)}× per CPU-s"
            notes = []
            if f and f.get("complete") is False:
                notes.append(f"fixed rate not sustained: {fmt(f.get('delivered'))} of {fmt(f.get('sent'))} delivered "
                             f"within 30 s of the last send")
            if sat.get("backlog_at_start"):
                notes.append(f"saturated run started with {fmt(sat['backlog_at_start'])} messages of the fixed run still in "
                             "flight (they fill the window and count as delivered)")
            for label, w in (("fixed", f), ("saturated", sat)):
                if w.get("lost") and w.get("lost") > 0:
                    notes.append(f"{label}: {w['lost']} not delivered")
                if w.get("stalled"):
                    notes.append(f"{label}: {w['stalled']}")
            rows.append((NAMES[kind], mode, fmt(f.get("delivered_per_second"), 0),
                         f"{fmt(f.get('latency_p50_ms'), 1)} / {fmt(f.get('latency_p99_ms'), 1)}",
                         cpu(f.get("server_cpu_seconds")), fmt(f.get("messages_per_cpu_second"), 0),
                         fmt(sat.get("delivered_per_second"), 0),
                         f"{fmt(sat.get('latency_p50_ms'), 1)} / {fmt(sat.get('latency_p99_ms'), 1)}",
                         cpu(sat.get("server_cpu_seconds")), fmt(sat.get("messages_per_cpu_second"), 0),
                         fmt(sat.get("driver_share"), 2), "; ".join(filter(None, [ratio] + notes))))
    lines += ["### Messaging with the archive on and off", "",
              table(["server", "archive", f"{t['rate']} msg/s offered: delivered/s", "latency p50 / p99 ms", "server CPU s",
                     "msg/CPU-s", "saturated: delivered msg/s", "latency p50 / p99 ms", "server CPU s", "msg/CPU-s",
                     "driver share", "on ÷ off; note"], rows), ""]
    if "mam.png" in images:
        lines += ["![mam](benchmarks/mam.png)", ""]
    lines += ["Tuning:", ""] + [f"- {NAMES.get(k, k)}: " + "; ".join(v) for k, v in (report["scenarios"]["mam"].get("tuning") or {}).items()] + [""]
    return lines


def pep_section(pe, report):
    z = report["sizes"]["pep"]
    c = z["caps"]
    lines = ["## Personal eventing (XEP-0163): PEP fan-out and the caps cache", "",
             f"Per server kind, the federation lab builds two providers of that kind (real DNSSEC): A hosts the publisher and "
             f"{z['local']:,} local contacts, B {z['remote']:,} remote contacts (reached over s2s); every contact has a presence "
             "subscription both ways with the publisher (written into each server's roster storage before its start; "
             "ejabberd: mod_admin_extra:add_rosteritem). bench/pepdriver.py, in A's namespace, logs everyone in as real client "
             "sessions (STARTTLS, SASL PLAIN); the contacts announce XEP-0115 caps whose features include NODE+notify (one ver for "
             "all, as one client kind would) and answer the servers' disco#info queries. After "
             f"{z.get('warmups', 2)} warm-up publishes, the publisher publishes {z['publishes']} items, one every "
             f"{z.get('publish_interval', 1.2)} s. **All contacts**: from sending the publish until the last contact has the "
             "notification (p50 and max over the publishes); **lost**: notifications that did not arrive within "
             f"{z.get('probe_timeout', 30)} s; **duplicates**: a notification a session received a second time. **CPU**: the "
             "servers' CPU seconds (/proc, all their processes) from each publish until its last notification arrived, summed, "
             "per 1,000 notifications delivered (A alone; A + B). **Caps cache**: then the local contacts change their presence "
             f"to new vers one after another until {c['distinct']:,} distinct vers were announced, each answered when A's server "
             "asks with disco#info; bytes per entry = (A's RSS 3 s after the last answer − 3 s before the first) / the vers it "
             "asked about. The RSS difference also holds whatever else the presence changes left behind (no control run).", ""]
    rows = []
    for r in pe.get("results", []):
        notes = []
        if r.get("error"):
            notes.append("error: " + r["error"][:200])
        results = r.get("publish_results") or {}
        if any(k != "result" for k in results):
            notes.append("publish answers: " + ", ".join(f"{k[:80]} ×{v}" for k, v in results.items()))
        if r.get("errors_seen"):
            notes.append(f"errors {r['errors_seen']}")
        if r.get("connections_lost"):
            notes.append(f"{len(r['connections_lost'])} connections lost")
        if any(m for m in (r.get("warmup_missing") or [])):
            notes.append(f"warm-ups missing {r['warmup_missing']}")
        rows.append((NAMES[r["kind"]], f"{fmt(r.get('local'))} + {fmt(r.get('remote'))}",
                     f"{fmt(r.get('complete'))}/{fmt(r.get('publishes'))}",
                     fmt(r.get("all_p50_ms"), 1), fmt(r.get("all_max_ms"), 1), fmt(r.get("delivery_median_ms"), 1),
                     f"{fmt(r.get('lost'))} of {fmt(r.get('expected'))}", fmt(r.get("duplicates")),
                     fmt(r.get("cpu_a_per_1000"), 3), fmt(r.get("cpu_total_per_1000"), 3),
                     "; ".join(notes)))
    lines += ["### Fan-out of one publish", "",
              table(["server", "contacts (local + remote)", "publishes complete", "all contacts p50 ms", "all contacts max ms",
                     "median delivery ms", "lost", "duplicates", "CPU s / 1,000 notifications (A)",
                     "CPU s / 1,000 (A + B)", "note"], rows), ""]
    rows = []
    for r in pe.get("results", []):
        before, after = r.get("caps_rss_before_kib"), r.get("caps_rss_after_kib")
        steps = r.get("caps_steps") or []
        on_the_way = ", ".join(f"{fmt(x['rss_kib'] / 1024, 1)} at {fmt(x['vers_learned'])}" for x in steps[:-1])
        rows.append((NAMES[r["kind"]], fmt(r.get("caps_distinct")), fmt(r.get("caps_vers_queried")), fmt(r.get("caps_timeouts")),
                     fmt(r.get("caps_seconds"), 1), fmt(before / 1024, 1) if before else "—", on_the_way or "—",
                     fmt(after / 1024, 1) if after else "—", fmt(r.get("caps_bytes_per_entry"), 0),
                     fmt(r.get("caps_marginal_bytes_per_entry"), 0),
                     (f"{fmt(((r.get('caps_control') or {}).get('rss_after_kib') or 0) / 1024, 1)} "
                      f"({fmt((r.get('caps_control') or {}).get('queries'))} queries)") if r.get("caps_control") else "—",
                     fmt(r.get("caps_net_bytes_per_entry"), 0)))
    lines += [f"### Caps cache at {c['distinct']:,} distinct vers", "",
              f"RSS after: {c.get('settle', 15)} s after the last answer. Marginal: (RSS at the end − RSS at the first step) / the "
              "entries learned in between, which leaves out what the first burst of queries left in the allocator. Control: then "
              f"{c['distinct'] - 1:,} presence changes again, to vers the server already knows, at the same pace (the server "
              f"should ask nothing); RSS {c.get('settle', 15)} s later. Net: ((RSS after − before) − (RSS after the control − RSS "
              "after)) / entries. The control runs after the cache filled, so it may reuse memory the first phase freed: read "
              "net as a lower bound of the cache's own cost.", "",
              table(["server", "distinct vers announced", "vers the server asked about", "not asked within "
                     f"{c.get('query_timeout', 10)} s", "seconds", "RSS before MiB", "RSS on the way MiB", "RSS after MiB",
                     "bytes per entry", "marginal bytes per entry", "RSS after the control MiB", "net bytes per entry"], rows), ""]
    lines += ["Tuning:", ""] + [f"- {NAMES.get(k, k)}: " + "; ".join(v) for k, v in (pe.get("tuning") or {}).items()] + [""]
    return lines


def newpair_section(np_, report):
    z = report["sizes"]["newpair"]
    n = z["n"]
    lines = ["## s2s: a new domain pair on a live link", "",
             f"Per combination (sender's server → receiver's server), the federation lab builds two providers, A and B, with "
             f"{n} domains each and one user per domain (real DNSSEC; bench/newpair.py, bench/xmppdriver.py inside A's "
             "namespace). One message at a time, each sent once the previous one has arrived: a warm-up a1 → b1 opens the "
             f"s2s link; then one message on each of the {n * n - 1} other ordered pairs ai → bj, the first stanza of a "
             f"pair the link has not carried (**new**); then {z['warm_repeats']} messages round-robin over those pairs, now "
             "authorised (**warm**, the reference). Latency: the receiving client's read − the sending client's write. "
             "Connections: established TCP connections between A's and B's s2s ports, after the warm-up and at the end. "
             "CPU: both servers' CPU time (/proc) over the new-pair phase, per pair. A pair not delivered within "
             f"{z['timeout']} s counts as lost; after {z['give_up_after']} in a row the combination stops. Same tuning as "
             "the fan-out section (log level warning, Braid's archive off).", ""]
    extra = (report.get("separate_runs") or {}).get("newpair")
    if extra:
        em = extra.get("machine", {})
        lines += [f"Run {em.get('date', '?')}: Braid {extra.get('braid', '?')}; load average at start {em.get('load_average_at_start')}, "
                  f"at end {em.get('load_average_at_end')}.", ""]
    rows = []
    for r in np_.get("results", []):
        pair = f"{NAMES[r['sender']]} → {NAMES[r['receiver']]}"
        if r.get("new_median_ms") is None:
            rows.append((pair, f"{r['n']}×{r['n']}", "—", "—", "—", "—", "—", "—", "—", "—", "—",
                         "—", "error: " + (r.get("error") or r.get("note") or "?")[:160]))
            continue
        lost = (r.get("new_lost") or 0) + (r.get("warm_lost") or 0)
        bounced = (r.get("new_errors") or 0) + (r.get("warm_errors") or 0)
        notes = [x for x in (r.get("note"), "gave up" if r.get("gave_up") else None, r.get("error")) if x]
        rows.append((pair, f"{r['n']}×{r['n']}", f"{fmt(r.get('new_delivered'))}/{fmt(r.get('new_pairs'))}",
                     f"{fmt(r.get('new_median_ms'), 2)} / {fmt(r.get('new_p90_ms'), 2)} / {fmt(r.get('new_p99_ms'), 2)} / "
                     f"{fmt(r.get('new_max_ms'), 2)}",
                     f"{fmt(r.get('warm_median_ms'), 2)} / {fmt(r.get('warm_p99_ms'), 2)}",
                     fmt(r.get("new_over_warm"), 1), fmt(r.get("warmup_ms"), 1),
                     f"{fmt(r.get('connections_after_warmup'))} → {fmt(r.get('connections_end'))}",
                     f"{cpu(r.get('cpu_new_a_seconds'))} / {cpu(r.get('cpu_new_b_seconds'))}",
                     fmt(r.get("cpu_ms_per_new_pair"), 1), f"{fmt(lost)} / {fmt(bounced)}",
                     fmt(r.get("new_phase_seconds"), 2), "; ".join(notes)[:200]))
    lines += [table(["sender → receiver", "N×N", "new pairs delivered", "new pair ms: median / p90 / p99 / max",
                     "warm ms: median / p99", "new ÷ warm (median)", "warm-up (link opening) ms",
                     "s2s connections: after warm-up → end", "CPU s over the new pairs (A / B)", "CPU ms per new pair (A + B)",
                     "lost / bounced", "new-pair phase s", "note"], rows), ""]
    # The new pairs by what the link knew: the list is a1→b2..bN, a2→b1..bN, ... (a1→b1 is the warm-up).
    rows = []
    for r in np_.get("results", []):
        values, k = r.get("new_ms") or [], r["n"]
        if len(values) != k * k - 1:
            continue
        order = [(i, j) for i in range(k) for j in range(k) if (i, j) != (0, 0)]
        groups = {"target": [], "sender": [], "both": []}
        for (i, j), value in zip(order, values):
            groups["target" if i == 0 else ("sender" if j == 0 else "both")].append(value)

        def cell(group):
            ordered = sorted(group)
            if not ordered:
                return "—"
            middle = len(ordered) // 2
            median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
            return f"{fmt(median, 2)} / {fmt(ordered[-1], 2)} ({len(ordered)})"
        rows.append((f"{NAMES[r['sender']]} → {NAMES[r['receiver']]}", cell(groups["target"]), cell(groups["sender"]),
                     cell(groups["both"])))
    if rows:
        lines += ["New pairs by what the link already carried (ms, median / max, number of pairs in parentheses): "
                  "a new remote domain (a1 → bj: the sender's domain already flows, the receiver's does not), a new "
                  "local domain (ai → b1), and pairs whose two domains both flow already, in other pairs (ai → bj, "
                  "i, j > 1; sent after a1 → bj and ai → b1).", "",
                  table(["sender → receiver", "new remote domain", "new local domain", "both domains known"], rows), ""]
    for r in np_.get("results", []):
        if r.get("error_conditions"):
            lines.append(f"- {NAMES[r['sender']]} → {NAMES[r['receiver']]}: bounce conditions {r['error_conditions']}")
        for problem in (r.get("new_problems") or [])[:3]:
            lines.append(f"- {NAMES[r['sender']]} → {NAMES[r['receiver']]}: pair {problem.get('pair')}: {problem.get('problem')}")
    lines += [""]
    return lines


def cluster_section(cl, report):
    z = report["sizes"].get("cluster", {})
    lines = ["## Cluster (Braid only): CPU per message across nodes, federation takeover", "",
             "Two Braid nodes of provider A (a.example) on one PostgreSQL (initdb in the run's directory, Unix socket, "
             "fsync off), node links over gRPC with mutual TLS from a throw-away cluster CA, and a third Braid as provider "
             "B (b.example, SQLite), all on 127.0.0.1 in a loopback-only namespace (bench/cluster.py). A's nodes configure "
             "the same s2s port; only the holder of the `s2s` lease binds it. A and B find each other by static "
             "`s2s.peers` entries. Clients: one asyncio process of minimal XMPP clients (STARTTLS, SASL PLAIN, bind, "
             "presence; no stream management). Prosody has no cluster; ejabberd's clustering needs Erlang distribution "
             "between the nodes (cookie, epmd, mnesia), which this harness does not set up: Braid only.", ""]
    extra = (report.get("separate_runs") or {}).get("cluster")
    if extra:
        em = extra.get("machine", {})
        lines += [f"Run {em.get('date', '?')}: Braid {extra.get('braid', '?')}; load average at start {em.get('load_average_at_start')}, "
                  f"at end {em.get('load_average_at_end')}.", ""]
    if cl.get("braid_build"):
        lines += [f"Binary: {cl['braid_build']}.", ""]
    if cl.get("pinning"):
        lines += [f"Pinning: {cl['pinning']}.", ""]
    if cl.get("error"):
        lines += [f"Error: {cl['error'][:500]}", ""]
    d = cl.get("delivery") or {}
    if d.get("error"):
        lines += [f"Delivery: error: {d['error'][:500]}", ""]
    elif d.get("same"):
        n = d.get("senders")
        lines += [f"### CPU per message, same-node and cross-node", "",
                  f"{n} senders log in on node 1, {n} receivers on node 1 and {n} more on node 2. Each phase offers "
                  f"{fmt(d.get('offered_per_second'))} messages/s for {fmt(d.get('seconds'))} s (open loop, round-robin over "
                  f"{n} sender → receiver pairs, to the receivers' full JIDs): **same-node** to the receivers on node 1, "
                  "**cross-node** to those on node 2 (node 1 hands each message over the node link). CPU: utime + stime "
                  "of each Braid process (/proc), read when the phase's first message is written and when its last one "
                  "has arrived; same-node counts node 1, cross-node both nodes. Idle: each node's CPU per second over the "
                  "seconds just before the phase (heartbeats and lease renewals every "
                  f"{fmt((cl.get('takeover') or {}).get('heartbeat_seconds') or z.get('heartbeat_seconds'), 1)} s); "
                  "\"net\" subtracts it over the phase's window. Latency: the receiving client's read − the sending "
                  "client's write (one process, one clock).", ""]
        rows = []
        for name, label in (("same", "same-node (node 1 → node 1)"), ("cross", "cross-node (node 1 → node 2)")):
            r = d.get(name) or {}
            cpu_s = r.get("cpu_seconds") or []
            idle = r.get("idle_cpu_per_second") or []
            rows.append((label, f"{fmt(r.get('delivered'))} / {fmt(r.get('sent'))}",
                         f"{fmt(r.get('lost'))} / {fmt(r.get('bounced'))} / {fmt(r.get('duplicates'))}",
                         fmt(r.get("delivered_per_second")),
                         f"{fmt(r.get('p50_ms'), 2)} / {fmt(r.get('p99_ms'), 2)} / {fmt(r.get('max_ms'), 1)}",
                         " / ".join(cpu(x) for x in cpu_s),
                         " / ".join(f"{x * 100:.1f} %" for x in idle),
                         f"**{fmt(r.get('cpu_us_per_message'))}**", fmt(r.get("cpu_us_per_message_net_of_idle")),
                         fmt(r.get("cpu_us_per_message_all_nodes"))))
        lines += [table(["path", "delivered / sent", "lost / bounced / duplicated", "delivered msg/s", "latency ms p50 / p99 / max",
                         "CPU s node 1 / node 2", "idle CPU node 1 / node 2", "CPU µs/msg (counted nodes)",
                         "net of idle", "both nodes"], rows), ""]
        if d.get("cross_over_same"):
            lines += [f"Cross-node ÷ same-node CPU per message: **{d['cross_over_same']:.2f}×**.", ""]
    tk = cl.get("takeover") or {}
    if tk.get("runs"):
        lines += ["### Federation takeover after the lease holder dies", "",
                  f"Heartbeat {fmt(tk.get('heartbeat_seconds'), 1)} s, dead after {fmt(tk.get('dead_after_seconds'), 1)} s "
                  f"(goal: < 2 × dead_after = {fmt(tk.get('goal_seconds'), 1)} s, 0 lost). One user of A at the node that does "
                  f"not hold the s2s lease sends a numbered message every {fmt((tk.get('interval_seconds') or 0) * 1000, 0)} ms "
                  f"to a user of B; {fmt(z.get('stream_warmup'))} s in, the lease holder is killed with SIGKILL (its sockets "
                  "reset by the kernel, no lease release); the stream goes on for "
                  f"{fmt(z.get('stream_after'))} s, then up to {fmt(z.get('stream_drain'))} s for stragglers. **Takeover**: "
                  "kill → first message arriving at B again. Lease / listening: kill → the survivor holds a valid lease in "
                  "`cluster_leases` / something listens on A's s2s port (polled every ~50 ms). Lost: sent, neither received "
                  "at B nor bounced to the sender; duplicated: received more than once. Held back: messages sent after the "
                  "kill that arrived more than 0.5 s later (kept by the survivor until it held the lease). The killed node "
                  "is started again between repetitions.", ""]
        rows = []
        for i, r in enumerate(tk["runs"], 1):
            if r.get("error"):
                rows.append((str(i), "—", "—", "—", "—", "—", "—", "—", "—", "—", "error: " + r["error"][:200]))
                continue
            rows.append((str(i), f"{r['killed']} → {r['survivor']}", f"{fmt(r.get('sent'))} ({fmt(r.get('sent_before_kill'))})",
                         f"**{fmt(r.get('takeover_seconds'), 3)}**", fmt(r.get("lease_taken_seconds"), 3),
                         fmt(r.get("s2s_listening_seconds"), 3), fmt(r.get("longest_gap_seconds"), 3),
                         fmt(r.get("max_delay_seconds"), 3),
                         f"{fmt(r.get('lost'))} / {fmt(r.get('bounced'))} / {fmt(r.get('duplicates'))}",
                         fmt(r.get("held_back")), ", ".join(r.get("bounce_conditions") or [])))
        lines += [table(["kill", "killed → survivor", "sent (before the kill)", "takeover s", "lease taken s",
                         "s2s listening s", "longest gap between arrivals s", "max delay s", "lost / bounced / duplicated",
                         "held back", "note"], rows), ""]
    if cl.get("tuning"):
        lines += ["Tuning: " + "; ".join(cl["tuning"]) + ".", ""]
    return lines


def web_section(we, report):
    z = report["sizes"]["web"]
    results = {r["kind"]: r for r in we.get("results", [])}
    transfers = ", ".join(f"{size / 1e6:,.0f} MB ×{reps}" for size, reps in z["upload"]["transfers"])
    lines = ["## Web: XMPP over WebSocket beside TCP, and HTTP file upload (XEP-0363)", "",
             "Per server, one start in a loopback-only namespace (bench/web.py, bench/webdriver.py). **Messages**: "
             f"{z['pairs']} pairs of accounts exchange chat messages, each side keeping {z['window']} in flight (every message "
             f"read lets its sender send the next), over {z['driver_processes']} driver processes (asyncio); after a "
             f"{z['warmup']} s warm-up, messages read in {z['seconds']} s, first over TCP (STARTTLS on 5222), then over "
             "WebSocket (RFC 7395, wss on each server's HTTPS listener, the driver's own RFC 6455 client); both TLS, "
             "SASL PLAIN, fresh sessions. Latency from the send stamp in the body to the read; server CPU seconds "
             "(/proc) over the window; then sending stops and every message sent must arrive (lost must be 0, else "
             "the figure is an error); a window in which other processes used more than 2 CPU s is measured once more "
             "when the load average is below 1, and the note says what others used in the window kept. **Upload**: one account asks upload.web.test for a slot, PUTs random bytes "
             f"({transfers}; MB = 10^6 bytes) and GETs them back, compared byte for byte; MB/s is the median over the "
             "repetitions, from the request line to the last byte of the answer; RSS is the server processes' VmRSS, "
             "sampled every 20 ms, before the transfer and at its peak (growth = peak − before); server CPU: the "
             "server processes' CPU seconds over the transfer (median).", ""]
    rows = []
    for kind in KINDS:
        r = results.get(kind)
        if not r:
            continue
        tcp, ws = r.get("tcp") or {}, r.get("ws") or {}
        notes = [f"{t.upper()}: {x['error'][:160]}" for t, x in (("tcp", tcp), ("ws", ws)) if x.get("error")]
        notes += [f"{t.upper()}: other processes on the machine used {fmt(x['other_cpu_seconds'], 1)} CPU s in the window"
                  for t, x in (("tcp", tcp), ("ws", ws)) if (x.get("other_cpu_seconds") or 0) > 0.5]
        notes += [f"{t.upper()}: measured again (other processes' work in the first window); the second is shown"
                  for t, x in (("tcp", tcp), ("ws", ws)) if x.get("attempt", 1) > 1]
        if r.get("error"):
            notes.append(r["error"][:200])
        rows.append((NAMES[kind], fmt(tcp.get("delivered_per_second"), 0), fmt(ws.get("delivered_per_second"), 0),
                     fmt(r.get("ws_over_tcp"), 2), fmt(tcp.get("messages_per_server_cpu_second"), 0),
                     fmt(ws.get("messages_per_server_cpu_second"), 0), fmt(r.get("ws_over_tcp_per_cpu"), 2),
                     f"{fmt(tcp.get('p50_ms'), 2)} / {fmt(ws.get('p50_ms'), 2)}",
                     f"{fmt(tcp.get('p99_ms'), 2)} / {fmt(ws.get('p99_ms'), 2)}",
                     f"{cpu(tcp.get('server_cpu_seconds'))} / {cpu(ws.get('server_cpu_seconds'))}",
                     f"{cpu(tcp.get('driver_cpu_seconds'))} / {cpu(ws.get('driver_cpu_seconds'))}",
                     f"{fmt(tcp.get('lost'))} / {fmt(ws.get('lost'))}",
                     f"{fmt(tcp.get('login_seconds'), 1)} / {fmt(ws.get('login_seconds'), 1)}", "; ".join(notes)))
    lines += ["### Messages over WebSocket and over TCP", "",
              table(["server", "TCP msg/s", "WS msg/s", "WS / TCP", "TCP msg per server CPU-s", "WS msg per server CPU-s",
                     "WS / TCP per CPU-s", "p50 ms TCP / WS", "p99 ms TCP / WS", f"server CPU s in {z['seconds']} s TCP / WS",
                     "driver CPU s TCP / WS", "lost TCP / WS", f"{2 * z['pairs']} logins at once, s TCP / WS", "note"], rows), "",
              "Other processes' CPU (the note) is the machine's user + system time (/proc/stat) minus the server's and the "
              "driver's; the two sources disagree by up to about 2 s at full load (it comes out negative), so only a large "
              "positive figure means someone else's work.", ""]
    rows = []
    for kind in KINDS:
        r = results.get(kind)
        if not r:
            continue
        for u in r.get("upload") or []:
            mib = lambda k: fmt(u[k] / 1024, 1) if u.get(k) is not None else "—"  # noqa: E731
            rows.append((NAMES[kind], f"{u['bytes'] / 1e6:,.0f} MB", fmt(u.get("put_mb_per_second"), 1),
                         fmt(u.get("get_mb_per_second"), 1), mib("rss_before_kib"),
                         f"{mib('put_peak_rss_kib')} (+{mib('put_peak_growth_kib')})",
                         f"{mib('get_peak_rss_kib')} (+{mib('get_peak_growth_kib')})",
                         f"{cpu(u.get('put_server_cpu_seconds'))} / {cpu(u.get('get_server_cpu_seconds'))}",
                         f"{u.get('verified')}/{u.get('repetitions')}", "; ".join(e[:160] for e in u.get("errors") or [])))
        if not r.get("upload") and (r.get("upload_error") or r.get("error")):
            rows.append((NAMES[kind], "—", "—", "—", "—", "—", "—", "—", "—", (r.get("upload_error") or r.get("error"))[:200]))
    lines += ["### HTTP file upload", "",
              table(["server", "file", "PUT MB/s", "GET MB/s", "RSS before MiB", "peak RSS during PUT MiB (growth)",
                     "peak RSS during GET MiB (growth)", "server CPU s PUT / GET", "verified", "note"], rows), ""]
    ratios = we.get("ratios") or {}
    labels = [("tcp_messages_per_second", "TCP msg/s"), ("ws_messages_per_second", "WS msg/s"),
              ("tcp_messages_per_server_cpu_second", "TCP msg per server CPU-s"),
              ("ws_messages_per_server_cpu_second", "WS msg per server CPU-s"), ("ws_over_tcp", "WS / TCP")]
    for size, _ in z["upload"]["transfers"]:
        mb = size // 1_000_000
        labels += [(f"upload_{mb}mb_put_mb_per_second", f"PUT MB/s, {mb:,} MB"), (f"upload_{mb}mb_get_mb_per_second", f"GET MB/s, {mb:,} MB"),
                   (f"upload_{mb}mb_put_peak_rss_kib", f"peak RSS during PUT, {mb:,} MB (lower is better)"),
                   (f"upload_{mb}mb_get_peak_rss_kib", f"peak RSS during GET, {mb:,} MB (lower is better)")]
    rows = [(label, fmt((ratios.get("prosody") or {}).get(key), 2), fmt((ratios.get("ejabberd") or {}).get(key), 2))
            for key, label in labels]
    lines += ["### Ratios", "", "Braid's figure over the peer's (above 1: Braid higher).", "",
              table(["figure", "Braid / Prosody", "Braid / ejabberd"], rows), ""]
    lines += ["Tuning:", ""] + [f"- {NAMES.get(k, k)}: " + "; ".join(v) for k, v in (we.get("tuning") or {}).items()] + [""]
    return lines


def write(report, out):
    os.makedirs(out, exist_ok=True)
    images = plots(report, os.path.join(out, "benchmarks"))
    m = report["machine"]
    v = m["versions"]
    s = report["scenarios"]
    lines = ["# Benchmarks: Braid beside Prosody and ejabberd", "",
             "Generated by `sudo bench/run` (bench/benchmarks.py) from one run; every figure is also in "
             "[`benchmarks.json`](benchmarks.json). Do not edit by hand: run it again.", "",
             f"- Mode: **{report['mode']}**, run time {fmt(report.get('run_seconds'))} s, date {m['date']}",
             f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, {m['os']}",
             f"- Load average at start {m['load_average_at_start']}, at end {m.get('load_average_at_end')}; "
             f"open-files limit {report.get('open_files_limit')} (the hard limit on this machine)",
             f"- Braid: HEAD {v['braid_commit']} at the run; binary `{v['braid_binary']}` built {v.get('braid_binary_built', '?')}, "
             f"last Sources/ commit before that {v.get('braid_sources_commit_at_build', '?')}; Prosody {v['prosody']}; ejabberd {v['ejabberd']}; "
             f"tsung {v['tsung']}; Erlang {v['erlang']}; Lua {v['lua']}",
             "- Everything runs on this one machine, one server at a time; the load generators (the Python "
             "driver, tsung) share the 2 cores with the server under test, so absolute rates are low and a "
             "ratio near 1 often means the generator, not the server, was the limit.", ""]
    # A scenario measured in a run of its own (bench/run --only X) and merged into this report.
    for name, extra in sorted((report.get("separate_runs") or {}).items()):
        em = extra.get("machine", {})
        ev = em.get("versions", {})
        lines[-1:-1] = [f"- The {name} section comes from a separate run (`bench/run --only {name}`), {em.get('date', '?')}, "
                        f"{fmt(extra.get('run_seconds'))} s: Braid {extra.get('braid', ev.get('braid_commit', '?'))}; load average at start "
                        f"{em.get('load_average_at_start')}, at end {em.get('load_average_at_end')}; Prosody {ev.get('prosody', '?')}; "
                        f"ejabberd {ev.get('ejabberd', '?')}"]
    if report.get("missing_figures"):
        lines += [f"**Scenarios that produced no figures:** {', '.join(report['missing_figures'])}", ""]

    lines += ["## Goals", "", table(["goal", "measured", "ratio", "verdict"], goals(report)), ""]

    # fan-out
    fo = s.get("fanout", {})
    if fo.get("results"):
        lines += ["## s2s fan-out", "",
                  "Two providers of one kind, N domains each, one user per domain, real DNSSEC (the federation lab, "
                  "namespaces `braidbench-*`, subnet 10.77.55.0/24). Cold: one message on every ordered domain pair "
                  "(2·N² messages) sent at once, time until the last arrives. Warm: a burst over the same pairs "
                  "right after. Lost = sent − delivered (cold and warm); bounced = error replies the senders got. "
                  "Connections: peak established TCP connections between the two providers' s2s ports.", ""]
        rows = []
        for r in sorted(fo["results"], key=lambda r: (r["n"], KINDS.index(r["kind"]))):
            cold = fmt(r.get("cold_seconds"), 2) if r.get("cold_seconds") is not None else (
                f"did not finish in {r.get('time_limit_seconds')} s ({fmt(r.get('cold_delivered'))}/{fmt(r.get('cold_sent'))})"
                if r.get("cold_sent") else ("error: " + r.get("error", "?")[:120]))
            rows.append((f"{NAMES[r['kind']]}⇄{NAMES[r['kind']]}", f"{r['n']}×{r['n']}", fmt(r.get("tcp_connections_peak")),
                         cold, fmt(r.get("warm_messages_per_second")), f"{fmt(r.get('messages_lost'))} / {fmt((r.get('cold_errors') or 0) + (r.get('warm_errors') or 0))}",
                         f"{fmt((r.get('peak_rss_a_kib') or 0) / 1024)} / {fmt((r.get('peak_rss_b_kib') or 0) / 1024)}",
                         f"{cpu(r.get('cpu_a_seconds'))} / {cpu(r.get('cpu_b_seconds'))}"))
        lines += [table(["pair", "N×M", "TCP conns", "cold s", "warm msg/s", "lost / bounced", "peak RSS MiB (A / B)", "CPU s (A / B)"], rows), ""]
        for r in sorted(fo["results"], key=lambda r: (r["n"], KINDS.index(r["kind"]))):
            conditions = (r.get("driver") or {}).get("error_conditions")
            if conditions:
                lines.append(f"- {NAMES[r['kind']]} {r['n']}×{r['n']}: bounce conditions {conditions}")
            if r.get("note"):
                lines.append(f"- {NAMES[r['kind']]} {r['n']}×{r['n']}: {r['note']}")
        errors = [r for r in fo["results"] if r.get("error")]
        for r in errors:
            lines.append(f"- {NAMES[r['kind']]} {r['n']}×{r['n']}: {r['error'][:300]}")
        if "fanout.png" in images:
            lines += ["", "![fan-out](benchmarks/fanout.png)"]
        lines += ["", "Tuning:", ""] + [f"- {NAMES[k]}: " + "; ".join(t) for k, t in fo.get("tuning", {}).items()] + [""]

    npr = s.get("newpair", {})
    if npr.get("results"):
        lines += newpair_section(npr, report)

    # c2s
    cs = s.get("c2s", {})
    if cs.get("results"):
        lines += ["## c2s load (tsung)", "",
                  "tsung 1.7's XMPP plugin has no SCRAM (it knows PLAIN, DIGEST-MD5, ANONYMOUS, EXTERNAL), so all "
                  "three servers are driven alike with **SASL PLAIN inside STARTTLS**; each verifies the password "
                  "against stored SCRAM keys (4096 PBKDF2 iterations everywhere). SCRAM-SHA-256 is measured in "
                  "process under Micro, and over the network by braid-load below. Server on 127.0.0.1 in a loopback-only "
                  "namespace; tsung's controller VM is the load client, on a core of its own when pinning is recorded "
                  "below (runs before 2026-12-07 shared both cores unpinned).", ""]
        rows = []
        for kind in KINDS:
            e = cs["results"].get(kind, {})
            se = e.get("sessions", {})
            me = e.get("messages", {})
            mem = {x["target"]: x for x in se.get("steps", [])}
            rows.append((NAMES[kind], fmt(se.get("login_rate_per_second")), fmt(se.get("login_mean_ms"), 1),
                         fmt(me.get("sustained_per_second")), fmt(me.get("p50_ms_at_sustained"), 2), fmt(me.get("p99_ms_at_sustained"), 2),
                         fmt(me.get("cpu_us_per_message_at_sustained")),
                         *[fmt(mem[t]["rss_per_session_kib"] * 1.024, 1) + f" ({fmt(mem[t]['sessions'])})"
                           if t in mem and mem[t].get("rss_per_session_kib") is not None else "—"
                           for t in sorted(cs.get("steps_targets", []) or sorted({x for k in KINDS for x in {y['target'] for y in cs['results'].get(k, {}).get('sessions', {}).get('steps', [])}}))]))
        targets = sorted({y["target"] for k in KINDS for y in cs["results"].get(k, {}).get("sessions", {}).get("steps", [])})
        lines += [table(["server", "logins/s", "login ms (mean)", "sustained msg/s", "p50 ms", "p99 ms", "CPU µs/msg"] +
                        [f"KB/idle session at {t:,}" for t in targets], rows), "",
                  "Sustained: the highest offered rate whose delivered rate is ≥ 95 % of it with p99 < 100 ms; p50/p99 "
                  "and CPU are at that step. KB per idle session: (server RSS − RSS before any client) / established "
                  "sessions (count in parentheses). Logins/s: the first step's users arrive faster than any server "
                  "logs them in; completions per second of tsung's `authenticate` transaction.", "",
                  "Every rate step:", ""]
        srows = []
        for kind in KINDS:
            for x in cs["results"].get(kind, {}).get("messages", {}).get("steps", []):
                srows.append((NAMES[kind], fmt(x["offered_per_second"]), fmt(x["delivered_per_second"]), fmt(x.get("p50_ms"), 2),
                              fmt(x.get("p99_ms"), 2), fmt(x.get("max_ms"), 1), fmt(x.get("cpu_us_per_message"))))
        lines += [table(["server", "offered msg/s", "delivered msg/s", "p50 ms", "p99 ms", "max ms", "CPU µs/msg"], srows), ""]
        lines += c2s_loadgen_section(cs)
        for kind in KINDS:
            e = cs["results"].get(kind, {})
            for key in ("sessions_error", "messages_error", "loadgen_error", "calibration_error"):
                if e.get(key):
                    lines.append(f"- {NAMES[kind]} {key.split('_')[0]}: {e[key][:300]}")
        if "c2s.png" in images:
            lines += ["", "![c2s](benchmarks/c2s.png)"]
        lines += ["", "Tuning:", ""] + [f"- {NAMES.get(k, k)}: " + "; ".join(t) for k, t in cs.get("tuning", {}).items()] + [""]

    lines += logins_section(s.get("logins", {}))

    hs = s.get("hosting", {})
    if hs.get("results"):
        lines += ["## Hosting scale", "",
                  "Fresh data directory per count, loopback-only namespace. Start: spawn until a stream to the first "
                  "domain gets features. Idle RSS 2 s later. Live add: from adding the domain (Braid `braid domain add`, "
                  "Prosody VirtualHost + `prosodyctl shell host:activate`, ejabberd hosts + `reload_config` over "
                  "distribution; each tool's own start-up included) until a stream to it gets features. Per domain: "
                  "(idle RSS at N − idle RSS at 1) / (N − 1).", ""]
        rows = []
        for kind in KINDS:
            for r in hs["results"].get(kind, []):
                rows.append((NAMES[kind], fmt(r.get("domains")), fmt(r.get("start_seconds"), 3),
                             fmt(r["idle_rss_kib"] / 1024, 1) if r.get("idle_rss_kib") else "—",
                             fmt(r.get("rss_per_domain_bytes")), fmt(r.get("live_add_seconds"), 3),
                             (r.get("error") or r.get("live_add_error") or "")[:160]))
        lines += [table(["server", "domains", "start s", "idle RSS MiB", "bytes/domain", "live add s", "note"], rows)]
        if "hosting.png" in images:
            lines += ["", "![hosting](benchmarks/hosting.png)"]
        lines += ["", "Tuning:", ""] + [f"- {NAMES[k]}: " + "; ".join(t) for k, t in hs.get("tuning", {}).items()] + [""]

    mu = s.get("muc", {})
    if mu.get("rooms") or mu.get("service"):
        lines += muc_section(mu, report)

    ma = s.get("mam", {})
    if ma.get("results"):
        lines += mam_section(ma["results"], report, images)

    pe = s.get("pep", {})
    if pe.get("results"):
        lines += pep_section(pe, report)

    we = s.get("web", {})
    if we.get("results"):
        lines += web_section(we, report)

    cl = s.get("cluster", {})
    if cl.get("delivery") or cl.get("takeover") or cl.get("error"):
        lines += cluster_section(cl, report)

    mi = s.get("micro", {})
    if mi:
        p, sc, s4 = mi.get("parse", {}), mi.get("scram", {}), mi.get("scram_4096", {})
        lines += ["## Micro (braid-bench, release build)", "",
                  table(["benchmark", "figure"], [
                      ("stream parse: raw expat, no handlers", f"{fmt(p.get('raw_expat_mb_per_s'))} MB/s"),
                      ("stream parse: expat with no-op handlers", f"{fmt(p.get('expat_noop_handlers_mb_per_s'))} MB/s"),
                      ("stream parse: Braid's tree-building parser", f"{fmt(p.get('braid_mb_per_s'))} MB/s, {fmt(p.get('braid_stanzas_per_s'), 0)} stanzas/s"),
                      ("Braid / raw expat", f"{fmt((p.get('ratio_to_raw') or 0) * 100)} %"),
                      ("SCRAM-SHA-256 logins, server side (10000 iterations stored)", f"{fmt(sc.get('server_logins_per_s'), 0)} /s ({fmt(sc.get('server_us_per_login'), 1)} µs each)"),
                      ("SCRAM-SHA-256 logins, client + server (client PBKDF2, 10000 it.)", f"{fmt(sc.get('full_logins_per_s'))} /s"),
                      ("SCRAM-SHA-256 logins, client + server (4096 it.)", f"{fmt(s4.get('full_logins_per_s'))} /s"),
                  ]), "",
                  f"Parse: {fmt(p.get('bytes'))} bytes, {fmt(p.get('stanzas'))} stanzas, best of {report['sizes']['micro']['repetitions']}. "
                  "The server side of a SCRAM login does no PBKDF2 (the stored keys are used); the client's PBKDF2 "
                  "dominates a full exchange.", "",
                  "Not measured: in-process routing stanzas/s. " + mi.get("not_measured", {}).get("routing_in_process", ""), ""]

    findings = os.path.join(os.path.dirname(os.path.abspath(__file__)), "findings.md")
    if os.path.exists(findings) and report.get("mode") == "full":
        with open(findings) as handle:
            lines += [handle.read().strip(), ""]

    lines += ["## Sizes of this run", "", "```", __import__("json").dumps(report["sizes"], indent=1), "```", ""]
    with open(os.path.join(out, "benchmarks.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
