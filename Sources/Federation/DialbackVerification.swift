import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import XMPPCore
import XMPPStream

/// The answer of an Authoritative Server to `db:verify`.
enum VerificationOutcome: Sendable, Equatable {
    case valid
    case invalid
    case error(StanzaError)
}

extension FederationManager {
    /// XEP-0220 Step 2–3: asks `originating`'s authoritative server, over a separate,
    /// short-lived connection, whether it issued `key` for `receiving` on stream `streamID`.
    /// The connection is never the one the key arrived on (XEP-0288 §2.2). A failure to reach
    /// the authoritative server is `remote-server-not-found` (XEP-0220 §2.5).
    func verifyDialback(receiving: String, originating: String, streamID: String, key: String) async -> VerificationOutcome {
        let location = await locate(originating)
        guard case .targets(let targets) = location, !targets.isEmpty else {
            return .error(StanzaError(.remoteServerNotFound, text: "cannot locate \(originating)"))
        }
        let request = DialbackElement(kind: .verify, from: receiving, to: originating, id: streamID, key: key)
        for target in targets {
            do {
                return try await verify(request, at: target)
            } catch {
                logger.info("dialback verification target failed", metadata: ["originating": "\(originating)", "target": "\(target)", "error": "\(error)"])
            }
        }
        return .error(StanzaError(.remoteServerNotFound, text: "cannot reach the authoritative server of \(originating)"))
    }

    private func verify(_ request: DialbackElement, at target: PeerTarget) async throws -> VerificationOutcome {
        // At most `max_concurrent_connects` db:verify connections per server at a time: a
        // burst of new pairs with dialback asks for one per pair (720 at once in the lab).
        // A pool of their own: a link being set up may wait for the peer's verification,
        // which may wait for ours, so sharing slots with links could deadlock both sides.
        let slot = target.serverTarget
        guard await verificationSlots.acquire(slot, limit: max(1, configuration.maxConcurrentConnects), until: .now + .seconds(configuration.negotiationTimeoutSeconds)) else {
            throw VerificationTimeout()
        }
        defer { verificationSlots.release(slot) }
        let resolved = try await resolveTarget(target)
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        // This stream only carries db:verify; the answer binds a key to a stream id, so the
        // peer's identity here matters no more than DNS does (XEP-0220 §3). It is still
        // encrypted (RFC 6120 §13.14).
        tls.certificateVerification = .none
        if target.directTLS { tls.applicationProtocols = ["xmpp-server"] }
        let sslContext = try NIOSSLContext(configuration: tls)
        let serverName = (try? JID(domain: request.to).asciiDomain) ?? request.to
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.maxStanzaBytes)
        do {
            return try await connectFirst(resolved.addresses, target: "\(target)", tuned: false, install: { channel, answered in
                let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.server, limits: limits)
                let handler = VerificationHandler(request: request, decoder: decoder, sslContext: sslContext, serverName: serverName, directTLS: target.directTLS, answered: answered)
                try StreamPipeline.install(on: channel, directTLS: target.directTLS ? try NIOSSLClientHandler(context: sslContext, serverHostname: serverName) : nil,
                                           decoder: decoder, contentNamespace: XMLNamespace.server, handler: handler)
            }, timedOut: { VerificationTimeout() })
        } catch let failed as NoConnection {
            throw failed.last
        }
    }
}

struct VerificationTimeout: Error {}
struct VerificationFailed: Error {
    var reason: String
}

/// One `db:verify` exchange: header, STARTTLS, header, then the request, with no
/// authentication of its own.
final class VerificationHandler: ChannelInboundHandler {
    typealias InboundIn = StreamEvent
    typealias OutboundOut = StreamOutput

    private let request: DialbackElement
    private let decoder: XMLStreamDecoder
    private let sslContext: NIOSSLContext
    private let serverName: String
    private let answered: OneShot<VerificationOutcome>
    private var secured: Bool
    private var sent = false
    private var done = false

    init(request: DialbackElement, decoder: XMLStreamDecoder, sslContext: NIOSSLContext, serverName: String, directTLS: Bool, answered: OneShot<VerificationOutcome>) {
        self.request = request
        self.decoder = decoder
        self.sslContext = sslContext
        self.serverName = serverName
        self.secured = directTLS
        self.answered = answered
    }

    private var header: StreamHeader {
        StreamHeader(to: request.to, from: request.from, version: "1.0", contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback])
    }

    func channelActive(context: ChannelHandlerContext) {
        if !secured {
            context.writeAndFlush(wrapOutboundOut(.header(header)), promise: nil)
        }
        context.fireChannelActive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            secured = true
            context.writeAndFlush(wrapOutboundOut(.header(header)), promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .element(let element) = unwrapInboundIn(data) else { return }
        if element.name == "features" && element.namespace == XMLNamespace.streams {
            if !secured {
                // Never in the clear: STARTTLS whether advertised or not (RFC 7590 §3.1).
                context.writeAndFlush(wrapOutboundOut(.element(XMLElement(name: "starttls", namespace: XMLNamespace.tls))), promise: nil)
            } else if !sent {
                sent = true
                context.writeAndFlush(wrapOutboundOut(.element(request.element)), promise: nil)
            }
        } else if element.name == "proceed" && element.namespace == XMLNamespace.tls {
            decoder.restart(leftover: .reject, context: context)
            do {
                try StreamPipeline.startTLS(try NIOSSLClientHandler(context: sslContext, serverHostname: serverName), on: context.channel)
            } catch {
                finish(.failure(error), context: context)
            }
        } else if let answer = DialbackElement(element), answer.kind == .verify, let outcome = answer.outcome {
            // The answer must match the request exactly (XEP-0220 §2.1.2, §3.1).
            guard answer.from == request.to, answer.to == request.from, answer.id == request.id else {
                finish(.failure(VerificationFailed(reason: "answer does not match the request")), context: context)
                return
            }
            switch outcome {
            case .valid: finish(.success(.valid), context: context)
            case .invalid: finish(.success(.invalid), context: context)
            case .error: finish(.success(.error(answer.error ?? StanzaError(.remoteServerNotFound))), context: context)
            }
        } else if element.name == "failure" || (element.name == "error" && element.namespace == XMLNamespace.streams) {
            finish(.failure(VerificationFailed(reason: "the authoritative server refused: \(element)")), context: context)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done {
            done = true
            answered.fail(VerificationFailed(reason: "connection closed before an answer"))
        }
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // A channel that closes before it was ever active never reports inactive.
        if !done {
            done = true
            answered.fail(VerificationFailed(reason: "connection closed"))
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(.failure(error), context: context)
    }

    private func finish(_ result: Result<VerificationOutcome, any Error>, context: ChannelHandlerContext) {
        guard !done else { return }
        done = true
        answered.complete(result)
        let channel = context.channel
        context.writeAndFlush(wrapOutboundOut(.end)).whenComplete { _ in channel.close(promise: nil) }
    }
}

@available(*, unavailable)
extension VerificationHandler: Sendable {}
