#!/usr/bin/python3
"""Browser interop: Debian's headless Chromium running Strophe.js against a real Braid.

The page (browser/client.html, client.js, with Debian's libjs-strophe) finds the WebSocket
endpoint through host-meta (XEP-0156), logs in over WebSocket (RFC 7395) with SCRAM, sends
presence, chats with a slixmpp peer, finds upload.localhost (XEP-0363), PUTs a file made from
the run id with fetch(), reads it back, and sends the GET URL to the peer as Conversations
does (body + XEP-0066 oob). The peer downloads it and the bytes are compared. The page reports
every step by POSTing JSON to this test's own HTTP server on 127.0.0.1 (the page's origin),
and shows them; Chromium is driven over --remote-debugging-pipe (no library needed) and the
final page is saved as a screenshot (printed path, under $BROWSER_INTEROP_ARTIFACTS, default
/tmp/braid-browser-interop).

Also over raw HTTPS and a minimal RFC 6455 client: the host-meta documents (XRD and JSON,
CORS), <host-unknown/> then <close/> for an <open/> to a domain not hosted, and a stream
error for text that is not XML.

Run with Debian's Python (the one that has slixmpp):
    BRAID_BINARY=/work/main/.build/debug/braid /usr/bin/python3 Tests/Interop/test_browser.py
Needs chromium and libjs-strophe (`bash Scripts/setup test`). INTEROP_ONLY=name,name runs
only those tests, INTEROP_DEBUG=1 shows slixmpp's log and Chromium's stderr.

BROWSER_INTEROP_SERVER=prosody runs the same page against Debian's Prosody 0.12 instead
(mod_websocket, mod_http_file_share as upload.localhost), a reference for telling a page
problem from a server problem. Prosody serves no host-meta, so this test's HTTP server
serves one pointing at it, and the host-meta test is left out, as is the not-XML one
(Prosody ends such a stream with a WebSocket close 1007, no stream error).
"""

import asyncio
import base64
import hashlib
import http.client
import http.server
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, unique  # noqa: E402

from slixmpp import ClientXMPP  # noqa: E402

DOMAIN = "localhost"
PASSWORD = "correct horse ✓"
FILE_SIZE = 300 * 1024 + 5
WEBSOCKET_PATH = "/xmpp-websocket"
WEBSOCKET_REL = "urn:xmpp:alt-connections:websocket"
XRD = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
FRAMING = "urn:ietf:params:xml:ns:xmpp-framing"
STREAMS = "http://etherx.jabber.org/streams"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
OOB = "jabber:x:oob"

BROWSER_DIR = os.path.join(harness.HERE, "browser")
STROPHE = os.environ.get("STROPHE_JS", "/usr/share/javascript/strophe/strophe.js")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = os.environ.get("BROWSER_INTEROP_ARTIFACTS", os.path.join(tempfile.gettempdir(), "braid-browser-interop"))
SERVER_KIND = os.environ.get("BROWSER_INTEROP_SERVER", "braid")

LOGIN_TIMEOUT = 15.0    # the slixmpp peer's login
WAIT = 10.0             # one answer, frame or HTTP response
PAGE_TIMEOUT = 90.0     # the whole page scenario, from navigation to its "done"
CDP_TIMEOUT = 15.0      # one DevTools command
STOP_GRACE = 3.0        # Chromium and Prosody, after the polite request, before SIGKILL

POSH_PORT = harness.free_port()
ENV = {"BRAID_ADMIN_POSH_PORT": str(POSH_PORT)}
HTTPS_BASE = f"https://{DOMAIN}:{POSH_PORT}"

if not os.environ.get("INTEROP_DEBUG"):
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
else:
    logging.basicConfig(level=logging.DEBUG)


def insecure():
    """TLS without certificate checks: the server's certificate is self-signed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def file_bytes(run, size):
    """The bytes client.js uploads for `run`: xorshift32 seeded with FNV-1a of the run id."""
    seed = 0x811C9DC5
    for byte in run.encode("utf-8"):
        seed = ((seed ^ byte) * 0x01000193) & 0xFFFFFFFF
    x = seed or 1
    out = bytearray(size)
    for index in range(size):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[index] = x & 0xFF
    return bytes(out)


def loopback_for(host):
    """Where a URL's host is reached: localhost and its subdomains (upload.localhost, which
    Chromium resolves itself but the C library may not) are this machine."""
    name = host.lower().rstrip(".")
    return harness.HOST if name == "localhost" or name.endswith(".localhost") else host


def https_get(url, headers=None, method="GET", address=None):
    """(status, headers with lower-case names, body) of one HTTPS request to `url`, sent to
    `address`, else loopback for *.localhost names (SNI and Host keep the URL's name); no
    certificate checks."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "https", f"not an https URL: {url}"
    # The TLS socket is made here (loopback address, the URL's name for SNI); http.client
    # then speaks HTTP over it as given.
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 443, timeout=WAIT)
    try:
        raw = socket.create_connection((address or loopback_for(parts.hostname), parts.port or 443), timeout=WAIT)
        connection.sock = insecure().wrap_socket(raw, server_hostname=parts.hostname)
        connection.putrequest(method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), skip_host=True)
        connection.putheader("Host", parts.netloc)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        connection.close()


# -- the page's HTTP server -------------------------------------------------------------

class PageServer:
    """Serves the page, client.js and strophe.js on 127.0.0.1, and receives the page's step
    reports (POST /report). With `dev_websocket_url` it also serves host-meta documents that
    point there, under /dev-host-meta (for a server without host-meta: Prosody)."""

    def __init__(self, loop, dev_websocket_url=None):
        self.loop = loop
        self.dev_websocket_url = dev_websocket_url
        self.reports = []
        self.changed = asyncio.Event()
        self.httpd = None
        self.thread = None

    def start(self):
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status, body=b"", content_type="text/plain; charset=utf-8", extra=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                for name, value in extra:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                files = {
                    "/client.html": (os.path.join(BROWSER_DIR, "client.html"), "text/html; charset=utf-8"),
                    "/client.js": (os.path.join(BROWSER_DIR, "client.js"), "text/javascript; charset=utf-8"),
                    "/strophe/strophe.js": (STROPHE, "text/javascript; charset=utf-8"),
                }
                if path in files:
                    name, content_type = files[path]
                    with open(name, "rb") as source:
                        return self.reply(200, source.read(), content_type)
                if owner.dev_websocket_url and path == "/dev-host-meta/.well-known/host-meta.json":
                    body = json.dumps({"links": [{"rel": WEBSOCKET_REL, "href": owner.dev_websocket_url}]}).encode()
                    return self.reply(200, body, "application/json", [("Access-Control-Allow-Origin", "*")])
                if owner.dev_websocket_url and path == "/dev-host-meta/.well-known/host-meta":
                    body = (f"<?xml version='1.0' encoding='utf-8'?>\n<XRD xmlns='{XRD}'>\n"
                            f"  <Link rel='{WEBSOCKET_REL}' href='{owner.dev_websocket_url}'/>\n</XRD>\n").encode()
                    return self.reply(200, body, "application/xrd+xml; charset=utf-8", [("Access-Control-Allow-Origin", "*")])
                return self.reply(404, b"not found")

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if urllib.parse.urlsplit(self.path).path != "/report":
                    return self.reply(404, b"not found")
                try:
                    entry = json.loads(body)
                except ValueError:
                    entry = {"step": "bad-report", "status": "error", "details": body[:500].decode("utf-8", "replace")}
                owner.loop.call_soon_threadsafe(owner._add, entry)
                return self.reply(204)

        self.httpd = http.server.ThreadingHTTPServer((harness.HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="page-server", daemon=True)
        self.thread.start()
        return self

    @property
    def origin(self):
        return f"http://{harness.HOST}:{self.httpd.server_address[1]}"

    def _add(self, entry):
        self.reports.append(entry)
        self.changed.set()

    def step(self, name):
        return next((entry for entry in self.reports if entry.get("step") == name), None)

    async def wait_for_step(self, name, deadline, alive=lambda: None):
        """The report of step `name`, waiting until `deadline` (loop time); `alive()` returns
        a reason to give up early (the browser died), or None."""
        loop = asyncio.get_running_loop()
        while True:
            found = self.step(name)
            if found is not None:
                return found
            reason = alive()
            if reason is not None:
                raise AssertionError(f"{reason} before the page reported '{name}'")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"the page did not report '{name}' within its time")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    def describe(self):
        lines = []
        for entry in self.reports:
            details = dict(entry.get("details") or {}) if isinstance(entry.get("details"), dict) else entry.get("details")
            trace = details.pop("trace", None) if isinstance(details, dict) else None
            lines.append(f"      {entry.get('status', '?'):5} {entry.get('step')}: {json.dumps(details, ensure_ascii=False)[:700]}")
            if trace and any(e.get("status") == "error" for e in self.reports):
                lines.append("      XMPP traffic at the end (page's trace):")
                lines.extend("        " + line[:300] for line in trace)
        return "\n".join(lines) or "      (no step reported)"

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.httpd = None


# -- Chromium over the DevTools pipe ----------------------------------------------------

class Chromium:
    """Headless Chromium in its own process group, with a fresh profile in a temporary
    directory, driven through --remote-debugging-pipe: the DevTools protocol as
    NUL-terminated JSON on fds 3 (to the browser) and 4 (from it)."""

    def __init__(self):
        self.process = None
        self.profile = None
        self.to_browser = None
        self.from_browser = None
        self.reader = None
        self.next_id = 0
        self.lock = threading.Lock()
        self.answered = threading.Condition()
        self.answers = {}
        self.events = []
        self.session = None
        self.stderr_path = None

    def start(self):
        if not os.access(CHROMIUM, os.X_OK):
            raise harness.HarnessError(f"{CHROMIUM} is missing (bash Scripts/setup test installs chromium)")
        self.profile = tempfile.mkdtemp(prefix="braid-chromium-")
        # Two pipes, moved to fds >= 10 so that the child's dup2 to 3 and 4 cannot clobber them.
        commands_read, commands_write = os.pipe()
        replies_read, replies_write = os.pipe()
        child_read = fcntl_dup(commands_read)
        child_write = fcntl_dup(replies_write)
        os.close(commands_read)
        os.close(replies_write)

        def in_child():
            harness._terminate_with_parent()
            os.dup2(child_read, 3)   # dup2 clears close-on-exec: 3 and 4 reach Chromium
            os.dup2(child_write, 4)

        argv = [CHROMIUM, "--headless", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--ignore-certificate-errors", "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--password-store=basic", "--use-mock-keychain",
                "--mute-audio", "--hide-scrollbars", "--window-size=1100,1400", "about:blank"]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")
        self.stderr_path = os.path.join(self.profile, "chromium.stderr")
        with open(self.stderr_path, "wb") as stderr:
            try:
                self.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, close_fds=False,
                    start_new_session=True, preexec_fn=in_child, env={**os.environ, "HOME": self.profile})
            finally:
                os.close(child_read)
                os.close(child_write)
        self.to_browser = commands_write
        self.from_browser = replies_read
        self.reader = threading.Thread(target=self._read, name="devtools-reader", daemon=True)
        self.reader.start()
        return self

    def _read(self):
        buffer = b""
        while True:
            try:
                chunk = os.read(self.from_browser, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                with self.answered:
                    if "id" in message:
                        self.answers[message["id"]] = message
                    else:
                        self.events.append(message)
                    self.answered.notify_all()
        with self.answered:
            self.answered.notify_all()

    def command(self, method, params=None, session=True, timeout=CDP_TIMEOUT):
        """Sends one DevTools command (to the page's session unless `session` is False) and
        returns its result; raises with the protocol's error."""
        with self.lock:
            self.next_id += 1
            ident = self.next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self.answered:
            while ident not in self.answers:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.reader.is_alive():
                    raise AssertionError(f"DevTools {method}: no answer ({'timed out' if remaining <= 0 else 'pipe closed'})")
                self.answered.wait(remaining)
            answer = self.answers.pop(ident)
        if "error" in answer:
            raise AssertionError(f"DevTools {method}: {answer['error']}")
        return answer.get("result", {})

    def open_page(self, url):
        """Attaches to the browser's tab, turns on console reporting, navigates to `url`."""
        deadline = time.monotonic() + CDP_TIMEOUT
        while True:
            pages = [t for t in self.command("Target.getTargets", session=False)["targetInfos"] if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)   # the first tab appears shortly after start-up; polled, bounded
        assert pages, "Chromium opened no tab"
        self.session = self.command("Target.attachToTarget", {"targetId": pages[0]["targetId"], "flatten": True}, session=False)["sessionId"]
        self.command("Runtime.enable")
        self.command("Page.enable")
        result = self.command("Page.navigate", {"url": url})
        assert not result.get("errorText"), f"navigation to {url} failed: {result['errorText']}"

    def screenshot(self, path):
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as out:
            out.write(base64.b64decode(data))
        return path

    def console(self):
        """What the page logged (console calls and uncaught exceptions), as lines."""
        lines = []
        with self.answered:
            events = list(self.events)
        for event in events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                text = " ".join(str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", []))
                lines.append(f"console.{params.get('type')}: {text}")
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                lines.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        return lines

    def died(self):
        if self.process is not None and self.process.poll() is not None:
            return f"Chromium exited with code {self.process.returncode}"
        return None

    def stop(self):
        """Browser.close, then SIGTERM and SIGKILL to the whole process group, bounded."""
        if self.process is not None:
            if self.process.poll() is None and self.reader is not None and self.reader.is_alive():
                try:
                    self.command("Browser.close", session=False, timeout=STOP_GRACE)
                except (AssertionError, OSError):
                    pass
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        os.killpg(self.process.pid, sig)
                    except ProcessLookupError:
                        pass
                try:
                    self.process.wait(timeout=STOP_GRACE)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Helpers (renderer, GPU, zygote) share the group; none may outlive the test.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for fd in (self.to_browser, self.from_browser):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.to_browser = self.from_browser = None
        if self.reader is not None:
            self.reader.join(timeout=5)
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def stderr_tail(self, lines=15):
        try:
            with open(self.stderr_path, "rb") as source:
                return source.read().decode("utf-8", "replace").splitlines()[-lines:]
        except (OSError, TypeError):
            return []


def fcntl_dup(fd):
    """A close-on-exec duplicate of `fd` numbered 10 or above."""
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


# -- the slixmpp peer -------------------------------------------------------------------

class Peer(ClientXMPP):
    """The browser's contact: answers its greeting, downloads the file whose URL it sends
    (over HTTPS, no certificate checks) and says what it got."""

    def __init__(self, jid, mechanism):
        super().__init__(jid, PASSWORD, sasl_mech=mechanism)
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        mechanisms = self["feature_mechanisms"]
        default = mechanisms.sasl_callback

        def callback(required, optional):
            # No channel binding: gs2 flag 'n' (see test_clients.py's Client).
            values = default(required, optional)
            if "channel_binding" in values:
                values["channel_binding"] = None
            return values
        mechanisms.sasl_callback = callback
        self.received = []        # (from, body, oob url or None)
        self.downloads = []       # (url, status, headers, bytes) or (url, error)
        self.add_event_handler("message", self._on_message)

    def _on_message(self, message):
        if message["type"] not in ("chat", "normal"):
            return
        oob = message.xml.find(f"{{{OOB}}}x/{{{OOB}}}url")
        url = oob.text.strip() if oob is not None and oob.text else None
        self.received.append((str(message["from"]), message["body"], url))
        if url is not None:
            asyncio.ensure_future(self._download(message, url))
        elif message["body"].startswith("hello from the browser"):
            self.send_message(mto=message["from"], mbody=f"reply to: {message['body']}", mtype="chat")

    async def _download(self, message, url):
        try:
            status, headers, body = await asyncio.to_thread(https_get, url)
        except Exception as error:  # noqa: BLE001 - reported to the page and to the test
            self.downloads.append((url, f"{type(error).__name__}: {error}"))
            self.send_message(mto=message["from"], mbody=f"download failed: {type(error).__name__}: {error}", mtype="chat")
            return
        self.downloads.append((url, status, headers, body))
        if status != 200:
            text = f"download failed: HTTP {status}"
        else:
            text = f"downloaded {len(body)} bytes sha256 {hashlib.sha256(body).hexdigest()}"
        self.send_message(mto=message["from"], mbody=text, mtype="chat")


async def peer_login(server, jid, mechanism):
    peer = Peer(jid, mechanism)
    outcome = asyncio.get_running_loop().create_future()

    def settle(error=None):
        if not outcome.done():
            outcome.set_result(error)
    peer.add_event_handler("session_start", lambda _: settle())
    peer.add_event_handler("failed_all_auth", lambda _: settle(AssertionError(f"peer {jid}: SASL failed")))
    peer.add_event_handler("disconnected", lambda reason: settle(AssertionError(f"peer {jid}: disconnected ({reason})")))
    peer.connect((harness.HOST, server.starttls_port))
    try:
        error = await asyncio.wait_for(outcome, LOGIN_TIMEOUT)
        if error is not None:
            raise error
        peer.send_presence()
        iq = peer.Iq()
        iq["type"] = "get"
        iq.enable("roster")
        await iq.send(timeout=WAIT)   # answered after the presence: the peer is available
    except BaseException:
        await peer_close(peer)
        raise
    return peer


async def peer_close(peer):
    await harness.close_client(peer)


# -- a minimal RFC 6455 client ----------------------------------------------------------

class RawWebSocket:
    """A WebSocket client over TLS to the server's HTTPS listener: the opening handshake,
    masked client frames, server frames reassembled into messages, pings answered."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, port, host=DOMAIN, path=WEBSOCKET_PATH, protocol="xmpp"):
        raw = socket.create_connection((harness.HOST, port), timeout=WAIT)
        self.sock = insecure().wrap_socket(raw, server_hostname=host)
        self.buffer = b""
        self.closed_by_server = None   # (code, reason) of the server's close frame
        self.eof = False
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", f"Origin: http://{harness.HOST}"]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"the server closed the connection during the handshake: {self.buffer!r}"
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if self.status == 101:
            expected = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
            assert self.headers.get("sec-websocket-accept") == expected, f"bad Sec-WebSocket-Accept: {self.headers}"

    def _exactly(self, count, deadline):
        while len(self.buffer) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                raise AssertionError("the server sent nothing more in time") from None
            except (ssl.SSLError, ConnectionError):
                chunk = b""
            if not chunk:
                self.eof = True
                raise EOFError
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def send_frame(self, opcode, payload, fin=True):
        header = bytes([(0x80 if fin else 0) | opcode])
        length = len(payload)
        if length < 126:
            header += bytes([0x80 | length])
        elif length < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", length)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_text(self, text):
        self.send_frame(0x1, text.encode("utf-8"))

    def receive(self, deadline):
        """The next text message, or None once the server closed (close frame or EOF)."""
        parts = []
        while True:
            try:
                first, second = self._exactly(2, deadline)
                length = second & 0x7F
                if length == 126:
                    length = struct.unpack("!H", self._exactly(2, deadline))[0]
                elif length == 127:
                    length = struct.unpack("!Q", self._exactly(8, deadline))[0]
                assert not second & 0x80, "the server masked a frame (RFC 6455 §5.1 forbids it)"
                payload = self._exactly(length, deadline)
            except EOFError:
                return None
            opcode = first & 0x0F
            if opcode == 0x9:
                self.send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.closed_by_server = (code, payload[2:].decode("utf-8", "replace"))
                try:
                    self.send_frame(0x8, payload[:2])
                except OSError:
                    pass
                return None
            parts.append(payload)
            if first & 0x80:
                return b"".join(parts).decode("utf-8")

    def messages_until_closed(self, timeout=WAIT, answer_close=True):
        """Every text message until the server closes the WebSocket, within `timeout`.
        A <close/> from the server is answered with ours (RFC 7395 §3.6)."""
        deadline = time.monotonic() + timeout
        messages = []
        while True:
            message = self.receive(deadline)
            if message is None:
                return messages
            messages.append(message)
            if answer_close and message.lstrip().startswith("<close"):
                try:
                    self.send_text(f"<close xmlns='{FRAMING}'/>")
                except OSError:
                    pass

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def parse(message):
    try:
        return ET.fromstring(message)
    except ET.ParseError as error:
        raise AssertionError(f"the server sent a message that is not one XML element ({error}): {message!r}") from None


def stream_error_then_close(messages, conditions, socket_):
    """Asserts that `messages` (what came on `socket_` until it closed) hold a stream error
    with one of `conditions`, then <close/>; returns the condition."""
    ending = f"close frame {socket_.closed_by_server}" if socket_.closed_by_server else "TCP/TLS end" if socket_.eof else "?"
    elements = [parse(message) for message in messages]
    errors = [index for index, element in enumerate(elements) if element.tag == f"{{{STREAMS}}}error"]
    assert errors, f"no <stream:error/> among the server's messages: {messages} (then {ending})"
    error = elements[errors[0]]
    found = [child.tag.split("}")[1] for child in error if child.tag.startswith(f"{{{STREAM_ERRORS}}}") and child.tag != f"{{{STREAM_ERRORS}}}text"]
    assert found and found[0] in conditions, f"stream error {found}, expected one of {conditions}: {messages[errors[0]]}"
    closes = [index for index, element in enumerate(elements) if element.tag == f"{{{FRAMING}}}close"]
    assert closes and closes[0] > errors[0], f"no <close/> after the stream error: {messages}"
    assert errors[0] == len(elements) - 2 and closes[0] == len(elements) - 1, f"messages after the error and <close/>: {messages}"
    return found[0]


def websocket_port(ctx):
    return ctx.server.websocket_port if hasattr(ctx.server, "websocket_port") else POSH_PORT


# -- tests --------------------------------------------------------------------------------

@test(timeout=30)
def host_meta_documents(ctx):
    """XEP-0156 §3: both forms name the WebSocket endpoint, readable from any origin."""
    expected = f"wss://{DOMAIN}:{POSH_PORT}{WEBSOCKET_PATH}"
    origin = {"Origin": "http://127.0.0.1:9"}
    request = urllib.request.Request(f"{HTTPS_BASE}/.well-known/host-meta", headers=origin)
    with urllib.request.urlopen(request, context=insecure(), timeout=WAIT) as response:
        assert response.status == 200, f"host-meta: HTTP {response.status}"
        assert response.headers.get("Access-Control-Allow-Origin") == "*", f"host-meta CORS: {dict(response.headers)}"
        assert "xml" in (response.headers.get("Content-Type") or ""), f"host-meta type {response.headers.get('Content-Type')}"
        xrd = ET.fromstring(response.read())
    assert xrd.tag == f"{{{XRD}}}XRD", f"host-meta root {xrd.tag}"
    links = [link.get("href") for link in xrd.iter(f"{{{XRD}}}Link") if link.get("rel") == WEBSOCKET_REL]
    assert links == [expected], f"host-meta WebSocket links {links}, expected [{expected}]"

    request = urllib.request.Request(f"{HTTPS_BASE}/.well-known/host-meta.json", headers=origin)
    with urllib.request.urlopen(request, context=insecure(), timeout=WAIT) as response:
        assert response.status == 200, f"host-meta.json: HTTP {response.status}"
        assert response.headers.get("Access-Control-Allow-Origin") == "*", f"host-meta.json CORS: {dict(response.headers)}"
        assert "json" in (response.headers.get("Content-Type") or ""), f"host-meta.json type {response.headers.get('Content-Type')}"
        document = json.loads(response.read())
    links = [link.get("href") for link in document.get("links", []) if link.get("rel") == WEBSOCKET_REL]
    assert links == [expected], f"host-meta.json WebSocket links {links}, expected [{expected}]"

    # A CORS preflight (a page sending a non-simple header) is answered too.
    status, headers, _ = https_get(f"{HTTPS_BASE}/.well-known/host-meta.json", method="OPTIONS", headers={
        **origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "accept"})
    assert 200 <= status < 300, f"preflight: HTTP {status}"
    assert headers.get("access-control-allow-origin") == "*", f"preflight CORS: {headers}"

    # A name this server does not host gets no WebSocket link.
    status, _, body = https_get(f"https://not-hosted.example:{POSH_PORT}/.well-known/host-meta.json", address=harness.HOST)
    assert status == 404 or WEBSOCKET_REL not in body.decode("utf-8", "replace"), f"not-hosted.example: HTTP {status} {body[:300]!r}"


@test(timeout=30)
def websocket_open_to_an_unknown_host(ctx):
    """RFC 7395 §3.6.1: <host-unknown/> for a domain not hosted, then <close/>, then the end."""
    socket_ = RawWebSocket(websocket_port(ctx))
    try:
        assert socket_.status == 101, f"handshake: HTTP {socket_.status} {socket_.headers}"
        assert socket_.headers.get("sec-websocket-protocol") == "xmpp", f"subprotocol: {socket_.headers}"
        socket_.send_text(f"<open xmlns='{FRAMING}' to='not-hosted.example' version='1.0'/>")
        messages = socket_.messages_until_closed()
        # §3.5: an error while opening comes after the server's own <open/>.
        assert messages and parse(messages[0]).tag == f"{{{FRAMING}}}open", f"the first message is not <open/>: {messages}"
        stream_error_then_close(messages, {"host-unknown"}, socket_)
        assert socket_.eof or socket_.closed_by_server, "the WebSocket stayed open"
    finally:
        socket_.close()


@test(timeout=30)
def websocket_text_that_is_not_xml(ctx):
    """After a good <open/>, a message that is not XML ends the stream with an error, then
    <close/>: plain text, and an element cut short."""
    for text in ("this is not XML <<< & >", "<message to='localhost'><body>cut short"):
        socket_ = RawWebSocket(websocket_port(ctx))
        try:
            assert socket_.status == 101, f"handshake: HTTP {socket_.status} {socket_.headers}"
            socket_.send_text(f"<open xmlns='{FRAMING}' to='{DOMAIN}' version='1.0'/>")
            deadline = time.monotonic() + WAIT
            opened = parse(socket_.receive(deadline) or "<none/>")
            assert opened.tag == f"{{{FRAMING}}}open", f"first message {ET.tostring(opened)!r}"
            features = parse(socket_.receive(deadline) or "<none/>")
            assert features.tag == f"{{{STREAMS}}}features", f"second message {ET.tostring(features)!r}"
            socket_.send_text(text)
            messages = socket_.messages_until_closed()
            try:
                condition = stream_error_then_close(messages, {"not-well-formed", "bad-format"}, socket_)
            except AssertionError as error:
                raise AssertionError(f"after {text!r}: {error}") from None
            print(f"    note: {text!r} got <{condition}/>", flush=True)
            assert socket_.eof or socket_.closed_by_server, f"after {text!r}: the WebSocket stayed open"
        finally:
            socket_.close()


@test(timeout=30)
def websocket_refusals(ctx):
    """RFC 7395 §3.1: no `xmpp` subprotocol offered, no upgrade (400). A message larger than
    the stanza limit ends the stream with <policy-violation/>, then <close/>."""
    socket_ = RawWebSocket(websocket_port(ctx), protocol=None)
    try:
        assert socket_.status == 400, f"an upgrade without the xmpp subprotocol got HTTP {socket_.status} {socket_.headers}"
    finally:
        socket_.close()
    socket_ = RawWebSocket(websocket_port(ctx))
    try:
        assert socket_.status == 101, f"handshake: HTTP {socket_.status} {socket_.headers}"
        socket_.send_text(f"<open xmlns='{FRAMING}' to='{DOMAIN}' version='1.0'/>")
        deadline = time.monotonic() + WAIT
        assert parse(socket_.receive(deadline) or "<none/>").tag == f"{{{FRAMING}}}open"
        assert parse(socket_.receive(deadline) or "<none/>").tag == f"{{{STREAMS}}}features"
        # The default stanza limit is 256 KiB (c2s.max_stanza_bytes).
        socket_.send_text("<message xmlns='jabber:client'><body>" + "x" * 400_000 + "</body></message>")
        stream_error_then_close(socket_.messages_until_closed(), {"policy-violation"}, socket_)
    finally:
        socket_.close()


@test(timeout=150)
async def browser_logs_in_chats_and_shares_a_file(ctx):
    server = ctx.server
    browser_jid = f"{unique('browser')}@{DOMAIN}"
    peer_jid = f"{unique('peer')}@{DOMAIN}"
    server.add_user(browser_jid, PASSWORD)
    server.add_user(peer_jid, PASSWORD)
    run = unique("run")
    expected = file_bytes(run, FILE_SIZE)
    loop = asyncio.get_running_loop()

    dev_url = getattr(server, "websocket_url", None)
    pages = PageServer(loop, dev_websocket_url=dev_url).start()
    chromium = None
    peer = None
    screenshot = None
    try:
        peer = await peer_login(server, peer_jid, getattr(server, "peer_mechanism", "SCRAM-SHA-256"))
        hostmeta = f"{pages.origin}/dev-host-meta" if dev_url else HTTPS_BASE
        query = urllib.parse.urlencode({"domain": DOMAIN, "hostmeta": hostmeta, "jid": browser_jid, "password": PASSWORD,
                                        "peer": peer_jid, "size": FILE_SIZE, "run": run})
        url = f"{pages.origin}/client.html?{query}"
        # Started from the main thread: its parent-death signal is tied to this thread.
        chromium = Chromium().start()
        started = loop.time()
        await asyncio.to_thread(chromium.open_page, url)
        try:
            done = await pages.wait_for_step("done", loop.time() + PAGE_TIMEOUT, alive=chromium.died)
        finally:
            if not chromium.died():
                screenshot = os.path.join(ARTIFACTS, f"browser-{SERVER_KIND}.png")
                try:
                    await asyncio.to_thread(chromium.screenshot, screenshot)
                except AssertionError as error:
                    print(f"    no screenshot: {error}", flush=True)
                    screenshot = None
        elapsed = loop.time() - started

        failures = [entry for entry in pages.reports if entry.get("status") == "error"]
        assert done.get("status") == "ok" and not failures, "the page reported failures"
        for step in ("host-meta.json", "host-meta", "login", "presence", "chat", "upload-service", "slot", "put", "get", "share"):
            entry = pages.step(step)
            assert entry is not None and entry["status"] == "ok", f"step {step}: {entry}"

        service = pages.step("upload-service")["details"]
        assert service["listed_in_items"], f"upload.{DOMAIN} is not in the disco#items of {DOMAIN} (clients such as Conversations look there): {service}"
        login = pages.step("login")["details"]
        assert login["mechanism"] in ("SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"), f"the browser logged in with {login['mechanism']}"
        assert login["url"] == (dev_url or f"wss://{DOMAIN}:{POSH_PORT}{WEBSOCKET_PATH}"), f"the page connected to {login['url']}"

        # The peer saw the greeting and the URL (body and oob), and downloaded the very bytes.
        greetings = [r for r in peer.received if r[1].startswith("hello from the browser") and r[0].startswith(browser_jid + "/")]
        assert greetings, f"the peer got no greeting from {browser_jid}/…: {peer.received}"
        shared = [r for r in peer.received if r[2] is not None]
        assert shared and shared[0][1] == shared[0][2] == pages.step("slot")["details"]["get"], f"shared: {shared}"
        assert peer.downloads and len(peer.downloads[0]) == 4, f"the peer's download: {peer.downloads}"
        _, status, headers, body = peer.downloads[0]
        assert status == 200, f"the peer's download: HTTP {status}"
        assert body == expected, (f"the peer downloaded {len(body)} bytes (sha256 {hashlib.sha256(body).hexdigest()}), "
                                  f"not the {len(expected)} the page made (sha256 {hashlib.sha256(expected).hexdigest()})")
        assert pages.step("put")["details"]["sha256"] == hashlib.sha256(expected).hexdigest(), "the page's bytes differ from file_bytes()"
        print(f"    page: {login['mechanism']} (offered {', '.join(login['offered'])}) over {login['url']}; "
              f"upload service {pages.step('upload-service')['details']['jid']} "
              f"(in disco#items: {pages.step('upload-service')['details']['listed_in_items']}); "
              f"{FILE_SIZE} bytes up and down; page run {elapsed:.1f}s; screenshot {screenshot}", flush=True)
    except AssertionError as error:
        lines = [str(error), "    steps the page reported:", pages.describe()]
        if chromium is not None:
            console = chromium.console()
            if console:
                lines.append("    browser console:")
                lines.extend("      " + line[:400] for line in console[-20:])
            if os.environ.get("INTEROP_DEBUG"):
                lines.extend("      chromium: " + line for line in chromium.stderr_tail())
        if peer is not None:
            lines.append(f"    peer received: {peer.received}")
        if screenshot:
            lines.append(f"    screenshot: {screenshot}")
        raise AssertionError("\n".join(lines)) from None
    finally:
        if chromium is not None:
            await asyncio.to_thread(chromium.stop)
        if peer is not None:
            await peer_close(peer)
        pages.stop()


# -- Prosody, for developing the page against a reference server --------------------------

class ProsodyServer:
    """Debian's Prosody 0.12 with what the page needs, on free loopback ports, with the
    BraidServer methods the suite uses (stands in for it when BROWSER_INTEROP_SERVER=prosody)."""

    peer_mechanism = "SCRAM-SHA-1"

    def __init__(self, env=None, domains=("localhost",), **_ignored):
        self.https_port = int((env or {}).get("BRAID_ADMIN_POSH_PORT") or harness.free_port())
        self.data_dir = None
        self.log_path = None
        self.process = None
        self.starttls_port = None
        self.config = None

    @property
    def websocket_port(self):
        return self.https_port

    @property
    def websocket_url(self):
        return f"wss://{DOMAIN}:{self.https_port}{WEBSOCKET_PATH}"

    def start(self):
        self.data_dir = tempfile.mkdtemp(prefix="braid-interop-prosody-")
        self.log_path = os.path.join(self.data_dir, "prosody.log")
        self.starttls_port = harness.free_port()
        certificate, key = os.path.join(self.data_dir, "cert.pem"), os.path.join(self.data_dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,DNS:upload.localhost", "-keyout", key, "-out", certificate],
                       check=True, capture_output=True, timeout=60)
        os.makedirs(os.path.join(self.data_dir, "data"))
        self.config = os.path.join(self.data_dir, "prosody.cfg.lua")
        with open(self.config, "w") as out:
            out.write(f"""
run_as_root = true
daemonize = false
pidfile = "{self.data_dir}/prosody.pid"
data_path = "{self.data_dir}/data"
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = "{self.log_path}" }} }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.starttls_port} }}
c2s_direct_tls_ports = {{ }}
s2s_ports = {{ }}
http_ports = {{ }}
https_ports = {{ {self.https_port} }}
https_interfaces = {{ "127.0.0.1" }}
ssl = {{ certificate = "{certificate}", key = "{key}" }}
https_ssl = {{ certificate = "{certificate}", key = "{key}" }}
modules_enabled = {{ "roster", "saslauth", "tls", "disco", "ping", "http", "websocket" }}
modules_disabled = {{ "s2s" }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = true
consider_websocket_secure = true
cross_domain_websocket = true
VirtualHost "{DOMAIN}"
Component "upload.{DOMAIN}" "http_file_share"
    http_file_share_size_limit = {4 * FILE_SIZE}
""")
        self._log_file = open(os.path.join(self.data_dir, "prosody.stdout"), "ab")
        self.process = subprocess.Popen(["prosody", "--config", self.config], cwd=self.data_dir, stdin=subprocess.DEVNULL,
                                        stdout=self._log_file, stderr=subprocess.STDOUT, preexec_fn=harness._terminate_with_parent)
        deadline = time.monotonic() + harness.STARTUP_TIMEOUT
        harness.wait_for_port(self.starttls_port, deadline, self.process)
        harness.wait_for_port(self.https_port, deadline, self.process)

    def add_user(self, jid, password):
        user, _, host = jid.partition("@")
        result = subprocess.run(["prosodyctl", "--config", self.config, "register", user, host, password],
                                cwd=self.data_dir, capture_output=True, text=True, timeout=harness.CLI_TIMEOUT)
        if result.returncode != 0:
            raise harness.HarnessError(f"prosodyctl register {jid}: {result.stdout} {result.stderr}")

    def add_domain(self, domain):
        raise harness.HarnessError("the Prosody stand-in hosts localhost only")

    def stop(self):
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=STOP_GRACE)
            code = self.process.returncode
            self._log_file.close()
        return code

    def cleanup(self):
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def is_running(self):
        return self.process is not None and self.process.poll() is None

    log_size = harness.BraidServer.log_size
    log_since = harness.BraidServer.log_since


def setup(ctx):
    missing = [path for path in (STROPHE, CHROMIUM, os.path.join(BROWSER_DIR, "client.js")) if not os.path.exists(path)]
    if missing:
        raise harness.HarnessError(f"missing {missing} (bash Scripts/setup test installs chromium and libjs-strophe)")
    # The harness waits for the XMPP listeners only; the HTTPS one may come up just after.
    harness.wait_for_port(websocket_port(ctx), time.monotonic() + harness.STARTUP_TIMEOUT, ctx.server.process)


def main():
    tests = harness.collect_tests(globals())
    if SERVER_KIND == "prosody":
        harness.BraidServer = ProsodyServer   # run_suite starts this one instead
        # Left out: Prosody serves no host-meta, and answers text that is not XML with a
        # WebSocket close 1007 instead of a stream error.
        tests = [case for case in tests if case.name not in ("host_meta_documents", "websocket_text_that_is_not_xml", "websocket_refusals")]
        print("note: against Prosody (BROWSER_INTEROP_SERVER=prosody); host-meta comes from the test's own server; "
              "host_meta_documents and websocket_text_that_is_not_xml left out", flush=True)
    elif SERVER_KIND != "braid":
        print(f"BROWSER_INTEROP_SERVER must be braid or prosody, not {SERVER_KIND}", file=sys.stderr)
        return 2
    return harness.run_suite(tests, env=ENV, domains=[DOMAIN], setup=setup)


if __name__ == "__main__":
    sys.exit(main())
