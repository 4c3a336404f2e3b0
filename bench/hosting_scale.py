#!/usr/bin/env python3
"""Hosting scale: Braid with N hosted domains.

For each N it measures, on a fresh data directory:
  - start time: from spawning `braid serve` until the STARTTLS port accepts a stream for a
    hosted domain and answers with stream features;
  - idle resident memory (VmRSS) two seconds after start;
  - live add: from running `braid domain add NEW` until a stream to NEW gets features
    instead of <host-unknown/> (includes the CLI's own start-up), and the part of that after
    the CLI returned (the server's pick-up delay).
The cost per domain is the RSS growth over the one-domain baseline, divided by N.

Usage: bench/hosting_scale.py --braid PATH [--counts 1,1000,10000] [--config braid.yaml] [--json out.json]
Network: 127.0.0.1 only. Every server started is stopped by PID.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_answer(port, domain, timeout=2.0):
    """Opens a client stream to `domain` and returns 'features', 'host-unknown' or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall((
                "<?xml version='1.0'?><stream:stream to='%s' xmlns='jabber:client' "
                "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>" % domain).encode())
            data = b""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
                if b"features" in data:
                    return "features"
                if b"host-unknown" in data:
                    return "host-unknown"
    except OSError:
        return None
    return None


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(braid, count, config=None):
    """One fresh server with COUNT domains; CONFIG: a braid.yaml for it (BRAID_CONFIG), or none."""
    directory = tempfile.mkdtemp(prefix="braid-scale-")
    port = free_port()
    environment = dict(os.environ,
                       BRAID_DATA_DIRECTORY=os.path.join(directory, "data"),
                       BRAID_C2S_ADDRESS="127.0.0.1",
                       BRAID_C2S_STARTTLS_PORT=str(port),
                       BRAID_C2S_DIRECT_TLS_PORT=str(free_port()),
                       BRAID_DEFAULT_DOMAIN="customer0.example",
                       BRAID_LOG_LEVEL="warning")
    environment.pop("BRAID_CONFIG", None)
    if config:
        environment["BRAID_CONFIG"] = config
    server = None
    try:
        names = os.path.join(directory, "domains.txt")
        with open(names, "w") as f:
            for index in range(count):
                f.write("customer%d.example\n" % index)
        subprocess.run([braid, "domain", "add", "--file", names], env=environment, check=True, stdout=subprocess.DEVNULL)

        started = time.monotonic()
        log = open(os.path.join(directory, "server.log"), "w")
        server = subprocess.Popen([braid, "serve"], env=environment, stdout=log, stderr=subprocess.STDOUT)
        deadline = started + 60
        while stream_answer(port, "customer0.example", timeout=0.5) != "features":
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("server did not start; see %s" % log.name)
            time.sleep(0.01)
        start_seconds = time.monotonic() - started

        time.sleep(2)
        idle_rss = rss_kib(server.pid)

        new_domain = "added-live.example"
        before = time.monotonic()
        subprocess.run([braid, "domain", "add", new_domain], env=environment, check=True, stdout=subprocess.DEVNULL)
        cli_done = time.monotonic()
        deadline = before + 10
        while stream_answer(port, new_domain) != "features":
            if time.monotonic() > deadline:
                raise RuntimeError("live domain not served within 10 s")
            time.sleep(0.005)
        served = time.monotonic()
        return {
            "domains": count,
            "start_seconds": round(start_seconds, 3),
            "idle_rss_kib": idle_rss,
            "live_add_seconds": round(served - before, 3),
            "live_add_after_cli_seconds": round(served - cli_done, 3),
        }
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--braid", required=True, help="path to the braid binary (a release build for real numbers)")
    parser.add_argument("--counts", default="1,1000,10000")
    parser.add_argument("--config", help="a braid.yaml for every server started (default: none, the defaults)")
    parser.add_argument("--json", help="write the results here")
    arguments = parser.parse_args()

    results = [measure(arguments.braid, int(count), arguments.config) for count in arguments.counts.split(",")]
    baseline = next((r for r in results if r["domains"] == 1), results[0])
    for result in results:
        extra = result["idle_rss_kib"] - baseline["idle_rss_kib"]
        result["rss_per_domain_bytes"] = round(extra * 1024 / (result["domains"] - 1)) if result["domains"] > 1 else None

    print("%8s %10s %12s %14s %16s %18s" % ("domains", "start s", "idle RSS MiB", "per domain B", "live add s", "after CLI s"))
    for r in results:
        print("%8d %10.3f %12.1f %14s %16.3f %18.3f" % (
            r["domains"], r["start_seconds"], r["idle_rss_kib"] / 1024, r["rss_per_domain_bytes"] if r["rss_per_domain_bytes"] is not None else "-",
            r["live_add_seconds"], r["live_add_after_cli_seconds"]))
    if arguments.json:
        with open(arguments.json, "w") as f:
            json.dump({"benchmark": "hosting-scale", "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
