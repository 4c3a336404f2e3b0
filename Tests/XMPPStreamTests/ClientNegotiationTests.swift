import Testing
import XMPPCore
@testable import XMPPStream

/// The client negotiation state machine on its own: inputs in, actions out, no channel.
@Suite("Client negotiation state machine")
struct ClientNegotiationTests {
    static let secret = [UInt8](repeating: 7, count: 32)

    func machine(requireTLS: Bool = true) -> ClientNegotiation {
        ClientNegotiation(configuration: .init(requireTLS: requireTLS, scramIterations: 4096, serverSecret: Self.secret), makeStreamID: { "sid" })
    }

    func header(to: String? = "example.com", version: String? = "1.0") -> StreamHeader {
        StreamHeader(to: to, version: version, contentNamespace: XMLNamespace.client)
    }

    func features(of action: ClientNegotiation.Action) -> XMLElement? {
        if case .sendHeaderAndFeatures(_, let features) = action { return features }
        return nil
    }

    func streamError(of action: ClientNegotiation.Action) -> StreamError.Condition? {
        if case .closeWithStreamError(let error) = action { return error.condition }
        return nil
    }

    /// A machine that has reached the secured phase, features sent.
    func securedMachine(binding: ChannelBinding? = nil) -> ClientNegotiation {
        var negotiation = machine()
        _ = negotiation.headerReceived(header(), isHosted: true)
        _ = negotiation.elementReceived(XMLElement(name: "starttls", namespace: XMLNamespace.tls))
        negotiation.tlsEstablished(channelBindings: binding.map { [$0] } ?? [])
        _ = negotiation.headerReceived(header(), isHosted: true)
        return negotiation
    }

    @Test("The reply header comes from the domain with a fresh id, and TLS is the only feature")
    func firstHeader() {
        var negotiation = machine()
        let action = negotiation.headerReceived(header(to: "Example.COM"), isHosted: true)
        guard case .sendHeaderAndFeatures(let reply, let features) = action else {
            Issue.record("got \(action)")
            return
        }
        #expect(reply.from == "example.com" && reply.id == "sid" && reply.version == "1.0")
        #expect(features.elements.map(\.name) == ["starttls"])
        #expect(negotiation.domain == "example.com")
    }

    @Test("Header errors: unhosted domain, missing to, old version")
    func headerErrors() {
        var unhosted = machine()
        #expect(streamError(of: unhosted.headerReceived(header(), isHosted: false)) == .hostUnknown)
        var noTo = machine()
        #expect(streamError(of: noTo.headerReceived(header(to: nil), isHosted: true)) == .hostUnknown)
        var old = machine()
        #expect(streamError(of: old.headerReceived(header(version: nil), isHosted: true)) == .unsupportedVersion)
        var older = machine()
        #expect(streamError(of: older.headerReceived(header(version: "0.9"), isHosted: true)) == .unsupportedVersion)
    }

    @Test("Stanzas before negotiation get not-authorized; other elements unsupported-stanza-type")
    func beforeNegotiation() {
        var negotiation = machine()
        _ = negotiation.headerReceived(header(), isHosted: true)
        #expect(streamError(of: negotiation.elementReceived(XMLElement(name: "message", namespace: XMLNamespace.client))) == .notAuthorized)
        var other = machine()
        _ = other.headerReceived(header(), isHosted: true)
        #expect(streamError(of: other.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl))) == .unsupportedStanzaType)
    }

    @Test("STARTTLS, then mechanisms with -PLUS only when binding data exists")
    func starttlsThenMechanisms() {
        var negotiation = machine()
        _ = negotiation.headerReceived(header(), isHosted: true)
        #expect(negotiation.elementReceived(XMLElement(name: "starttls", namespace: XMLNamespace.tls)) == .startTLS(domain: "example.com"))
        negotiation.tlsEstablished(channelBindings: [ChannelBinding(type: "tls-exporter", data: [4, 5, 6]), ChannelBinding(type: "tls-server-end-point", data: [1, 2, 3])])
        let secured = features(of: negotiation.headerReceived(header(), isHosted: true))
        let offered = secured?.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.children(name: "mechanism", namespace: XMLNamespace.sasl).map(\.text)
        #expect(offered == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
        // XEP-0440: every binding type, strongest first.
        let types = secured?.firstChild(name: "sasl-channel-binding", namespace: "urn:xmpp:sasl-cb:0")?
            .children(name: "channel-binding", namespace: "urn:xmpp:sasl-cb:0").compactMap { $0.attribute("type") }
        #expect(types == ["tls-exporter", "tls-server-end-point"])
        // A type not offered (tls-unique, undefined on TLS 1.3) fails with RFC 5802's error in <text/>.
        let clientFirst = Array("p=tls-unique,,n=juliet,r=abcdefgh".utf8)
        let refused = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl,
            attributes: [XMLAttribute("mechanism", "SCRAM-SHA-256-PLUS")], text: Base64.encode(clientFirst)))
        guard case .send(let failure) = refused else { Issue.record("expected a failure, got \(refused)"); return }
        #expect(failure.name == "failure")
        #expect(failure.firstChild(name: "not-authorized", namespace: XMLNamespace.sasl) != nil)
        #expect(failure.firstChild(name: "text", namespace: XMLNamespace.sasl)?.text == "e=unsupported-channel-binding-type")
        let plain = securedMachine()
        #expect(plain.offeredMechanisms(secured: true) == ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
    }

    @Test("XEP-0077: iq-register is offered over TLS only on open domains; the register query (get or set) reaches the server there, anything else before authentication is refused")
    func inBandRegistration() {
        let configuration = ClientNegotiation.Configuration(scramIterations: 4096, serverSecret: Self.secret, registrationOpen: { $0 == "open.example" })
        func secured(_ domain: String) -> (ClientNegotiation, XMLElement?) {
            var negotiation = ClientNegotiation(configuration: configuration, makeStreamID: { "sid" })
            let first = features(of: negotiation.headerReceived(header(to: domain), isHosted: true))
            #expect(first?.firstChild(name: "register", namespace: "http://jabber.org/features/iq-register") == nil, "not before TLS")
            _ = negotiation.elementReceived(XMLElement(name: "starttls", namespace: XMLNamespace.tls))
            negotiation.tlsEstablished(channelBindings: [])
            let secured = features(of: negotiation.headerReceived(header(to: domain), isHosted: true))
            return (negotiation, secured)
        }
        func request(_ type: String, _ payload: XMLElement) -> XMLElement {
            XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", type), XMLAttribute("id", "r1")], children: [.element(payload)])
        }
        let query = XMLElement(name: "query", namespace: "jabber:iq:register")
        var (open, openFeatures) = secured("open.example")
        #expect(openFeatures?.firstChild(name: "register", namespace: "http://jabber.org/features/iq-register") != nil)
        #expect(open.elementReceived(request("get", query)) == .registration(request("get", query)))
        #expect(open.elementReceived(request("set", query)) == .registration(request("set", query)))
        // Another payload is still a stanza before authentication.
        #expect(streamError(of: open.elementReceived(request("get", XMLElement(name: "query", namespace: "jabber:iq:roster")))) == .notAuthorized)
        var (closed, closedFeatures) = secured("closed.example")
        #expect(closedFeatures?.firstChild(name: "register", namespace: "http://jabber.org/features/iq-register") == nil)
        #expect(streamError(of: closed.elementReceived(request("get", query))) == .notAuthorized)
    }

    @Test("A restart must address the same domain")
    func sameDomainAfterRestart() {
        var negotiation = machine()
        _ = negotiation.headerReceived(header(), isHosted: true)
        _ = negotiation.elementReceived(XMLElement(name: "starttls", namespace: XMLNamespace.tls))
        negotiation.tlsEstablished(channelBindings: [])
        #expect(streamError(of: negotiation.headerReceived(header(to: "other.example"), isHosted: true)) == .hostUnknown)
    }

    @Test("SASL failures leave the client free to try again")
    func saslFailures() {
        var negotiation = securedMachine()
        let unknown = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "DIGEST-MD5")]))
        #expect(unknown == .send(XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: "invalid-mechanism", namespace: XMLNamespace.sasl))])))
        let notPlus = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "SCRAM-SHA-256-PLUS")], text: "biws"))
        #expect(notPlus == .send(XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: "invalid-mechanism", namespace: XMLNamespace.sasl))])))
        let badBase64 = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "PLAIN")], text: "not base64!"))
        #expect(badBase64 == .send(XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: "incorrect-encoding", namespace: XMLNamespace.sasl))])))
        // Still accepting a new attempt.
        let plain = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "PLAIN")], text: Base64.encode(Array("\0juliet\0secret".utf8))))
        #expect(plain == .verifyPassword(username: "juliet", password: "secret"))
        #expect(negotiation.passwordChecked(false) == .send(XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: "not-authorized", namespace: XMLNamespace.sasl))])))
    }

    @Test("A full SCRAM-SHA-256 exchange ends in authenticated and a restart")
    func scramExchange() throws {
        var negotiation = securedMachine()
        let keys = try SCRAMKeyDerivation.newKeys(password: "pencil", iterations: 4096, hash: .sha256)
        var client = SCRAMClient(hash: .sha256, username: "juliet", password: "pencil")
        let auth = XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "SCRAM-SHA-256")], text: Base64.encode(try client.clientFirstMessage()))
        #expect(negotiation.elementReceived(auth) == .lookUpSCRAMKeys(username: "juliet", hash: .sha256))
        guard case .send(let challenge) = negotiation.scramKeysReceived(keys), challenge.name == "challenge", let serverFirst = Base64.decode(challenge.text) else {
            Issue.record("no challenge")
            return
        }
        let response = XMLElement(name: "response", namespace: XMLNamespace.sasl, text: Base64.encode(try client.serverFirstReceived(serverFirst)))
        guard case .authenticated(let username, let success) = negotiation.elementReceived(response) else {
            Issue.record("not authenticated")
            return
        }
        #expect(username == "juliet")
        try client.serverFinalReceived(Base64.decode(success.text) ?? [])
        #expect(client.isServerAuthenticated)
        #expect(negotiation.username == "juliet")
        // The restarted stream offers binding and stream management.
        let offered = features(of: negotiation.headerReceived(header(), isHosted: true))?.elements.map(\.name)
        #expect(offered == ["bind", "session", "ver", "sm", "csi"])
    }

    @Test("An authorization identity other than the account is refused")
    func foreignAuthzid() {
        var negotiation = securedMachine()
        let plain = XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "PLAIN")], text: Base64.encode(Array("romeo@example.com\0juliet\0secret".utf8)))
        #expect(negotiation.elementReceived(plain) == .verifyPassword(username: "juliet", password: "secret"))
        #expect(negotiation.passwordChecked(true) == .send(XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: "invalid-authzid", namespace: XMLNamespace.sasl))])))
    }

    @Test("Before binding only the bind IQ is accepted; then stanzas are delivered")
    func binding() throws {
        var negotiation = securedMachine()
        _ = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "PLAIN")], text: Base64.encode(Array("\0juliet\0secret".utf8))))
        guard case .authenticated = negotiation.passwordChecked(true) else {
            Issue.record("not authenticated")
            return
        }
        _ = negotiation.headerReceived(header(), isHosted: true)
        let roster = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "get"), XMLAttribute("id", "r1")], children: [.element(XMLElement(name: "query", namespace: "jabber:iq:roster"))])
        guard case .send(let refused) = negotiation.elementReceived(roster) else {
            Issue.record("roster before bind not refused")
            return
        }
        #expect(refused.attribute("type") == "error" && refused.attribute("id") == "r1")
        #expect(streamError(of: negotiation.elementReceived(XMLElement(name: "message", namespace: XMLNamespace.client))) == .notAuthorized)
    }

    @Test("Bind, then delivery")
    func bindThenDeliver() throws {
        var negotiation = securedMachine()
        _ = negotiation.elementReceived(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "PLAIN")], text: Base64.encode(Array("\0juliet\0secret".utf8))))
        _ = negotiation.passwordChecked(true)
        _ = negotiation.headerReceived(header(), isHosted: true)
        let bind = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "set"), XMLAttribute("id", "b")], children: [
            .element(XMLElement(name: "bind", namespace: XMLNamespace.bind, children: [.element(XMLElement(name: "resource", namespace: XMLNamespace.bind, text: "balcony"))])),
        ])
        #expect(negotiation.elementReceived(bind) == .bind(requestedResource: "balcony", iqID: "b"))
        let jid = try JID("juliet@example.com/balcony")
        let actions = negotiation.bindSucceeded(jid, iqID: "b")
        #expect(actions.count == 2)
        #expect(actions.last == .established(jid))
        let message = XMLElement(name: "message", namespace: XMLNamespace.client)
        #expect(negotiation.elementReceived(message) == .deliver(message))
    }
}
