import XMPPCore

/// Server-side negotiation of a client stream (RFC 6120 §4–§7): header, STARTTLS, SASL,
/// resource binding, and the XEP-0198 resume that can replace binding.
///
/// A pure state machine in the postgres-nio style: one method per input, each returning what
/// to do. It never touches a channel, the clock, storage or the network; the handler that
/// drives it performs the actions and reports their results back as inputs. Peer
/// misbehaviour becomes a `closeWithStreamError` action; a caller that feeds an input the
/// current state cannot receive has a sequencing bug, which traps.
public struct ClientNegotiation: Sendable {
    /// Settings fixed for the connection's lifetime.
    public struct Configuration: Sendable {
        /// STARTTLS is mandatory: the first features hold only `<starttls><required/>`.
        public var requireTLS: Bool
        /// Offer PLAIN (never before TLS).
        public var allowPLAIN: Bool
        /// Iterations used for fake SCRAM keys of unknown users, matching real accounts.
        public var scramIterations: Int
        /// A per-server secret that makes fake SCRAM salts stable for a username.
        public var serverSecret: [UInt8]
        /// Offer XEP-0198 stream management.
        public var streamManagement: Bool
        /// The server's entity capabilities for a domain (XEP-0115 §6.3: its `<c/>` in the
        /// stream features, so a client knows the server's features without asking).
        public var capabilities: (@Sendable (_ domain: String) -> XMLElement?)?
        /// Whether anyone may create an account on a domain in-band (XEP-0077): the
        /// `iq-register` feature is offered over TLS before authentication, and registration
        /// requests then reach the server (``Action/registration(_:)``).
        public var registrationOpen: (@Sendable (_ domain: String) -> Bool)?

        public init(requireTLS: Bool = true, allowPLAIN: Bool = true, scramIterations: Int = 10_000, serverSecret: [UInt8], streamManagement: Bool = true,
                    capabilities: (@Sendable (_ domain: String) -> XMLElement?)? = nil, registrationOpen: (@Sendable (_ domain: String) -> Bool)? = nil) {
            self.registrationOpen = registrationOpen
            self.requireTLS = requireTLS
            self.allowPLAIN = allowPLAIN
            self.scramIterations = scramIterations
            self.serverSecret = serverSecret
            self.streamManagement = streamManagement
            self.capabilities = capabilities
        }
    }

    /// Where in the RFC 6120 layer order the stream is (§13.3): the features offered and the
    /// elements accepted depend on it.
    public enum Phase: Sendable, Hashable {
        /// Nothing negotiated yet.
        case plaintext
        /// TLS is up, SASL is not done.
        case secured
        /// SASL succeeded.
        case authenticated
    }

    public enum State: Sendable {
        /// Waiting for a `<stream:stream>` header in this phase.
        case awaitingHeader(Phase)
        /// Features sent; waiting for the first element of this phase.
        case featuresSent(Phase)
        /// `<proceed/>` sent; the TLS handshake is under way.
        case negotiatingTLS
        /// A SASL exchange is under way.
        case authenticating(SASLExchange)
        /// Bound (or resumed): stanzas flow.
        case established(JID)
        /// Closed, by error or by `</stream>`.
        case closed
        /// Placeholder while a nested exchange is mutated, to avoid copy-on-write copies.
        case modifying
    }

    /// A SASL mechanism in progress.
    public enum SASLExchange: Sendable {
        case scram(SCRAMServer)
        case plain(PLAINServer)
    }

    /// What the handler must do.
    public enum Action: Sendable, Equatable {
        /// Send our stream header (with a fresh id) and these features.
        case sendHeaderAndFeatures(StreamHeader, features: XMLElement)
        /// Send `<proceed/>`, restart the parser refusing buffered cleartext, and start TLS
        /// presenting the certificate for `domain`.
        case startTLS(domain: String)
        /// Send this element (SASL challenge, success or failure; IQ results).
        case send(XMLElement)
        /// Send `<success/>` (in `element`), then restart the stream: the parser is reset and
        /// the bytes after the SASL response are parsed as the new stream.
        case authenticated(username: String, element: XMLElement)
        /// Look up SCRAM keys for `username` and report them with ``scramKeysReceived(_:)``.
        case lookUpSCRAMKeys(username: String, hash: SCRAMHash)
        /// Check a PLAIN password and report with ``passwordChecked(_:)``.
        case verifyPassword(username: String, password: String)
        /// A `jabber:iq:register` request before authentication, on a domain open to
        /// registration: the server answers it on the stream, which stays where it was.
        case registration(XMLElement)
        /// Bind `resource` (nil: generate one) for the authenticated account and report with
        /// ``bindSucceeded(_:iqID:)`` or ``bindFailed(_:iqID:)``.
        case bind(requestedResource: String?, iqID: String)
        /// Resume the XEP-0198 session `previousID`, the client having handled `handled`
        /// stanzas; report with ``resumeSucceeded(_:)`` or ``resumeFailed()``.
        case resume(previousID: String, handled: UInt32)
        /// The stream is established: hand stanzas and stream-level elements to the session.
        case established(JID)
        /// Deliver this first-level element to the established session.
        case deliver(XMLElement)
        /// Send the stream error and close.
        case closeWithStreamError(StreamError)
        /// The peer closed its stream: answer with `</stream>` and close.
        case closeStream
        /// Nothing to do.
        case none
    }

    public private(set) var state: State = .awaitingHeader(.plaintext)
    public let configuration: Configuration

    /// The hosted domain this stream is for, fixed by the first header's `to`.
    public private(set) var domain: String?
    /// The authenticated account's localpart.
    public private(set) var username: String?
    /// Channel-binding types and data for SCRAM-*-PLUS, known once TLS is up, strongest
    /// first (`tls-exporter`, then `tls-server-end-point`).
    private var channelBindings: [ChannelBinding] = []
    /// The phase a SASL exchange started in, to return to if it fails.
    private var authenticationPhase: Phase = .secured
    private var makeStreamID: @Sendable () -> String

    public init(configuration: Configuration, makeStreamID: @escaping @Sendable () -> String) {
        self.configuration = configuration
        self.makeStreamID = makeStreamID
    }

    /// The SASL mechanism of the current or last exchange, for metrics and logs.
    public private(set) var mechanismInUse: String?

    /// True while no channel binding is known (direct TLS learns it from the first header).
    public var channelBindingMissing: Bool { channelBindings.isEmpty }

    /// Sets the channel bindings of a direct-TLS stream, before its first header is answered.
    public mutating func setChannelBindings(_ bindings: [ChannelBinding]) {
        channelBindings = bindings
    }

    /// Starts a stream that begins inside TLS (XEP-0368 direct TLS).
    public mutating func startedWithTLS(channelBindings: [ChannelBinding]) {
        guard case .awaitingHeader(.plaintext) = state else { preconditionFailure("direct TLS after the stream started: \(state)") }
        self.channelBindings = channelBindings
        state = .awaitingHeader(.secured)
    }

    // MARK: Inputs

    /// A `<stream:stream>` header arrived. `isHosted` tells whether its `to` is a domain we
    /// serve (the handler looks it up, so this machine stays pure).
    public mutating func headerReceived(_ header: StreamHeader, isHosted: Bool) -> Action {
        guard case .awaitingHeader(let phase) = state else {
            // A second header without a restart is not XML a stream can contain; the parser
            // would have failed first. Treat it as a protocol violation all the same.
            return fail(.notWellFormed, "unexpected stream header")
        }
        // RFC 6120 §4.9.3.25: a version below 1.0 (or none, §4.7.5) is not supported.
        guard let version = header.versionNumbers, version.major >= 1 else {
            return fail(.unsupportedVersion, nil)
        }
        guard let to = header.to, let toDomain = try? JID(domain: to), isHosted else {
            // §4.9.3.6. The handler sends a header first when the error answers one (§4.9.1.2).
            return fail(.hostUnknown, nil)
        }
        if let domain, domain != toDomain.domainpart {
            // After a restart the client must address the same domain (§4.3.3).
            return fail(.hostUnknown, nil)
        }
        domain = toDomain.domainpart

        let features = features(for: phase)
        let reply = StreamHeader(to: nil, from: toDomain.domainpart, id: makeStreamID(), version: "1.0", language: "en", contentNamespace: XMLNamespace.client)
        state = .featuresSent(phase)
        return .sendHeaderAndFeatures(reply, features: features)
    }

    /// A first-level element arrived.
    public mutating func elementReceived(_ element: XMLElement) -> Action {
        switch state {
        case .awaitingHeader, .negotiatingTLS, .modifying:
            return fail(.notAuthorized, "element before negotiation")
        case .closed:
            return .none
        case .featuresSent(.plaintext):
            if element.name == "starttls" && element.namespace == XMLNamespace.tls, let domain {
                state = .negotiatingTLS
                return .startTLS(domain: domain)
            }
            if !configuration.requireTLS, element.name == "auth", element.namespace == XMLNamespace.sasl {
                return beginSASL(element, secured: false)
            }
            return refuseBeforeNegotiation(element)
        case .featuresSent(.secured):
            if element.name == "auth" && element.namespace == XMLNamespace.sasl {
                return beginSASL(element, secured: true)
            }
            if isRegistrationRequest(element) {
                return .registration(element)
            }
            return refuseBeforeNegotiation(element)
        case .authenticating(let exchange):
            guard element.namespace == XMLNamespace.sasl else {
                return fail(.notAuthorized, "element during SASL")
            }
            switch element.name {
            case "response":
                guard let bytes = Self.decodeBase64(element.text) else {
                    return saslFailed(.incorrectEncoding)
                }
                return step { exchange in
                    switch exchange {
                    case .scram(var scram):
                        let action = scram.responseReceived(bytes)
                        exchange = .scram(scram)
                        return action
                    case .plain(var plain):
                        // PLAIN has no second step; a response is out of order.
                        let action = plain.abort()
                        exchange = .plain(plain)
                        return action
                    }
                }
            case "abort":
                return saslFailed(.aborted)
            default:
                return saslFailed(.malformedRequest)
            }
        case .featuresSent(.authenticated):
            return afterAuthentication(element)
        case .established:
            return .deliver(element)
        }
    }

    /// The TLS handshake completed; the client now sends a new header.
    public mutating func tlsEstablished(channelBindings: [ChannelBinding]) {
        guard case .negotiatingTLS = state else { preconditionFailure("TLS established in \(state)") }
        self.channelBindings = channelBindings
        state = .awaitingHeader(.secured)
    }

    /// The SCRAM keys looked up for ``Action/lookUpSCRAMKeys(username:hash:)`` (nil: no
    /// such account; the exchange goes on identically and fails at the end).
    public mutating func scramKeysReceived(_ keys: SCRAMServerKeys?) -> Action {
        guard case .authenticating(.scram) = state else { return .none }
        return step { exchange in
            guard case .scram(var scram) = exchange else { return .failure(.malformedRequest) }
            let action = scram.credentialsReceived(keys)
            exchange = .scram(scram)
            return action
        }
    }

    /// The outcome of ``Action/verifyPassword(username:password:)``.
    public mutating func passwordChecked(_ valid: Bool) -> Action {
        guard case .authenticating(.plain) = state else { return .none }
        return step { exchange in
            guard case .plain(var plain) = exchange else { return .failure(.malformedRequest) }
            let action = plain.verificationFinished(valid)
            exchange = .plain(plain)
            return action
        }
    }

    /// The resource was bound: reply to the bind IQ and establish the stream.
    public mutating func bindSucceeded(_ jid: JID, iqID: String) -> [Action] {
        guard case .featuresSent(.authenticated) = state else { return [] }
        state = .established(jid)
        let result = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("id", iqID), XMLAttribute("type", "result"),
        ], children: [.element(XMLElement(name: "bind", namespace: XMLNamespace.bind, children: [
            .element(XMLElement(name: "jid", namespace: XMLNamespace.bind, text: jid.description)),
        ]))])
        return [.send(result), .established(jid)]
    }

    /// Binding failed with a stanza error (RFC 6120 §7.6.2): the client may try again.
    public mutating func bindFailed(_ error: StanzaError, iqID: String) -> Action {
        guard case .featuresSent(.authenticated) = state else { return .none }
        return .send(Self.iqError(id: iqID, error: error))
    }

    /// The XEP-0198 resumption succeeded: the session is bound to `jid` again.
    public mutating func resumeSucceeded(_ jid: JID) -> Action {
        guard case .featuresSent(.authenticated) = state else { return .none }
        state = .established(jid)
        return .established(jid)
    }

    /// The XEP-0198 resumption failed; the client may bind instead (XEP-0198 §5).
    public mutating func resumeFailed() -> Action {
        guard case .featuresSent(.authenticated) = state else { return .none }
        return .send(XMLElement(name: "failed", namespace: XMLNamespace.streamManagement, children: [
            .element(XMLElement(name: StanzaError.Condition.itemNotFound.rawValue, namespace: XMLNamespace.stanzaErrors)),
        ]))
    }

    /// The peer sent `</stream:stream>`.
    public mutating func streamEnded() -> Action {
        state = .closed
        return .closeStream
    }

    /// The connection failed or we closed it.
    public mutating func closed() {
        state = .closed
    }

    // MARK: Features

    /// The stream features for a phase (RFC 6120 §4.3.2).
    func features(for phase: Phase) -> XMLElement {
        var children: [XMLNode] = []
        switch phase {
        case .plaintext:
            // §5.3.1: when TLS is mandatory, it is the only feature offered.
            let starttls = XMLElement(name: "starttls", namespace: XMLNamespace.tls, children: configuration.requireTLS
                ? [.element(XMLElement(name: "required", namespace: XMLNamespace.tls))] : [])
            children.append(.element(starttls))
            if !configuration.requireTLS {
                children.append(.element(mechanisms(secured: false)))
            }
        case .secured:
            children.append(.element(mechanisms(secured: true)))
            if let domain, configuration.registrationOpen?(domain) == true {
                children.append(.element(XMLElement(name: "register", namespace: "http://jabber.org/features/iq-register")))
            }
            if !channelBindings.isEmpty {
                // XEP-0440: which channel-binding types SCRAM-*-PLUS can use here.
                children.append(.element(XMLElement(name: "sasl-channel-binding", namespace: "urn:xmpp:sasl-cb:0", children: channelBindings.map {
                    .element(XMLElement(name: "channel-binding", namespace: "urn:xmpp:sasl-cb:0", attributes: [XMLAttribute("type", $0.type)]))
                })))
            }
        case .authenticated:
            children.append(.element(XMLElement(name: "bind", namespace: XMLNamespace.bind)))
            // RFC 3921 session establishment, optional since RFC 6121; old clients look for it.
            children.append(.element(XMLElement(name: "session", namespace: XMLNamespace.session, children: [
                .element(XMLElement(name: "optional", namespace: XMLNamespace.session)),
            ])))
            children.append(.element(XMLElement(name: "ver", namespace: "urn:xmpp:features:rosterver")))
            if configuration.streamManagement {
                children.append(.element(XMLElement(name: "sm", namespace: XMLNamespace.streamManagement)))
            }
            // XEP-0352 §2: client state indication.
            children.append(.element(XMLElement(name: "csi", namespace: XMLNamespace.clientState)))
        }
        // Over TLS only: before it the features are for getting there.
        if phase != .plaintext, let domain, let caps = configuration.capabilities?(domain) {
            children.append(.element(caps))
        }
        return XMLElement(name: "features", namespace: XMLNamespace.streams, children: children)
    }

    /// XEP-0077 §3.1 before authentication: an IQ get or set whose payload is the register
    /// query, on a domain open to registration, over TLS.
    private func isRegistrationRequest(_ element: XMLElement) -> Bool {
        guard element.name == "iq", element.namespace == XMLNamespace.client, let domain,
              configuration.registrationOpen?(domain) == true,
              ["get", "set"].contains(element.attribute("type") ?? ""), element.attribute("id") != nil else { return false }
        let payloads = Array(element.elements)
        return payloads.count == 1 && payloads[0].name == "query" && payloads[0].namespace == "jabber:iq:register"
    }

    /// Mechanisms in order of preference. PLAIN only inside TLS (RFC 6120 §6.3.4); the -PLUS
    /// variants only when the TLS layer gave channel-binding data.
    func offeredMechanisms(secured: Bool) -> [String] {
        var names: [String] = []
        if secured, !channelBindings.isEmpty {
            names += ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"]
        }
        names += ["SCRAM-SHA-256", "SCRAM-SHA-1"]
        if secured, configuration.allowPLAIN {
            names.append("PLAIN")
        }
        return names
    }

    private func mechanisms(secured: Bool) -> XMLElement {
        XMLElement(name: "mechanisms", namespace: XMLNamespace.sasl, children: offeredMechanisms(secured: secured).map {
            .element(XMLElement(name: "mechanism", namespace: XMLNamespace.sasl, text: $0))
        })
    }

    // MARK: SASL

    private mutating func beginSASL(_ auth: XMLElement, secured: Bool) -> Action {
        let name = auth.attribute("mechanism") ?? ""
        guard offeredMechanisms(secured: secured).contains(name) else {
            // §6.4.5: an unknown or not-offered mechanism.
            return saslFailed(.invalidMechanism)
        }
        // §6.4.2: an empty initial response is sent as "="; no text means none was sent.
        let text = auth.text.trimmingXMLWhitespace
        var initial: [UInt8]?
        if text == "=" {
            initial = []
        } else if !text.isEmpty {
            guard let bytes = Self.decodeBase64(text) else { return saslFailed(.incorrectEncoding) }
            initial = bytes
        }
        authenticationPhase = secured ? .secured : .plaintext
        mechanismInUse = name
        let plusOffered = secured && !channelBindings.isEmpty
        let exchange: SASLExchange
        switch name {
        case "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1":
            let hash: SCRAMHash = name.hasPrefix("SCRAM-SHA-256") ? .sha256 : .sha1
            let bindings = name.hasSuffix("-PLUS") ? channelBindings : []
            exchange = .scram(SCRAMServer(hash: hash, channelBindings: bindings, plusOffered: plusOffered,
                                          serverSecret: configuration.serverSecret, fakeIterations: configuration.scramIterations))
        default:
            exchange = .plain(PLAINServer())
        }
        state = .authenticating(exchange)
        return step { exchange in
            switch exchange {
            case .scram(var scram):
                let action = scram.start(initialResponse: initial)
                exchange = .scram(scram)
                return action
            case .plain(var plain):
                let action = plain.start(initialResponse: initial)
                exchange = .plain(plain)
                return action
            }
        }
    }

    /// Runs one step of the current SASL exchange and turns its action into ours.
    private mutating func step(_ body: (inout SASLExchange) -> SASLServerAction) -> Action {
        guard case .authenticating(var exchange) = state else { return .none }
        state = .modifying
        let saslAction = body(&exchange)
        state = .authenticating(exchange)
        return translate(saslAction, exchange: exchange)
    }

    private mutating func translate(_ action: SASLServerAction, exchange: SASLExchange) -> Action {
        switch action {
        case .challenge(let bytes):
            return .send(XMLElement(name: "challenge", namespace: XMLNamespace.sasl, text: Self.encodeBase64(bytes)))
        case .lookUpSCRAMKeys(let username):
            guard case .scram(let scram) = exchange else { return saslFailed(.temporaryAuthFailure) }
            return .lookUpSCRAMKeys(username: username, hash: scram.hash)
        case .verifyPassword(let username, let password):
            return .verifyPassword(username: username, password: password)
        case .success(let username, let additionalData):
            // §6.4.6 and RFC 6120 §6.3.8: an authorization identity must name the account
            // itself; Braid does not let one account act as another.
            let authzid: String?
            switch exchange {
            case .scram(let scram): authzid = scram.authzid
            case .plain(let plain): authzid = plain.authzid
            }
            if let authzid, !authzid.isEmpty {
                guard let domain, let requested = try? JID(authzid), requested.isBare,
                      requested == (try? JID(localpart: username, domainpart: domain, resourcepart: String?.none)) else {
                    return saslFailed(.invalidAuthzid)
                }
            }
            self.username = username
            state = .awaitingHeader(.authenticated)
            let text = additionalData.map(Self.encodeBase64) ?? ""
            return .authenticated(username: username, element: XMLElement(name: "success", namespace: XMLNamespace.sasl, text: text))
        case .failure(let condition):
            // RFC 6120 §6.4.5 lets a failure carry text; a SCRAM server-error the client can act
            // on (RFC 5802 §7, such as `e=unsupported-channel-binding-type`) goes there, since
            // XMPP's SASL profile has no other place for it before the final message.
            if case .scram(let scram) = exchange, let serverError = scram.serverError {
                return saslFailed(condition, text: "e=" + serverError)
            }
            return saslFailed(condition)
        }
    }

    /// Sends `<failure/>`; the client may start another exchange (RFC 6120 §6.4.5).
    private mutating func saslFailed(_ condition: SASLFailure, text: String? = nil) -> Action {
        if case .authenticating = state { state = .featuresSent(authenticationPhase) }
        var children: [XMLNode] = [.element(XMLElement(name: condition.rawValue, namespace: XMLNamespace.sasl))]
        if let text {
            children.append(.element(XMLElement(name: "text", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("lang", "en", namespace: XMLNamespace.xml)], text: text)))
        }
        return .send(XMLElement(name: "failure", namespace: XMLNamespace.sasl, children: children))
    }

    // MARK: After authentication

    private mutating func afterAuthentication(_ element: XMLElement) -> Action {
        if element.name == "resume", element.namespace == XMLNamespace.streamManagement, configuration.streamManagement {
            guard let previous = element.attribute("previd"), let handled = element.attribute("h").flatMap(UInt32.init) else {
                return .send(XMLElement(name: "failed", namespace: XMLNamespace.streamManagement, children: [
                    .element(XMLElement(name: StanzaError.Condition.badRequest.rawValue, namespace: XMLNamespace.stanzaErrors)),
                ]))
            }
            return .resume(previousID: previous, handled: handled)
        }
        guard let iq = IQ(element), let id = iq.id else {
            return refuseBeforeNegotiation(element)
        }
        guard iq.type == .set, let bind = iq.payload, bind.name == "bind", bind.namespace == XMLNamespace.bind else {
            // §7.1: nothing but binding is allowed before a resource is bound.
            return .send(Self.iqError(id: id, error: StanzaError(.notAuthorized)))
        }
        let resource = bind.firstChild(name: "resource", namespace: XMLNamespace.bind)?.text
        return .bind(requestedResource: (resource?.isEmpty ?? true) ? nil : resource, iqID: id)
    }

    /// §4.3.5: stanzas sent before negotiation completes are refused with `not-authorized`.
    private mutating func refuseBeforeNegotiation(_ element: XMLElement) -> Action {
        if Stanza(element) != nil {
            return fail(.notAuthorized, "stanza before negotiation")
        }
        return fail(.unsupportedStanzaType, "unexpected <\(element.name)> in \(element.namespace)")
    }

    private mutating func fail(_ condition: StreamError.Condition, _ text: String?) -> Action {
        state = .closed
        return .closeWithStreamError(StreamError(condition, text: text))
    }

    // MARK: Helpers

    static func iqError(id: String, error: StanzaError) -> XMLElement {
        XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("id", id), XMLAttribute("type", "error"),
        ], children: [.element(error.element())])
    }

    static func decodeBase64(_ text: String) -> [UInt8]? {
        Base64.decode(text.trimmingXMLWhitespace)
    }

    static func encodeBase64(_ bytes: [UInt8]) -> String {
        Base64.encode(bytes)
    }
}
