import Synchronization
import Testing
import XMPPCore
@testable import XMPPStream

/// The receiving side of a server-to-server stream on its own: headers and elements in,
/// actions out, no channel. Each stage is reached by feeding the machine the real events.
@Suite("Incoming s2s negotiation state machine")
struct IncomingServerNegotiationTests {
    typealias Negotiation = IncomingServerNegotiation

    static let local = "example.net"
    static let peer = "peer.example"

    /// Where the machine is, comparable (the machine's own `State` is not `Equatable`).
    enum Where: Equatable, Sendable {
        case header(Negotiation.Phase), open(Negotiation.Phase), tls, closed
    }

    /// The stages a stream goes through, in order; `reach(_:)` brings a machine to each.
    enum Stage: String, CaseIterable, Sendable {
        case fresh, openPlaintext, negotiatingTLS, securedHeader, openSecured, restartHeader, openAuthenticated, closed

        var expected: Where {
            switch self {
            case .fresh: .header(.plaintext)
            case .openPlaintext: .open(.plaintext)
            case .negotiatingTLS: .tls
            case .securedHeader: .header(.secured)
            case .openSecured: .open(.secured)
            case .restartHeader: .header(.authenticated)
            case .openAuthenticated: .open(.authenticated)
            case .closed: .closed
            }
        }
    }

    /// Stream ids "id-1", "id-2", ... so a test can tell which header a key is bound to.
    final class StreamIDs: Sendable {
        private let count = Atomic<Int>(0)
        func next() -> String { "id-\(count.add(1, ordering: .relaxed).newValue)" }
    }

    static let everything = Negotiation.Configuration(requireTLS: true, offerBidi: true, offerStreamManagement: true)

    func machine(_ configuration: Negotiation.Configuration = IncomingServerNegotiationTests.everything) -> Negotiation {
        let ids = StreamIDs()
        return Negotiation(configuration: configuration, makeStreamID: { ids.next() })
    }

    func header(to: String? = local, from: String? = peer, version: String? = "1.0") -> StreamHeader {
        StreamHeader(to: to, from: from, version: version, contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback])
    }

    /// A machine brought to `stage` by the events that lead there: header, STARTTLS, TLS,
    /// header, SASL EXTERNAL, header. Stream ids: id-1 (plaintext), id-2 (secured), id-3.
    func reach(_ stage: Stage, _ configuration: Negotiation.Configuration = IncomingServerNegotiationTests.everything, externalAvailable: Bool = true) -> Negotiation {
        var negotiation = machine(configuration)
        defer { #expect(where_(negotiation) == stage.expected, "could not reach \(stage)") }
        if stage == .fresh { return negotiation }
        _ = negotiation.headerReceived(header(), isHosted: true, externalAvailable: false)
        if stage == .openPlaintext { return negotiation }
        if stage == .closed {
            _ = negotiation.streamEnded()
            return negotiation
        }
        _ = negotiation.elementReceived(Input.starttls.element)
        if stage == .negotiatingTLS { return negotiation }
        negotiation.tlsEstablished()
        if stage == .securedHeader { return negotiation }
        _ = negotiation.headerReceived(header(), isHosted: true, externalAvailable: externalAvailable)
        if stage == .openSecured { return negotiation }
        _ = negotiation.elementReceived(Input.authExternal.element)
        if stage == .restartHeader { return negotiation }
        _ = negotiation.headerReceived(header(), isHosted: true, externalAvailable: false)
        return negotiation
    }

    func where_(_ negotiation: Negotiation) -> Where {
        switch negotiation.state {
        case .awaitingHeader(let phase): .header(phase)
        case .open(let phase): .open(phase)
        case .negotiatingTLS: .tls
        case .closed: .closed
        }
    }

    // MARK: Inputs

    /// One element of each kind the peer may send.
    enum Input: String, CaseIterable, Sendable {
        case starttls, authExternal, dbResult, dbVerify, dbAnswer, bidi, message, unknown, smEnable

        var element: XMLElement {
            let local = IncomingServerNegotiationTests.local, peer = IncomingServerNegotiationTests.peer
            return switch self {
            case .starttls:
                XMLElement(name: "starttls", namespace: XMLNamespace.tls)
            case .authExternal:
                XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "EXTERNAL")], text: "=")
            case .dbResult:
                XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", peer), XMLAttribute("to", local)], text: "k3y")
            case .dbVerify:
                XMLElement(name: "verify", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", peer), XMLAttribute("to", local), XMLAttribute("id", "their-id")], text: "k3y")
            case .dbAnswer:
                XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", peer), XMLAttribute("to", local), XMLAttribute("type", "valid")])
            case .bidi:
                XMLElement(name: "bidi", namespace: XMLNamespace.bidi)
            case .message:
                XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("from", "romeo@\(peer)"), XMLAttribute("to", "juliet@\(local)")])
            case .unknown:
                XMLElement(name: "frobnicate", namespace: "urn:example:unknown")
            case .smEnable:
                XMLElement(name: "enable", namespace: XMLNamespace.streamManagement)
            }
        }
    }

    /// What an input should produce.
    enum Expect: Sendable {
        case exactly(Negotiation.Action)
        case streamError(StreamError.Condition)
        /// A SASL `<failure/>` with this condition (RFC 6120 §6.5).
        case saslFailure(String)
        /// A dialback answer of `type='error'` with this stanza-error condition (XEP-0220 §2.5).
        case dialbackError(StanzaError.Condition)
    }

    struct Row: Sendable, CustomTestStringConvertible {
        var input: Input
        var expect: Expect
        var after: Where
        init(_ input: Input, _ expect: Expect, _ after: Where) {
            self.input = input
            self.expect = expect
            self.after = after
        }
        var testDescription: String { "<\(input.element.name)/> → \(expect), then \(after)" }
    }

    static func saslFailure(_ condition: String) -> XMLElement {
        XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: condition, namespace: XMLNamespace.sasl))])
    }

    func check(_ action: Negotiation.Action, _ expect: Expect, input: XMLElement) {
        switch expect {
        case .exactly(let expected):
            #expect(action == expected)
        case .streamError(let condition):
            guard case .closeWithStreamError(let error) = action else {
                Issue.record("expected a <\(condition.rawValue)/> stream error, got \(action)")
                return
            }
            #expect(error.condition == condition)
        case .saslFailure(let condition):
            #expect(action == .send(Self.saslFailure(condition)))
        case .dialbackError(let condition):
            guard case .send(let answer) = action, let parsed = DialbackElement(answer) else {
                Issue.record("expected a dialback error, got \(action)")
                return
            }
            // §2.2: the answer swaps the addresses and keeps the kind and the id.
            #expect(answer.name == input.name && answer.namespace == XMLNamespace.dialback)
            #expect(parsed.from == input.attribute("to") && parsed.to == input.attribute("from"))
            #expect(parsed.id == input.attribute("id"))
            #expect(parsed.outcome == .error && parsed.key == nil)
            #expect(parsed.error?.condition == condition)
        }
    }

    func run(_ row: Row, at stage: Stage, _ configuration: Negotiation.Configuration = IncomingServerNegotiationTests.everything) {
        var negotiation = reach(stage, configuration)
        check(negotiation.elementReceived(row.input.element), row.expect, input: row.input.element)
        #expect(where_(negotiation) == row.after)
    }

    // MARK: Headers

    @Test("The first header is answered from the addressed domain, with a fresh id and the db prefix declared")
    func firstHeader() {
        var negotiation = machine()
        let action = negotiation.headerReceived(header(to: "EXAMPLE.net", from: "Peer.Example"), isHosted: true, externalAvailable: false)
        guard case .sendHeaderAndFeatures(let reply, _) = action else {
            Issue.record("got \(action)")
            return
        }
        #expect(reply == StreamHeader(to: Self.peer, from: Self.local, id: "id-1", version: "1.0", language: "en",
                                      contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback]))
        #expect(negotiation.localDomain == Self.local && negotiation.claimedPeer == Self.peer && negotiation.streamID == "id-1")
        #expect(where_(negotiation) == .open(.plaintext))
    }

    struct PlaintextFeatures: Sendable, CustomTestStringConvertible {
        var configuration: Negotiation.Configuration
        var expected: XMLElement
        var testDescription: String { "requireTLS \(configuration.requireTLS), bidi \(configuration.offerBidi), sm \(configuration.offerStreamManagement)" }
    }

    static let starttlsRequired = XMLElement(name: "starttls", namespace: XMLNamespace.tls, children: [.element(XMLElement(name: "required", namespace: XMLNamespace.tls))])
    static let dialbackWithErrors = XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature, children: [
        .element(XMLElement(name: "errors", namespace: XMLNamespace.dialbackFeature)),
    ])

    static func features(_ children: [XMLElement]) -> XMLElement {
        XMLElement(name: "features", namespace: XMLNamespace.streams, children: children.map { .element($0) })
    }

    /// RFC 7590 §3: with TLS mandatory only `<starttls><required/>` is offered; bidi and
    /// stream management are never offered in the clear.
    @Test("Features before TLS", arguments: [
        PlaintextFeatures(configuration: everything, expected: features([starttlsRequired])),
        PlaintextFeatures(configuration: .init(requireTLS: false, offerBidi: true, offerStreamManagement: true),
                          expected: features([XMLElement(name: "starttls", namespace: XMLNamespace.tls), dialbackWithErrors])),
    ])
    func plaintextFeatures(_ row: PlaintextFeatures) {
        var negotiation = machine(row.configuration)
        #expect(negotiation.headerReceived(header(), isHosted: true, externalAvailable: true)
            == .sendHeaderAndFeatures(StreamHeader(to: Self.peer, from: Self.local, id: "id-1", contentNamespace: XMLNamespace.server,
                                                   prefixes: ["db": XMLNamespace.dialback]), features: row.expected))
    }

    struct SecuredFeatures: Sendable, CustomTestStringConvertible {
        var externalAvailable: Bool
        var configuration: Negotiation.Configuration
        var expected: [String]
        var testDescription: String { "external \(externalAvailable), bidi \(configuration.offerBidi), sm \(configuration.offerStreamManagement) → \(expected)" }
    }

    /// XEP-0178 §3 / RFC 6120 §6.3.4: EXTERNAL only when the certificate names the header's
    /// `from`; XEP-0220 §2.4.2 dialback with errors always; XEP-0288 bidi and its requests.
    @Test("Features after TLS", arguments: [
        SecuredFeatures(externalAvailable: true, configuration: everything,
                        expected: ["mechanisms \(XMLNamespace.sasl)", "dialback \(XMLNamespace.dialbackFeature)", "bidi \(XMLNamespace.bidiFeature)",
                                   "requests \(XMLNamespace.bidiRequestsFeature)", "sm \(XMLNamespace.streamManagement)"]),
        SecuredFeatures(externalAvailable: false, configuration: everything,
                        expected: ["dialback \(XMLNamespace.dialbackFeature)", "bidi \(XMLNamespace.bidiFeature)",
                                   "requests \(XMLNamespace.bidiRequestsFeature)", "sm \(XMLNamespace.streamManagement)"]),
        SecuredFeatures(externalAvailable: true, configuration: .init(),
                        expected: ["mechanisms \(XMLNamespace.sasl)", "dialback \(XMLNamespace.dialbackFeature)"]),
        SecuredFeatures(externalAvailable: false, configuration: .init(), expected: ["dialback \(XMLNamespace.dialbackFeature)"]),
    ])
    func securedFeatures(_ row: SecuredFeatures) throws {
        var negotiation = reach(.securedHeader, row.configuration)
        let action = negotiation.headerReceived(header(), isHosted: true, externalAvailable: row.externalAvailable)
        guard case .sendHeaderAndFeatures(let reply, let features) = action else {
            Issue.record("got \(action)")
            return
        }
        #expect(reply.id == "id-2" && reply.from == Self.local && reply.to == Self.peer)
        #expect(features.name == "features" && features.namespace == XMLNamespace.streams)
        #expect(features.elements.map { "\($0.name) \($0.namespace)" } == row.expected)
        #expect(features.firstChild(name: "dialback", namespace: XMLNamespace.dialbackFeature) == Self.dialbackWithErrors)
        if row.externalAvailable {
            let mechanisms = try #require(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl))
            #expect(mechanisms.children(name: "mechanism", namespace: XMLNamespace.sasl).map(\.text) == ["EXTERNAL"])
        }
        #expect(where_(negotiation) == .open(.secured))
    }

    @Test("After SASL EXTERNAL the restarted stream offers dialback (further pairs), bidi and acknowledgements, no SASL")
    func authenticatedFeatures() {
        var negotiation = reach(.restartHeader)
        #expect(negotiation.headerReceived(header(), isHosted: true, externalAvailable: true)
            == .sendHeaderAndFeatures(StreamHeader(to: Self.peer, from: Self.local, id: "id-3", contentNamespace: XMLNamespace.server,
                                                   prefixes: ["db": XMLNamespace.dialback]),
                                      features: Self.features([Self.dialbackWithErrors, XMLElement(name: "bidi", namespace: XMLNamespace.bidiFeature),
                                                               XMLElement(name: "requests", namespace: XMLNamespace.bidiRequestsFeature),
                                                               XMLElement(name: "sm", namespace: XMLNamespace.streamManagement)])))
        var plain = reach(.restartHeader, .init())
        #expect(plain.headerReceived(header(), isHosted: true, externalAvailable: true)
            == .sendHeaderAndFeatures(StreamHeader(to: Self.peer, from: Self.local, id: "id-3", contentNamespace: XMLNamespace.server,
                                                   prefixes: ["db": XMLNamespace.dialback]), features: Self.features([Self.dialbackWithErrors])))
    }

    struct BadHeader: Sendable, CustomTestStringConvertible {
        var name: String
        var header: StreamHeader
        var isHosted: Bool
        var condition: StreamError.Condition
        var testDescription: String { name }
    }

    /// RFC 6120 §4.7.5: a missing or pre-1.0 version cannot do TLS; §4.9.3.6: a `to` we do
    /// not serve is host-unknown. A first header without `to` leaves nothing to answer from.
    @Test("First header errors close the stream", arguments: [
        BadHeader(name: "no version", header: StreamHeader(to: local, from: peer, version: nil, contentNamespace: XMLNamespace.server), isHosted: true, condition: .unsupportedVersion),
        BadHeader(name: "version 0.9", header: StreamHeader(to: local, from: peer, version: "0.9", contentNamespace: XMLNamespace.server), isHosted: true, condition: .unsupportedVersion),
        BadHeader(name: "version not major.minor", header: StreamHeader(to: local, from: peer, version: "1", contentNamespace: XMLNamespace.server), isHosted: true, condition: .unsupportedVersion),
        BadHeader(name: "to not hosted", header: StreamHeader(to: "elsewhere.example", from: peer, contentNamespace: XMLNamespace.server), isHosted: false, condition: .hostUnknown),
        BadHeader(name: "to not a domain", header: StreamHeader(to: "user@\(local)", from: peer, contentNamespace: XMLNamespace.server), isHosted: true, condition: .hostUnknown),
        BadHeader(name: "no to on the first header", header: StreamHeader(to: nil, from: peer, contentNamespace: XMLNamespace.server), isHosted: true, condition: .hostUnknown),
    ])
    func firstHeaderErrors(_ row: BadHeader) {
        var negotiation = machine()
        check(negotiation.headerReceived(row.header, isHosted: row.isHosted, externalAvailable: true), .streamError(row.condition), input: Input.starttls.element)
        #expect(where_(negotiation) == .closed)
        #expect(negotiation.streamID == nil)
    }

    @Test("A higher minor or major version is answered with 1.0 (RFC 6120 §4.7.5)", arguments: ["1.1", "2.0"])
    func higherVersion(_ version: String) {
        var negotiation = machine()
        guard case .sendHeaderAndFeatures(let reply, _) = negotiation.headerReceived(header(version: version), isHosted: true, externalAvailable: false) else {
            Issue.record("header with version \(version) refused")
            return
        }
        #expect(reply.version == "1.0")
    }

    struct Restart: Sendable, CustomTestStringConvertible {
        var stage: Stage
        var to: String?
        var isHosted: Bool
        /// nil: accepted.
        var condition: StreamError.Condition?
        var testDescription: String { "\(stage), to \(to ?? "absent"), hosted \(isHosted) → \(condition?.rawValue ?? "accepted")" }
    }

    /// RFC 6120 §5.4.3.3 and §6.4.6: after TLS and after SASL the new header must address the
    /// same domain; RFC 3920 peers may leave `to` out of a restart header (RFC 6120 §4.7.2).
    @Test("Restart headers must address the same domain", arguments: [Stage.securedHeader, .restartHeader].flatMap { stage in [
        Restart(stage: stage, to: "other.example", isHosted: true, condition: .hostUnknown),
        Restart(stage: stage, to: "other.example", isHosted: false, condition: .hostUnknown),
        Restart(stage: stage, to: local, isHosted: false, condition: .hostUnknown),
        Restart(stage: stage, to: "EXAMPLE.NET", isHosted: true, condition: nil),
        Restart(stage: stage, to: nil, isHosted: false, condition: nil),
    ] })
    func restartHeader(_ row: Restart) {
        var negotiation = reach(row.stage)
        let action = negotiation.headerReceived(header(to: row.to), isHosted: row.isHosted, externalAvailable: true)
        if let condition = row.condition {
            check(action, .streamError(condition), input: Input.starttls.element)
            #expect(where_(negotiation) == .closed)
        } else {
            guard case .sendHeaderAndFeatures(let reply, _) = action else {
                Issue.record("restart refused: \(action)")
                return
            }
            #expect(reply.from == Self.local)
            #expect(negotiation.localDomain == Self.local)
            #expect(where_(negotiation) == .open(row.stage == .securedHeader ? .secured : .authenticated))
        }
    }

    @Test("A second header on an open stream or during TLS is not well-formed", arguments: [Stage.openPlaintext, .negotiatingTLS, .openSecured, .openAuthenticated])
    func headerWhenNotExpected(_ stage: Stage) {
        var negotiation = reach(stage)
        check(negotiation.headerReceived(header(), isHosted: true, externalAvailable: true), .streamError(.notWellFormed), input: Input.starttls.element)
        #expect(where_(negotiation) == .closed)
    }

    @Test("A header whose 'from' is not a domain: the reply has no 'to', EXTERNAL is refused, dialback still works")
    func unusableFrom() {
        var negotiation = reach(.securedHeader)
        guard case .sendHeaderAndFeatures(let reply, _) = negotiation.headerReceived(header(from: "romeo@\(Self.peer)"), isHosted: true, externalAvailable: true) else {
            Issue.record("header refused")
            return
        }
        #expect(reply.to == nil && negotiation.claimedPeer == nil)
        // There is no claimed domain for the certificate to prove.
        #expect(negotiation.elementReceived(Input.authExternal.element) == .send(Self.saslFailure("invalid-mechanism")))
        #expect(negotiation.elementReceived(Input.dbResult.element)
            == .authorizeDialback(DialbackElement(kind: .result, from: Self.peer, to: Self.local, key: "k3y"), streamID: "id-2"))
    }

    // MARK: Elements in each stage

    /// RFC 6120 §4.9.3.12: data before the stream is open is not-authorized; cleartext that
    /// follows `<starttls/>` is refused (§5.4.3.3).
    @Test("Before a header and during TLS every element closes the stream with not-authorized",
          arguments: [Stage.fresh, .negotiatingTLS, .securedHeader, .restartHeader], Input.allCases)
    func elementBeforeHeader(_ stage: Stage, _ input: Input) {
        var negotiation = reach(stage)
        check(negotiation.elementReceived(input.element), .streamError(.notAuthorized), input: input.element)
        #expect(where_(negotiation) == .closed)
    }

    @Test("After the stream closed, elements are ignored", arguments: Input.allCases)
    func elementAfterClose(_ input: Input) {
        var negotiation = reach(.closed)
        #expect(negotiation.elementReceived(input.element) == .none)
        #expect(where_(negotiation) == .closed)
    }

    /// RFC 7590 §3 with TLS mandatory. XEP-0220 §2.5: dialback is refused with a dialback
    /// error (the stream stays, so the peer may still do STARTTLS); RFC 6120 §4.9.3.12: a
    /// stanza or any other element before the mandatory TLS is a not-authorized stream error.
    @Test("Plaintext stream, TLS required", arguments: [
        Row(.starttls, .exactly(.startTLS(domain: local)), .tls),
        Row(.authExternal, .saslFailure("invalid-mechanism"), .open(.plaintext)),
        Row(.dbResult, .dialbackError(.policyViolation), .open(.plaintext)),
        Row(.dbVerify, .dialbackError(.policyViolation), .open(.plaintext)),
        Row(.dbAnswer, .dialbackError(.policyViolation), .open(.plaintext)),
        // Not advertised before TLS, yet accepted: it only matters once a pair is authenticated.
        Row(.bidi, .exactly(.bidiRequested), .open(.plaintext)),
        Row(.message, .streamError(.notAuthorized), .closed),
        Row(.unknown, .streamError(.notAuthorized), .closed),
        Row(.smEnable, .streamError(.notAuthorized), .closed),
    ])
    func plaintextRequired(_ row: Row) {
        run(row, at: .openPlaintext)
    }

    @Test("Plaintext stream, TLS optional, bidi not offered", arguments: [
        Row(.starttls, .exactly(.startTLS(domain: local)), .tls),
        Row(.authExternal, .saslFailure("invalid-mechanism"), .open(.plaintext)),
        Row(.dbResult, .exactly(.authorizeDialback(DialbackElement(kind: .result, from: peer, to: local, key: "k3y"), streamID: "id-1")), .open(.plaintext)),
        Row(.dbVerify, .exactly(.answerVerify(DialbackElement(kind: .verify, from: peer, to: local, id: "their-id", key: "k3y"))), .open(.plaintext)),
        Row(.dbAnswer, .exactly(.none), .open(.plaintext)),
        Row(.bidi, .streamError(.unsupportedStanzaType), .closed),
        Row(.message, .exactly(.deliver(Input.message.element)), .open(.plaintext)),
        Row(.unknown, .exactly(.deliver(Input.unknown.element)), .open(.plaintext)),
        Row(.smEnable, .exactly(.deliver(Input.smEnable.element)), .open(.plaintext)),
    ])
    func plaintextOptional(_ row: Row) {
        run(row, at: .openPlaintext, .init(requireTLS: false, offerBidi: false, offerStreamManagement: false))
    }

    /// A second STARTTLS is a policy violation (TLS is negotiated once). Stanzas and
    /// unknown elements go to the link, which checks them against the authorised pairs.
    /// XEP-0220 §3.1: a typed `db:result` on an inbound stream answers nothing we asked.
    @Test("Secured stream, EXTERNAL offered", arguments: [
        Row(.starttls, .streamError(.policyViolation), .closed),
        Row(.authExternal, .exactly(.externalSucceeded(peer: peer, local: local)), .header(.authenticated)),
        Row(.dbResult, .exactly(.authorizeDialback(DialbackElement(kind: .result, from: peer, to: local, key: "k3y"), streamID: "id-2")), .open(.secured)),
        Row(.dbVerify, .exactly(.answerVerify(DialbackElement(kind: .verify, from: peer, to: local, id: "their-id", key: "k3y"))), .open(.secured)),
        Row(.dbAnswer, .exactly(.none), .open(.secured)),
        Row(.bidi, .exactly(.bidiRequested), .open(.secured)),
        Row(.message, .exactly(.deliver(Input.message.element)), .open(.secured)),
        Row(.unknown, .exactly(.deliver(Input.unknown.element)), .open(.secured)),
        Row(.smEnable, .exactly(.deliver(Input.smEnable.element)), .open(.secured)),
    ])
    func secured(_ row: Row) {
        run(row, at: .openSecured)
    }

    /// After SASL the stream never restarts again: no STARTTLS, no second SASL; dialback
    /// requests for further pairs are bound to this stream's id (XEP-0220 §2, XEP-0344).
    @Test("Authenticated stream, after SASL EXTERNAL and a restart", arguments: [
        Row(.starttls, .streamError(.policyViolation), .closed),
        Row(.authExternal, .saslFailure("invalid-mechanism"), .open(.authenticated)),
        Row(.dbResult, .exactly(.authorizeDialback(DialbackElement(kind: .result, from: peer, to: local, key: "k3y"), streamID: "id-3")), .open(.authenticated)),
        Row(.dbVerify, .exactly(.answerVerify(DialbackElement(kind: .verify, from: peer, to: local, id: "their-id", key: "k3y"))), .open(.authenticated)),
        Row(.dbAnswer, .exactly(.none), .open(.authenticated)),
        Row(.bidi, .exactly(.bidiRequested), .open(.authenticated)),
        Row(.message, .exactly(.deliver(Input.message.element)), .open(.authenticated)),
        Row(.unknown, .exactly(.deliver(Input.unknown.element)), .open(.authenticated)),
        Row(.smEnable, .exactly(.deliver(Input.smEnable.element)), .open(.authenticated)),
    ])
    func authenticated(_ row: Row) {
        run(row, at: .openAuthenticated)
    }

    @Test("Bidi not offered: a request after TLS is unsupported-stanza-type")
    func bidiNotOffered() {
        run(Row(.bidi, .streamError(.unsupportedStanzaType), .closed), at: .openSecured, .init(requireTLS: true, offerBidi: false))
    }

    /// XEP-0288: once the stream is bidirectional, typed dialback elements are answers to
    /// what we asked on it and go to the link. COMPAT ejabberd#4300: the request may come in
    /// the feature namespace.
    @Test("Typed dialback elements reach the link only once the stream is bidirectional", arguments: [XMLNamespace.bidi, XMLNamespace.bidiFeature])
    func typedDialbackOnBidi(_ namespace: String) {
        var negotiation = reach(.openSecured)
        #expect(negotiation.elementReceived(Input.dbAnswer.element) == .none)
        #expect(negotiation.elementReceived(XMLElement(name: "bidi", namespace: namespace)) == .bidiRequested)
        #expect(negotiation.elementReceived(Input.dbAnswer.element) == .deliver(Input.dbAnswer.element))
        // Requests are still the machine's to hand out, with the stream id.
        #expect(negotiation.elementReceived(Input.dbResult.element)
            == .authorizeDialback(DialbackElement(kind: .result, from: Self.peer, to: Self.local, key: "k3y"), streamID: "id-2"))
    }

    @Test("A dialback element without addresses is bad-format, before and after TLS", arguments: [Stage.openPlaintext, .openSecured, .openAuthenticated], ["result", "verify"])
    func dialbackWithoutAddresses(_ stage: Stage, _ name: String) {
        var negotiation = reach(stage)
        let element = XMLElement(name: name, namespace: XMLNamespace.dialback, attributes: [XMLAttribute("to", Self.local)], text: "k3y")
        check(negotiation.elementReceived(element), .streamError(.badFormat), input: element)
        #expect(where_(negotiation) == .closed)
    }

    @Test("</stream> closes the stream in every stage", arguments: Stage.allCases)
    func streamEnd(_ stage: Stage) {
        var negotiation = reach(stage)
        #expect(negotiation.streamEnded() == .closeStream)
        #expect(where_(negotiation) == .closed)
        #expect(negotiation.elementReceived(Input.message.element) == .none)
    }

    @Test("Direct TLS (XEP-0368): the first header gets the secured features, and STARTTLS is then refused")
    func directTLS() {
        var negotiation = machine()
        negotiation.startedWithTLS()
        #expect(where_(negotiation) == .header(.secured))
        guard case .sendHeaderAndFeatures(_, let features) = negotiation.headerReceived(header(), isHosted: true, externalAvailable: true) else {
            Issue.record("header refused")
            return
        }
        #expect(features.firstChild(name: "starttls", namespace: XMLNamespace.tls) == nil)
        #expect(features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl) != nil)
        check(negotiation.elementReceived(Input.starttls.element), .streamError(.policyViolation), input: Input.starttls.element)
    }

    // MARK: SASL EXTERNAL (XEP-0178)

    struct Auth: Sendable, CustomTestStringConvertible {
        var name: String
        var mechanism: String?
        var text: String
        /// nil: success.
        var failure: String?
        var testDescription: String { name }
    }

    /// XEP-0178 §3, RFC 6120 §6.3.8: the authzid is absent, "=", or the header's `from`
    /// (compared as a domain). A failure leaves the stream open for another attempt.
    @Test("SASL EXTERNAL on the secured stream", arguments: [
        Auth(name: "no initial response", mechanism: "EXTERNAL", text: "", failure: nil),
        Auth(name: "empty response '='", mechanism: "EXTERNAL", text: "=", failure: nil),
        Auth(name: "authzid = from", mechanism: "EXTERNAL", text: Base64.encode(Array(peer.utf8)), failure: nil),
        Auth(name: "authzid = from in another case", mechanism: "EXTERNAL", text: Base64.encode(Array("PEER.Example".utf8)), failure: nil),
        Auth(name: "authzid another domain", mechanism: "EXTERNAL", text: Base64.encode(Array("other.example".utf8)), failure: "invalid-authzid"),
        Auth(name: "authzid not a domain", mechanism: "EXTERNAL", text: Base64.encode(Array("romeo@\(peer)".utf8)), failure: "invalid-authzid"),
        Auth(name: "mechanism PLAIN", mechanism: "PLAIN", text: Base64.encode(Array("\0romeo\0secret".utf8)), failure: "invalid-mechanism"),
        Auth(name: "no mechanism", mechanism: nil, text: "=", failure: "invalid-mechanism"),
    ])
    func external(_ row: Auth) {
        var negotiation = reach(.openSecured)
        let auth = XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: row.mechanism.map { [XMLAttribute("mechanism", $0)] } ?? [], text: row.text)
        let action = negotiation.elementReceived(auth)
        if let failure = row.failure {
            #expect(action == .send(Self.saslFailure(failure)))
            #expect(where_(negotiation) == .open(.secured))
            // RFC 6120 §6.4.5: the peer may try again.
            #expect(negotiation.elementReceived(Input.authExternal.element) == .externalSucceeded(peer: Self.peer, local: Self.local))
        } else {
            #expect(action == .externalSucceeded(peer: Self.peer, local: Self.local))
            // The stream restarts (RFC 6120 §6.4.6).
            #expect(where_(negotiation) == .header(.authenticated))
        }
    }

    @Test("EXTERNAL not offered (the certificate does not name the peer): invalid-mechanism, dialback remains")
    func externalNotOffered() {
        var negotiation = reach(.openSecured, externalAvailable: false)
        #expect(negotiation.elementReceived(Input.authExternal.element) == .send(Self.saslFailure("invalid-mechanism")))
        #expect(where_(negotiation) == .open(.secured))
        #expect(negotiation.elementReceived(Input.dbResult.element)
            == .authorizeDialback(DialbackElement(kind: .result, from: Self.peer, to: Self.local, key: "k3y"), streamID: "id-2"))
    }

    /// RFC 6120 §6.5.5: data whose base 64 encoding is incorrect gets `<incorrect-encoding/>`
    /// (as the client negotiation answers; it used to be `<invalid-authzid/>`, found by this
    /// suite).
    @Test("An authzid that is not base 64 is incorrect-encoding (RFC 6120 §6.5.5)")
    func externalBadBase64() {
        var negotiation = reach(.openSecured)
        let auth = XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "EXTERNAL")], text: "not base64!")
        #expect(negotiation.elementReceived(auth) == .send(Self.saslFailure("incorrect-encoding")))
        #expect(where_(negotiation) == .open(.secured))
    }
}
