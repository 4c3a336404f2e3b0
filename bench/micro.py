"""Micro-benchmarks from braid-bench (release build): stream parse throughput against raw
expat, SCRAM-SHA-256 logins per second, and storage operations on SQLite and PostgreSQL side
by side (a PostgreSQL of its own, from the lab library, on a Unix socket). In-process routing is not measured: Router's
initializer and ClientSession are internal to the Server module, and braid-bench (a
release executable) cannot use @testable import; the c2s tsung scenario measures routing
end to end instead."""

import json
import os
import subprocess

from common import ROOT, log


def bench_binary(config="release"):
    return os.path.join(ROOT, ".build", config, "braid-bench")


def build(config="release", timeout=1800):
    log(f"building braid-bench ({config})")
    result = subprocess.run(["swift", "build", "-c", config, "--product", "braid-bench"], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError("swift build failed: " + (result.stdout + result.stderr)[-1500:])
    return bench_binary(config)


def _json(argv, timeout):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def storage_run(binary, sizes):
    """braid-bench storage on SQLite and on a fresh PostgreSQL database."""
    import tempfile
    from common import lab
    directory = tempfile.mkdtemp(prefix="braid-bench-pg-")
    postgres = lab.LabPostgres(directory)
    try:
        postgres.start()
        argv = [binary, "storage", "--postgres-url", postgres.url, "--json"]
        for key in ("accounts", "messages", "contacts", "domains"):
            argv += [f"--{key}", str(sizes[key])]
        return _json(argv, 1800)
    finally:
        postgres.stop()
        import shutil
        shutil.rmtree(directory, ignore_errors=True)


def run(megabytes, repetitions, logins, binary=None, storage=None):
    binary = binary or bench_binary()
    out = {"not_measured": {"routing_in_process": __doc__.split("In-process routing is not measured: ")[1].strip()}}
    try:
        out["parse"] = _json([binary, "parse", "--megabytes", str(megabytes), "--repetitions", str(repetitions), "--json"], 900)
    except Exception as error:  # noqa: BLE001
        out["parse_error"] = str(error)[-500:]
    try:
        out["scram"] = _json([binary, "scram", "--logins", str(logins), "--iterations", "10000",
                              "--repetitions", str(repetitions), "--json"], 900)
        out["scram_4096"] = _json([binary, "scram", "--logins", str(logins), "--iterations", "4096",
                                   "--repetitions", str(repetitions), "--json"], 900)
    except Exception as error:  # noqa: BLE001
        out["scram_error"] = str(error)[-500:]
    if storage:
        try:
            out["storage"] = storage_run(binary, storage)
        except Exception as error:  # noqa: BLE001
            out["storage_error"] = str(error)[-500:]
    log(f"micro: {json.dumps(out)[:600]}")
    return out
