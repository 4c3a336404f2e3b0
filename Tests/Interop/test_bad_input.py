#!/usr/bin/python3
"""Bad input over real sockets: each case must end with its RFC 6120 stream error.

Every case opens its own connection to the direct TLS port (TLS from the first byte, ALPN
`xmpp-client`, SNI the hosted domain), usually sends a valid stream header and waits for the
features, then sends the bad input, reads until the server closes, and checks the one stream
error condition (RFC 6120 §4.9.3, §11). The STARTTLS injection case uses the STARTTLS port.

Two well-behaved observer sessions stay logged in for the whole suite; after every case they
exchange a message both ways, which proves one client's bad input did not disturb others.

Run with Debian's Python: /usr/bin/python3 Tests/Interop/test_bad_input.py
"""

import base64
import os
import socket
import ssl
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import test  # noqa: E402

DOMAIN = "bad.test"
UNHOSTED = "unhosted.example"
PASSWORD = "observer-secret"
MAX_STANZA_BYTES = 20_000

NS_STREAMS = "http://etherx.jabber.org/streams"
NS_STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_BIND = "urn:ietf:params:xml:ns:xmpp-bind"
NS_CLIENT = "jabber:client"

IO_TIMEOUT = 10.0       # any single wait for the server
CLOSE_TIMEOUT = 10.0    # from the bad input to the server closing the connection


def stream_header(to=DOMAIN, version="1.0", content_ns=NS_CLIENT, stream_ns=NS_STREAMS, declaration=True):
    """A client stream header; parameters let cases break exactly one thing."""
    prolog = "<?xml version='1.0'?>" if declaration else ""
    return (f"{prolog}<stream:stream to='{to}' version='{version}' xml:lang='en' "
            f"xmlns='{content_ns}' xmlns:stream='{stream_ns}'>").encode()


def tls_context():
    # Braid's certificates are self-signed: no verification. ALPN as XEP-0368 asks.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["xmpp-client"])
    return context


def connect_direct_tls(port, sni=DOMAIN):
    raw = socket.create_connection((harness.HOST, port), timeout=IO_TIMEOUT)
    try:
        return tls_context().wrap_socket(raw, server_hostname=sni)
    except BaseException:
        raw.close()
        raise


# -- a minimal XMPP stream reader ---------------------------------------------------------

class StreamClosed(Exception):
    """The server closed the connection (or the stream) while we waited for an element."""


class RawStream:
    """Reads first-level elements from an XMPP stream over a socket, nothing more."""

    def __init__(self, sock):
        self.sock = sock
        self.restart()

    def restart(self):
        """A new stream begins (after SASL success): parse the next bytes as a new document."""
        self.parser = ET.XMLPullParser(events=("start", "end"))
        self.depth = 0
        self.elements = deque()
        self.header = None
        self.stream_ended = False
        # Every byte of the current stream, so a later check can parse it as one document.
        self.received = bytearray()

    def send(self, data):
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def next_element(self, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not self.elements:
            if self.stream_ended:
                raise StreamClosed("the server closed its stream")
            self._read_some(deadline)
        return self.elements.popleft()

    def _read_some(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no element from the server in time")
        self.sock.settimeout(min(remaining, 1.0))
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            return
        if not data:
            raise StreamClosed("the server closed the connection")
        self.received += data
        self.parser.feed(data)
        for event, element in self.parser.read_events():
            if event == "start":
                if self.depth == 0:
                    self.header = element
                self.depth += 1
            else:
                self.depth -= 1
                if self.depth == 1:
                    self.elements.append(element)
                    self.header.remove(element)  # keep memory flat on long-lived streams
                elif self.depth == 0:
                    self.stream_ended = True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Session:
    """A logged-in raw client (SASL PLAIN inside TLS, then resource binding)."""

    def __init__(self, port, localpart, resource):
        self.bare = f"{localpart}@{DOMAIN}"
        self.stream = RawStream(connect_direct_tls(port))
        try:
            self._negotiate(localpart, resource)
        except BaseException:
            self.stream.close()
            raise

    def _negotiate(self, localpart, resource):
        stream = self.stream
        stream.send(stream_header())
        features = stream.next_element()
        mechanisms = [m.text for m in features.iter(f"{{{NS_SASL}}}mechanism")]
        assert "PLAIN" in mechanisms, f"PLAIN not offered inside TLS: {mechanisms}"
        credentials = base64.b64encode(f"\0{localpart}\0{PASSWORD}".encode()).decode()
        stream.send(f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{credentials}</auth>")
        outcome = stream.next_element()
        assert outcome.tag == f"{{{NS_SASL}}}success", f"{self.bare}: SASL failed: {ET.tostring(outcome)!r}"
        stream.restart()
        stream.send(stream_header())
        features = stream.next_element()
        assert features.find(f"{{{NS_BIND}}}bind") is not None, "no <bind/> feature after SASL"
        stream.send(f"<iq type='set' id='bind-1'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>")
        result = stream.next_element()
        bound = result.find(f"{{{NS_BIND}}}bind/{{{NS_BIND}}}jid")
        assert result.get("type") == "result" and bound is not None, f"bind failed: {ET.tostring(result)!r}"
        self.jid = bound.text
        assert self.jid == f"{self.bare}/{resource}", f"bound {self.jid}, asked for {self.bare}/{resource}"
        stream.send("<presence/>")

    def send_message(self, to, body):
        self.stream.send(f"<message type='chat' to='{to}' id='{uuid.uuid4().hex}'><body>{escape(body)}</body></message>")

    def expect_message(self, body, sender, timeout=IO_TIMEOUT):
        """Reads until the message `body` from `sender` arrives; any other message is an error."""
        deadline = time.monotonic() + timeout
        while True:
            element = self.stream.next_element(max(0.01, deadline - time.monotonic()))
            if element.tag != f"{{{NS_CLIENT}}}message":
                continue  # presence and the like are not what this check is about
            got_body = element.findtext(f"{{{NS_CLIENT}}}body")
            assert got_body == body and element.get("from") == sender, (
                f"{self.jid} got an unexpected message from {element.get('from')}: {got_body!r} "
                f"(waiting for {body!r} from {sender})")
            return

    def close(self):
        try:
            self.stream.send("</stream:stream>")
        except OSError:
            pass
        self.stream.close()


class Observers:
    """Two sessions logged in for the whole suite; `check()` proves they still work."""

    def __init__(self, port):
        self.alice = Session(port, "watcher-a", "observer")
        self.bob = Session(port, "watcher-b", "observer")

    def check(self):
        for sender, receiver in ((self.alice, self.bob), (self.bob, self.alice)):
            body = f"still here {uuid.uuid4().hex} ✓"
            try:
                sender.send_message(receiver.jid, body)
                receiver.expect_message(body, sender.jid)
            except (OSError, StreamClosed, TimeoutError) as error:
                raise AssertionError(f"observer {sender.jid} -> {receiver.jid} broken after the case: "
                                     f"{type(error).__name__}: {error}") from error

    def close(self):
        self.alice.close()
        self.bob.close()


# -- reading a stream error ---------------------------------------------------------------

def read_until_closed(sock, timeout=CLOSE_TIMEOUT):
    """Everything the server sends until it closes; (bytes, closed_by_server)."""
    deadline = time.monotonic() + timeout
    received = bytearray()
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            data = sock.recv(65536)
        except (socket.timeout, ssl.SSLWantReadError):
            continue
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return bytes(received), True
        if not data:
            return bytes(received), True
        received += data
    return bytes(received), False


def stream_error_of(data):
    """(conditions in <stream:error>, stream closed with </stream:stream>) from server bytes."""
    parser = ET.XMLPullParser(events=("start", "end"))
    conditions = None
    depth = 0
    stream_closed = False
    try:
        parser.feed(data)
        for event, element in parser.read_events():
            if event == "start":
                depth += 1
                continue
            depth -= 1
            if depth == 1 and element.tag == f"{{{NS_STREAMS}}}error":
                conditions = [child.tag.split("}", 1)[1] for child in element
                              if child.tag.startswith(f"{{{NS_STREAM_ERRORS}}}") and not child.tag.endswith("}text")]
            elif depth == 0:
                stream_closed = True
    except ET.ParseError as error:
        raise AssertionError(f"server output is not well-formed XML ({error}): {data[-400:]!r}") from error
    return conditions, stream_closed


def assert_stream_error(data, closed, condition):
    conditions, stream_closed = stream_error_of(data)
    tail = data[-400:]
    assert conditions is not None, f"no <stream:error> (expected <{condition}/>); received {tail!r}"
    assert conditions == [condition], f"expected <{condition}/>, got {conditions}; received {tail!r}"
    expected = f"<{condition} xmlns='{NS_STREAM_ERRORS}'/>".encode()
    assert expected in data, f"{expected!r} not found verbatim in {tail!r}"
    assert stream_closed, f"stream error not followed by </stream:stream>: {tail!r}"
    assert closed, f"connection still open {CLOSE_TIMEOUT}s after <{condition}/>"


def finish_with_error(stream, condition):
    """Reads until the server closes and checks the error in the whole stream it sent."""
    data, closed = read_until_closed(stream.sock)
    assert_stream_error(bytes(stream.received) + data, closed, condition)


def with_observer_check(ctx, case):
    """Runs `case()`, then always checks the observers, reporting both failures if both fail."""
    failure = None
    try:
        case()
    except (AssertionError, OSError, StreamClosed) as error:
        failure = error
    try:
        ctx.observers.check()
    except AssertionError as observer_failure:
        if failure is not None:
            raise AssertionError(f"{failure}; also: {observer_failure}") from None
        raise
    if failure is not None:
        raise failure


def bad_input_case(ctx, bad_input, condition, header=True, sni=DOMAIN):
    """Connects, optionally negotiates up to the features, sends `bad_input`, checks the error."""
    def case():
        stream = RawStream(connect_direct_tls(ctx.server.direct_tls_port, sni))
        try:
            if header:
                stream.send(stream_header())
                features = stream.next_element()
                assert features.tag == f"{{{NS_STREAMS}}}features", f"expected features, got {features.tag}"
            stream.send(bad_input)
            finish_with_error(stream, condition)
        finally:
            stream.close()
    with_observer_check(ctx, case)


def authenticated_case(ctx, bad_input, condition):
    """Like bad_input_case, but the bad input comes from a logged-in, bound session."""
    def case():
        session = Session(ctx.server.direct_tls_port, "sender", uuid.uuid4().hex[:8])
        try:
            session.stream.send(bad_input)
            finish_with_error(session.stream, condition)
        finally:
            session.stream.close()
    with_observer_check(ctx, case)


# -- the cases ----------------------------------------------------------------------------

@test(timeout=30)
def not_well_formed_mismatched_tag(ctx):
    bad_input_case(ctx, b"<message to='x@bad.test'><body>hi</message>", "not-well-formed")


@test(timeout=30)
def not_well_formed_unbound_prefix(ctx):
    # XML-NAMES "Prefix Declared": an undeclared prefix is not namespace-well-formed (§4.9.3.13).
    bad_input_case(ctx, b"<message to='x@bad.test'><foo:bar/></message>", "not-well-formed")


@test(timeout=30)
def restricted_xml_comment(ctx):
    bad_input_case(ctx, b"<message to='x@bad.test'><!-- a comment --><body>hi</body></message>", "restricted-xml")


@test(timeout=30)
def restricted_xml_processing_instruction(ctx):
    bad_input_case(ctx, b"<message to='x@bad.test'><?app do-something?><body>hi</body></message>", "restricted-xml")


@test(timeout=30)
def restricted_xml_doctype(ctx):
    # A DOCTYPE can only precede the root, so it comes in place of the plain header.
    doctype = b"<?xml version='1.0'?><!DOCTYPE stream:stream [<!ENTITY x 'y'>]>"
    bad_input_case(ctx, doctype + stream_header(declaration=False), "restricted-xml", header=False)


@test(timeout=30)
def restricted_xml_entity_reference(ctx):
    bad_input_case(ctx, b"<message to='x@bad.test'><body>&foo;</body></message>", "restricted-xml")


@test(timeout=30)
def invalid_namespace_stream_namespace(ctx):
    header = stream_header(stream_ns="http://etherx.jabber.org/streamz")
    bad_input_case(ctx, header, "invalid-namespace", header=False)


@test(timeout=30)
def invalid_namespace_server_content_namespace(ctx):
    # jabber:server is the s2s content namespace; a c2s listener must refuse it (§4.8.2).
    bad_input_case(ctx, stream_header(content_ns="jabber:server"), "invalid-namespace", header=False)


@test(timeout=30)
def invalid_namespace_server_stanza(ctx):
    bad_input_case(ctx, b"<message xmlns='jabber:server' to='x@bad.test'><body>hi</body></message>", "invalid-namespace")


@test(timeout=30)
def bad_namespace_prefix_prefixed_stanza(ctx):
    stanza = b"<cl:message xmlns:cl='jabber:client' to='x@bad.test'><cl:body>hi</cl:body></cl:message>"
    bad_input_case(ctx, stanza, "bad-namespace-prefix")


@test(timeout=30)
def unsupported_encoding_declaration(ctx):
    header = b"<?xml version='1.0' encoding='ISO-8859-1'?>" + stream_header(declaration=False)
    bad_input_case(ctx, header, "unsupported-encoding", header=False)


@test(timeout=30)
def unsupported_encoding_raw_ff_byte(ctx):
    bad_input_case(ctx, b"\xff", "unsupported-encoding")


def oversized_message(to):
    return f"<message type='chat' to='{to}'><body>{'x' * (MAX_STANZA_BYTES + 1000)}</body></message>".encode()


@test(timeout=30)
def policy_violation_oversized_stanza_before_auth(ctx):
    # RFC 6120 §13.12: the limit applies to the raw stanza, refused while it is arriving.
    bad_input_case(ctx, oversized_message(ctx.observers.bob.jid), "policy-violation")


@test(timeout=30)
def policy_violation_oversized_stanza_after_bind(ctx):
    # From an authenticated session, addressed to an observer: the observer must not get it.
    authenticated_case(ctx, oversized_message(ctx.observers.bob.jid), "policy-violation")


@test(timeout=30)
def host_unknown(ctx):
    bad_input_case(ctx, stream_header(to=UNHOSTED), "host-unknown", header=False)


@test(timeout=30)
def host_unknown_with_unhosted_sni(ctx):
    # No certificate matches the SNI; the stream must still get its RFC answer.
    bad_input_case(ctx, stream_header(to=UNHOSTED), "host-unknown", header=False, sni=UNHOSTED)


@test(timeout=30)
def unsupported_version(ctx):
    bad_input_case(ctx, stream_header(version="0.9"), "unsupported-version", header=False)


@test(timeout=30)
def not_authorized_message_before_auth(ctx):
    # Addressed to an observer: it must be refused, not processed or routed (RFC 6120 §4.9.3.12).
    stanza = f"<message type='chat' to='{ctx.observers.bob.jid}'><body>before auth</body></message>"
    bad_input_case(ctx, stanza.encode(), "not-authorized")


@test(timeout=30)
def unsupported_stanza_type_before_auth(ctx):
    # An unknown first-level element is not a stanza, so not-authorized does not apply;
    # §4.9.3.24 names the condition for a first-level element the server does not support.
    bad_input_case(ctx, b"<foo xmlns='urn:x'/>", "unsupported-stanza-type")


@test(timeout=30)
def unsupported_stanza_type_after_bind(ctx):
    authenticated_case(ctx, b"<foo xmlns='urn:x'/>", "unsupported-stanza-type")


@test(timeout=40)
def starttls_injection_is_not_processed(ctx):
    """<starttls/> and a cleartext <iq/> in one write: the iq must never be answered.

    RFC 6120 §5.4.3.3: data sent before the TLS handshake must not be treated as protected.
    After <proceed/> the test completes the handshake and opens a new stream, as a client
    whose injected bytes were buffered would, and reads until the server closes.
    """
    with_observer_check(ctx, lambda: starttls_injection(ctx.server.starttls_port))


def starttls_injection(port):
    raw = socket.create_connection((harness.HOST, port), timeout=IO_TIMEOUT)
    received = bytearray()
    try:
        stream = RawStream(raw)
        stream.send(stream_header())
        features = stream.next_element()
        assert features.find("{urn:ietf:params:xml:ns:xmpp-tls}starttls") is not None, "no STARTTLS offered"
        raw.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
                    b"<iq type='get' id='injected-iq'><query xmlns='jabber:iq:roster'/></iq>")
        reply = stream.next_element()
        closed = False
        if reply.tag == "{urn:ietf:params:xml:ns:xmpp-tls}proceed":
            try:
                secured = tls_context().wrap_socket(raw, server_hostname=DOMAIN)
            except (ssl.SSLError, OSError):
                closed = True  # the server ended the connection instead of negotiating TLS
            else:
                try:
                    secured.sendall(stream_header())
                    data, closed = read_until_closed(secured)
                    received += data
                finally:
                    secured.close()
        else:
            data, closed = read_until_closed(raw)
            received += ET.tostring(reply) + data
        # Everything, including cleartext that came in with or after <proceed/>.
        received = bytes(stream.received) + bytes(received)
        assert b"injected-iq" not in received, f"the injected iq was answered: {received[-400:]!r}"
        assert closed, f"connection still open {CLOSE_TIMEOUT}s after the injection"
    finally:
        raw.close()


# -- suite --------------------------------------------------------------------------------

def setup(ctx):
    for localpart in ("watcher-a", "watcher-b", "sender"):
        ctx.server.add_user(f"{localpart}@{DOMAIN}", PASSWORD)
    ctx.observers = Observers(ctx.server.direct_tls_port)
    ctx.observers.check()


def teardown(ctx):
    ctx.observers.close()


def main():
    tests = harness.collect_tests(globals())
    env = {"BRAID_C2S_MAX_STANZA_BYTES": str(MAX_STANZA_BYTES)}
    return harness.run_suite(tests, env=env, domains=[DOMAIN], setup=setup, teardown=teardown)


if __name__ == "__main__":
    sys.exit(main())
