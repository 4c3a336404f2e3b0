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
    private let negotiated: EventLoopPromise<FederationLink>
    private var settled = false
    private var context: ChannelHandlerContext?
    private var logger: Logger
    /// The chain the peer presented, captured during the handshake.
    private let presentedChain = CapturedChain()
    private let inbound: InboundStanzaQueue

    init(manager: FederationManager, link: FederationLink, decoder: XMLStreamDecoder, clientContext: NIOSSLContext,
         serverName: String, directTLS: Bool, negotiation: OutgoingServerNegotiation, negotiated: EventLoopPromise<FederationLink>) {
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
        inbound = InboundStanzaQueue(manager: manager)
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

    func channelActive(context: ChannelHandlerContext) {
        if !directTLS {
            run(negotiation.start(directTLS: false), context: context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        negotiation.closed()
        link.markClosed()
        inbound.finish()
        if settled {
            manager.outgoingClosed(link, remote: remoteDomain)
        } else {
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
            manager.metrics.streamError(streamError.streamError.condition.rawValue)
            fail(FederationManager.LinkFailure(reason: "bad input from \(link.peerAddress): \(error)", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: false), streamError: streamError.streamError)
        } else {
            logger.info("link error", metadata: ["error": "\(error)"])
            fail(FederationManager.LinkFailure(reason: "\(link.peerAddress): \(error)", stanzaError: StanzaError(.remoteServerTimeout), tryNextTarget: true), streamError: nil)
        }
    }

    // MARK: TLS

    /// RFC 6120 §13.7.2: the peer must present a certificate for the domain we asked for,
    /// chaining to a trusted root (or a configured per-peer anchor). When it does not, policy
    /// decides: dialback may still authenticate the pair over the encrypted link (RFC 7590
    /// §3.4), but a peer that must use certificates is dropped. Never continue in the clear.
    private func tlsCompleted(context: ChannelHandlerContext) {
        let chain = presentedChain.certificates.compactMap { try? Certificate(derEncoded: $0.toDERBytes()) }
        link.setCertificateChain(chain)
        let validator = manager.validator
        let remote = remoteDomain
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.makeFutureWithTask {
            await validator.validate(chain: chain, for: remote)
        }.whenSuccess { result in
            let (handler, context) = bound.value
            switch result {
            case .success(let validated):
                handler.link.recordProof(of: remote, method: .pkix, expires: validated.expires)
                handler.logger.debug("peer certificate proves the remote domain", metadata: ["match": "\(validated.match)"])
            case .failure(let failure):
                if handler.manager.requiresCertificates(remote) {
                    handler.logger.notice("peer certificate refused", metadata: ["reason": "\(failure)"])
                    handler.fail(FederationManager.LinkFailure(reason: "\(handler.link.peerAddress): \(failure)", stanzaError: StanzaError(.remoteServerNotFound, text: "\(remote) did not present a valid certificate: \(failure)"), tryNextTarget: true), streamError: StreamError(.policyViolation, text: "a valid certificate is required"))
                    return
                }
                handler.logger.info("peer certificate does not prove the domain; continuing with dialback", metadata: ["reason": "\(failure)"])
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
            context.write(wrapOutboundOut(.header(header)), promise: nil)
            context.flush()
        case .send(let element):
            context.writeAndFlush(wrapOutboundOut(.element(element)), promise: nil)
        case .startTLS:
            decoder.restart(leftover: .reject, context: context)
            do {
                try context.pipeline.syncOperations.addHandler(try makeTLSHandler(), position: .first)
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
            link.setCapabilities(capabilities)
            // How the remote domain is trusted: its certificate, or (dialback) DNS.
            let proof = link.proof(of: remoteDomain)
            let method = proof?.method ?? .dialback
            link.authorize(DomainPair(local: localDomain, remote: remoteDomain), .outbound, method: method, expires: proof?.expires)
            manager.metrics.proof(method, direction: .outbound)
            logger.info("link authenticated", metadata: ["local": "\(localDomain)", "method": "\(method.rawValue)"])
            settle(.success(link))
        case .deliver(let element):
            deliver(element, context: context)
        case .failed(let failure):
            let (stanzaError, tryNext) = Self.translate(failure, remote: remoteDomain)
            logger.notice("negotiation failed", metadata: ["failure": "\(failure)"])
            fail(FederationManager.LinkFailure(reason: "\(link.peerAddress): \(failure)", stanzaError: stanzaError, tryNextTarget: tryNext), streamError: nil)
        case .closeStream:
            let channel = context.channel
            context.writeAndFlush(wrapOutboundOut(.end)).whenComplete { _ in channel.close(promise: nil) }
        case .sequence(let actions):
            for action in actions { run(action, context: context) }
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

    /// A first-level element after the first pair was authorised.
    private func deliver(_ element: XMLElement, context: ChannelHandlerContext) {
        if let dialback = DialbackElement(element) {
            // The answer to a further pair we asked for (XEP-0220 §2.6.1); anything else is
            // unsolicited and ignored (§3.1).
            if dialback.kind == .result, let outcome = dialback.outcome, dialback.from == remoteDomain,
               let local = try? JID(domain: dialback.to).domainpart, manager.host.isHosted(local) {
                manager.pairResult(DomainPair(local: local, remote: remoteDomain), on: link, outcome: outcome, error: dialback.error)
            } else {
                logger.info("ignoring unsolicited dialback element", metadata: ["element": "\(element)"])
            }
            return
        }
        if element.namespace == XMLNamespace.streamManagement { return }
        // The peer sends stanzas on our link only if it is bidirectional and the pair was
        // authorised inbound; the same checks as an incoming link apply.
        switch InboundChecks.check(element, link: link, host: manager.host) {
        case .accept(let stanza):
            link.countReceived()
            inbound.enqueue(stanza)
        case .reject(let error, let reason):
            logger.warning("security: refused stanza from peer", metadata: ["reason": "\(reason)", "condition": "\(error.condition.rawValue)"])
            manager.metrics.streamError(error.condition.rawValue)
            link.close(with: error)
        }
    }

    /// Sends `db:result` for another local domain (sender multiplexing, XEP-0220 §2.6.1).
    func requestAdditionalPair(local: String) {
        guard let context, let streamID = negotiation.streamID, !link.isClosed else {
            manager.pairFailed(DomainPair(local: local, remote: remoteDomain), error: StanzaError(.remoteServerTimeout, text: "the link to \(remoteDomain) is closing"))
            return
        }
        let key = manager.keys.key(receiving: remoteDomain, originating: local, streamID: streamID)
        context.writeAndFlush(wrapOutboundOut(.element(DialbackElement(kind: .result, from: local, to: remoteDomain, key: key).element)), promise: nil)
    }

    // MARK: Outcome

    private func settle(_ result: Result<FederationLink, any Error>) {
        guard !settled else { return }
        settled = true
        negotiated.completeWith(result)
    }

    private func fail(_ failure: FederationManager.LinkFailure, streamError: StreamError?) {
        link.markClosed()
        if !settled {
            settle(.failure(failure))
        }
        guard let context else { return }
        let channel = context.channel
        if let streamError {
            context.writeAndFlush(wrapOutboundOut(.error(streamError))).whenComplete { _ in channel.close(promise: nil) }
        } else {
            channel.close(promise: nil)
        }
    }
}

@available(*, unavailable)
extension OutgoingLinkHandler: Sendable {}

/// The certificates a TLS verification callback saw. Written once on the channel's event
/// loop during the handshake, read on the same loop after it.
final class CapturedChain: Sendable {
    private let storage = Mutex<[NIOSSLCertificate]>([])

    func set(_ certificates: [NIOSSLCertificate]) {
        storage.withLock { $0 = certificates }
    }

    var certificates: [NIOSSLCertificate] {
        storage.withLock { $0 }
    }
}

/// Hands stanzas that passed a link's checks to the router one at a time, in arrival order
/// (RFC 6120 §10.1).
final class InboundStanzaQueue: Sendable {
    private let continuation: AsyncStream<Stanza>.Continuation

    init(manager: FederationManager) {
        let (stream, continuation) = AsyncStream.makeStream(of: Stanza.self)
        self.continuation = continuation
        Task {
            for await stanza in stream {
                await manager.deliverInbound(stanza)
            }
        }
    }

    func enqueue(_ stanza: Stanza) {
        continuation.yield(stanza)
    }

    func finish() {
        continuation.finish()
    }
}

/// RFC 6120 §8.1.1.2 and §8.1.2.2, plus §4.3.5: what a stanza from a peer must satisfy
/// before it is routed. On a link that carries many pairs, a failure closes the whole link,
/// so the reason is logged loudly as a security event naming the peer.
enum InboundChecks {
    enum Verdict {
        case accept(Stanza)
        case reject(StreamError, reason: String)
    }

    static func check(_ element: XMLElement, link: FederationLink, host: any FederationHost) -> Verdict {
        guard let stanza = Stanza(element) else {
            return .reject(StreamError(.unsupportedStanzaType), reason: "unexpected <\(element.name)> in \(element.namespace)")
        }
        guard link.hasInboundPairs() else {
            return .reject(StreamError(.notAuthorized), reason: "stanza before any domain was authenticated")
        }
        guard let toText = stanza.toString, let fromText = stanza.fromString else {
            return .reject(StreamError(.improperAddressing), reason: "stanza without 'to' or 'from'")
        }
        guard let to = try? JID(toText), let from = try? JID(fromText) else {
            return .reject(StreamError(.improperAddressing), reason: "malformed address in 'to' or 'from'")
        }
        guard link.isRemoteAuthenticated(from.domainpart) else {
            return .reject(StreamError(.invalidFrom), reason: "'from' domain \(from.domainpart) is not authenticated on this link")
        }
        guard host.isHosted(to.domainpart), link.isAuthorized(DomainPair(local: to.domainpart, remote: from.domainpart), .inbound) else {
            return .reject(StreamError(.hostUnknown), reason: "pair \(to.domainpart)⇄\(from.domainpart) is not authorised on this link")
        }
        return .accept(stanza)
    }
}
