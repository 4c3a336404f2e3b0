import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import X509

/// One TLS handshake with a listener on loopback, for what it presents: the leaf, the
/// negotiated ALPN protocol, and the channel (left open for the caller to close, or to see
/// the server close it).
struct TLSHandshake: Sendable {
    let leaf: Certificate
    let negotiatedProtocol: String?
    let channel: any Channel

    struct Failed: Error, CustomStringConvertible {
        var description: String
    }

    /// - Parameters:
    ///   - trustRoots: verify the chain against these and the name (the handshake fails
    ///     otherwise); nil: accept anything, to look at what is presented.
    ///   - keepOpen: leave the channel open (closed otherwise once the handshake is done).
    static func run(group: any EventLoopGroup, port: Int, serverName: String, protocols: [String],
                    trustRoots: [Certificate]? = nil, keepOpen: Bool = false) async throws -> TLSHandshake {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.applicationProtocols = protocols
        if let trustRoots {
            tls.trustRoots = .certificates(try trustRoots.map { try NIOSSLCertificate(bytes: try $0.serializeAsPEM().derBytes, format: .der) })
            tls.certificateVerification = .fullVerification
        } else {
            tls.certificateVerification = .none
        }
        let context = try NIOSSLContext(configuration: tls)
        let done = group.next().makePromise(of: Completed.self)
        let channel = try await ClientBootstrap(group: group).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: serverName))
                try channel.pipeline.syncOperations.addHandler(HandshakeWatcher(done: done))
            }
        }.connect(host: "127.0.0.1", port: port).get()
        do {
            let completed = try await done.futureResult.get()
            guard let peer = completed.peer else { throw Failed(description: "no certificate presented") }
            let leaf = try Certificate(derEncoded: try peer.toDERBytes())
            if !keepOpen { channel.close(promise: nil) }
            return TLSHandshake(leaf: leaf, negotiatedProtocol: completed.negotiatedProtocol, channel: channel)
        } catch {
            channel.close(promise: nil)
            throw error
        }
    }

    private struct Completed: Sendable {
        var negotiatedProtocol: String?
        var peer: NIOSSLCertificate?
    }

    /// Fulfils `done` once the handshake completes (the peer's certificate read there, since
    /// a server may close right after, taking the TLS handler away), or fails it.
    private final class HandshakeWatcher: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let done: EventLoopPromise<Completed>
        /// A promise is completed once.
        var completed = false

        init(done: EventLoopPromise<Completed>) { self.done = done }

        func complete(_ result: Result<Completed, any Error>) {
            guard !completed else { return }
            completed = true
            done.completeWith(result)
        }

        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if case .handshakeCompleted(let negotiated) = event as? TLSUserEvent {
                let peer = try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate
                complete(.success(Completed(negotiatedProtocol: negotiated, peer: peer)))
            }
            context.fireUserInboundEventTriggered(event)
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            complete(.failure(error))
            context.close(promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            complete(.failure(Failed(description: "closed before the handshake completed")))
            context.fireChannelInactive()
        }
    }
}
