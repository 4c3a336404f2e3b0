#!/usr/bin/python3
"""HTTP file upload (XEP-0363) interop: real clients against a real Braid.

slixmpp 1.8.3's xep_0363 finds `upload.localhost` through disco, reads `max-file-size` from
its XEP-0128 form, asks for a slot and PUTs with aiohttp; the test downloads the GET URL and
compares the bytes. go-sendxmpp (`-h`) uploads a file to a receiver, who gets the URL in a
message and downloads it. Then bad input over raw HTTPS: forged and expired signatures,
path traversal, a PUT without a slot, an oversized PUT refused before its body.

The URLs point at https://localhost:PORT (BRAID_UPLOAD_BASE_URL): the server presents its
self-signed certificate for `localhost` there, which the test fetches once and then trusts,
with host name checks on, as a client would trust a real certificate.

Run with Debian's Python (the one that has slixmpp):
    BRAID_BINARY=/work/main/.build/debug/braid /usr/bin/python3 Tests/Interop/test_upload.py
Set INTEROP_DEBUG=1 to see slixmpp's own log, INTEROP_ONLY=name,name to run only those tests.
"""

import asyncio
import http.client
import io
import logging
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test, unique  # noqa: E402

import aiohttp  # noqa: E402
import slixmpp.plugins.xep_0363.http_upload as slixmpp_upload  # noqa: E402
from slixmpp import ClientXMPP, JID  # noqa: E402
from slixmpp.exceptions import IqError  # noqa: E402

DOMAIN = "localhost"
OTHER_DOMAIN = "beta.test"
SERVICE = "upload." + DOMAIN
PASSWORD = "correct horse ✓"
MAX_FILE_SIZE = 2 * 1024 * 1024
NAMESPACE = "urn:xmpp:http:upload:0"

LOGIN_TIMEOUT = 15.0
WAIT = 10.0

POSH_PORT = harness.free_port()
BASE_URL = f"https://{DOMAIN}:{POSH_PORT}"
ENV = {
    "BRAID_ADMIN_POSH_PORT": str(POSH_PORT),
    "BRAID_UPLOAD_BASE_URL": BASE_URL,
    "BRAID_UPLOAD_MAX_FILE_SIZE": str(MAX_FILE_SIZE),
}

if not os.environ.get("INTEROP_DEBUG"):
    logging.getLogger("slixmpp").setLevel(logging.CRITICAL)
else:
    logging.basicConfig(level=logging.DEBUG)


# -- TLS --------------------------------------------------------------------------------

def server_certificate(port, name):
    """The certificate the HTTPS listener presents for `name` (SNI), in PEM."""
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    with socket.create_connection((harness.HOST, port), timeout=WAIT) as raw:
        with probe.wrap_socket(raw, server_hostname=name) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))


def trusting(pem):
    """A verifying context (host names checked) whose only trust anchor is `pem`."""
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = True
    return context


def insecure():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def use_trust_for_slixmpp(context):
    """slixmpp's xep_0363 PUTs with a plain aiohttp.ClientSession (system trust store), and
    offers no way to pass an SSL context: give its module a session that trusts `context`."""
    def session(*args, **kwargs):
        kwargs.setdefault("connector", aiohttp.TCPConnector(ssl=context))
        return aiohttp.ClientSession(*args, **kwargs)
    slixmpp_upload.ClientSession = session


async def download(url, context):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        async with session.get(url) as response:
            return response.status, dict(response.headers), await response.read()


# -- XMPP -------------------------------------------------------------------------------

class Client(ClientXMPP):
    """A slixmpp client with disco and upload; no certificate checks on the XMPP stream
    (self-signed); SCRAM without channel binding (see test_blocking.py); records messages."""

    def __init__(self, jid):
        super().__init__(jid, PASSWORD, sasl_mech="SCRAM-SHA-256")
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        mechanisms = self["feature_mechanisms"]
        default = mechanisms.sasl_callback

        def callback(required, optional):
            values = default(required, optional)
            if "channel_binding" in values:
                values["channel_binding"] = None
            return values
        mechanisms.sasl_callback = callback
        for plugin in ("xep_0030", "xep_0066", "xep_0363"):
            self.register_plugin(plugin)
        self.messages = []
        self.message_arrived = asyncio.Event()
        self.add_event_handler("message", self._on_message)

    def _on_message(self, message):
        self.messages.append(message)
        self.message_arrived.set()

    async def next_message(self, timeout=WAIT):
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.messages:
            self.message_arrived.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no message within {timeout}s")
            try:
                await asyncio.wait_for(self.message_arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.messages.pop(0)


async def login(server, jid):
    client = Client(jid)
    outcome = asyncio.get_running_loop().create_future()

    def settle(error=None):
        if not outcome.done():
            outcome.set_result(error)
    client.add_event_handler("session_start", lambda _: settle())
    client.add_event_handler("failed_all_auth", lambda _: settle(AssertionError(f"{jid}: SASL failed")))
    client.add_event_handler("disconnected", lambda reason: settle(AssertionError(f"{jid}: disconnected ({reason})")))
    client.connect((harness.HOST, server.starttls_port))
    try:
        error = await asyncio.wait_for(outcome, LOGIN_TIMEOUT)
        if error is not None:
            raise error
        client.send_presence()
        iq = client.Iq()
        iq["type"] = "get"
        iq.enable("roster")
        await iq.send(timeout=WAIT)
    except BaseException:
        await close(client)
        raise
    return client


async def close(client):
    await harness.close_client(client)


class Clients:
    """Closes every client a test logged in, whatever happens in the test."""

    def __init__(self, server):
        self.server = server
        self.clients = []

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await asyncio.gather(*(close(client) for client in self.clients), return_exceptions=True)

    async def login(self, jid):
        client = await login(self.server, jid)
        self.clients.append(client)
        return client


def new_account(server, prefix, domain=DOMAIN):
    jid = f"{unique(prefix)}@{domain}"
    server.add_user(jid, PASSWORD)
    return jid


async def discover(client, domain):
    """What slixmpp's get_info_from_domain caches: the domain's disco#info and that of each
    of its disco#items. COMPAT: slixmpp 1.8.3 hands coroutines to asyncio.wait there, which
    Python 3.11 refuses; this fetches the same answers, and xep_0363's own discovery (identity
    store/file, the feature, max-file-size from the form) then reads them from the cache."""
    disco = client["xep_0030"]
    items = await disco.get_items(domain, timeout=WAIT)
    jids = [domain] + [JID(item[0]) for item in items["disco_items"]["items"]]
    disco.domain_infos[domain] = [await disco.get_info(jid, timeout=WAIT) for jid in jids]


async def slot(client, filename, size, content_type="application/octet-stream"):
    """A slot from upload.localhost: (put URL, get URL)."""
    answer = await client["xep_0363"].request_slot(JID(SERVICE), filename, size, content_type, timeout=WAIT)
    return answer["http_upload_slot"]["put"]["url"], answer["http_upload_slot"]["get"]["url"]


# -- raw HTTPS --------------------------------------------------------------------------

def raw(method, path, body=b"", headers=None, send_body=True):
    """One request on its own connection, the path sent exactly as given (no client-side
    normalisation): (status, body). With `send_body` False only the head goes out, with
    the body's Content-Length, and the answer is read before any byte of the body."""
    connection = http.client.HTTPSConnection(harness.HOST, POSH_PORT, context=insecure(), timeout=WAIT)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", f"{DOMAIN}:{POSH_PORT}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if "Content-Length" not in (headers or {}):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        if send_body and body:
            connection.send(body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def path_of(url):
    parsed = urllib.parse.urlsplit(url)
    assert f"{parsed.scheme}://{parsed.netloc}" == BASE_URL, f"{url} is not under {BASE_URL}"
    return parsed.path


# -- tests ------------------------------------------------------------------------------

@test(timeout=60)
async def slixmpp_uploads_and_the_bytes_come_back(ctx):
    alice_jid = new_account(ctx.server, "alice")
    data = random.randbytes(300 * 1024 + 7)
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        await discover(alice, JID(DOMAIN))
        # Discovery: slixmpp takes the service from the domain's disco#items and the limit
        # from the XEP-0128 form in its disco#info.
        url = await alice["xep_0363"].upload_file("random.bin", size=len(data), content_type="application/octet-stream",
                                                  input_file=io.BytesIO(data), domain=JID(DOMAIN), timeout=WAIT)
        assert alice["xep_0363"].upload_service == JID(SERVICE), f"service found: {alice['xep_0363'].upload_service}"
        assert alice["xep_0363"].max_file_size == MAX_FILE_SIZE, f"max-file-size read: {alice['xep_0363'].max_file_size}"
        assert url.startswith(BASE_URL + "/upload/") and url.endswith("/random.bin"), url
        status, headers, body = await download(url, ctx.trust)
        assert status == 200, f"GET answered {status}"
        assert body == data, f"downloaded {len(body)} bytes, uploaded {len(data)}; equal: {body == data}"
        assert headers.get("X-Content-Type-Options") == "nosniff", headers
        assert headers.get("Content-Disposition", "").startswith("attachment"), headers
        # An image is served as what it is; a range of it too.
        picture = random.randbytes(5000)
        url = await alice["xep_0363"].upload_file("picture ✓.png", size=len(picture), content_type="image/png",
                                                  input_file=io.BytesIO(picture), timeout=WAIT)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx.trust)) as session:
            async with session.get(url) as response:
                assert response.status == 200 and response.headers["Content-Type"] == "image/png", response.headers
                assert await response.read() == picture
            async with session.get(url, headers={"Range": "bytes=100-199"}) as response:
                assert response.status == 206, response.status
                assert await response.read() == picture[100:200]


@test(timeout=60)
async def slixmpp_is_refused_what_the_service_refuses(ctx):
    alice_jid = new_account(ctx.server, "alice")
    stranger_jid = new_account(ctx.server, "stranger", OTHER_DOMAIN)
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        await discover(alice, JID(DOMAIN))
        # slixmpp checks the announced limit itself …
        try:
            await alice["xep_0363"].upload_file("big.bin", size=MAX_FILE_SIZE + 1, input_file=io.BytesIO(b""), domain=JID(DOMAIN), timeout=WAIT)
            raise AssertionError("a file over max-file-size was accepted by slixmpp")
        except slixmpp_upload.FileTooBig:
            pass
        # … and the service refuses a direct request with the XEP's element.
        try:
            await slot(alice, "big.bin", MAX_FILE_SIZE + 1)
            raise AssertionError("a slot over max-file-size was given")
        except IqError as error:
            assert error.condition == "not-acceptable", error.condition
            assert error.iq.xml.find(f".//{{{NAMESPACE}}}file-too-large/{{{NAMESPACE}}}max-file-size").text == str(MAX_FILE_SIZE)
        for filename, size in (("a/b", 10), ("ok.bin", 0), ("", 10)):
            try:
                await slot(alice, filename, size)
                raise AssertionError(f"a slot for {filename!r} size {size} was given")
            except IqError as error:
                assert error.condition == "bad-request", (filename, size, error.condition)
        stranger = await clients.login(stranger_jid)
        try:
            await slot(stranger, "x.bin", 10)
            raise AssertionError("a user of another domain got a slot")
        except IqError as error:
            assert error.condition == "not-allowed", error.condition


@test(timeout=90)
def go_sendxmpp_uploads_to_a_receiver(ctx):
    binary = shutil.which("go-sendxmpp")
    assert binary is not None, "go-sendxmpp is not installed"
    sender_jid = new_account(ctx.server, "sender")
    receiver_jid = new_account(ctx.server, "receiver")
    data = random.randbytes(200 * 1024)

    async def scenario(path):
        async with Clients(ctx.server) as clients:
            receiver = await clients.login(receiver_jid)
            # -n turns certificate checks off for the XMPP stream only; the PUT goes through
            # Go's own trust store, which SSL_CERT_FILE replaces with the server's certificate
            # (its name, localhost, checked).
            process = await asyncio.create_subprocess_exec(
                binary, "-u", sender_jid, "-p", PASSWORD, "-j", f"{harness.HOST}:{ctx.server.starttls_port}", "-n",
                "--timeout", "20", "-h", path, receiver_jid,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "HOME": os.path.dirname(path), "SSL_CERT_FILE": ctx.certificate_file})
            output, _ = await asyncio.wait_for(process.communicate(), 60)
            assert process.returncode == 0, f"go-sendxmpp exited with {process.returncode}: {output.decode(errors='replace')}"
            message = await receiver.next_message(timeout=WAIT)
            url = message["body"].strip()
            oob = message["oob"]["url"]
            assert url.startswith(BASE_URL + "/upload/"), f"body: {url!r}"
            assert oob in ("", url), f"oob url {oob!r} differs from the body {url!r}"
            status, _, body = await download(url, ctx.trust)
            assert status == 200 and body == data, f"GET {status}, {len(body)} bytes, equal: {body == data}"

    directory = tempfile.mkdtemp(prefix="braid-upload-")
    try:
        path = os.path.join(directory, "report.bin")
        with open(path, "wb") as out:
            out.write(data)
        asyncio.run(scenario(path))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@test(timeout=60)
async def bad_requests_over_raw_https(ctx):
    alice_jid = new_account(ctx.server, "alice")
    async with Clients(ctx.server) as clients:
        alice = await clients.login(alice_jid)
        data = random.randbytes(1000)
        put, get = await slot(alice, "file.bin", len(data))
        put_path, get_path = path_of(put), path_of(get)
        _, prefix, slot_id, signature, name = put_path.split("/")
        forged = signature[:-1] + ("B" if signature.endswith("A") else "A")
        headers = {"Content-Type": "application/octet-stream"}
        # A forged signature, another file name, another (unknown) slot: 403.
        for path in (f"/{prefix}/{slot_id}/{forged}/{name}", f"/{prefix}/{slot_id}/{signature}/other.bin",
                     f"/{prefix}/{'A' * 22}/{signature}/{name}"):
            status, _ = raw("PUT", path, data, headers)
            assert status == 403, f"PUT {path}: {status}"
        # The GET URL does not allow a PUT.
        assert raw("PUT", get_path, data, headers)[0] == 403
        # Path traversal, sent verbatim: never a file from outside, never the signing key.
        for path in ("/upload/../../../../etc/passwd", "/upload/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                     f"/upload/{slot_id}/{signature}/..%2F..%2Fsigning.key", "/upload/..%2Fsigning.key/x/y",
                     "/upload/signing.key", "/uploads/signing.key", f"/upload/{slot_id}/../../signing.key"):
            for method in ("GET", "PUT"):
                status, body = raw(method, path, data if method == "PUT" else b"", headers)
                assert status in (403, 404), f"{method} {path}: {status}"
                assert b"root:" not in body and len(body) < 100, f"{method} {path} returned {body[:100]!r}"
        # Larger than the slot: 413 before any byte of the body is sent.
        status, _ = raw("PUT", put_path, headers={**headers, "Content-Length": str(10 * 1024 * 1024)}, send_body=False)
        assert status == 413, f"oversized PUT: {status}"
        # Not stored yet: the GET URL finds nothing; after a real PUT it does, and a second PUT conflicts.
        assert raw("GET", get_path)[0] == 404
        assert raw("PUT", put_path, data, headers)[0] == 201
        assert raw("PUT", put_path, data, headers)[0] == 409
        status, body = raw("GET", get_path)
        assert status == 200 and body == data, f"GET {status}"
        assert raw("GET", f"/{prefix}/{slot_id}/{forged}/{name}")[0] == 403


@test(timeout=60)
async def an_expired_put_url_is_refused(ctx):
    # A server of its own whose PUT URLs last one second.
    env = {**ENV, "BRAID_ADMIN_POSH_PORT": str(harness.free_port()), "BRAID_UPLOAD_PUT_URL_SECONDS": "1"}
    env["BRAID_UPLOAD_BASE_URL"] = f"https://{DOMAIN}:{env['BRAID_ADMIN_POSH_PORT']}"
    with harness.SideServer(env=env, domains=[DOMAIN]) as server:
        jid = new_account(server, "alice")
        async with Clients(server) as clients:
            alice = await clients.login(jid)
            asked = time.time()
            put, _ = await slot(alice, "late.bin", 10)
        # The URL's expiry is in whole seconds from the request: two seconds later it is past.
        await asyncio.sleep(max(0.0, asked + 2.1 - time.time()))
        connection = http.client.HTTPSConnection(harness.HOST, int(env["BRAID_ADMIN_POSH_PORT"]), context=insecure(), timeout=WAIT)
        try:
            connection.request("PUT", urllib.parse.urlsplit(put).path, body=b"0123456789", headers={"Content-Type": "application/octet-stream"})
            status = connection.getresponse().status
        finally:
            connection.close()
        assert status == 403, f"an expired PUT URL got {status}"


def setup(ctx):
    pem = server_certificate(POSH_PORT, DOMAIN)
    ctx.trust = trusting(pem)
    ctx.certificate_file = os.path.join(ctx.server.data_dir, "upload-trust.pem")
    with open(ctx.certificate_file, "w") as out:
        out.write(pem)
    use_trust_for_slixmpp(ctx.trust)


def main():
    return harness.run_suite(harness.collect_tests(globals()), env=ENV, domains=[DOMAIN, OTHER_DOMAIN], setup=setup)


if __name__ == "__main__":
    sys.exit(main())
