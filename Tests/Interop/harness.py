"""Shared harness for Braid's interop suites.

It starts a real `braid serve` on 127.0.0.1 with a fresh data directory and free ports,
manages domains and accounts through the CLI, stops the server by PID, and runs tests
(plain or async functions) each under a timeout, printing `PASS name` / `FAIL name: reason`
and a closing `N passed, M failed` line.

The server binary comes from $BRAID_BINARY (default: /work/main/.build/debug/braid).
With BRAID_INTEROP_STORAGE=postgresql the server (and every CLI command) keeps its data in
a PostgreSQL server the harness starts (Debian's `postgresql`, as the `postgres` user when
run as root) and stops by PID; the default is the embedded SQLite.
Only the standard library is used here, so both suites can import it.
"""

import asyncio
import ctypes
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

DEFAULT_BINARY = "/work/main/.build/debug/braid"
HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"

# Bounds for everything the harness waits for.
STARTUP_TIMEOUT = 20.0      # until both listeners accept connections
CLI_TIMEOUT = 30.0          # one `braid domain|user` command (PBKDF2 runs there)
STOP_GRACE = 10.0           # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 40         # server log lines printed with a failing test


class HarnessError(Exception):
    """The harness itself could not do its job (server did not start, CLI failed...)."""


class TestTimeout(Exception):
    """A test ran past its time limit."""


def free_port():
    """A TCP port on 127.0.0.1 that nobody listens on right now.

    Binding port 0 lets the kernel choose; the port is released at once, so a tiny race
    with other programs remains, which is acceptable for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _terminate_with_parent():
    """In the server's child process: ask Linux for SIGTERM if the harness dies, so a
    killed test run never leaves a server behind (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def wait_for_port(port, deadline, process=None):
    """Waits until something accepts TCP connections on `port`, or raises at `deadline`."""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise HarnessError(f"server exited with code {process.returncode} during start-up")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise HarnessError(f"port {port} did not accept connections in time")


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free loopback port, trusting local connections."""

    def __init__(self):
        versions = sorted(int(name) for name in os.listdir("/usr/lib/postgresql") if name.isdigit()) \
            if os.path.isdir("/usr/lib/postgresql") else []
        if not versions:
            raise HarnessError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = f"/usr/lib/postgresql/{versions[-1]}/bin"
        self.directory = None
        self.process = None
        self.port = None

    def _as_postgres(self, argv):
        if os.geteuid() == 0:
            return ["/usr/bin/setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"] + argv
        return argv

    def start(self):
        self.directory = tempfile.mkdtemp(prefix="braid-interop-pg-")
        os.chmod(self.directory, 0o777)
        data = os.path.join(self.directory, "data")
        subprocess.run(self._as_postgres([f"{self.bin}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, timeout=120)
        self.port = free_port()
        log = open(os.path.join(self.directory, "postgres.log"), "ab")
        self.process = subprocess.Popen(
            self._as_postgres([f"{self.bin}/postgres", "-D", data, "-p", str(self.port), "-k", self.directory,
                               "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(f"postgres exited with code {self.process.returncode}")
            ready = subprocess.run([f"{self.bin}/pg_isready", "-h", HOST, "-p", str(self.port), "-U", "postgres"],
                                   capture_output=True, timeout=10)
            if ready.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise HarnessError("postgres did not accept connections in time")
        subprocess.run(["/usr/bin/psql", "-h", HOST, "-p", str(self.port), "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                        "-c", "CREATE DATABASE braid"], check=True, capture_output=True, timeout=30)

    @property
    def url(self):
        return f"postgresql://postgres@{HOST}:{self.port}/braid?sslmode=disable"

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.process.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_GRACE)
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


class BraidServer:
    """One `braid serve` process with its own data directory, ports and log file.

    `env` adds configuration overrides (BRAID_* variables); `domains` are hosted before
    the server starts.
    """

    def __init__(self, env=None, domains=("localhost",), binary=None, storage=None, postgres_url=None):
        self.binary = binary or os.environ.get("BRAID_BINARY", DEFAULT_BINARY)
        self.extra_env = dict(env or {})
        self.initial_domains = list(domains)
        self.data_dir = None
        self.log_path = None
        self.process = None
        self.starttls_port = None
        self.direct_tls_port = None
        self._log_file = None
        # `storage` overrides BRAID_INTEROP_STORAGE; `postgres_url` uses a database someone
        # else runs (the server then starts no PostgreSQL of its own).
        storage = storage or os.environ.get("BRAID_INTEROP_STORAGE", "sqlite")
        if storage not in ("sqlite", "postgresql"):
            raise HarnessError(f"BRAID_INTEROP_STORAGE must be sqlite or postgresql, not {storage}")
        self.postgres_url = postgres_url
        self.postgres = PostgresServer() if storage == "postgresql" and postgres_url is None else None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self):
        if not os.access(self.binary, os.X_OK):
            raise HarnessError(f"server binary {self.binary} is missing or not executable (set BRAID_BINARY)")
        if self.postgres is not None:
            self.postgres.start()
        self.data_dir = tempfile.mkdtemp(prefix="braid-interop-")
        self.log_path = os.path.join(self.data_dir, "server.log")
        self.starttls_port = free_port()
        self.direct_tls_port = free_port()
        # Every other listener on a free loopback port too, so two suites (or two servers
        # of one suite) never collide on the defaults (5269, 5270, 5280, 443).
        self.other_ports = {name: str(free_port()) for name in (
            "BRAID_S2S_STARTTLS_PORT", "BRAID_S2S_DIRECT_TLS_PORT", "BRAID_ADMIN_ADMIN_PORT", "BRAID_ADMIN_POSH_PORT")}
        for domain in self.initial_domains:
            self.add_domain(domain)
        self._launch()

    def _launch(self):
        """Starts `braid serve` on this server's data and ports; returns once both listeners
        accept connections."""
        offset = self.log_size()
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [self.binary, "serve"], env=self._env(), cwd=self.data_dir,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            preexec_fn=_terminate_with_parent)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        wait_for_port(self.starttls_port, deadline, self.process)
        wait_for_port(self.direct_tls_port, deadline, self.process)
        # The HTTPS listener (POSH, WebSocket, host-meta, upload) starts after the XMPP
        # ones: a test using it must not race it.
        https_port = self._env().get("BRAID_ADMIN_POSH_PORT", "")
        if https_port.isdigit():
            wait_for_port(int(https_port), deadline, self.process)
        if self.postgres is not None:
            # The suite must really run on PostgreSQL: no SQLite file, and the server said so.
            if os.path.exists(os.path.join(self.data_dir, "braid.sqlite")):
                raise HarnessError("the server created braid.sqlite although PostgreSQL was configured")
            if f"127.0.0.1:{self.postgres.port}/braid" not in self.log_since(offset):
                raise HarnessError("the server log does not show the PostgreSQL database being opened")

    def restart(self):
        """Stops the server process (SIGTERM) and starts it again on the same data directory,
        database and ports, as an operator's restart would; returns the stopped process's
        exit code."""
        code = self._stop_process()
        self._launch()
        return code

    def crash_and_restart(self):
        """Kills the server with SIGKILL (no shutdown of any kind, as a power cut would for
        the process) and starts it again on the same data, database and ports."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_GRACE)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._launch()

    def stop(self):
        """SIGTERM, then SIGKILL after a bounded wait. Returns the exit code (None if never started)."""
        code = self._stop_process()
        if self.postgres is not None:
            self.postgres.stop()
        return code

    def _stop_process(self):
        """Stops `braid serve` alone (the data and any PostgreSQL stay); returns its exit code."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    print(f"server pid {self.process.pid} ignored SIGTERM for {STOP_GRACE}s; killing it", file=sys.stderr)
                    self.process.kill()
                    self.process.wait(timeout=STOP_GRACE)
            code = self.process.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def keep_data(self):
        """Stops the server but keeps its data directory (for a test that reads it after)."""
        return self.stop()

    def cleanup(self):
        """Removes the data directory (database, certificates, log)."""
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def is_running(self):
        return self.process is not None and self.process.poll() is None

    # -- CLI ---------------------------------------------------------------------------

    def _env(self):
        # Start from a clean slate: stray BRAID_* variables from the caller's shell must
        # not change the server under test.
        env = {key: value for key, value in os.environ.items() if not key.startswith("BRAID_")}
        env.update({
            "BRAID_DATA_DIRECTORY": self.data_dir,
            "BRAID_C2S_ADDRESS": HOST,
            "BRAID_C2S_STARTTLS_PORT": str(self.starttls_port),
            "BRAID_C2S_DIRECT_TLS_PORT": str(self.direct_tls_port),
            "BRAID_LOG_LEVEL": "debug",
            "BRAID_S2S_ADDRESS": HOST,
            "BRAID_ADMIN_POSH_ADDRESS": HOST,
        })
        env.update(getattr(self, "other_ports", {}))
        url = self.postgres_url or (self.postgres.url if self.postgres is not None else None)
        if url is not None:
            env.update({"BRAID_STORAGE_BACKEND": "postgresql", "BRAID_STORAGE_URL": url})
        env.update(self.extra_env)
        return env

    def cli(self, *args, stdin_text=None):
        """Runs `braid ARGS` against this server's data; returns stdout, raises on failure."""
        # cwd is the data directory so that no ./braid.yaml from elsewhere is picked up.
        result = subprocess.run(
            [self.binary, *args], env=self._env(), cwd=self.data_dir,
            input=stdin_text, capture_output=True, text=True, timeout=CLI_TIMEOUT)
        if result.returncode != 0:
            raise HarnessError(f"braid {' '.join(args)} exited with {result.returncode}: "
                               f"{result.stderr.strip() or result.stdout.strip()}")
        return result.stdout

    def add_domain(self, domain):
        return self.cli("domain", "add", domain)

    def remove_domain(self, domain):
        return self.cli("domain", "remove", domain)

    def add_user(self, jid, password):
        # The password goes through stdin, as the CLI recommends.
        return self.cli("user", "add", jid, stdin_text=password + "\n")

    # -- log ---------------------------------------------------------------------------

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except (OSError, TypeError):
            return 0

    def log_since(self, offset):
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""


# -- test runner -----------------------------------------------------------------------

class Test:
    def __init__(self, function, timeout):
        self.function = function
        self.timeout = timeout
        self.name = function.__name__


def test(timeout=30):
    """Decorator: marks a function `f(ctx)` (plain or async) as a test with a time limit."""
    def mark(function):
        function.interop_test = Test(function, timeout)
        return function
    return mark


def collect_tests(namespace):
    """The functions marked with @test in a module namespace, in definition order; only
    those named in INTEROP_ONLY (comma-separated) when it is set."""
    only = {name for name in os.environ.get("INTEROP_ONLY", "").split(",") if name}
    return [value.interop_test for value in namespace.values()
            if hasattr(value, "interop_test") and (not only or value.interop_test.name in only)]


class Context:
    """What tests receive: the server, plus whatever the suite's setup adds."""

    def __init__(self, server):
        self.server = server


def _on_alarm(signum, frame):
    raise TestTimeout("timed out")


async def _async_with_timeout(coroutine, timeout):
    # asyncio.wait_for cancels the test, so its `finally` and `async with` blocks close the
    # clients. Its TimeoutError is told apart from one raised inside the test by the clock.
    started = time.monotonic()
    try:
        return await asyncio.wait_for(coroutine, timeout)
    except asyncio.TimeoutError:
        if time.monotonic() - started >= timeout * 0.99:
            raise TestTimeout("timed out") from None
        raise


def _run_one(test_case, ctx):
    """Runs one test under its timeout; returns None on success or a failure reason."""
    # SIGALRM interrupts blocking socket calls in the main thread; async tests also get an
    # asyncio timeout so their clients are cancelled cleanly. The alarm is the backstop.
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    is_async = inspect.iscoroutinefunction(test_case.function)
    signal.setitimer(signal.ITIMER_REAL, test_case.timeout + (5 if is_async else 0))
    try:
        if is_async:
            asyncio.run(_async_with_timeout(test_case.function(ctx), test_case.timeout))
        else:
            test_case.function(ctx)
        return None
    except TestTimeout:
        return f"timed out after {test_case.timeout}s"
    except AssertionError as error:
        return str(error) or "assertion failed: " + _last_frame(error)
    except Exception as error:  # noqa: BLE001 - any error is a test failure, reported by name
        return f"{type(error).__name__}: {error} ({_last_frame(error)})"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _on_terminate(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def _last_frame(error):
    """Where the error left the suite's own code (not asyncio's or slixmpp's)."""
    frames = traceback.extract_tb(error.__traceback__)
    suite = [frame for frame in frames if os.path.abspath(frame.filename) != os.path.abspath(__file__)
             and os.path.dirname(os.path.abspath(frame.filename)) == HERE]
    frame = (suite or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.filename)}:{frame.lineno}"


def _print_log_tail(text):
    lines = text.rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
    if lines:
        print(f"    --- server log (last {len(lines)} lines during the test) ---", flush=True)
        for line in lines:
            print("    | " + line, flush=True)


class SideServer:
    """A second `braid serve` for one test (its own configuration), used with `async with`
    or `with`: started on entry; on a failure its log's last lines are printed; always
    stopped and removed on exit. Its other listeners get free ports (see BraidServer)."""

    def __init__(self, env=None, domains=("localhost",), title="the test's own server"):
        self.server = BraidServer(env=env, domains=domains)
        self.title = title

    def __enter__(self):
        try:
            self.server.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self.server

    def __exit__(self, kind, error, trace):
        if kind is not None:
            lines = self.server.log_since(0).rstrip("\n").splitlines()[-LOG_TAIL_LINES:]
            print(f"    --- {self.title}'s log (last {len(lines)} lines) ---", flush=True)
            for line in lines:
                print("    | " + line, flush=True)
        self.server.stop()
        self.server.cleanup()
        return False

    async def __aenter__(self):
        return self.__enter__()

    async def __aexit__(self, kind, error, trace):
        return self.__exit__(kind, error, trace)


def run_suite(tests, env=None, domains=("localhost",), setup=None, teardown=None):
    """Starts a server, runs `setup(ctx)`, every test, `teardown(ctx)`, stops the server.

    Prints one line per test and the closing `N passed, M failed`; returns the process exit
    status (0 only if every test passed).
    """
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so `finally` stops the server.
    signal.signal(signal.SIGTERM, _on_terminate)
    server = BraidServer(env=env, domains=domains)
    ctx = Context(server)
    passed = failed = 0
    interrupted = False
    started = time.monotonic()
    try:
        setup_error = None
        try:
            server.start()
            if setup is not None:
                setup(ctx)
        except Exception as error:  # noqa: BLE001
            setup_error = f"suite setup failed: {type(error).__name__}: {error}"
            print(setup_error, flush=True)
            _print_log_tail(server.log_since(0))
        for index, test_case in enumerate(tests):
            if interrupted:
                break
            if setup_error is not None:
                print(f"FAIL {test_case.name}: {setup_error}", flush=True)
                failed += 1
                continue
            offset = server.log_size()
            try:
                reason = _run_one(test_case, ctx)
            except KeyboardInterrupt:
                # Ctrl-C or SIGTERM: report, skip the rest, still stop the server below.
                interrupted = True
                failed += len(tests) - index
                print(f"FAIL {test_case.name}: interrupted; {len(tests) - index - 1} tests not run", flush=True)
                continue
            if reason is None and not server.is_running():
                reason = f"server exited with code {server.process.returncode}"
            if reason is None:
                print(f"PASS {test_case.name}", flush=True)
                passed += 1
            else:
                print(f"FAIL {test_case.name}: {reason}", flush=True)
                time.sleep(0.2)  # let the server finish writing what the failure caused
                _print_log_tail(server.log_since(offset))
                failed += 1
        if teardown is not None and setup_error is None and not interrupted:
            try:
                teardown(ctx)
            except Exception as error:  # noqa: BLE001
                print(f"suite teardown failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
    finally:
        code = server.stop()
        if code not in (None, 0):
            print(f"note: server exit code after SIGTERM was {code}", file=sys.stderr, flush=True)
        server.cleanup()
    print(f"run time {time.monotonic() - started:.1f}s", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    if interrupted:
        return 130
    return 0 if failed == 0 else 1


def unique(prefix):
    """A short name unique within this run, for accounts and message bodies."""
    unique.counter += 1
    return f"{prefix}{os.getpid() % 10000}x{unique.counter}"


unique.counter = 0


async def close_client(client):
    """Disconnects a slixmpp client, best effort and bounded: cancels a pending connection
    attempt, waits up to 4 s for a clean close, else aborts, and stops its send loop. Every slixmpp suite uses it."""
    import asyncio
    client.cancel_connection_attempt()
    if client.transport is not None:
        try:
            await asyncio.wait_for(client.disconnect(wait=2.0), 4.0)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing is best effort
            client.abort()
    sender = client._run_out_filters
    if sender is not None and not sender.done():
        sender.cancel()
        await asyncio.wait({sender}, timeout=1.0)
