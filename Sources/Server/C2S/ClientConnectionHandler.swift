import Cluster
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import Storage
import XMPPCore
import XMPPStream

/// One client connection: runs ``ClientNegotiation`` and carries out its actions, then hands
/// stanzas to the bound ``ClientSession``.
///
/// The handler makes no protocol decisions of its own beyond timeouts and rate limits; those
/// live in the state machine. Every bad input ends with the RFC's stream error, a log line
/// naming the peer, and a metric.
final class ClientConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = StreamEvent
    typealias OutboundOut = StreamOutput

    private let server: ServerContext
    /// The TCP stream's decoder, which restarts with the stream; nil for WebSocket, where
    /// each `<open/>` is a message of its own and there is nothing to restart.
    private let decoder: XMLStreamDecoder?
    private let listener: ListenerKind
    private var negotiation: ClientNegotiation
    private var logger: Logger
    private var session: ClientSession?
    private var headerSent = false
    private var closing = false
    private var context: ChannelHandlerContext?

    private var negotiationTimer: SessionClock.Timer?
    private var livenessTimer: SessionClock.Timer?
    private let clock: SessionClock
    private var lastRead: NIODeadline
    private var lastWrite: NIODeadline
    private var rateLimiter: TokenBucket

    init(server: ServerContext, decoder: XMLStreamDecoder?, listener: ListenerKind, logger: Logger) {
        self.server = server
        self.decoder = decoder
        self.listener = listener
        self.logger = logger
        let settings = server.configuration.c2s
        negotiation = ClientNegotiation(
            configuration: .init(
                requireTLS: settings.requireTLS,
                allowPLAIN: settings.allowPlain,
                scramIterations: server.configuration.auth.scramIterations,
                serverSecret: server.secret,
                streamManagement: server.configuration.streamManagement.enabled,
                capabilities: { [server] domain in DiscoModule.capabilities(of: domain, server: server) },
                registrationOpen: { [server] domain in server.configuration.registration.isOpen(domain) && server.domains.isHosted(domain) }),
            makeStreamID: { ServerContext.randomIdentifier(bytes: 16) })
        if listener == .c2sDirectTLS || listener == .c2sWebSocket {
            // WebSocket runs over the HTTPS listener's TLS (RFC 7395 §3.1: wss).
            negotiation.startedWithTLS(channelBindings: [])
        }
        clock = server.sessionClock
        let now = clock.now()
        lastRead = now
        lastWrite = now
        rateLimiter = TokenBucket(rate: settings.stanzasPerSecond, burst: settings.stanzaBurst, now: now)
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if let remote = context.channel.remoteAddress {
            logger[metadataKey: "peer"] = "\(remote)"
        }
    }

    func channelActive(context: ChannelHandlerContext) {
        server.metrics.connectionsAccepted[listener]?.increment()
        logger.debug("client connected", metadata: ["listener": "\(listener.rawValue)"])
        let timeout = TimeAmount.seconds(Int64(server.configuration.c2s.negotiationTimeoutSeconds))
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        negotiationTimer = clock.schedule(on: context.eventLoop, in: timeout) {
            bound.value.failStream(StreamError(.connectionTimeout, text: "negotiation took too long"), reason: "negotiation timeout")
        }
        let interval = TimeAmount.seconds(Int64(max(1, min(server.configuration.c2s.keepaliveSeconds, server.configuration.c2s.idleTimeoutSeconds) / 2)))
        livenessTimer = clock.scheduleRepeated(on: context.eventLoop, every: interval) {
            bound.value.checkLiveness()
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        negotiationTimer?.cancel()
        livenessTimer?.cancel()
        negotiation.closed()
        if let session {
            self.session = nil
            session.connectionLost()
        }
        logger.debug("client disconnected")
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        lastRead = clock.now()
        switch unwrapInboundIn(data) {
        case .streamStart(let header):
            // Direct TLS: SCRAM-*-PLUS binds to the certificate chosen for this domain.
            if listener == .c2sDirectTLS, negotiation.channelBindingMissing, let to = header.to {
                negotiation.setChannelBindings(channelBindings(context: context, domain: to))
            } else if listener == .c2sWebSocket, negotiation.channelBindingMissing {
                // The HTTPS listener chose its certificate by SNI, maybe the provider's name
                // rather than this domain's: only tls-exporter, which binds the session itself.
                negotiation.setChannelBindings(channelBindings(context: context, domain: nil))
            }
            let hosted = header.to.flatMap { try? JID(domain: $0) }.map { server.domains.isHosted($0.domainpart) } ?? false
            run(negotiation.headerReceived(header, isHosted: hosted), context: context)
        case .element(let element):
            run(negotiation.elementReceived(element), context: context)
        case .streamEnd:
            run(negotiation.streamEnded(), context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is ClientActivity {
            lastRead = clock.now()
            return
        }
        if case TLSUserEvent.handshakeCompleted = event, case .negotiatingTLS = negotiation.state, let domain = negotiation.domain {
            negotiation.tlsEstablished(channelBindings: channelBindings(context: context, domain: domain))
            // A new stream begins inside TLS; ours opens when the client's header arrives, so
            // an error before then must open it first (RFC 6120 §4.9.1.1).
            headerSent = false
            logger.debug("TLS established", metadata: ["domain": "\(domain)"])
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// SCRAM-*-PLUS bindings for this connection: `tls-exporter` from the live TLS session
    /// (TLS 1.3), and `tls-server-end-point` for the certificate chosen for `domain`.
    private func channelBindings(context: ChannelHandlerContext, domain: String?) -> [ChannelBinding] {
        let serverEndPoint = domain.flatMap { server.certificates.channelBinding(for: $0) }
        guard let tls = try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self) else {
            return serverEndPoint.map { [$0] } ?? []
        }
        return TLSChannelBindings.bindings(handler: tls, serverEndPoint: serverEndPoint)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let streamError = error as? any StreamErrorConvertible {
            failStream(streamError.streamError, reason: "\(error)")
        } else if let tlsError = error as? NIOSSLError, tlsError == .uncleanShutdown {
            // The client dropped the connection without TLS's close_notify, as browsers do
            // when a page closes its WebSocket: a disconnection, not a TLS failure.
            logger.debug("connection closed without TLS close_notify")
            context.close(promise: nil)
        } else if error is NIOSSLError || error is BoringSSLError {
            // RFC 6120 §5.4.3.2: a failed TLS negotiation ends the TCP connection, no stream error.
            logger.info("TLS failure", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        } else if let channelError = error as? ChannelError, channelError == .ioOnClosedChannel || channelError == .alreadyClosed {
            context.close(promise: nil)
        } else {
            logger.debug("connection error", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
    }

    // MARK: Actions

    private func run(_ action: ClientNegotiation.Action, context: ChannelHandlerContext) {
        logger.trace("negotiation action", metadata: ["action": "\(action)"])
        switch action {
        case .none:
            break
        case .sendHeaderAndFeatures(let header, let features):
            headerSent = true
            write(.header(header), context: context)
            write(.element(features), context: context)
            context.flush()
        case .startTLS(let domain):
            // Cleartext after <starttls/> in the same read is an injection attempt (RFC 6120
            // §5.4.3.3, and the STARTTLS command-injection class of bugs).
            decoder?.restart(leftover: .reject, context: context)
            if let sslContext = server.certificates.serverContext(for: domain) {
                proceed(with: sslContext, context: context)
            } else {
                // No certificate yet: one may be made (off the event loop) for a hosted domain.
                let certificates = server.certificates
                let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
                context.eventLoop.makeFutureWithTask { await certificates.prepareCertificate(for: domain) }.whenComplete { _ in
                    let (handler, context) = bound.value
                    guard let sslContext = certificates.serverContext(for: domain) else {
                        handler.logger.error("no certificate for hosted domain", metadata: ["domain": "\(domain)"])
                        handler.failStream(StreamError(.internalServerError), reason: "no certificate for \(domain)")
                        return
                    }
                    handler.proceed(with: sslContext, context: context)
                }
            }
        case .send(let element):
            if element.name == "failure", element.namespace == XMLNamespace.sasl {
                server.metrics.authentication(mechanism: negotiation.mechanismInUse ?? "unknown", succeeded: false)
                logger.notice("authentication failed", metadata: ["condition": "\(element.firstElement?.name ?? "")"])
            }
            write(.element(element), context: context)
            context.flush()
        case .authenticated(let username, let element):
            server.metrics.authentication(mechanism: negotiation.mechanismInUse ?? "unknown", succeeded: true)
            logger[metadataKey: "user"] = "\(username)"
            logger.info("authenticated")
            write(.element(element), context: context)
            context.flush()
            decoder?.restart(leftover: .parse, context: context)
            // RFC 6120 §6.4.6: the stream is replaced; the next one is opened by the client.
            headerSent = false
        case .lookUpSCRAMKeys(let username, let hash):
            lookUpSCRAMKeys(username: username, hash: hash, context: context)
        case .verifyPassword(let username, let password):
            verifyPassword(username: username, password: password, context: context)
        case .registration(let iq):
            register(iq, context: context)
        case .bind(let requested, let iqID):
            bind(requested: requested, iqID: iqID, context: context)
        case .resume(let previousID, let handled):
            resume(previousID: previousID, handled: handled, context: context)
        case .established:
            break
        case .deliver(let element):
            deliver(element, context: context)
        case .closeWithStreamError(let error):
            failStream(error, reason: error.text ?? error.condition.rawValue)
        case .closeStream:
            closing = true
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end)).whenComplete { _ in channel.close(promise: nil) }
            if let session {
                // A clean close is final: no resumption (XEP-0198 §5).
                self.session = nil
                session.end()
            }
        }
    }

    /// Sends `<proceed/>`, then puts TLS in front of the pipeline once it is on the wire, so
    /// it goes out in the clear.
    private func proceed(with sslContext: NIOSSLContext, context: ChannelHandlerContext) {
        guard !closing else { return }
        let proceed = XMLElement(name: "proceed", namespace: XMLNamespace.tls)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.element(proceed))).whenSuccess {
            do {
                try StreamPipeline.startTLS(NIOSSLServerHandler(context: sslContext), on: channel)
            } catch {
                channel.close(promise: nil)
            }
        }
    }

    private func write(_ output: StreamOutput, context: ChannelHandlerContext) {
        lastWrite = clock.now()
        context.write(wrapOutboundOut(output), promise: nil)
    }

    // MARK: In-band registration (XEP-0077)

    private func register(_ iq: XMLElement, context: ChannelHandlerContext) {
        guard let domain = negotiation.domain else { return }
        let server = self.server
        let address = context.channel.remoteAddress?.ipAddress
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask {
            await InBandRegistration.answer(iq, domain: domain, address: address, server: server)
        }.whenSuccess { reply in
            let (handler, context) = loopBound.value
            guard !handler.closing else { return }
            handler.write(.element(reply), context: context)
            context.flush()
        }
    }

    // MARK: SASL

    private func accountJID(_ username: String) -> JID? {
        guard let domain = negotiation.domain else { return nil }
        return try? JID(localpart: username, domainpart: domain, resourcepart: String?.none)
    }

    private func lookUpSCRAMKeys(username: String, hash: SCRAMHash, context: ChannelHandlerContext) {
        let storage = server.storage
        let account = accountJID(username)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask { () async throws -> SCRAMServerKeys? in
            guard let account, let stored = try await storage.credentials(for: account) else { return nil }
            let keys = hash == .sha256 ? stored.sha256 : stored.sha1
            return SCRAMServerKeys(salt: keys.salt, iterations: keys.iterations, storedKey: keys.storedKey, serverKey: keys.serverKey)
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .success(let keys):
                handler.afterAuthenticationStep(handler.negotiation.scramKeysReceived(keys), context: context)
            case .failure(let error):
                handler.logger.error("credential lookup failed", metadata: ["error": "\(error)"])
                handler.afterAuthenticationStep(handler.negotiation.scramKeysReceived(nil), context: context)
            }
        }
    }

    private func verifyPassword(username: String, password: String, context: ChannelHandlerContext) {
        let storage = server.storage
        let account = accountJID(username)
        let iterations = server.configuration.auth.scramIterations
        let secret = server.secret
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        // PBKDF2 is deliberately slow: run it off the event loop. An unknown account costs the
        // same derivation with fake keys, so timing does not reveal which accounts exist.
        context.eventLoop.makeFutureWithTask { () async throws -> Bool in
            let stored = try await account.asyncFlatMap { try await storage.credentials(for: $0) }
            let keys = stored.map { SCRAMServerKeys(salt: $0.sha256.salt, iterations: $0.sha256.iterations, storedKey: $0.sha256.storedKey, serverKey: $0.sha256.serverKey) }
                ?? SCRAMKeyDerivation.fakeKeys(username: username, serverSecret: secret, iterations: iterations, hash: .sha256)
            let valid = SCRAMKeyDerivation.verify(password: password, keys: keys, hash: .sha256)
            return valid && stored != nil
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            let valid = (try? result.get()) ?? false
            handler.afterAuthenticationStep(handler.negotiation.passwordChecked(valid), context: context)
        }
    }

    /// Runs the action that follows an asynchronous SASL step, unless the stream closed meanwhile.
    private func afterAuthenticationStep(_ action: ClientNegotiation.Action, context: ChannelHandlerContext) {
        guard !closing else { return }
        run(action, context: context)
    }

    // MARK: Binding and resumption

    private func bind(requested: String?, iqID: String, context: ChannelHandlerContext) {
        guard let username = negotiation.username, let account = accountJID(username) else {
            failStream(StreamError(.internalServerError), reason: "bind without an account")
            return
        }
        let policy = server.configuration.c2s.resourceConflict
        var resource = requested ?? "braid-" + ServerContext.randomIdentifier(bytes: 6)
        var jid: JID
        do {
            jid = try account.with(resource: resource)
        } catch {
            // RFC 6120 §7.7.2.1: a resourcepart that cannot be prepared.
            run(negotiation.bindFailed(StanzaError(.badRequest, text: "invalid resource"), iqID: iqID), context: context)
            return
        }
        var newSession = makeSession(jid: jid, id: ServerContext.randomIdentifier(bytes: 16), context: context)
        var outcome = server.sessions.bind(newSession, replacing: policy == .replace)
        if case .conflict = outcome, policy == .rename {
            // RFC 6120 §7.7.2.2: the server may assign another resource instead.
            resource = resource + "-" + ServerContext.randomIdentifier(bytes: 4)
            guard let renamed = try? account.with(resource: resource) else {
                run(negotiation.bindFailed(StanzaError(.conflict), iqID: iqID), context: context)
                return
            }
            jid = renamed
            newSession = makeSession(jid: jid, id: newSession.id, context: context)
            outcome = server.sessions.bind(newSession, replacing: false)
        }
        switch outcome {
        case .conflict:
            run(negotiation.bindFailed(StanzaError(.conflict), iqID: iqID), context: context)
        case .bound(let replaced):
            if let replaced {
                logger.info("resource replaced by a newer session", metadata: ["resource": "\(resource)"])
                replaced.closeWithError(StreamError(.conflict, text: "replaced by a new session"))
            }
            establish(newSession, context: context)
            for action in negotiation.bindSucceeded(jid, iqID: iqID) {
                run(action, context: context)
            }
        }
    }

    private func makeSession(jid: JID, id: String, context: ChannelHandlerContext) -> ClientSession {
        let settings = ClientSession.Settings(
            resumeTimeout: .seconds(Int64(server.configuration.streamManagement.resumeTimeoutSeconds)),
            maxUnacked: server.configuration.streamManagement.maxUnackedStanzas,
            metrics: server.metrics,
            clock: server.sessionClock)
        return ClientSession(id: id, jid: jid, channel: context.channel, owner: server.router, settings: settings, logger: logger)
    }

    private func establish(_ newSession: ClientSession, context: ChannelHandlerContext) {
        negotiationTimer?.cancel()
        negotiationTimer = nil
        session = newSession
        logger[metadataKey: "jid"] = "\(newSession.jid)"
        server.metrics.sessionsActive.set(Int64(server.sessions.count))
        let router = server.router
        let server = self.server
        server.activeProcessing.add(1, ordering: .relaxed)
        Task {
            await newSession.runInboundProcessing(owner: router)
            server.activeProcessing.subtract(1, ordering: .relaxed)
        }
    }

    private func resume(previousID: String, handled: UInt32, context: ChannelHandlerContext) {
        if let username = negotiation.username, let account = accountJID(username), server.resumption.session(id: previousID) == nil,
           let cluster = server.cluster {
            resumeFromAnotherNode(previousID: previousID, account: account, handled: handled, cluster: cluster, context: context)
            return
        }
        guard let username = negotiation.username, let account = accountJID(username),
              let previous = server.resumption.session(id: previousID), previous.jid.bare == account else {
            // XEP-0198 §5: unknown or foreign session ids get <item-not-found/>.
            run(negotiation.resumeFailed(), context: context)
            return
        }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        previous.loop.submit { previous.takeOverForResumption(handled: handled) }
            .hop(to: context.eventLoop)
            .whenComplete { result in
                let (handler, context) = loopBound.value
                guard case .success(let taken?) = result else {
                    handler.run(handler.negotiation.resumeFailed(), context: context)
                    return
                }
                let resumed = handler.makeSession(jid: previous.jid, id: previous.id, context: context)
                guard handler.server.sessions.replace(previous, with: resumed) else {
                    handler.run(handler.negotiation.resumeFailed(), context: context)
                    return
                }
                handler.server.resumption.replace(resumed)
                handler.logger.info("session resumed", metadata: ["jid": "\(resumed.jid)"])
                handler.completeResumption(resumed, state: taken, context: context)
            }
    }

    /// The end of a resumption, local or from another node: the session takes over the
    /// XEP-0198 state, the client gets `<resumed/>`, and what it had not acknowledged is
    /// sent again (XEP-0198 §5).
    private func completeResumption(_ resumed: ClientSession, state: ClientSession.StreamManagementState, context: ChannelHandlerContext) {
        server.metrics.smResumed.increment()
        let reply = resumed.adoptResumedState(state)
        establish(resumed, context: context)
        run(negotiation.resumeSucceeded(resumed.jid), context: context)
        write(.element(reply), context: context)
        context.flush()
        resumed.retransmitUnacknowledged()
    }

    /// XEP-0198 resumption of a session another node of the cluster holds (the client came
    /// back through another SRV target): that node hands the session over with what it
    /// had not had acknowledged, and it continues here.
    private func resumeFromAnotherNode(previousID: String, account: JID, handled: UInt32, cluster: ClusterBridge, context: ChannelHandlerContext) {
        let promise = context.eventLoop.makePromise(of: SessionTransfer?.self)
        promise.completeWithTask { await cluster.resumeFromAnotherNode(previd: previousID, account: account, handled: handled) }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        promise.futureResult.whenComplete { result in
            let (handler, context) = loopBound.value
            guard case .success(let transfer?) = result, let jid = try? JID(transfer.record.jid), jid.bare == account, jid.resourcepart != nil else {
                handler.run(handler.negotiation.resumeFailed(), context: context)
                return
            }
            let resumed = handler.makeSession(jid: jid, id: previousID, context: context)
            // A stand-in of the session on the other node may still be here: replaced.
            guard case .bound = handler.server.sessions.bind(resumed, replacing: true) else {
                handler.run(handler.negotiation.resumeFailed(), context: context)
                Task { await cluster.orphanedTransfer(transfer) }
                return
            }
            var presence: XMLElement?
            if let text = transfer.record.presence { presence = try? XMLFragment.parse(text) }
            handler.server.sessions.update(resumed) { entry in
                entry.presence = presence
                entry.priority = transfer.record.priority
                entry.interestedInRoster = transfer.record.interestedInRoster
                entry.carbons = transfer.record.carbons
                entry.boundAt = transfer.record.boundAt
            }
            handler.server.resumption.register(resumed)
            handler.logger.info("session resumed from another node", metadata: ["jid": "\(resumed.jid)", "unacknowledged": "\(transfer.unacknowledged.count)"])
            var state = ClientSession.StreamManagementState(resumable: true)
            state.receivedInbound = transfer.receivedInbound
            state.handledInbound = transfer.receivedInbound
            state.sentOutbound = transfer.sentOutbound
            state.acknowledged = transfer.acknowledged
            state.unacked = transfer.unacknowledged.compactMap { try? XMLFragment.parse($0) }
            handler.completeResumption(resumed, state: state, context: context)
        }
    }

    // MARK: Established stream

    private func deliver(_ element: XMLElement, context: ChannelHandlerContext) {
        guard let session else { return }
        if element.namespace == XMLNamespace.streamManagement {
            switch session.streamManagementElement(element, resumptionEnabled: server.configuration.streamManagement.enabled) {
            case .none:
                break
            case .reply(let reply):
                write(.element(reply), context: context)
                context.flush()
            case .enabled(let reply, let resumable):
                if resumable { server.resumption.register(session) }
                write(.element(reply), context: context)
                context.flush()
            case .streamError(let error):
                failStream(error, reason: "stream management: \(error.text ?? "")")
            }
            return
        }
        if element.namespace == XMLNamespace.clientState {
            // XEP-0352: <active/> and <inactive/> (anything else in the namespace is ignored,
            // never a stream error: clients send these without always checking the feature).
            switch element.name {
            case "inactive": session.setInactive(true)
            case "active": session.setInactive(false)
            default: break
            }
            return
        }
        guard Stanza(element) != nil else {
            // RFC 6120 §4.8.4: a first-level element that is not a stanza is never routed.
            failStream(StreamError(.unsupportedStanzaType), reason: "unexpected <\(element.name)> in \(element.namespace)")
            return
        }
        guard rateLimiter.take(now: clock.now()) else {
            failStream(StreamError(.policyViolation, text: "too many stanzas"), reason: "rate limit")
            return
        }
        if let kind = StanzaKind(rawValue: element.name) {
            server.metrics.stanzasIn[kind]?.increment()
        }
        session.received(element)
    }

    // MARK: Failure and liveness

    /// Sends a stream error (after our header, if none was sent yet, RFC 6120 §4.9.1.2), logs
    /// it with the peer's address, counts it, and closes.
    private func failStream(_ error: StreamError, reason: String) {
        guard let context, !closing else { return }
        closing = true
        negotiation.closed()
        logger.notice("closing stream with error", metadata: ["condition": "\(error.condition.rawValue)", "reason": "\(reason)"])
        server.metrics.streamErrorSent(error.condition, listener: "c2s")
        if !headerSent {
            headerSent = true
            context.write(wrapOutboundOut(.header(StreamHeader(from: nil, id: ServerContext.randomIdentifier(bytes: 16), contentNamespace: XMLNamespace.client))), promise: nil)
        }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.error(error))).whenComplete { _ in channel.close(promise: nil) }
        if let session {
            self.session = nil
            session.end()
        }
    }

    private func checkLiveness() {
        guard let context, !closing else { return }
        let now = clock.now()
        let idle = TimeAmount.seconds(Int64(server.configuration.c2s.idleTimeoutSeconds))
        if now - lastRead > idle {
            failStream(StreamError(.connectionTimeout), reason: "idle for \(server.configuration.c2s.idleTimeoutSeconds)s")
            return
        }
        if headerSent, now - lastWrite >= .seconds(Int64(server.configuration.c2s.keepaliveSeconds)) {
            // RFC 6120 §4.6.1: whitespace keeps NATs and the client's own timers happy.
            write(.keepalive, context: context)
            context.flush()
        }
    }
}

@available(*, unavailable)
extension ClientConnectionHandler: Sendable {}

/// A token bucket for per-session stanza rate limits.
struct TokenBucket {
    let rate: Double
    let burst: Double
    private var tokens: Double
    private var last: NIODeadline

    init(rate: Double, burst: Double, now: NIODeadline) {
        self.rate = max(rate, 0.001)
        self.burst = max(burst, 1)
        tokens = self.burst
        last = now
    }

    mutating func take(now: NIODeadline) -> Bool {
        let elapsed = Double((now - last).nanoseconds) / 1e9
        last = now
        tokens = min(burst, tokens + elapsed * rate)
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }
}

extension Optional {
    func asyncFlatMap<U>(_ transform: (Wrapped) async throws -> U?) async rethrows -> U? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}
