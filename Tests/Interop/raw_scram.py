"""A raw XMPP client for channel-binding tests: STARTTLS through pyOpenSSL (Debian's
python3-openssl), whose OpenSSL exports keying material, then SCRAM-SHA-256(-PLUS) written
out by hand from RFC 5802. It is independent of Braid's BoringSSL and of slixmpp: Python's
own ssl module cannot give `tls-exporter` (RFC 9266) data.
"""

import base64
import hashlib
import hmac
import os
import re
import socket
import struct

from OpenSSL import SSL

READ_TIMEOUT_SECONDS = 10
FRAME_LIMIT = 1 << 20


class RawStream:
    def __init__(self, host, port, domain, max_tls12=False):
        self.domain = domain
        self.sock = socket.create_connection((host, port), timeout=READ_TIMEOUT_SECONDS)
        # Blocking socket with a receive timeout: pyOpenSSL cannot use Python's socket
        # timeouts, and a silent server must fail the test, not hang it.
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", READ_TIMEOUT_SECONDS, 0))
        self.tls = None
        self.buffer = b""
        self.max_tls12 = max_tls12

    def close(self):
        try:
            if self.tls is not None:
                self.tls.sendall(b"</stream:stream>")
        except Exception:  # noqa: BLE001 - closing is best effort
            pass
        self.sock.close()

    def send(self, text):
        data = text.encode()
        (self.tls or self.sock).sendall(data)

    def read_until(self, pattern):
        """Reads until `pattern` (a regex on the decoded text) matches; returns the match."""
        while True:
            # Latin-1 maps bytes to characters one to one, so match offsets are byte offsets.
            match = re.search(pattern, self.buffer.decode("latin-1"), re.S)
            if match:
                self.buffer = self.buffer[match.end():]
                return match
            if len(self.buffer) > FRAME_LIMIT:
                raise AssertionError("no match in 1 MiB of stream data")
            chunk = self.tls.recv(65536) if self.tls is not None else self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"stream closed while waiting for {pattern!r}; got {self.buffer[-300:]!r}")
            self.buffer += chunk

    def header(self):
        self.send(f"<?xml version='1.0'?><stream:stream to='{self.domain}' version='1.0' xml:lang='en' "
                  "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        return self.read_until(r"<(?:stream:)?features.*?</(?:stream:)?features>").group(0)

    def starttls(self):
        self.header()
        self.send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self.read_until(r"<proceed[^>]*/>")
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if self.max_tls12:
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
        self.tls = SSL.Connection(context, self.sock)
        self.tls.set_tlsext_host_name(self.domain.encode())
        self.tls.set_connect_state()
        self.tls.do_handshake()
        return self.header()

    # -- channel-binding data, computed by OpenSSL on the client's side ----------------

    def tls_exporter(self):
        # RFC 9266 §2: label EXPORTER-Channel-Binding, empty context, 32 bytes.
        return self.tls.export_keying_material(b"EXPORTER-Channel-Binding", 32, None)

    def tls_server_end_point(self):
        # RFC 5929 §4.1: the certificate's signature hash, SHA-256 for MD5 and SHA-1.
        from cryptography.hazmat.primitives import hashes, serialization
        certificate = self.tls.get_peer_certificate().to_cryptography()
        algorithm = certificate.signature_hash_algorithm
        if algorithm is None or algorithm.name in ("md5", "sha1"):
            algorithm = hashes.SHA256()
        digest = hashes.Hash(algorithm)
        digest.update(certificate.public_bytes(serialization.Encoding.DER))
        return digest.finalize()

    def tls_version(self):
        return self.tls.get_protocol_version_name()

    # -- SCRAM-SHA-256 -----------------------------------------------------------------

    def scram(self, username, password, cb_type=None, cb_data=b""):
        """One SCRAM-SHA-256 exchange; -PLUS with `cb_type`. Returns ("success", verified)
        or ("failure", condition, text)."""
        mechanism = "SCRAM-SHA-256-PLUS" if cb_type else "SCRAM-SHA-256"
        gs2 = f"p={cb_type},," if cb_type else "n,,"
        client_nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n={username},r={client_nonce}"
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>"
                  f"{base64.b64encode((gs2 + first_bare).encode()).decode()}</auth>")
        reply = self.read_until(r"<challenge[^>]*>(.*?)</challenge>|<failure[^>]*>(.*?)</failure>")
        if reply.group(2) is not None:
            return self._failure(reply.group(2))
        server_first = base64.b64decode(reply.group(1)).decode()
        fields = dict(part.split("=", 1) for part in server_first.split(","))
        assert fields["r"].startswith(client_nonce), f"server nonce does not extend ours: {server_first}"
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
        stored_key = hashlib.sha256(client_key).digest()
        channel = base64.b64encode(gs2.encode() + (cb_data if cb_type else b"")).decode()
        final_without_proof = f"c={channel},r={fields['r']}"
        auth_message = f"{first_bare},{server_first},{final_without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.send(f"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                  f"{base64.b64encode((final_without_proof + ',p=' + base64.b64encode(proof).decode()).encode()).decode()}</response>")
        outcome = self.read_until(r"<success[^>]*>(.*?)</success>|<success[^>]*/>|<failure[^>]*>(.*?)</failure>")
        if outcome.group(0).startswith("<failure"):
            return self._failure(outcome.group(2))
        server_final = base64.b64decode(outcome.group(1) or "").decode()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        expected = "v=" + base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest()).decode()
        return ("success", server_final == expected)

    @staticmethod
    def _failure(inner):
        condition = re.search(r"<([a-z-]+)", inner or "")
        text = re.search(r"<text[^>]*>(.*?)</text>", inner or "", re.S)
        return ("failure", condition.group(1) if condition else None, text.group(1) if text else None)


def channel_bindings_offered(features):
    """The XEP-0440 binding types in a features element, in order."""
    block = re.search(r"<sasl-channel-binding[^>]*>(.*?)</sasl-channel-binding>", features, re.S)
    return re.findall(r"type=['\"]([^'\"]+)['\"]", block.group(1)) if block else []
