import Testing
import XMPPCore
@testable import XMPPStream

/// The initiating side of a server-to-server stream on its own: every event in every state,
/// each state reached by feeding the machine the real events, no channel.
///
/// First, what it learns from the peer's stream features: whether the peer will answer
/// `db:result` for further pairs is a question of the features after TLS, not of the
/// header's namespace declaration (issue 9: ejabberd without `mod_s2s_dialback`).
@Suite("Outgoing s2s negotiation state machine")
struct OutgoingServerNegotiationTests {
    static let header = StreamHeader(from: "peer.example", id: "s1", contentNamespace: XMLNamespace.server,
                                     prefixes: ["db": XMLNamespace.dialback])

    func features(_ children: [XMLElement]) -> XMLElement {
        XMLElement(name: "features", namespace: XMLNamespace.streams, children: children.map { .element($0) })
    }

    static let external = XMLElement(name: "mechanisms", namespace: XMLNamespace.sasl, children: [
        .element(XMLElement(name: "mechanism", namespace: XMLNamespace.sasl, text: "EXTERNAL")),
    ])

    /// Runs the negotiation to the secured features, SASL EXTERNAL, and the features after
    /// it; returns the capabilities at establishment.
    func negotiate(secured: [XMLElement], authenticated: [XMLElement]) -> OutgoingServerNegotiation.PeerCapabilities? {
        var negotiation = OutgoingServerNegotiation(configuration: .init(localDomain: "us.example", remoteDomain: "peer.example", useExternal: true))
        _ = negotiation.start(directTLS: true)
        _ = negotiation.headerReceived(Self.header)
        _ = negotiation.elementReceived(features(secured + [Self.external]))
        _ = negotiation.elementReceived(XMLElement(name: "success", namespace: XMLNamespace.sasl))
        _ = negotiation.headerReceived(Self.header)
        guard case .established(let capabilities) = negotiation.elementReceived(features(authenticated)) else { return nil }
        return capabilities
    }

    @Test("A header that declares the dialback namespace, but no dialback feature: no requests on the link")
    func headerOnly() throws {
        let capabilities = try #require(negotiate(secured: [], authenticated: []))
        #expect(capabilities.dialback)
        #expect(!capabilities.dialbackFeature)
        #expect(!capabilities.dialbackErrors)
    }

    @Test("Dialback offered after TLS, without errors (Prosody 0.12): requests allowed, targets not")
    func dialbackWithoutErrors() throws {
        let capabilities = try #require(negotiate(secured: [XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature)], authenticated: []))
        #expect(capabilities.dialbackFeature)
        #expect(!capabilities.dialbackErrors)
    }

    @Test("Dialback with errors offered after SASL (Braid, ejabberd)")
    func dialbackWithErrors() throws {
        let offered = XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature, children: [
            .element(XMLElement(name: "errors", namespace: XMLNamespace.dialbackFeature)),
        ])
        let capabilities = try #require(negotiate(secured: [], authenticated: [offered]))
        #expect(capabilities.dialbackFeature)
        #expect(capabilities.dialbackErrors)
    }

    // MARK: Every event in every state

    typealias Negotiation = OutgoingServerNegotiation

    static let local = "us.example"
    static let remote = "peer.example"

    /// Where the machine is, comparable (the machine's own `State` is not `Equatable`).
    enum Where: Equatable, Sendable {
        case idle, header(Negotiation.Phase), features(Negotiation.Phase), proceed, tls, external, dialback, established, closed
    }

    func where_(_ negotiation: Negotiation) -> Where {
        switch negotiation.state {
        case .idle: .idle
        case .awaitingHeader(let phase): .header(phase)
        case .awaitingFeatures(let phase): .features(phase)
        case .awaitingProceed: .proceed
        case .negotiatingTLS: .tls
        case .authenticatingExternal: .external
        case .dialbackPending: .dialback
        case .established: .established
        case .closed: .closed
        }
    }

    /// The stages of a stream, in order. Up to `securedFeatures` both paths agree; then
    /// `authenticatingExternal` → `authenticatedHeader` → `authenticatedFeatures` →
    /// `established` is SASL EXTERNAL, and `dialbackPending` is dialback (no EXTERNAL offered).
    enum Stage: String, CaseIterable, Sendable {
        case idle, plaintextHeader, plaintextFeatures, awaitingProceed, negotiatingTLS, securedHeader, securedFeatures
        case authenticatingExternal, authenticatedHeader, authenticatedFeatures, established, dialbackPending, closed

        var expected: Where {
            switch self {
            case .idle: .idle
            case .plaintextHeader: .header(.plaintext)
            case .plaintextFeatures: .features(.plaintext)
            case .awaitingProceed: .proceed
            case .negotiatingTLS: .tls
            case .securedHeader: .header(.secured)
            case .securedFeatures: .features(.secured)
            case .authenticatingExternal: .external
            case .authenticatedHeader: .header(.authenticated)
            case .authenticatedFeatures: .features(.authenticated)
            case .established: .established
            case .dialbackPending: .dialback
            case .closed: .closed
            }
        }
    }

    static let dialbackFeature = XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature, children: [
        .element(XMLElement(name: "errors", namespace: XMLNamespace.dialbackFeature)),
    ])

    static func peerHeader(id: String, declaresDialback: Bool = true, version: String? = "1.0") -> StreamHeader {
        StreamHeader(from: remote, id: id, version: version, contentNamespace: XMLNamespace.server,
                     prefixes: declaresDialback ? ["db": XMLNamespace.dialback] : [:])
    }

    /// Our header, sent at the start and after each restart.
    static let ourHeader = StreamHeader(to: remote, from: local, version: "1.0", language: "en", contentNamespace: XMLNamespace.server,
                                        prefixes: ["db": XMLNamespace.dialback])

    func configuration(useExternal: Bool = true, requestBidi: Bool = false) -> Negotiation.Configuration {
        .init(localDomain: Self.local, remoteDomain: Self.remote, useExternal: useExternal, requestBidi: requestBidi)
    }

    /// A machine brought to `stage` by the real events. The peer's stream ids are s1
    /// (plaintext), s2 (secured), s3 (authenticated). `secured` are the features after TLS
    /// (EXTERNAL is added on the EXTERNAL path).
    func reach(_ stage: Stage, _ configuration: Negotiation.Configuration? = nil,
               secured: [XMLElement] = [OutgoingServerNegotiationTests.dialbackFeature], declaresDialback: Bool = true) -> Negotiation {
        var negotiation = Negotiation(configuration: configuration ?? self.configuration())
        defer { #expect(where_(negotiation) == stage.expected, "could not reach \(stage)") }
        if stage == .idle { return negotiation }
        _ = negotiation.start(directTLS: false)
        if stage == .plaintextHeader { return negotiation }
        if stage == .closed {
            _ = negotiation.streamEnded()
            return negotiation
        }
        _ = negotiation.headerReceived(Self.peerHeader(id: "s1", declaresDialback: declaresDialback))
        if stage == .plaintextFeatures { return negotiation }
        _ = negotiation.elementReceived(features([]))
        if stage == .awaitingProceed { return negotiation }
        _ = negotiation.elementReceived(Input.proceed.element)
        if stage == .negotiatingTLS { return negotiation }
        _ = negotiation.tlsEstablished()
        if stage == .securedHeader { return negotiation }
        _ = negotiation.headerReceived(Self.peerHeader(id: "s2", declaresDialback: declaresDialback))
        if stage == .securedFeatures { return negotiation }
        if stage == .dialbackPending {
            _ = negotiation.elementReceived(features(secured))
            return negotiation
        }
        _ = negotiation.elementReceived(features(secured + [Self.external]))
        if stage == .authenticatingExternal { return negotiation }
        _ = negotiation.elementReceived(Input.saslSuccess.element)
        if stage == .authenticatedHeader { return negotiation }
        _ = negotiation.headerReceived(Self.peerHeader(id: "s3", declaresDialback: declaresDialback))
        if stage == .authenticatedFeatures { return negotiation }
        _ = negotiation.elementReceived(features([Self.dialbackFeature]))
        return negotiation
    }

    /// One element of each kind the peer may send.
    enum Input: String, CaseIterable, Sendable {
        case features, proceed, tlsFailure, saslSuccess, saslFailure, saslChallenge
        case resultValid, resultInvalid, resultError, resultOtherPair, resultRequest, verify, message, smRequest, unknown

        var element: XMLElement {
            let local = OutgoingServerNegotiationTests.local, remote = OutgoingServerNegotiationTests.remote
            func result(from: String = remote, type: String?, children: [XMLNode] = []) -> XMLElement {
                XMLElement(name: "result", namespace: XMLNamespace.dialback,
                           attributes: [XMLAttribute("from", from), XMLAttribute("to", local)] + (type.map { [XMLAttribute("type", $0)] } ?? []),
                           children: children)
            }
            return switch self {
            case .features: XMLElement(name: "features", namespace: XMLNamespace.streams)
            case .proceed: XMLElement(name: "proceed", namespace: XMLNamespace.tls)
            case .tlsFailure: XMLElement(name: "failure", namespace: XMLNamespace.tls)
            case .saslSuccess: XMLElement(name: "success", namespace: XMLNamespace.sasl)
            case .saslFailure:
                XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: "not-authorized", namespace: XMLNamespace.sasl))])
            case .saslChallenge: XMLElement(name: "challenge", namespace: XMLNamespace.sasl, text: "=")
            case .resultValid: result(type: "valid")
            case .resultInvalid: result(type: "invalid")
            // XEP-0220 §2.5: the <error/> child, here in the stream's content namespace.
            case .resultError: result(type: "error", children: [.element(XMLElement(name: "error", namespace: XMLNamespace.server, attributes: [XMLAttribute("type", "cancel")], children: [
                .element(XMLElement(name: "item-not-found", namespace: XMLNamespace.stanzaErrors)),
            ]))])
            case .resultOtherPair: result(from: "other.example", type: "valid")
            case .resultRequest: XMLElement(name: "result", namespace: XMLNamespace.dialback,
                                            attributes: [XMLAttribute("from", remote), XMLAttribute("to", local)], text: "k3y")
            case .verify: XMLElement(name: "verify", namespace: XMLNamespace.dialback,
                                     attributes: [XMLAttribute("from", remote), XMLAttribute("to", local), XMLAttribute("id", "x1")], text: "k3y")
            case .message: XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("from", "romeo@\(remote)"), XMLAttribute("to", "juliet@\(local)")])
            case .smRequest: XMLElement(name: "r", namespace: XMLNamespace.streamManagement)
            case .unknown: XMLElement(name: "frobnicate", namespace: "urn:example:unknown")
            }
        }
    }

    /// What an input should produce; protocol errors are compared by kind, not text.
    enum Expect: Sendable {
        case exactly(Negotiation.Action)
        case protocolError
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
        var testDescription: String { "\(input.rawValue) → \(expect), then \(after)" }
    }

    func check(_ action: Negotiation.Action, _ expect: Expect) {
        switch expect {
        case .exactly(let expected):
            #expect(action == expected)
        case .protocolError:
            guard case .failed(.protocolError) = action else {
                Issue.record("expected a protocol error, got \(action)")
                return
            }
        }
    }

    func run(_ row: Row, at stage: Stage, _ configuration: Negotiation.Configuration? = nil, secured: [XMLElement] = [OutgoingServerNegotiationTests.dialbackFeature]) {
        var negotiation = reach(stage, configuration, secured: secured)
        check(negotiation.elementReceived(row.input.element), row.expect)
        #expect(where_(negotiation) == row.after)
    }

    @Test("Start sends our header with the db prefix; direct TLS skips STARTTLS (XEP-0368)", arguments: [false, true])
    func start(_ directTLS: Bool) {
        var negotiation = Negotiation(configuration: configuration())
        #expect(negotiation.start(directTLS: directTLS) == .sendHeader(Self.ourHeader))
        #expect(where_(negotiation) == .header(directTLS ? .secured : .plaintext))
        #expect(negotiation.headerReceived(Self.peerHeader(id: "d1")) == .none)
        #expect(negotiation.streamID == "d1")
        let next = negotiation.elementReceived(features([Self.dialbackFeature]))
        #expect(next == (directTLS ? .sendDialbackResult(from: Self.local, to: Self.remote, streamID: "d1")
                                   : .send(XMLElement(name: "starttls", namespace: XMLNamespace.tls))))
    }

    @Test("Header rules: pre-1.0 peers are refused, the id of each header is kept for dialback",
          arguments: [Stage.plaintextHeader, .securedHeader, .authenticatedHeader])
    func headers(_ stage: Stage) {
        var old = reach(stage)
        check(old.headerReceived(Self.peerHeader(id: "x", version: nil)), .protocolError)
        #expect(where_(old) == .closed)
        var negotiation = reach(stage)
        #expect(negotiation.headerReceived(Self.peerHeader(id: "new")) == .none)
        #expect(negotiation.streamID == "new")
        guard case .header(let phase) = stage.expected else { return }
        #expect(where_(negotiation) == .features(phase))
    }

    @Test("A header where none is expected is a protocol error",
          arguments: [Stage.plaintextFeatures, .awaitingProceed, .negotiatingTLS, .securedFeatures, .authenticatingExternal, .dialbackPending, .authenticatedFeatures, .established, .closed])
    func unexpectedHeader(_ stage: Stage) {
        var negotiation = reach(stage)
        check(negotiation.headerReceived(Self.peerHeader(id: "again")), .protocolError)
        #expect(where_(negotiation) == .closed)
    }

    @Test("Waiting for a header or for TLS, any element is a protocol error",
          arguments: [Stage.idle, .plaintextHeader, .negotiatingTLS, .securedHeader, .authenticatedHeader], Input.allCases)
    func elementWhileWaiting(_ stage: Stage, _ input: Input) {
        var negotiation = reach(stage)
        check(negotiation.elementReceived(input.element), .protocolError)
        #expect(where_(negotiation) == .closed)
    }

    @Test("Once closed, elements are ignored", arguments: Input.allCases)
    func elementAfterClose(_ input: Input) {
        var negotiation = reach(.closed)
        #expect(negotiation.elementReceived(input.element) == .none)
        #expect(where_(negotiation) == .closed)
    }

    /// RFC 6120 §4.9.1: a stream error ends the stream in any state; the handler bounces the
    /// queued stanzas with it.
    @Test("A stream error from the peer fails the negotiation in every open state",
          arguments: Stage.allCases.filter { $0 != .closed })
    func streamErrorFromPeer(_ stage: Stage) {
        var negotiation = reach(stage)
        let error = StreamError(.hostUnknown, text: "no such domain")
        #expect(negotiation.elementReceived(error.element) == .failed(.streamError(error)))
        #expect(where_(negotiation) == .closed)
        // An unknown condition is undefined-condition (RFC 6120 §4.9.2).
        var other = reach(stage)
        let odd = XMLElement(name: "error", namespace: XMLNamespace.streams, children: [.element(XMLElement(name: "gremlins", namespace: XMLNamespace.streamErrors))])
        #expect(other.elementReceived(odd) == .failed(.streamError(StreamError(.undefinedCondition))))
    }

    @Test("</stream> before establishment is a failure; after it, a clean close", arguments: Stage.allCases)
    func streamEnd(_ stage: Stage) {
        var negotiation = reach(stage)
        let action = negotiation.streamEnded()
        if stage == .established {
            #expect(action == .closeStream)
        } else {
            check(action, .protocolError)
        }
        #expect(where_(negotiation) == .closed)
    }

    /// RFC 7590 §3.1: STARTTLS is attempted whether or not it is advertised, and a peer that
    /// refuses it is never talked to in the clear.
    @Test("Features before TLS: always STARTTLS", arguments: [
        Row(.features, .exactly(.send(XMLElement(name: "starttls", namespace: XMLNamespace.tls))), .proceed),
        Row(.proceed, .protocolError, .closed),
        Row(.saslSuccess, .protocolError, .closed),
        Row(.resultValid, .protocolError, .closed),
        Row(.message, .protocolError, .closed),
        Row(.unknown, .protocolError, .closed),
    ])
    func plaintextFeatures(_ row: Row) {
        run(row, at: .plaintextFeatures)
    }

    @Test("Features offering mechanisms and dialback in the clear still get STARTTLS, not auth")
    func plaintextFeaturesWithAuthOffered() {
        var negotiation = reach(.plaintextFeatures)
        #expect(negotiation.elementReceived(features([Self.external, Self.dialbackFeature])) == .send(XMLElement(name: "starttls", namespace: XMLNamespace.tls)))
        #expect(where_(negotiation) == .proceed)
    }

    @Test("Waiting for <proceed/>", arguments: [
        Row(.proceed, .exactly(.startTLS), .tls),
        Row(.tlsFailure, .exactly(.failed(.tlsUnavailable("the peer refused STARTTLS"))), .closed),
        Row(.features, .protocolError, .closed),
        Row(.saslSuccess, .protocolError, .closed),
        Row(.message, .protocolError, .closed),
    ])
    func awaitingProceed(_ row: Row) {
        run(row, at: .awaitingProceed)
    }

    @Test("TLS established: our header again, and the secured features are awaited")
    func tlsEstablished() {
        var negotiation = reach(.negotiatingTLS)
        #expect(negotiation.tlsEstablished() == .sendHeader(Self.ourHeader))
        #expect(where_(negotiation) == .header(.secured))
    }

    struct SecuredChoice: Sendable, CustomTestStringConvertible {
        var name: String
        var useExternal: Bool
        var requestBidi: Bool
        var headerDeclaresDialback = true
        var offered: [XMLElement]
        var expected: Negotiation.Action
        var after: Where
        var testDescription: String { name }
    }

    static let auth = XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "EXTERNAL")],
                                 text: Base64.encode(Array(local.utf8)))
    static let bidiRequest = XMLElement(name: "bidi", namespace: XMLNamespace.bidi)
    static let bidiOffer = XMLElement(name: "bidi", namespace: XMLNamespace.bidiFeature)
    static let dialbackResult = Negotiation.Action.sendDialbackResult(from: local, to: remote, streamID: "s2")

    /// XEP-0178 §3: EXTERNAL when our certificate names us and the peer offers it, with the
    /// authzid for older peers; else XEP-0220 dialback, which the header's namespace
    /// declaration alone announces. XEP-0288 §2.2: bidi is requested before authenticating.
    @Test("Features after TLS: how we authenticate", arguments: [
        SecuredChoice(name: "EXTERNAL offered and usable", useExternal: true, requestBidi: false,
                      offered: [external, dialbackFeature], expected: .send(auth), after: .external),
        SecuredChoice(name: "EXTERNAL and bidi", useExternal: true, requestBidi: true,
                      offered: [external, dialbackFeature, bidiOffer], expected: .sequence([.send(bidiRequest), .send(auth)]), after: .external),
        SecuredChoice(name: "EXTERNAL offered, our certificate does not name us", useExternal: false, requestBidi: false,
                      offered: [external, dialbackFeature], expected: dialbackResult, after: .dialback),
        SecuredChoice(name: "no EXTERNAL offered", useExternal: true, requestBidi: false,
                      offered: [dialbackFeature], expected: dialbackResult, after: .dialback),
        SecuredChoice(name: "dialback and bidi", useExternal: false, requestBidi: true,
                      offered: [dialbackFeature, bidiOffer], expected: .sequence([.send(bidiRequest), dialbackResult]), after: .dialback),
        SecuredChoice(name: "bidi wanted but not offered", useExternal: false, requestBidi: true,
                      offered: [dialbackFeature], expected: dialbackResult, after: .dialback),
        SecuredChoice(name: "bidi offered but not wanted", useExternal: true, requestBidi: false,
                      offered: [external, bidiOffer], expected: .send(auth), after: .external),
        SecuredChoice(name: "no dialback feature, but the header declares the namespace", useExternal: false, requestBidi: false,
                      offered: [], expected: dialbackResult, after: .dialback),
        SecuredChoice(name: "neither EXTERNAL nor dialback", useExternal: true, requestBidi: true, headerDeclaresDialback: false,
                      offered: [bidiOffer], expected: .failed(.noAuthentication("no SASL EXTERNAL offered; the peer offers no dialback")), after: .closed),
        SecuredChoice(name: "EXTERNAL unusable, no dialback", useExternal: false, requestBidi: false, headerDeclaresDialback: false,
                      offered: [external], expected: .failed(.noAuthentication("our certificate does not name us.example; the peer offers no dialback")), after: .closed),
    ])
    func securedFeatures(_ row: SecuredChoice) {
        var negotiation = reach(.securedFeatures, configuration(useExternal: row.useExternal, requestBidi: row.requestBidi),
                                declaresDialback: row.headerDeclaresDialback)
        #expect(negotiation.elementReceived(features(row.offered)) == row.expected)
        #expect(where_(negotiation) == row.after)
    }

    @Test("Waiting for secured features, anything else is a protocol error", arguments: [Input.proceed, .saslSuccess, .resultValid, .message])
    func securedNotFeatures(_ input: Input) {
        run(Row(input, .protocolError, .closed), at: .securedFeatures)
    }

    /// XEP-0178 §3: a refused EXTERNAL falls back to dialback on the same stream; an empty
    /// challenge gets the empty response "=".
    @Test("SASL EXTERNAL in progress", arguments: [
        Row(.saslSuccess, .exactly(.restartAfterSASL(ourHeader)), .header(.authenticated)),
        Row(.saslFailure, .exactly(dialbackResult), .dialback),
        Row(.saslChallenge, .exactly(.send(XMLElement(name: "response", namespace: XMLNamespace.sasl, text: "="))), .external),
        Row(.proceed, .protocolError, .closed),
        Row(.features, .protocolError, .closed),
        Row(.resultValid, .protocolError, .closed),
        Row(.message, .protocolError, .closed),
        Row(.unknown, .protocolError, .closed),
    ])
    func authenticatingExternal(_ row: Row) {
        run(row, at: .authenticatingExternal)
    }

    @Test("SASL EXTERNAL refused by a peer without dialback: no way to authenticate")
    func externalRefusedWithoutDialback() {
        var negotiation = reach(.securedFeatures, declaresDialback: false)
        #expect(negotiation.elementReceived(features([Self.external])) == .send(Self.auth))
        #expect(negotiation.elementReceived(Input.saslFailure.element)
            == .failed(.noAuthentication("SASL EXTERNAL refused; the peer offers no dialback")))
        #expect(where_(negotiation) == .closed)
    }

    @Test("After SASL: the features establish the first pair with what the peer offered")
    func authenticatedFeatures() throws {
        var negotiation = reach(.authenticatedFeatures, secured: [])
        guard case .established(let capabilities) = negotiation.elementReceived(features([
            Self.dialbackFeature, Self.bidiOffer, XMLElement(name: "requests", namespace: XMLNamespace.bidiRequestsFeature),
            XMLElement(name: "sm", namespace: XMLNamespace.streamManagement),
        ])) else {
            Issue.record("not established")
            return
        }
        #expect(capabilities.dialback && capabilities.dialbackFeature && capabilities.dialbackErrors)
        #expect(capabilities.bidi && capabilities.answersRequestsOnItsLinks && capabilities.streamManagement)
        #expect(where_(negotiation) == .established)
        #expect(negotiation.streamID == "s3")
        var other = reach(.authenticatedFeatures)
        check(other.elementReceived(Input.message.element), .protocolError)
    }

    /// XEP-0220 §2.1.1–§2.1.2 and §2.5: only the answer for our pair, addressed back to us,
    /// settles the negotiation. Other dialback traffic is left to the link (§3.1 ignores
    /// answers nobody asked for); a stanza before our pair is valid is out of order.
    @Test("Dialback pending", arguments: [
        Row(.resultValid, .exactly(.established(dialbackCapabilities)), .established),
        Row(.resultInvalid, .exactly(.failed(.dialbackInvalid)), .closed),
        Row(.resultError, .exactly(.failed(.dialbackError(StanzaError(.itemNotFound, type: .cancel)))), .closed),
        Row(.resultOtherPair, .exactly(.deliver(Input.resultOtherPair.element)), .dialback),
        Row(.resultRequest, .exactly(.deliver(Input.resultRequest.element)), .dialback),
        Row(.verify, .exactly(.deliver(Input.verify.element)), .dialback),
        Row(.message, .protocolError, .closed),
        Row(.smRequest, .protocolError, .closed),
        Row(.unknown, .protocolError, .closed),
        Row(.saslSuccess, .protocolError, .closed),
        Row(.features, .protocolError, .closed),
    ])
    func dialbackPending(_ row: Row) {
        run(row, at: .dialbackPending, secured: Self.dialbackSecured)
    }

    static let dialbackSecured = [dialbackFeature, XMLElement(name: "sm", namespace: XMLNamespace.streamManagement)]
    static var dialbackCapabilities: Negotiation.PeerCapabilities {
        var capabilities = Negotiation.PeerCapabilities()
        capabilities.dialback = true
        capabilities.dialbackFeature = true
        capabilities.dialbackErrors = true
        capabilities.streamManagement = true
        return capabilities
    }

    @Test("Dialback answers must name our pair exactly: swapped or foreign addresses do not settle it")
    func dialbackAnswerAddresses() {
        for (from, to) in [(Self.local, Self.remote), (Self.remote, "someone.else"), ("other.example", Self.local)] {
            var negotiation = reach(.dialbackPending)
            let answer = XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", from), XMLAttribute("to", to), XMLAttribute("type", "invalid")])
            #expect(negotiation.elementReceived(answer) == .deliver(answer))
            #expect(where_(negotiation) == .dialback)
        }
        // An error answer without an <error/> child is undefined-condition.
        var negotiation = reach(.dialbackPending)
        let bare = XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", Self.remote), XMLAttribute("to", Self.local), XMLAttribute("type", "error")])
        #expect(negotiation.elementReceived(bare) == .failed(.dialbackError(StanzaError(.undefinedCondition))))
    }

    /// XEP-0288 §2.2: on a bidirectional stream the peer may authenticate its own pairs and
    /// send stanzas for them while ours is still pending; the link checks them.
    @Test("Dialback pending on a bidirectional stream: the peer's stanzas go to the link")
    func dialbackPendingBidi() {
        var negotiation = reach(.dialbackPending, configuration(useExternal: false, requestBidi: true), secured: [Self.dialbackFeature, Self.bidiOffer])
        #expect(negotiation.elementReceived(Input.message.element) == .deliver(Input.message.element))
        #expect(where_(negotiation) == .dialback)
    }

    /// The handler makes the link bidirectional only when the peer offered bidi *and* we
    /// requested it (OutgoingLinkHandler: `capabilities.bidi && requestBidi`); the machine
    /// used to test `capabilities.bidi` alone, handing a stanza that arrived before our pair
    /// was valid to a one-way link (found by this suite).
    @Test("Dialback pending, bidi offered but not requested: a stanza is still out of order")
    func dialbackPendingBidiOfferedOnly() {
        run(Row(.message, .protocolError, .closed), at: .dialbackPending, configuration(useExternal: false, requestBidi: false),
            secured: [Self.dialbackFeature, Self.bidiOffer])
    }

    @Test("Established: every first-level element goes to the link", arguments: Input.allCases)
    func established(_ input: Input) {
        run(Row(input, .exactly(.deliver(input.element)), .established), at: .established)
    }
}
