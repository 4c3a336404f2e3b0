import Foundation
import Logging
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization
import Trust
import X509
import XMPPCore
import XMPPStream

/// Drives an outgoing link: runs ``OutgoingServerNegotiation``, checks the peer's certificate
/// for the domain we meant to reach, and reports the outcome to the manager.
final class OutgoingLinkHandler: ChannelInboundHandler {
    typealias InboundIn = StreamEvent
    typealias OutboundOut = StreamOutput

    private let manager: FederationManager
    private let link: FederationLink
    private let decoder: XMLStreamDecoder
    private let clientContext: NIOSSLContext
    private let serverName: String
    private let directTLS: Bool
    private var negotiation: OutgoingServerNegotiation
    private let negotiated: OneShot<FederationLink>
    private var settled = false
    /// Our side of the current stream is open (its header sent); false from the start and
    /// again after the TLS handshake, until the next header.
    private var streamOpen = false
    private var context: ChannelHandlerContext?
    private var logger: Logger
    /// The chain the peer presented, captured during the handshake.
    private let presentedChain = CapturedChain()
    private let session: LinkSession

    init(manager: FederationManager, link: FederationLink, decoder: XMLStreamDecoder, clientContext: NIOSSLContext,
         serverName: String, directTLS: Bool, negotiation: OutgoingServerNegotiation, negotiated: OneShot<FederationLink>) {
        self.manager = manager
        self.link = link
        self.decoder = decoder
        self.clientContext = clientContext
        self.serverName = serverName
        self.directTLS = directTLS
        self.negotiation = negotiation
        self.negotiated = negotiated
        var logger = manager.logger
        logger[metadataKey: "link"] = "\(link.id.prefix(8))"
        logger[metadataKey: "remote"] = "\(negotiation.configuration.remoteDomain)"
        logger[metadataKey: "peer"] = "\(link.peerAddress)"
        self.logger = logger
        session = LinkSession(manager: manager, link: link, logger: logger)
    }

    var localDomain: String { negotiation.configuration.localDomain }
    var remoteDomain: String { negotiation.configuration.remoteDomain }

    /// The TLS client handler: SNI is the remote domain (XEP-0368 §3); the chain is captured
    /// and checked by our own code after the handshake.
    func makeTLSHandler() throws -> NIOSSLClientHandler {
        let captured = presentedChain
        return try NIOSSLClientHandler(context: clientContext, serverHostname: serverName, customVerificationCallbackWithMetadata: { certificates, promise in
            captured.set(certificates)
            promise.succeed(.certificateVerified(VerificationMetadata(nil)))
        })
    }

    // MARK: Channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // A channel that closes before it was ever active never reports inactive.
        settle(.failure(FederationManager.LinkFailure(reason: "\(link.peerAddress): connection closed", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true)))
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        if !directTLS {
            run(negotiation.start(directTLS: false), context: context)
        }
        context.fireChannelActive()
    }

    /// NIO backpressure: the socket took what was buffered, so the link's queues drain on.
    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable { link.drain() }
        context.fireChannelWritabilityChanged()
    }

    func channelInactive(context: ChannelHandlerContext) {
        negotiation.closed()
        session.finish()
        manager.linkClosed(link)
        if !settled {
            settle(.failure(FederationManager.LinkFailure(reason: "\(link.peerAddress): connection closed during negotiation", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true)))
        }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .streamStart(let header):
            run(negotiation.headerReceived(header), context: context)
        case .element(let element):
            run(negotiation.elementReceived(element), context: context)
        case .streamEnd:
            link.peerEndedStream()
            run(negotiation.streamEnded(), context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            tlsCompleted(context: context)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let streamError = error as? any StreamErrorConvertible {
            logger.notice("peer sent bad input", metadata: ["error": "\(error)"])
            fail(FederationManager.LinkFailure(reason: "bad input from \(link.peerAddress): \(error)", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: false), streamError: streamError.streamError)
        } else {
            logger.info("link error", metadata: ["error": "\(error)"])
            fail(FederationManager.LinkFailure(reason: "\(link.peerAddress): \(error)", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true), streamError: nil)
        }
    }

    // MARK: TLS

    /// RFC 6120 §13.7.2: the peer must prove the domain we asked for: a certificate naming
    /// it that chains to a trusted root (or a per-peer anchor), a DANE match under its secure
    /// SRV, or its POSH file. Without a proof, policy decides: dialback may still authenticate
    /// the pair over the encrypted link (RFC 7590 §3.4), but a peer that must use
    /// certificates is dropped, and a proof that positively fails (a TLSA or POSH mismatch)
    /// drops it too. Never continue in the clear.
    private func tlsCompleted(context: ChannelHandlerContext) {
        // A new stream begins inside TLS; ours is open only once we send its header.
        streamOpen = false
        let chain = presentedChain.certificates.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
        link.setCertificateChain(chain)
        manager.checkRevocationSoon(link)
        let manager = self.manager
        let link = self.link
        let remote = remoteDomain
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask {
            (await manager.proveRemote(remote, on: link), await manager.certificateRequired(remote, on: link))
        }.whenSuccess { outcome, certificateRequired in
            let (handler, context) = bound.value
            // The connection may have closed while the peer was being proven (the peer gave
            // up, or a timeout): the negotiation is over, and starting the stream now would
            // break its state machine's contract (it trapped under load).
            if case .closed = handler.negotiation.state { return }
            switch outcome {
            case .proven(let method, _):
                handler.logger.debug("the peer is proven for the remote domain", metadata: ["method": "\(method.rawValue)"])
            case .refuted(let reason):
                handler.logger.warning("security: the peer's proof for the remote domain failed", metadata: ["reason": "\(reason)"])
                handler.fail(FederationManager.LinkFailure(reason: "\(link.peerAddress): \(reason)", stanzaError: StanzaError(.remoteServerNotFound, text: "\(remote) could not be authenticated: \(reason)"), tryNextTarget: true), streamError: StreamError(.policyViolation, text: "authentication failed"))
                return
            case .notApplicable(let reason):
                if certificateRequired {
                    manager.metrics.certificateRequiredRefusals.increment()
                    handler.logger.notice("peer certificate refused", metadata: ["reason": "\(reason)"])
                    handler.fail(FederationManager.LinkFailure(reason: "\(link.peerAddress): \(reason)", stanzaError: StanzaError(.remoteServerNotFound, text: "\(remote) did not present a valid certificate: \(reason)"), tryNextTarget: true), streamError: StreamError(.policyViolation, text: "a valid certificate is required"))
                    return
                }
                handler.logger.info("the peer is not proven for the remote domain; continuing with dialback", metadata: ["reason": "\(reason)"])
            }
            if handler.directTLS {
                handler.run(handler.negotiation.start(directTLS: true), context: context)
            } else {
                handler.run(handler.negotiation.tlsEstablished(), context: context)
            }
        }
    }

    // MARK: Actions

    private func run(_ action: OutgoingServerNegotiation.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .sendHeader(let header):
            streamOpen = true
            context.write(wrapOutboundOut(.header(header)), promise: nil)
            context.flush()
        case .send(let element):
            context.writeAndFlush(wrapOutboundOut(.element(element)), promise: nil)
        case .startTLS:
            decoder.restart(leftover: .reject, context: context)
            do {
                try StreamPipeline.startTLS(try makeTLSHandler(), on: context.channel)
            } catch {
                fail(FederationManager.LinkFailure(reason: "cannot start TLS: \(error)", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true), streamError: nil)
            }
        case .restartAfterSASL(let header):
            decoder.restart(leftover: .parse, context: context)
            context.writeAndFlush(wrapOutboundOut(.header(header)), promise: nil)
        case .sendDialbackResult(let from, let to, let streamID):
            let key = manager.keys.key(receiving: to, originating: from, streamID: streamID)
            context.writeAndFlush(wrapOutboundOut(.element(DialbackElement(kind: .result, from: from, to: to, key: key).element)), promise: nil)
        case .established(let capabilities):
            established(capabilities, context: context)
        case .deliver(let element):
            session.handle(element)
        case .failed(let failure):
            let (stanzaError, tryNext) = Self.translate(failure, remote: remoteDomain)
            logger.notice("negotiation failed", metadata: ["failure": "\(failure)"])
            fail(FederationManager.LinkFailure(reason: "\(link.peerAddress): \(failure)", stanzaError: stanzaError, tryNextTarget: tryNext,
                                               scope: Self.concernsLocalDomain(failure) ? .pair : .domain), streamError: nil)
        case .closeStream:
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end)).whenComplete { _ in channel.close(promise: nil) }
        case .sequence(let actions):
            for action in actions { run(action, context: context) }
        }
    }

    /// The peer refused our local domain (not itself): other local domains may still reach
    /// it, so only this pair backs off.
    static func concernsLocalDomain(_ failure: OutgoingServerNegotiation.Failure) -> Bool {
        switch failure {
        case .noAuthentication, .dialbackInvalid, .dialbackError: true
        case .tlsUnavailable, .streamError, .protocolError: false
        }
    }

    static func translate(_ failure: OutgoingServerNegotiation.Failure, remote: String) -> (StanzaError, Bool) {
        switch failure {
        case .tlsUnavailable(let why):
            return (StanzaError(.remoteServerTimeout, text: "\(remote): \(why)"), true)
        case .noAuthentication(let why):
            return (StanzaError(.remoteServerTimeout, text: "\(remote): cannot authenticate: \(why)"), false)
        case .dialbackInvalid:
            return (StanzaError(.internalServerError, text: "\(remote) refused our dialback key"), false)
        case .dialbackError(let error):
            return (StanzaError(error.condition == .undefinedCondition ? .remoteServerTimeout : error.condition, text: "\(remote): dialback error \(error.condition.rawValue)"), false)
        case .streamError(let error):
            return (StanzaError(.remoteServerTimeout, text: "\(remote) closed the stream: \(error)"), true)
        case .protocolError(let why):
            return (StanzaError(.remoteServerTimeout, text: "\(remote): \(why)"), true)
        }
    }

    /// The first pair is authorised (SASL EXTERNAL or dialback). The link takes its place
    /// among the manager's links, the pair's waiting stanzas go out, and with XEP-0288 the
    /// peer may use it back; stream management is enabled when offered (XEP-0198 §3: the
    /// initiator enables, after authentication).
    private func established(_ capabilities: OutgoingServerNegotiation.PeerCapabilities, context: ChannelHandlerContext) {
        link.setCapabilities(capabilities)
        link.setStreamID(negotiation.streamID)
        if capabilities.bidi && negotiation.configuration.requestBidi {
            link.setBidirectional()
        }
        manager.linkOpened(link)
        let pair = DomainPair(local: localDomain, remote: remoteDomain)
        // How the remote domain is trusted: a proof on this connection, or (dialback) DNS.
        let proof = link.proof(of: remoteDomain)
        // With no proof on the connection the remote domain rests on DNS alone (we dialled
        // its SRV target); say so rather than "dialback", which did not happen for it.
        let method = proof?.method ?? .dns
        if capabilities.streamManagement && manager.configuration.streamManagement {
            link.enableStreamManagement(requested: true)
            link.sendControl(XMLElement(name: "enable", namespace: XMLNamespace.streamManagement))
        }
        manager.authorize(pair, .outbound, on: link, method: method, expires: proof?.expires)
        logger.info("link authenticated", metadata: ["local": "\(localDomain)", "method": "\(method.rawValue)", "bidi": "\(link.isBidirectional)", "sm": "\(link.streamManagementEnabled)"])
        settle(.success(link))
    }

    // MARK: Outcome

    private func settle(_ result: Result<FederationLink, any Error>) {
        guard !settled else { return }
        settled = true
        negotiated.complete(result)
    }

    private func fail(_ failure: FederationManager.LinkFailure, streamError: StreamError?) {
        if !settled {
            settle(.failure(failure))
        }
        guard let context else { return }
        let channel = context.channel
        if let streamError {
            // An error needs an open stream around it (RFC 6120 §4.9.1.1): right after the
            // TLS handshake ours is not open yet, and a bare <stream:error> there is an
            // unbound prefix to the peer (issue 10, item 11: it read not-well-formed).
            if !streamOpen {
                context.write(wrapOutboundOut(.header(negotiation.header)), promise: nil)
                streamOpen = true
            }
            manager.metrics.streamError(streamError.condition.rawValue)
            context.writeAndFlush(wrapOutboundOut(.error(streamError))).whenComplete { _ in channel.close(promise: nil) }
        } else {
            channel.close(promise: nil)
        }
    }
}

@available(*, unavailable)
extension OutgoingLinkHandler: Sendable {}

