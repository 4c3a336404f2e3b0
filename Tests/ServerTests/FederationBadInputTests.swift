import Foundation
import Testing
import Trust
import XMPPCore
import XMPPStream
@testable import Federation
@testable import Server

/// Bad input on server-to-server links, from a scripted peer: each case gets its exact RFC
/// or XEP answer, and the genuine link between the two providers keeps working.
@Suite("Federation: bad input from peers", .serialized)
struct FederationBadInputTests {
    /// Connects to A's s2s port as `claimed`, does STARTTLS presenting `certificate`, and
    /// returns the client and the features after TLS.
    func openPeer(to server: TestServer, claiming claimed: String, certificate: PEMCredentials?) async throws -> (TestClient, XMLElement) {
        let port = try #require(server.server.federationPorts["s2s_starttls"])
        let peer = try await TestClient.connect(port: port, group: server.group, contentNamespace: XMLNamespace.server, clientCertificate: certificate)
        try await peer.sendServerHeader(to: "a.example", from: claimed)
        let first = try await peer.nextElement()
        #expect(first.firstChild(name: "starttls", namespace: XMLNamespace.tls)?.firstChild(name: "required", namespace: XMLNamespace.tls) != nil)
        try await peer.startTLS()
        try await peer.sendServerHeader(to: "a.example", from: claimed)
        return (peer, try await peer.nextElement())
    }

    /// Authenticates the peer as `b.example` with SASL EXTERNAL (a CA certificate for it).
    func authenticatedPeer(_ pair: FederatedPair) async throws -> TestClient {
        let certificate = try pair.ca.issueXMPPServerCertificate(domains: ["b.example"])
        let (peer, features) = try await openPeer(to: pair.a, claiming: "b.example", certificate: certificate)
        let mechanisms = features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.children(name: "mechanism", namespace: XMLNamespace.sasl).map(\.text)
        #expect(mechanisms == ["EXTERNAL"])
        try await peer.send(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "EXTERNAL")], text: Base64.encode(Array("b.example".utf8))))
        _ = try await peer.waitFor { $0.name == "success" }
        try await peer.sendServerHeader(to: "a.example", from: "b.example")
        _ = try await peer.nextElement()
        return peer
    }

    func message(from: String, to: String, body: String) -> XMLElement {
        XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("from", from), XMLAttribute("to", to), XMLAttribute("type", "chat")], children: [
            .element(XMLElement(name: "body", namespace: XMLNamespace.server, text: body)),
        ])
    }

    /// The genuine link still carries messages.
    func expectGenuineLinkWorks(_ pair: FederatedPair, _ alice: TestClient, _ bob: TestClient, _ text: String) async throws {
        try await bob.sendMessage(to: "alice@a.example/test", body: text)
        let received = try await alice.waitFor(timeout: .seconds(10)) { $0.name == "message" && $0.body == text }
        #expect(received.attribute("from") == "bob@b.example/test")
    }

    func withGenuineClients(_ body: (FederatedPair, TestClient, TestClient) async throws -> Void,
                            configureA: @escaping (inout BraidConfiguration) -> Void = { _ in }) async throws {
        try await withFederation(configureA: configureA) { pair in
            let (alice, _) = try await pair.a.loggedIn("alice@a.example")
            let (bob, _) = try await pair.b.loggedIn("bob@b.example")
            try await alice.sendPresence()
            try await bob.sendPresence()
            try await expectGenuineLinkWorks(pair, alice, bob, "before")
            try await body(pair, alice, bob)
            await alice.close()
            await bob.close()
        }
    }

    @Test("A stanza before authentication gets not-authorized and is not delivered")
    func stanzaBeforeAuthentication() async throws {
        try await withGenuineClients { pair, alice, bob in
            let (peer, _) = try await openPeer(to: pair.a, claiming: "b.example", certificate: nil)
            try await peer.send(message(from: "bob@b.example/x", to: "alice@a.example/test", body: "sneaky"))
            #expect(try await peer.streamErrorCondition() == .notAuthorized)
            #expect(await alice.expectSilence().map { $0.body == "sneaky" } != true)
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }

    @Test("Bad bytes where the peer's restarted header should be get an error inside a new stream header (RFC 6120 §4.9.1.1)")
    func errorOpensTheRestartedStream() async throws {
        try await withFederation { pair in
            let port = try #require(pair.a.server.federationPorts["s2s_starttls"])
            let peer = try await TestClient.connect(port: port, group: pair.a.group, contentNamespace: XMLNamespace.server, clientCertificate: nil)
            try await peer.sendServerHeader(to: "a.example", from: "b.example")
            _ = try await peer.nextElement()
            try await peer.startTLS()
            try await peer.sendRaw("<<")
            guard case .stream(.streamStart) = try await peer.next() else { Issue.record("no stream header before the error"); return }
            #expect(try await peer.streamErrorCondition() == .notWellFormed)
        }
    }

    @Test("What a peer pipelines after its secured header waits for the header's certificate check, then is handled in order")
    func pipelinedAfterHeader() async throws {
        try await withFederation { pair in
            let certificate = try pair.ca.issueXMPPServerCertificate(domains: ["b.example"])
            let port = try #require(pair.a.server.federationPorts["s2s_starttls"])
            let peer = try await TestClient.connect(port: port, group: pair.a.group, contentNamespace: XMLNamespace.server, clientCertificate: certificate)
            try await peer.sendServerHeader(to: "a.example", from: "b.example")
            _ = try await peer.nextElement()
            try await peer.startTLS()
            // The header, then at once (before A's features) the EXTERNAL request: A checks the
            // certificate for the header asynchronously, and the request must wait for it.
            try await peer.sendServerHeader(to: "a.example", from: "b.example")
            try await peer.send(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "EXTERNAL")], text: "="))
            let features = try await peer.waitFor { $0.name == "features" }
            #expect(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.firstElement?.text == "EXTERNAL")
            let outcome = try await peer.waitFor { $0.name == "success" || $0.name == "failure" }
            #expect(outcome.name == "success")
            await peer.close()
        }
    }

    @Test("A spoofed 'from' domain gets invalid-from")
    func spoofedFrom() async throws {
        try await withGenuineClients { pair, alice, bob in
            let peer = try await authenticatedPeer(pair)
            try await peer.send(message(from: "mallory@c.example/x", to: "alice@a.example/test", body: "spoofed"))
            #expect(try await peer.streamErrorCondition() == .invalidFrom)
            #expect(await alice.expectSilence().map { $0.body == "spoofed" } != true)
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }

    @Test("A 'to' that is not hosted gets host-unknown")
    func unhostedTo() async throws {
        try await withGenuineClients { pair, alice, bob in
            let peer = try await authenticatedPeer(pair)
            try await peer.send(message(from: "bob@b.example/x", to: "someone@elsewhere.example", body: "lost"))
            #expect(try await peer.streamErrorCondition() == .hostUnknown)
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }

    @Test("A stanza without addresses gets improper-addressing")
    func missingAddresses() async throws {
        try await withGenuineClients { pair, alice, bob in
            let peer = try await authenticatedPeer(pair)
            try await peer.send(XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("to", "alice@a.example")]))
            #expect(try await peer.streamErrorCondition() == .improperAddressing)
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }

    @Test("db:result for a domain not hosted gets an item-not-found dialback error; the stream stays")
    func dialbackForUnhostedDomain() async throws {
        try await withGenuineClients { pair, alice, bob in
            let peer = try await authenticatedPeer(pair)
            try await peer.send(DialbackElement(kind: .result, from: "b.example", to: "elsewhere.example", key: "00").element)
            let answer = try await peer.waitFor { $0.name == "result" && $0.namespace == XMLNamespace.dialback }
            let parsed = try #require(DialbackElement(answer))
            #expect(parsed.outcome == .error)
            #expect(parsed.error?.condition == .itemNotFound)
            #expect(parsed.from == "elsewhere.example" && parsed.to == "b.example")
            // The stream is kept: the pair authenticated before still delivers.
            try await peer.send(message(from: "bob@b.example/peer", to: "alice@a.example/test", body: "still here"))
            let delivered = try await alice.waitFor(timeout: .seconds(5)) { $0.body == "still here" }
            #expect(delivered.attribute("from") == "bob@b.example/peer")
            await peer.close()
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }

    @Test("A forged dialback key is refused by the authoritative server: invalid, and the stream closes")
    func forgedDialbackKey() async throws {
        try await withGenuineClients { pair, alice, bob in
            let (peer, features) = try await openPeer(to: pair.a, claiming: "b.example", certificate: nil)
            #expect(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl) == nil)
            #expect(features.firstChild(name: "dialback", namespace: XMLNamespace.dialbackFeature)?.firstChild(name: "errors", namespace: XMLNamespace.dialbackFeature) != nil)
            try await peer.send(DialbackElement(kind: .result, from: "b.example", to: "a.example", key: String(repeating: "ab", count: 32)).element)
            let answer = try await peer.waitFor(timeout: .seconds(10)) { $0.name == "result" && $0.namespace == XMLNamespace.dialback }
            #expect(DialbackElement(answer)?.outcome == .invalid)
            #expect(try await peer.streamErrorCondition() == nil)
            #expect(pair.a.metrics.counterValue("braid_s2s_dialback_refused_total", [("condition", "invalid")]) == 1)
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }

    @Test("A certificate for another domain does not authenticate the claimed one")
    func certificateForAnotherDomain() async throws {
        try await withGenuineClients({ pair, alice, bob in
            let certificate = try pair.ca.issueXMPPServerCertificate(domains: ["other.example"])
            let (peer, features) = try await openPeer(to: pair.a, claiming: "b.example", certificate: certificate)
            // RFC 6120 §6.3.4: EXTERNAL is offered only when the certificate names the 'from'.
            #expect(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl) == nil)
            try await peer.send(DialbackElement(kind: .result, from: "b.example", to: "a.example", key: "00").element)
            let answer = try await peer.waitFor(timeout: .seconds(10)) { $0.name == "result" && $0.namespace == XMLNamespace.dialback }
            let parsed = try #require(DialbackElement(answer))
            #expect(parsed.outcome == .error && parsed.error?.condition == .notAuthorized)
            await peer.close()
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }, configureA: { $0.s2s.peers["b.example"]?.requireCertificates = true })
    }

    @Test("An expired certificate does not authenticate")
    func expiredCertificate() async throws {
        try await withGenuineClients({ pair, alice, bob in
            let certificate = try pair.ca.issueXMPPServerCertificate(domains: ["b.example"], notValidBefore: Date() - 86_400 * 10, notValidAfter: Date() - 86_400)
            let (peer, features) = try await openPeer(to: pair.a, claiming: "b.example", certificate: certificate)
            #expect(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl) == nil)
            try await peer.send(DialbackElement(kind: .result, from: "b.example", to: "a.example", key: "00").element)
            let answer = try await peer.waitFor(timeout: .seconds(10)) { $0.name == "result" && $0.namespace == XMLNamespace.dialback }
            #expect(DialbackElement(answer)?.error?.condition == .notAuthorized)
            await peer.close()
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }, configureA: { $0.s2s.peers["b.example"]?.requireCertificates = true })
    }

    @Test("A serverAuth-only client certificate is accepted for SASL EXTERNAL")
    func serverAuthOnlyCertificate() async throws {
        try await withGenuineClients { pair, alice, bob in
            let certificate = try pair.ca.issueXMPPServerCertificate(domains: ["b.example"], extendedKeyUsages: .serverAuthOnly)
            let (peer, features) = try await openPeer(to: pair.a, claiming: "b.example", certificate: certificate)
            #expect(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.firstElement?.text == "EXTERNAL")
            await peer.close()
            try await expectGenuineLinkWorks(pair, alice, bob, "after")
        }
    }
}
