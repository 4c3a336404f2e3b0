"""Hosting scale: 1, 1k and 10k hosted domains, for Braid, Prosody and ejabberd.

All in a loopback-only namespace of ours (braidbench-host). Per server and count N, on a
fresh data directory:
  start      from spawning the server until a client stream to the first domain gets
             stream features (and the last domain too, checked right after);
  idle RSS   two seconds later (all server processes of the service);
  live add   from the moment the domain is added until a stream to it gets features:
             Braid `braid domain add NEW` (its CLI start included), Prosody: the
             VirtualHost appended to the config and SIGHUP (reload), ejabberd: the host
             appended to ejabberd.yml and ejabberd_admin:reload_config over distribution
             (an `erl` client start included, as ejabberdctl would);
  per domain (idle RSS at N - idle RSS at 1) / (N - 1).
Braid's figures come from bench/hosting_scale.py (same definitions), run in the namespace.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time

from common import HERE, PYTHON, LoopbackNamespace, lab, log, rss_kib, server_pids
import servers

TUNING = {
    "braid": ["defaults; domains added with `braid domain add --file` before start, log level warning"],
    "prosody": ["N `VirtualHost` lines in prosody.cfg.lua, modules roster, saslauth, tls, disco, ping, posix; s2s disabled; log level warn",
                "one self-signed certificate (SANs for the first 50 domains)"],
    "ejabberd": ["N entries under `hosts:` in ejabberd.yml, modules disco, ping, roster; loglevel warning",
                 "one self-signed certificate (SANs for the first 50 domains)"],
}


def domains_for(count):
    return [f"customer{i}.example" for i in range(count)]


def measure_peer(kind, ns, count, limit):
    directory = tempfile.mkdtemp(prefix=f"braidbench-host-{kind}-")
    os.chmod(directory, 0o755)
    figures = {"domains": count}
    server = None
    try:
        server = servers.SERVERS[kind](ns.ns, directory, domains_for(count))
        started = time.monotonic()
        server.start()
        if not server.wait_ready(limit):
            figures["error"] = f"did not serve the first domain within {limit} s"
            return figures
        figures["start_seconds"] = round(time.monotonic() - started, 3)
        last = domains_for(count)[-1]
        if not server.wait_ready(max(5, limit - (time.monotonic() - started)), domain=last):
            figures["error"] = f"did not serve the last domain within {limit} s"
            return figures
        figures["start_all_seconds"] = round(time.monotonic() - started, 3)
        time.sleep(2)
        figures["idle_rss_kib"] = rss_kib(server_pids(server.pid))
        new = "added-live.example"
        before = time.monotonic()
        server.add_domain_live(new)
        if server.wait_ready(min(limit, 120), domain=new):
            figures["live_add_seconds"] = round(time.monotonic() - before, 3)
        else:
            figures["live_add_error"] = f"new domain not served within {min(limit, 120)} s"
    except Exception as error:  # noqa: BLE001
        figures["error"] = f"{type(error).__name__}: {str(error)[-400:]}"
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    log(f"hosting {kind} {count}: {json.dumps(figures)}")
    return figures


def measure_braid(ns, braid_binary, counts, limit, config=None):
    """bench/hosting_scale.py in NS for COUNTS; CONFIG: a braid.yaml for the servers it starts."""
    out = os.path.join(tempfile.mkdtemp(prefix="braidbench-host-braid-"), "hosting.json")
    try:
        lab.run(ns.argv([PYTHON, os.path.join(HERE, "hosting_scale.py"), "--braid", braid_binary,
                         "--counts", ",".join(str(c) for c in counts), "--json", out]
                        + (["--config", config] if config else [])),
                timeout=limit * len(counts) + 120)
        with open(out) as handle:
            results = json.load(handle)["results"]
    except Exception as error:  # noqa: BLE001
        return [{"domains": c, "error": f"{type(error).__name__}: {str(error)[-400:]}"} for c in counts]
    finally:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    log(f"hosting braid: {json.dumps(results)}")
    return results


def per_domain(results):
    base = next((r for r in results if r.get("domains") == 1 and r.get("idle_rss_kib")), None)
    for r in results:
        if base and r.get("idle_rss_kib") and r["domains"] > 1:
            r["rss_per_domain_bytes"] = round((r["idle_rss_kib"] - base["idle_rss_kib"]) * 1024 / (r["domains"] - 1))
    return results


def run(kinds, counts, braid_binary, limit=300):
    counts = sorted(set([1] + list(counts)))
    results = {}
    for kind in kinds:
        with LoopbackNamespace("host") as ns:
            if kind == "braid":
                results[kind] = per_domain(measure_braid(ns, braid_binary, counts, limit))
            else:
                rows = []
                for count in counts:
                    rows.append(measure_peer(kind, ns, count, limit))
                    if "error" in rows[-1] and "within" in rows[-1]["error"]:
                        for bigger in counts[counts.index(count) + 1:]:
                            rows.append({"domains": bigger, "error": f"not tried: {count} domains already did not start within {limit} s"})
                        break
                results[kind] = per_domain(rows)
    return {"results": results, "tuning": TUNING}
