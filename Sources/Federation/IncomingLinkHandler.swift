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
    private let session: LinkSession
    private var headerSent = false
    private var closing = false
    /// Events that arrived while a header was being checked, processed in order after it.
    private var waiting: [StreamEvent] = []
    private var checkingHeader = false
    /// The certificate check made when EXTERNAL was offered, reused on success.
    private var externalProof: ValidatedPeerCertificate?
    private var negotiationTimer: Scheduled<Void>?
    /// SASL EXTERNAL succeeded for (peer, local); the pair is authorised once the restarted
    /// stream's header is answered.
    private var authenticatedByExternal: (String, String)?

    init(manager: FederationManager, link: FederationLink, decoder: XMLStreamDecoder, directTLS: Bool) {
        self.manager = manager
        self.link = link
        self.decoder = decoder
        negotiation = IncomingServerNegotiation(configuration: .init(requireTLS: true, offerBidi: manager.configuration.bidi,
                                                                     offerStreamManagement: manager.configuration.streamManagement),
                                                makeStreamID: { UUID().uuidString })
        if directTLS { negotiation.startedWithTLS() }
        var logger = manager.logger
        logger[metadataKey: "link"] = "\(link.id.prefix(8))"
        logger[metadataKey: "peer"] = "\(link.peerAddress)"
        self.logger = logger
        session = LinkSession(manager: manager, link: link, logger: logger)
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
        manager.linkOpened(link)
        manager.metrics.connectionsAccepted.increment()
        let bound = NIOLoopBound(self, eventLoop: context.eventLoop)
        negotiationTimer = context.eventLoop.scheduleTask(in: .seconds(Int64(manager.configuration.negotiationTimeoutSeconds))) {
            let handler = bound.value
            if !handler.link.hasInboundPairs() {
                handler.closeWithError(StreamError(.connectionTimeout, text: "no domain authenticated in time"), reason: "negotiation timeout")
            }
        }
        context.fireChannelActive()
    }

    /// NIO backpressure: the socket took what was buffered, so the link's queues drain on.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { link.drain() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        negotiationTimer?.cancel()
        negotiation.closed()
        session.finish()
        manager.linkClosed(link)
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
            manager.checkRevocationSoon(link)
            negotiation.tlsEstablished()
            // A new stream begins inside TLS: ours is open again only once we answer the
            // peer's new header, so an error before then must open it first (RFC 6120
            // §4.9.1.1; a bare <stream:error> there has an unbound prefix).
            headerSent = false
        } else if case TLSUserEvent.handshakeCompleted = event {
            // Direct TLS: the chain is known before the first header.
            link.setCertificateChain(presentedChain.certificates.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) })
            manager.checkRevocationSoon(link)
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
            link.peerEndedStream()
            run(negotiation.streamEnded(), context: context)
        }
    }

    /// RFC 6120 §6.3.4 and XEP-0178 §3: EXTERNAL is offered only when the certificate is
    /// valid and names the header's `from`; that check is made before the features go out.
    private func headerReceived(_ header: StreamHeader, context: ChannelHandlerContext) {
        link.setPeerDeclaredDialback(header.declaresDialback)
        if let to = header.to.flatMap({ try? JID(domain: $0).domainpart }) {
            // Our certificate is chosen for the domain the header asks for (STARTTLS), or by
            // SNI naming the same domain (direct TLS).
            link.setLocalCertificate(manager.host.tls.certificateDER(for: to))
        }
        let hosted = header.to.flatMap { try? JID(domain: $0) }.map { manager.host.isHosted($0.domainpart) } ?? false
        let chain = link.certificateChain
        guard case .awaitingHeader(.secured) = negotiation.state, let from = header.from.flatMap({ try? JID(domain: $0).domainpart }), !chain.isEmpty, hosted else {
            run(negotiation.headerReceived(header, isHosted: hosted, externalAvailable: false), context: context)
            return
        }
        checkingHeader = true
        let federation = self.manager
        let thisLink = self.link
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask {
            await federation.validateCertificate(chain, for: from, on: thisLink)
        }.whenSuccess { result in
            let (handler, context) = bound.value
            // The connection may have gone while the certificate was checked (a peer that
            // sends its header, an error and closes): nothing to answer then.
            if case .closed = handler.negotiation.state { return }
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
            link.setStreamID(header.id)
            context.write(wrapOutboundOut(.header(header)), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.element(features)), promise: nil)
            if let (peer, local) = authenticatedByExternal {
                // The restarted stream is open: only now may stanzas flow, including, on a
                // bidirectional link, ours to the peer (XEP-0288 §2.2, RFC 6120 §6.4.6).
                authenticatedByExternal = nil
                manager.authorize(DomainPair(local: local, remote: peer), .inbound, on: link, method: .pkix, expires: externalProof?.expires)
            }
        case .startTLS(let domain):
            startTLS(domain: domain, context: context)
        case .send(let element):
            context.writeAndFlush(wrapOutboundOut(.element(element)), promise: nil)
        case .externalSucceeded(let peer, let local):
            context.writeAndFlush(wrapOutboundOut(.element(XMLElement(name: "success", namespace: XMLNamespace.sasl))), promise: nil)
            decoder.restart(leftover: .parse, context: context)
            headerSent = false
            link.recordProof(of: peer, method: .pkix, expires: externalProof?.expires)
            authenticatedByExternal = (peer, local)
            logger.info("peer authenticated with SASL EXTERNAL", metadata: ["peer-domain": "\(peer)", "local": "\(local)", "bidi": "\(link.isBidirectional)"])
        case .authorizeDialback(let request, let streamID):
            session.peerAsserts(request, streamID: streamID)
        case .answerVerify(let request):
            session.answerVerify(request)
        case .bidiRequested:
            // XEP-0288 §2.2: we may use this link back once the peer has authenticated.
            link.setBidirectional()
            logger.debug("peer asked for a bidirectional stream")
        case .deliver(let element):
            session.handle(element)
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
            bound.value.0.link.setLocalCertificate(manager.host.tls.certificateDER(for: domain))
            let (handler, context) = bound.value
            guard let sslContext else {
                handler.closeWithError(StreamError(.internalServerError), reason: "no certificate for \(domain)")
                return
            }
            let channel = context.channel
            // Loop-bound: the write's callback runs on this channel's event loop.
            let tlsHandler = NIOLoopBound(handler.makeTLSHandler(context: sslContext), eventLoop: channel.eventLoop)
            context.writeAndFlush(handler.wrapOutboundOut(.element(XMLElement(name: "proceed", namespace: XMLNamespace.tls)))).whenSuccess {
                do {
                    try StreamPipeline.startTLS(tlsHandler.value, on: channel)
                } catch {
                    channel.close(promise: nil)
                }
            }
        }
    }

    private func closeWithError(_ error: StreamError, reason: String) {
        guard let context, !closing else { return }
        closing = true
        negotiation.closed()
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
