import Foundation
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import Trust
import X509
import XMPPCore
import XMPPStream

/// Drives a link a peer opened: runs ``IncomingServerNegotiation``, authorises each pair the
/// peer asserts with the strongest proof available on this connection for that domain at
/// that moment, answers `db:verify` as the Authoritative Server, and checks every stanza.
final class IncomingLinkHandler: ChannelInboundHandler {
    typealias InboundIn = StreamEvent
    typealias OutboundOut = StreamOutput

    private let manager: FederationManager
    private let link: FederationLink
    private let decoder: XMLStreamDecoder
    private var negotiation: IncomingServerNegotiation
    private var context: ChannelHandlerContext?
    private var logger: Logger
    private let presentedChain = CapturedChain()
    private let inbound: InboundStanzaQueue
    private var headerSent = false
    private var closing = false
    /// Events that arrived while a header was being checked, processed in order after it.
    private var waiting: [StreamEvent] = []
    private var checkingHeader = false
    /// The certificate check made when EXTERNAL was offered, reused on success.
    private var externalProof: ValidatedPeerCertificate?
    private var negotiationTimer: Scheduled<Void>?

    init(manager: FederationManager, link: FederationLink, decoder: XMLStreamDecoder, directTLS: Bool) {
        self.manager = manager
        self.link = link
        self.decoder = decoder
        negotiation = IncomingServerNegotiation(configuration: .init(requireTLS: true), makeStreamID: { UUID().uuidString })
        if directTLS { negotiation.startedWithTLS() }
        var logger = manager.logger
        logger[metadataKey: "link"] = "\(link.id.prefix(8))"
        logger[metadataKey: "peer"] = "\(link.peerAddress)"
        self.logger = logger
        inbound = InboundStanzaQueue(manager: manager)
    }

    /// The TLS server handler: requests a client certificate and captures it; our own code
    /// judges it per domain (a serverAuth-only certificate is fine, XEP-0178 trap).
    func makeTLSHandler(context sslContext: NIOSSLContext) -> NIOSSLServerHandler {
        let captured = presentedChain
        return NIOSSLServerHandler(context: sslContext, customVerificationCallbackWithMetadata: { certificates, promise in
            captured.set(certificates)
            promise.succeed(.certificateVerified(VerificationMetadata(nil)))
        })
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func channelActive(context: ChannelHandlerContext) {
        manager.incomingAccepted(link)
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        negotiationTimer = context.eventLoop.scheduleTask(in: .seconds(Int64(manager.configuration.negotiationTimeoutSeconds))) {
            let handler = bound.value
            if !handler.link.hasInboundPairs() {
                handler.closeWithError(StreamError(.connectionTimeout, text: "no domain authenticated in time"), reason: "negotiation timeout")
            }
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        negotiationTimer?.cancel()
        negotiation.closed()
        link.markClosed()
        inbound.finish()
        manager.incomingClosed(link)
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let event = unwrapInboundIn(data)
        if checkingHeader {
            waiting.append(event)
        } else {
            handle(event, context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event, case .negotiatingTLS = negotiation.state {
            link.setCertificateChain(presentedChain.certificates.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) })
            negotiation.tlsEstablished()
        } else if case TLSUserEvent.handshakeCompleted = event {
            // Direct TLS: the chain is known before the first header.
            link.setCertificateChain(presentedChain.certificates.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) })
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let streamError = error as? any StreamErrorConvertible {
            closeWithError(streamError.streamError, reason: "\(error)")
        } else {
            logger.info("link error", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
    }

    // MARK: Events

    private func handle(_ event: StreamEvent, context: ChannelHandlerContext) {
        switch event {
        case .streamStart(let header):
            headerReceived(header, context: context)
        case .element(let element):
            run(negotiation.elementReceived(element), context: context)
        case .streamEnd:
            run(negotiation.streamEnded(), context: context)
        }
    }

    /// RFC 6120 §6.3.4 and XEP-0178 §3: EXTERNAL is offered only when the certificate is
    /// valid and names the header's `from`; that check is made before the features go out.
    private func headerReceived(_ header: StreamHeader, context: ChannelHandlerContext) {
        let hosted = header.to.flatMap { try? JID(domain: $0) }.map { manager.host.isHosted($0.domainpart) } ?? false
        let chain = link.certificateChain
        guard case .awaitingHeader(.secured) = negotiation.state, let from = header.from.flatMap({ try? JID(domain: $0).domainpart }), !chain.isEmpty, hosted else {
            run(negotiation.headerReceived(header, isHosted: hosted, externalAvailable: false), context: context)
            return
        }
        checkingHeader = true
        let validator = manager.validator
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask {
            await validator.validate(chain: chain, for: from)
        }.whenSuccess { result in
            let (handler, context) = bound.value
            if case .success(let validated) = result {
                handler.externalProof = validated
            }
            handler.run(handler.negotiation.headerReceived(header, isHosted: hosted, externalAvailable: handler.externalProof != nil), context: context)
            handler.checkingHeader = false
            while !handler.checkingHeader, !handler.waiting.isEmpty {
                handler.handle(handler.waiting.removeFirst(), context: context)
            }
        }
    }

    private func run(_ action: IncomingServerNegotiation.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .sendHeaderAndFeatures(let header, let features):
            headerSent = true
            context.write(wrapOutboundOut(.header(header)), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.element(features)), promise: nil)
        case .startTLS(let domain):
            startTLS(domain: domain, context: context)
        case .send(let element):
            context.writeAndFlush(wrapOutboundOut(.element(element)), promise: nil)
        case .externalSucceeded(let peer, let local):
            context.writeAndFlush(wrapOutboundOut(.element(XMLElement(name: "success", namespace: XMLNamespace.sasl))), promise: nil)
            decoder.restart(leftover: .parse, context: context)
            link.recordProof(of: peer, method: .pkix, expires: externalProof?.expires)
            link.authorize(DomainPair(local: local, remote: peer), .inbound, method: .pkix, expires: externalProof?.expires)
            manager.metrics.proof(.pkix, direction: .inbound)
            logger.info("peer authenticated with SASL EXTERNAL", metadata: ["peer-domain": "\(peer)", "local": "\(local)"])
        case .authorizeDialback(let request, let streamID):
            authorizeDialback(request, streamID: streamID, context: context)
        case .answerVerify(let request):
            answerVerify(request, context: context)
        case .bidiRequested:
            logger.debug("peer asked for a bidirectional stream")
        case .deliver(let element):
            deliver(element, context: context)
        case .closeWithStreamError(let error):
            closeWithError(error, reason: error.text ?? error.condition.rawValue)
        case .closeStream:
            closing = true
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end)).whenComplete { _ in channel.close(promise: nil) }
        }
    }

    private func startTLS(domain: String, context: ChannelHandlerContext) {
        // Cleartext after <starttls/> in the same read is refused (RFC 6120 §5.4.3.3).
        decoder.restart(leftover: .reject, context: context)
        let manager = self.manager
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask { () async -> NIOSSLContext? in
            await manager.host.prepareCertificate(for: domain)
            return try? manager.host.tls.serverContextRequestingClientCertificate(for: domain)
        }.whenSuccess { sslContext in
            let (handler, context) = bound.value
            guard let sslContext else {
                handler.closeWithError(StreamError(.internalServerError), reason: "no certificate for \(domain)")
                return
            }
            let channel = context.channel
            let tlsHandler = handler.makeTLSHandler(context: sslContext)
            context.writeAndFlush(handler.wrapOutboundOut(.element(XMLElement(name: "proceed", namespace: XMLNamespace.tls)))).whenSuccess {
                do {
                    try channel.pipeline.syncOperations.addHandler(tlsHandler, position: .first)
                } catch {
                    channel.close(promise: nil)
                }
            }
        }
    }

    // MARK: Dialback

    /// XEP-0220 Steps 1–4 on the receiving side. The pair is authorised with the strongest
    /// proof available now: the certificate on this connection naming the asserted domain
    /// (XEP-0344 §2.4, checked for this exact domain at this moment, not cached from the
    /// handshake: CVE-2021-32919), else, unless policy requires certificates, a `db:verify`
    /// on a separate connection to the domain's authoritative server. Failures are dialback
    /// errors: the link and every pair already on it stay up (§2.2.1).
    private func authorizeDialback(_ request: DialbackElement, streamID: String, context: ChannelHandlerContext) {
        guard let local = try? JID(domain: request.to).domainpart, manager.host.isHosted(local) else {
            refuse(request, StanzaError(.itemNotFound, text: "\(request.to) is not hosted here"), context: context)
            return
        }
        guard let remote = try? JID(domain: request.from).domainpart, !manager.host.isHosted(remote) else {
            refuse(request, StanzaError(.notAcceptable, text: "invalid sender domain"), context: context)
            return
        }
        guard let key = request.key else {
            refuse(request, StanzaError(.badRequest, text: "no dialback key"), context: context)
            return
        }
        let chain = link.certificateChain
        let manager = self.manager
        let requireCertificates = manager.requiresCertificates(remote)
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask { () async -> DialbackDecision in
            if !chain.isEmpty, case .success(let validated) = await manager.validator.validate(chain: chain, for: remote) {
                return .valid(.pkix, validated.expires)
            }
            if requireCertificates {
                return .error(StanzaError(.notAuthorized, text: "a valid certificate for \(remote) is required"))
            }
            manager.metrics.dialbackVerifications.increment()
            switch await manager.verifyDialback(receiving: local, originating: remote, streamID: streamID, key: key) {
            case .valid: return .valid(.dialback, nil)
            case .invalid: return .invalid
            case .error(let error): return .error(error)
            }
        }.whenSuccess { decision in
            let (handler, context) = bound.value
            handler.dialbackDecided(request, local: local, remote: remote, decision: decision, context: context)
        }
    }

    enum DialbackDecision: Sendable {
        case valid(ProofMethod, Date?)
        case invalid
        case error(StanzaError)
    }

    private func dialbackDecided(_ request: DialbackElement, local: String, remote: String, decision: DialbackDecision, context: ChannelHandlerContext) {
        guard !closing, !link.isClosed else { return }
        switch decision {
        case .valid(let method, let expires):
            link.recordProof(of: remote, method: method, expires: expires)
            link.authorize(DomainPair(local: local, remote: remote), .inbound, method: method, expires: expires)
            manager.metrics.proof(method, direction: .inbound)
            logger.info("pair authorised", metadata: ["pair": "\(local)⇄\(remote)", "method": "\(method.rawValue)"])
            context.writeAndFlush(wrapOutboundOut(.element(request.answer(.valid).element)), promise: nil)
        case .invalid:
            logger.warning("security: dialback key refused by the authoritative server", metadata: ["pair": "\(local)⇄\(remote)"])
            manager.metrics.dialbackRefused("invalid")
            if link.hasInboundPairs() {
                // §2.2.1: other pairs are valid on this stream, so keep it and report an error.
                context.writeAndFlush(wrapOutboundOut(.element(request.answer(.error, error: StanzaError(.forbidden)).element)), promise: nil)
            } else {
                // §2.1.2: the first pair failed: answer invalid and close the stream.
                closing = true
                let channel = context.channel
                context.write(wrapOutboundOut(.element(request.answer(.invalid).element)), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end)).whenComplete { _ in channel.close(promise: nil) }
            }
        case .error(let error):
            refuse(request, error, context: context)
        }
    }

    private func refuse(_ request: DialbackElement, _ error: StanzaError, context: ChannelHandlerContext) {
        logger.notice("dialback request refused", metadata: ["from": "\(request.from)", "to": "\(request.to)", "condition": "\(error.condition.rawValue)"])
        manager.metrics.dialbackRefused(error.condition.rawValue)
        context.writeAndFlush(wrapOutboundOut(.element(request.answer(.error, error: error).element)), promise: nil)
    }

    /// XEP-0220 Step 3: as the Authoritative Server, say whether we issued this key.
    private func answerVerify(_ request: DialbackElement, context: ChannelHandlerContext) {
        guard let originating = try? JID(domain: request.to).domainpart, manager.host.isHosted(originating) else {
            refuse(request, StanzaError(.itemNotFound, text: "\(request.to) is not hosted here"), context: context)
            return
        }
        let valid = request.id.flatMap { id in
            request.key.map { manager.keys.verify($0, receiving: request.from, originating: originating, streamID: id) }
        } ?? false
        if !valid {
            logger.notice("db:verify for a key we did not issue", metadata: ["from": "\(request.from)", "to": "\(request.to)"])
        }
        context.writeAndFlush(wrapOutboundOut(.element(request.answer(valid ? .valid : .invalid).element)), promise: nil)
    }

    // MARK: Stanzas

    private func deliver(_ element: XMLElement, context: ChannelHandlerContext) {
        if element.namespace == XMLNamespace.streamManagement { return }
        switch InboundChecks.check(element, link: link, host: manager.host) {
        case .accept(let stanza):
            link.countReceived()
            inbound.enqueue(stanza)
        case .reject(let error, let reason):
            logger.warning("security: refused stanza from peer", metadata: ["reason": "\(reason)", "condition": "\(error.condition.rawValue)"])
            closeWithError(error, reason: reason)
        }
    }

    private func closeWithError(_ error: StreamError, reason: String) {
        guard let context, !closing else { return }
        closing = true
        negotiation.closed()
        link.markClosed()
        manager.metrics.streamError(error.condition.rawValue)
        logger.notice("closing link with error", metadata: ["condition": "\(error.condition.rawValue)", "reason": "\(reason)"])
        if !headerSent {
            headerSent = true
            context.write(wrapOutboundOut(.header(StreamHeader(id: UUID().uuidString, contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback]))), promise: nil)
        }
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.error(error))).whenComplete { _ in channel.close(promise: nil) }
    }
}

@available(*, unavailable)
extension IncomingLinkHandler: Sendable {}
