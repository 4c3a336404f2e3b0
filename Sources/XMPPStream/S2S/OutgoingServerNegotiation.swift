import XMPPCore

/// The initiating side of a server-to-server stream (RFC 6120 §4–§6, XEP-0178, XEP-0220,
/// XEP-0288): header, STARTTLS (always attempted, never skipped), then SASL EXTERNAL when our
/// certificate covers our domain, else dialback.
///
/// Pure: the handler performs the actions (TLS, keys, writes) and reports results back.
public struct OutgoingServerNegotiation: Sendable {
    public struct Configuration: Sendable {
        /// Our domain (the Sender Domain of the first pair).
        public var localDomain: String
        /// The peer's domain (the Target Domain).
        public var remoteDomain: String
        /// Our certificate names `localDomain`, so SASL EXTERNAL may be used (XEP-0178).
        public var useExternal: Bool
        /// Ask for a bidirectional stream when offered (XEP-0288).
        public var requestBidi: Bool

        public init(localDomain: String, remoteDomain: String, useExternal: Bool, requestBidi: Bool = false) {
            self.localDomain = localDomain
            self.remoteDomain = remoteDomain
            self.useExternal = useExternal
            self.requestBidi = requestBidi
        }
    }

    public enum Phase: Sendable, Hashable {
        case plaintext, secured, authenticated
    }

    public enum State: Sendable {
        case idle
        case awaitingHeader(Phase)
        case awaitingFeatures(Phase)
        case awaitingProceed
        case negotiatingTLS
        case authenticatingExternal
        /// Our `db:result` for the first pair is out.
        case dialbackPending
        case established
        case closed
    }

    /// What the peer's features said, kept for the link's later decisions.
    public struct PeerCapabilities: Sendable, Hashable {
        /// `<dialback><errors/></dialback>` (XEP-0220 §2.4.2): target multiplexing is allowed.
        public var dialbackErrors = false
        /// The peer declared the dialback namespace on its header or advertised the feature.
        public var dialback = false
        /// The peer advertised `urn:xmpp:features:dialback` after TLS: it answers
        /// `db:result` for further pairs (XEP-0220 §2.4, §2.6). A header declaration alone
        /// (which servers without dialback still send) is not enough for that.
        public var dialbackFeature = false
        public var bidi = false
        /// Braid's feature: on links it opens to us, the peer answers our `db:result`.
        public var answersRequestsOnItsLinks = false
        public var streamManagement = false

        public init() {}
    }

    /// Why negotiation failed; the handler maps it to the stanza error for queued stanzas.
    public enum Failure: Sendable, Hashable {
        /// The peer refused TLS or the handshake failed; never fall back to cleartext.
        case tlsUnavailable(String)
        /// No way to authenticate: no EXTERNAL we can use and no dialback.
        case noAuthentication(String)
        /// The peer said our dialback key is invalid (XEP-0220 §2.1.1).
        case dialbackInvalid
        /// A dialback error (XEP-0220 §2.5), with its condition.
        case dialbackError(StanzaError)
        /// The peer closed the stream with an error.
        case streamError(StreamError)
        /// The peer violated the protocol.
        case protocolError(String)
    }

    public enum Action: Sendable, Equatable {
        /// Send our stream header (again, after each restart).
        case sendHeader(StreamHeader)
        case send(XMLElement)
        /// `<proceed/>` arrived: restart the parser refusing leftovers and start TLS with
        /// SNI = the remote domain (XEP-0368 §3, RFC 6120 §13.7.2.1).
        case startTLS
        /// SASL succeeded: restart the parser and send a new header.
        case restartAfterSASL(StreamHeader)
        /// Send `db:result` for (local, remote) with a key bound to `streamID`.
        case sendDialbackResult(from: String, to: String, streamID: String)
        /// The first pair is authorised; stanzas for it may flow.
        case established(PeerCapabilities)
        /// A first-level element on the established stream: a stanza, a typed `db:result`
        /// for a further pair, a `db:verify`, stream management.
        case deliver(XMLElement)
        /// Negotiation failed; close the connection.
        case failed(Failure)
        case closeStream
        /// Several actions, in order.
        case sequence([Action])
        case none
    }

    public private(set) var state: State = .idle
    public let configuration: Configuration
    public private(set) var capabilities = PeerCapabilities()
    /// The id of the peer's latest stream header: dialback keys are bound to it.
    public private(set) var streamID: String?
    private var phase: Phase = .plaintext

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Our opening header (also what a stream error after a restart must follow: RFC 6120
    /// §4.9.1.1, an error is a child of an open stream).
    public var header: StreamHeader {
        StreamHeader(to: configuration.remoteDomain, from: configuration.localDomain, version: "1.0", language: "en",
                     contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback])
    }

    // MARK: Inputs

    /// The connection is up (after the TLS handshake, for direct TLS).
    public mutating func start(directTLS: Bool) -> Action {
        guard case .idle = state else { preconditionFailure("started twice") }
        phase = directTLS ? .secured : .plaintext
        state = .awaitingHeader(phase)
        return .sendHeader(header)
    }

    public mutating func headerReceived(_ header: StreamHeader) -> Action {
        guard case .awaitingHeader(let current) = state else {
            return fail(.protocolError("unexpected stream header"))
        }
        guard let version = header.versionNumbers, version.major >= 1 else {
            return fail(.protocolError("peer speaks a pre-1.0 stream"))
        }
        streamID = header.id
        if header.declaresDialback { capabilities.dialback = true }
        state = .awaitingFeatures(current)
        return .none
    }

    public mutating func elementReceived(_ element: XMLElement) -> Action {
        if element.name == "error", element.namespace == XMLNamespace.streams {
            return fail(.streamError(StreamError(element: element) ?? StreamError(.undefinedCondition)))
        }
        switch state {
        case .awaitingFeatures(let current):
            guard element.name == "features", element.namespace == XMLNamespace.streams else {
                return fail(.protocolError("expected stream features, got <\(element.name)>"))
            }
            return featuresReceived(element, phase: current)
        case .awaitingProceed:
            guard element.namespace == XMLNamespace.tls else { return fail(.protocolError("unexpected <\(element.name)> during STARTTLS")) }
            if element.name == "proceed" {
                state = .negotiatingTLS
                return .startTLS
            }
            return fail(.tlsUnavailable("the peer refused STARTTLS"))
        case .authenticatingExternal:
            guard element.namespace == XMLNamespace.sasl else { return fail(.protocolError("unexpected <\(element.name)> during SASL")) }
            switch element.name {
            case "success":
                phase = .authenticated
                state = .awaitingHeader(.authenticated)
                return .restartAfterSASL(header)
            case "failure":
                // XEP-0178 §3: without EXTERNAL, dialback may still authenticate the stream.
                return startDialback(reason: "SASL EXTERNAL refused")
            case "challenge":
                // EXTERNAL takes no challenge beyond an empty one; answer it empty.
                return .send(XMLElement(name: "response", namespace: XMLNamespace.sasl, text: "="))
            default:
                return fail(.protocolError("unexpected <\(element.name)> during SASL"))
            }
        case .dialbackPending:
            guard let answer = DialbackElement(element), answer.kind == .result, let outcome = answer.outcome,
                  answer.from == configuration.remoteDomain, answer.to == configuration.localDomain else {
                // A db:verify for someone else or a stanza before our pair is valid: on a
                // bidirectional stream the link sorts it out; otherwise it is out of order.
                // Bidirectional only when the peer offered it and we asked (XEP-0288 §2.1).
                if DialbackElement(element) != nil || (capabilities.bidi && configuration.requestBidi) { return .deliver(element) }
                return fail(.protocolError("unexpected <\(element.name)> before dialback completed"))
            }
            switch outcome {
            case .valid:
                state = .established
                return .established(capabilities)
            case .invalid:
                return fail(.dialbackInvalid)
            case .error:
                return fail(.dialbackError(answer.error ?? StanzaError(.undefinedCondition)))
            }
        case .established:
            return .deliver(element)
        case .idle, .awaitingHeader, .negotiatingTLS, .closed:
            return state.isClosed ? .none : fail(.protocolError("unexpected <\(element.name)>"))
        }
    }

    public mutating func tlsEstablished() -> Action {
        guard case .negotiatingTLS = state else { preconditionFailure("TLS established in \(state)") }
        phase = .secured
        state = .awaitingHeader(.secured)
        return .sendHeader(header)
    }

    public mutating func streamEnded() -> Action {
        let wasEstablished = if case .established = state { true } else { false }
        state = .closed
        return wasEstablished ? .closeStream : .failed(.protocolError("the peer closed the stream during negotiation"))
    }

    public mutating func closed() {
        state = .closed
    }

    // MARK: Features

    private mutating func featuresReceived(_ features: XMLElement, phase current: Phase) -> Action {
        switch current {
        case .plaintext:
            // RFC 7590 §3.1: STARTTLS is attempted even when not advertised; a peer that
            // cannot do it is not talked to in the clear.
            state = .awaitingProceed
            return .send(XMLElement(name: "starttls", namespace: XMLNamespace.tls))
        case .secured:
            if let dialback = features.firstChild(name: "dialback", namespace: XMLNamespace.dialbackFeature) {
                capabilities.dialback = true
                capabilities.dialbackFeature = true
                capabilities.dialbackErrors = dialback.firstChild(name: "errors", namespace: XMLNamespace.dialbackFeature) != nil
            }
            capabilities.bidi = features.firstChild(name: "bidi", namespace: XMLNamespace.bidiFeature) != nil
            capabilities.answersRequestsOnItsLinks = features.firstChild(name: "requests", namespace: XMLNamespace.bidiRequestsFeature) != nil
            // Offered before authentication on a stream that will use dialback; enabled once
            // the first pair is valid (XEP-0198 §3 names dialback as authentication).
            capabilities.streamManagement = features.firstChild(name: "sm", namespace: XMLNamespace.streamManagement) != nil
            let mechanisms = features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?
                .children(name: "mechanism", namespace: XMLNamespace.sasl).map { $0.text.trimmingXMLWhitespace } ?? []
            var pending: [XMLElement] = []
            if configuration.requestBidi && capabilities.bidi {
                // XEP-0288 §2.2: request before authenticating.
                pending.append(XMLElement(name: "bidi", namespace: XMLNamespace.bidi))
            }
            if configuration.useExternal && mechanisms.contains("EXTERNAL") {
                state = .authenticatingExternal
                // XEP-0178 §3 interop note: send the authzid (our domain) for older peers.
                pending.append(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "EXTERNAL")],
                                          text: Base64.encode(Array(configuration.localDomain.utf8))))
                return pending.count == 1 ? .send(pending[0]) : .sendAll(pending)
            }
            let dialback = startDialback(reason: mechanisms.contains("EXTERNAL") ? "our certificate does not name \(configuration.localDomain)" : "no SASL EXTERNAL offered")
            guard !pending.isEmpty else { return dialback }
            if case .sendDialbackResult = dialback { return .sendAll(pending, then: dialback) }
            return dialback
        case .authenticated:
            capabilities.streamManagement = features.firstChild(name: "sm", namespace: XMLNamespace.streamManagement) != nil
            if let dialback = features.firstChild(name: "dialback", namespace: XMLNamespace.dialbackFeature) {
                capabilities.dialback = true
                capabilities.dialbackFeature = true
                capabilities.dialbackErrors = dialback.firstChild(name: "errors", namespace: XMLNamespace.dialbackFeature) != nil
            }
            if features.firstChild(name: "bidi", namespace: XMLNamespace.bidiFeature) != nil { capabilities.bidi = true }
            if features.firstChild(name: "requests", namespace: XMLNamespace.bidiRequestsFeature) != nil { capabilities.answersRequestsOnItsLinks = true }
            state = .established
            return .established(capabilities)
        }
    }

    private mutating func startDialback(reason: String) -> Action {
        guard capabilities.dialback, let streamID else {
            return fail(.noAuthentication(reason + "; the peer offers no dialback"))
        }
        state = .dialbackPending
        return .sendDialbackResult(from: configuration.localDomain, to: configuration.remoteDomain, streamID: streamID)
    }

    private mutating func fail(_ failure: Failure) -> Action {
        state = .closed
        return .failed(failure)
    }
}

extension OutgoingServerNegotiation.State {
    var isClosed: Bool {
        if case .closed = self { return true }
        return false
    }
}

extension OutgoingServerNegotiation.Action {
    /// Several elements to send in order, optionally followed by another action.
    static func sendAll(_ elements: [XMLElement], then next: OutgoingServerNegotiation.Action? = nil) -> OutgoingServerNegotiation.Action {
        .sequence(elements.map { .send($0) } + (next.map { [$0] } ?? []))
    }
}
