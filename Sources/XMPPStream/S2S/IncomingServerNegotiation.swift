import XMPPCore

/// The receiving side of a server-to-server stream (RFC 6120 §4–§6, XEP-0178, XEP-0220):
/// header, STARTTLS, SASL EXTERNAL, and from then on dialback requests and stanzas.
///
/// It decides what the stream may do next; the handler that drives it answers the questions
/// it cannot (is this domain hosted? does the certificate name the peer?) and keeps the table
/// of authorised domain pairs, which every stanza is checked against.
public struct IncomingServerNegotiation: Sendable {
    public struct Configuration: Sendable {
        /// STARTTLS is mandatory (RFC 7590 §3): before it only `<starttls><required/>` is offered.
        public var requireTLS: Bool
        /// Offer XEP-0288 bidirectional streams.
        public var offerBidi: Bool
        /// Offer XEP-0198 acknowledgements once authenticated.
        public var offerStreamManagement: Bool

        public init(requireTLS: Bool = true, offerBidi: Bool = false, offerStreamManagement: Bool = false) {
            self.requireTLS = requireTLS
            self.offerBidi = offerBidi
            self.offerStreamManagement = offerStreamManagement
        }
    }

    public enum Phase: Sendable, Hashable {
        case plaintext, secured, authenticated
    }

    public enum State: Sendable {
        case awaitingHeader(Phase)
        /// Features sent; dialback and (once a pair is authorised) stanzas may flow.
        case open(Phase)
        case negotiatingTLS
        case closed
    }

    public enum Action: Sendable, Equatable {
        /// Send our header (a fresh id, `xmlns:db` declared) and these features.
        case sendHeaderAndFeatures(StreamHeader, features: XMLElement)
        /// Send `<proceed/>`, refuse buffered cleartext, start TLS for `domain`'s certificate.
        case startTLS(domain: String)
        /// Send this element.
        case send(XMLElement)
        /// SASL EXTERNAL succeeded for `domain`: send `<success/>` and restart the stream.
        /// The pair (domain, local) is authenticated by the certificate (XEP-0178).
        case externalSucceeded(peer: String, local: String)
        /// Authorise the pair of a `db:result` (XEP-0220 Step 1), then answer with
        /// ``dialbackDecided(_:)``. `streamID` is this stream's id.
        case authorizeDialback(DialbackElement, streamID: String)
        /// Check a `db:verify` as the Authoritative Server and answer it.
        case answerVerify(DialbackElement)
        /// The peer enabled bidirectional use (XEP-0288).
        case bidiRequested
        /// A stanza or other first-level element for the established stream.
        case deliver(XMLElement)
        case closeWithStreamError(StreamError)
        case closeStream
        case none
    }

    public private(set) var state: State = .awaitingHeader(.plaintext)
    public let configuration: Configuration
    /// Our domain the peer addressed (the first header's `to`).
    public private(set) var localDomain: String?
    /// The domain the peer's header claims (`from`); untrusted until proven.
    public private(set) var claimedPeer: String?
    /// The id of our current stream header, which dialback keys are bound to.
    public private(set) var streamID: String?
    private let makeStreamID: @Sendable () -> String
    private var bidiEnabled = false

    public init(configuration: Configuration, makeStreamID: @escaping @Sendable () -> String) {
        self.configuration = configuration
        self.makeStreamID = makeStreamID
    }

    /// The stream began inside TLS (XEP-0368 direct TLS).
    public mutating func startedWithTLS() {
        guard case .awaitingHeader(.plaintext) = state else { preconditionFailure("direct TLS after the stream started: \(state)") }
        state = .awaitingHeader(.secured)
    }

    // MARK: Inputs

    /// A header arrived. `isHosted` says whether its `to` is ours; `externalAvailable` whether
    /// the peer's certificate is valid for its `from` (RFC 6120 §6.3.4, XEP-0178 §3: only then
    /// is EXTERNAL offered).
    public mutating func headerReceived(_ header: StreamHeader, isHosted: Bool, externalAvailable: Bool) -> Action {
        guard case .awaitingHeader(let phase) = state else {
            return fail(.notWellFormed, "unexpected stream header in \(state)")
        }
        // A pre-1.0 peer cannot do TLS, which this server requires (RFC 6120 §4.7.5).
        guard let version = header.versionNumbers, version.major >= 1 else {
            return fail(.unsupportedVersion, nil)
        }
        let to: String
        if let given = header.to {
            guard let domain = try? JID(domain: given), isHosted else {
                return fail(.hostUnknown, nil)
            }
            to = domain.domainpart
        } else {
            // RFC 3920 peers may omit 'to' (RFC 6120 §4.7.2): only possible before any was given.
            guard let known = localDomain else { return fail(.hostUnknown, "no 'to' on the stream header") }
            to = known
        }
        if let localDomain, localDomain != to {
            return fail(.hostUnknown, nil)
        }
        localDomain = to
        claimedPeer = header.from.flatMap { try? JID(domain: $0).domainpart }
        let id = makeStreamID()
        streamID = id
        let reply = StreamHeader(to: claimedPeer, from: to, id: id, version: "1.0", language: "en",
                                 contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback])
        state = .open(phase)
        return .sendHeaderAndFeatures(reply, features: features(for: phase, externalAvailable: externalAvailable))
    }

    public mutating func elementReceived(_ element: XMLElement) -> Action {
        guard case .open(let phase) = state else {
            if case .closed = state { return .none }
            return fail(.notAuthorized, "element before the stream header")
        }
        switch (element.namespace, element.name) {
        case (XMLNamespace.tls, "starttls"):
            guard phase == .plaintext, let localDomain else { return fail(.policyViolation, "STARTTLS after TLS") }
            state = .negotiatingTLS
            return .startTLS(domain: localDomain)
        case (XMLNamespace.sasl, "auth"):
            return saslAuth(element, phase: phase)
        case (XMLNamespace.dialback, "result"), (XMLNamespace.dialback, "verify"):
            if phase == .plaintext && configuration.requireTLS {
                // XEP-0220 §2.5: a policy refusal is a dialback error, not a stream error.
                guard let request = DialbackElement(element) else { return fail(.badFormat, "dialback element without addresses") }
                return .send(request.answer(.error, error: StanzaError(.policyViolation, text: "TLS is required")).element)
            }
            guard let request = DialbackElement(element) else { return fail(.badFormat, "dialback element without addresses") }
            if request.outcome != nil {
                // XEP-0220 §3.1: typed dialback elements on an inbound stream answer nothing we
                // asked, unless the stream is bidirectional; never act on them here.
                return bidiEnabled ? .deliver(element) : .none
            }
            if request.kind == .verify {
                return .answerVerify(request)
            }
            guard let streamID else { return fail(.internalServerError, nil) }
            return .authorizeDialback(request, streamID: streamID)
        case (XMLNamespace.bidi, "bidi"), (XMLNamespace.bidiFeature, "bidi"):
            // COMPAT: ejabberd sent the feature namespace in place of the request one (ejabberd#4300).
            guard configuration.offerBidi else { return fail(.unsupportedStanzaType, "bidi not offered") }
            bidiEnabled = true
            return .bidiRequested
        default:
            if phase == .plaintext && configuration.requireTLS {
                return fail(.notAuthorized, "stanza before TLS")
            }
            // Stanzas and other elements; the handler checks them against the authorised pairs.
            return .deliver(element)
        }
    }

    public mutating func tlsEstablished() {
        guard case .negotiatingTLS = state else { preconditionFailure("TLS established in \(state)") }
        state = .awaitingHeader(.secured)
    }

    public mutating func streamEnded() -> Action {
        state = .closed
        return .closeStream
    }

    public mutating func closed() {
        state = .closed
    }

    // MARK: SASL EXTERNAL (XEP-0178)

    private var externalOffered = false

    private mutating func saslAuth(_ auth: XMLElement, phase: Phase) -> Action {
        guard phase == .secured, externalOffered, auth.attribute("mechanism") == "EXTERNAL",
              let claimed = claimedPeer, let local = localDomain else {
            return .send(Self.saslFailure(.invalidMechanism))
        }
        // XEP-0178 §3 / RFC 6120 §6.3.8: the authzid is empty ("="), or the stream 'from'.
        let text = auth.text.trimmingXMLWhitespace
        if !text.isEmpty && text != "=" {
            // RFC 6120 §6.5.5: data that is not base 64 is incorrect-encoding; a decoded
            // authzid other than the stream's 'from' is invalid-authzid (§6.5.6).
            guard let bytes = Base64.decode(text) else {
                return .send(Self.saslFailure(.incorrectEncoding))
            }
            guard let authzid = String(validating: bytes, as: UTF8.self), (try? JID(domain: authzid).domainpart) == claimed else {
                return .send(Self.saslFailure(.invalidAuthzid))
            }
        }
        state = .awaitingHeader(.authenticated)
        externalOffered = false
        return .externalSucceeded(peer: claimed, local: local)
    }

    static func saslFailure(_ condition: SASLFailure) -> XMLElement {
        XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: [.element(XMLElement(name: condition.rawValue, namespace: XMLNamespace.sasl))])
    }

    // MARK: Features

    private mutating func features(for phase: Phase, externalAvailable: Bool) -> XMLElement {
        var children: [XMLNode] = []
        switch phase {
        case .plaintext:
            children.append(.element(XMLElement(name: "starttls", namespace: XMLNamespace.tls, children: configuration.requireTLS
                ? [.element(XMLElement(name: "required", namespace: XMLNamespace.tls))] : [])))
            if !configuration.requireTLS { children.append(.element(Self.dialbackFeature)) }
        case .secured:
            externalOffered = externalAvailable
            if externalAvailable {
                children.append(.element(XMLElement(name: "mechanisms", namespace: XMLNamespace.sasl, children: [
                    .element(XMLElement(name: "mechanism", namespace: XMLNamespace.sasl, text: "EXTERNAL")),
                ])))
            }
            children.append(.element(Self.dialbackFeature))
            if configuration.offerBidi {
                children.append(.element(XMLElement(name: "bidi", namespace: XMLNamespace.bidiFeature)))
                children.append(.element(XMLElement(name: "requests", namespace: XMLNamespace.bidiRequestsFeature)))
            }
            // A stream authenticated by dialback never restarts, so acknowledgements are
            // offered here; `<enable/>` is accepted only once a pair is valid.
            if configuration.offerStreamManagement { children.append(.element(XMLElement(name: "sm", namespace: XMLNamespace.streamManagement))) }
        case .authenticated:
            children.append(.element(Self.dialbackFeature))
            if configuration.offerBidi {
                children.append(.element(XMLElement(name: "bidi", namespace: XMLNamespace.bidiFeature)))
                children.append(.element(XMLElement(name: "requests", namespace: XMLNamespace.bidiRequestsFeature)))
            }
            if configuration.offerStreamManagement { children.append(.element(XMLElement(name: "sm", namespace: XMLNamespace.streamManagement))) }
        }
        return XMLElement(name: "features", namespace: XMLNamespace.streams, children: children)
    }

    /// XEP-0220 §2.4.2: dialback with error support.
    public static let dialbackFeature = XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature, children: [
        .element(XMLElement(name: "errors", namespace: XMLNamespace.dialbackFeature)),
    ])

    private mutating func fail(_ condition: StreamError.Condition, _ text: String?) -> Action {
        state = .closed
        return .closeWithStreamError(StreamError(condition, text: text))
    }
}
