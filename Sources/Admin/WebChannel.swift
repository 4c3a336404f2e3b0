import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOWebSocket

/// A WebSocket endpoint on the HTTPS listener (RFC 7395 for XMPP clients). The server side
/// is the `Server` module's: Admin only upgrades the connection and hands the channel over,
/// so XMPP over WebSocket runs on the same event-loop handlers as XMPP over TCP.
public protocol WebSocketEndpoint: Sendable {
    /// The request path, `/xmpp-websocket`.
    var path: String { get }
    /// The largest WebSocket message accepted, in bytes (a frame, or fragments together).
    var maximumMessageBytes: Int { get }
    /// The response headers for an upgrade request to ``path`` (the chosen subprotocol), or
    /// nil to refuse it with 400 (no `xmpp` subprotocol offered, an origin not allowed). On
    /// the channel's event loop.
    func acceptUpgrade(_ head: HTTPRequestHead, channel: any Channel) -> HTTPHeaders?
    /// Adds the handlers that run the stream, after the WebSocket frame codec. On the
    /// channel's event loop.
    func configure(_ channel: any Channel, head: HTTPRequestHead) throws
}

/// What the HTTPS listener knows about the request being answered, for route handlers.
public enum WebRequest {
    /// The connection's peer, set around every request the router answers.
    @TaskLocal public static var remoteAddress: SocketAddress?
}

/// The HTTPS listener's child channel: HTTP/1.1 answered by the Hummingbird router, and,
/// when an endpoint is configured, an upgrade to WebSocket on its path (RFC 6455 §4.2).
///
/// Modelled on hummingbird-websocket's upgrade channel, but the upgraded channel keeps its
/// NIO pipeline (the endpoint's handlers) instead of becoming an async sequence of frames.
struct WebChannel: ServerChildChannel, HTTPChannelHandler {
    enum Upgrade: Sendable {
        /// Upgraded; the endpoint's handlers run the channel until it closes.
        case webSocket(any Channel)
        case notUpgraded(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        /// An upgrade was asked for and refused.
        case refused(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
    }

    struct Value: ServerChildChannelValue {
        let upgrade: EventLoopFuture<Upgrade>
        let channel: any Channel
    }

    let responder: HTTPChannelHandler.Responder
    let webSocket: (any WebSocketEndpoint)?
    let idleTimeout: Duration

    init(responder: @escaping HTTPChannelHandler.Responder, webSocket: (any WebSocketEndpoint)?, idleTimeout: Duration) {
        self.webSocket = webSocket
        self.idleTimeout = idleTimeout
        // NIO's upgrade handler leaves the pipeline after the first request. An upgrade asked
        // for later on a kept-alive connection is redirected to the same URL on a new
        // connection, where the upgrade handler is in place again.
        self.responder = { request, writer, channel in
            if request.headers[.upgrade]?.lowercased() == "websocket" {
                var location = request.uri.path
                if let query = request.uri.query { location += "?\(query)" }
                try await writer.writeResponse(HTTPResponse(status: .temporaryRedirect, headerFields: [.connection: "close", .location: location]))
                throw UpgradeOnKeptAliveConnection()
            }
            try await responder(request, writer, channel)
        }
    }

    private struct UpgradeOnKeptAliveConnection: Error {}

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            let idleTimeout = self.idleTimeout
            // Set when an upgrade was asked for: if it is not done, the request is answered 400
            // rather than passed to the router (which would redirect it back here).
            let upgradeAsked = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
            var upgraders: [any NIOTypedHTTPServerProtocolUpgrader<Upgrade>] = []
            if let endpoint = webSocket {
                upgraders.append(NIOTypedWebSocketServerUpgrader<Upgrade>(
                    maxFrameSize: endpoint.maximumMessageBytes,
                    // The endpoint answers protocol errors (an oversized frame) in its own
                    // protocol first: XMPP's stream error, then the close frame.
                    enableAutomaticErrorHandling: false,
                    shouldUpgrade: { channel, head in
                        upgradeAsked.value = true
                        guard Self.path(of: head.uri) == endpoint.path else {
                            return channel.eventLoop.makeSucceededFuture(nil)
                        }
                        return channel.eventLoop.makeSucceededFuture(endpoint.acceptUpgrade(head, channel: channel))
                    },
                    upgradePipelineHandler: { channel, head in
                        channel.eventLoop.makeCompletedFuture {
                            try endpoint.configure(channel, head: head)
                            return Upgrade.webSocket(channel)
                        }
                    }))
            }
            let configuration = NIOTypedHTTPServerUpgradeConfiguration<Upgrade>(
                upgraders: upgraders,
                notUpgradingCompletionHandler: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(HTTP1ToHTTPServerCodec(secure: false))
                        try channel.pipeline.syncOperations.addHandler(HTTPConnectionStateHandler(idleTimeout: idleTimeout, logger: logger))
                        let http = try NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>(
                            wrappingChannelSynchronously: channel, configuration: .init(isOutboundHalfClosureEnabled: true))
                        return upgradeAsked.value ? .refused(http) : .notUpgraded(http)
                    }
                })
            var pipeline = NIOUpgradableHTTPServerPipelineConfiguration<Upgrade>(upgradeConfiguration: configuration)
            pipeline.enablePipelining = false  // NIOAsyncChannel serializes requests
            pipeline.enableErrorHandling = false  // Hummingbird answers errors
            pipeline.enableResponseHeaderValidation = false  // HTTP types validate already
            let upgrade = try channel.pipeline.syncOperations.configureUpgradableHTTPServerPipeline(configuration: pipeline)
            return Value(upgrade: upgrade, channel: channel)
        }
    }

    func handle(value: Value, logger: Logger) async {
        do {
            switch try await value.upgrade.get() {
            case .notUpgraded(let http):
                // The route handlers see the client's address (the provisioning API limits
                // failed logins per address) without the router's context type changing for
                // every module: the connection's requests are answered in this task.
                await WebRequest.$remoteAddress.withValue(value.channel.remoteAddress) {
                    await handleHTTP(asyncChannel: http, logger: logger)
                }
            case .refused(let http):
                await Self.refuse(http)
            case .webSocket(let channel):
                // The endpoint's handlers own the channel now; the listener's shutdown waits
                // for it like for any connection.
                try await channel.closeFuture.get()
            }
        } catch {
            logger.debug("HTTPS connection ended", metadata: ["error": "\(error)"])
        }
    }

    /// The path of a request target, without the query.
    static func path(of uri: String) -> Substring {
        uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
    }

    private static func refuse(_ http: NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>) async {
        try? await http.executeThenClose { _, outbound in
            try await outbound.write(contentsOf: [
                .head(HTTPResponse(status: .badRequest, headerFields: [.connection: "close", .contentLength: "0"])),
                .end(nil),
            ])
        }
    }
}
