import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

/// The key authorisations being offered, by token; the ACME client adds one before it tells
/// the CA to validate and removes it once the authorisation is decided.
public final class ACMEChallengeTokens: Sendable {
    private let table = Mutex<[String: String]>([:])

    public init() {}

    func publish(token: String, keyAuthorization: String) {
        table.withLock { $0[token] = keyAuthorization }
    }

    func withdraw(token: String) {
        table.withLock { _ = $0.removeValue(forKey: token) }
    }

    func keyAuthorization(token: String) -> String? {
        table.withLock { $0[token] }
    }
}

/// The plain-HTTP listener for HTTP-01 (RFC 8555 §8.3): answers
/// `GET /.well-known/acme-challenge/TOKEN` with the key authorisation, and redirects every
/// other request to the same path over https, so port 80 is of use to browsers too.
final class HTTP01Listener: Sendable {
    static let challengePrefix = "/.well-known/acme-challenge/"

    private let channel: any Channel

    private init(channel: any Channel) {
        self.channel = channel
    }

    var port: Int? { channel.localAddress?.port }

    static func bind(host: String, port: Int, tokens: ACMEChallengeTokens, group: any EventLoopGroup, logger: Logger) async throws -> HTTP01Listener {
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    // One request per connection, and a connection that says nothing is closed:
                    // connections are not tracked, so none may outlive the listener for long
                    // (a CA's kept-alive connection would otherwise hold the port).
                    try channel.pipeline.syncOperations.addHandler(IdleStateHandler(readTimeout: .seconds(10)))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(HTTP01Handler(tokens: tokens, logger: logger))
                }
            }
        let channel = try await bootstrap.bind(host: host, port: port).get()
        return HTTP01Listener(channel: channel)
    }

    func close() async {
        try? await channel.close()
    }
}

/// One connection's requests; answers each when its end arrives (bodies are ignored).
final class HTTP01Handler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let tokens: ACMEChallengeTokens
    private let logger: Logger
    private var head: HTTPRequestHead?
    private var answered = false

    init(tokens: ACMEChallengeTokens, logger: Logger) {
        self.tokens = tokens
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
        case .body:
            break
        case .end:
            // Anything after the first request is ignored; the connection closes after it.
            guard let request = head, !answered else { return }
            head = nil
            answered = true
            respond(to: request, context: context)
        }
    }

    /// What to answer, without I/O: the challenge, a 404 for an unknown token, or a redirect.
    enum Answer: Equatable {
        case keyAuthorization(String)
        case notFound
        case redirect(String)
        case badRequest
    }

    static func answer(method: HTTPMethod, uri: String, host: String?, tokens: ACMEChallengeTokens) -> Answer {
        let path = uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? uri
        if path.hasPrefix(HTTP01Listener.challengePrefix) {
            let token = String(path.dropFirst(HTTP01Listener.challengePrefix.count))
            guard method == .GET || method == .HEAD, ACMEClient.isToken(token), let answer = tokens.keyAuthorization(token: token) else {
                return .notFound
            }
            return .keyAuthorization(answer)
        }
        // Host without its port; the https side listens on its own. A Host that is not a
        // plain name is not echoed into a Location header.
        guard let host, let name = host.split(separator: ":").first, !name.isEmpty,
              name.utf8.allSatisfy({ $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") || ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A) }),
              uri.hasPrefix("/") else {
            return .badRequest
        }
        return .redirect("https://\(name.lowercased())\(uri)")
    }

    private func respond(to request: HTTPRequestHead, context: ChannelHandlerContext) {
        let answer = Self.answer(method: request.method, uri: request.uri, host: request.headers.first(name: "Host"), tokens: tokens)
        var headers = HTTPHeaders()
        let status: HTTPResponseStatus
        var body = ""
        switch answer {
        case .keyAuthorization(let text):
            status = .ok
            headers.add(name: "Content-Type", value: "application/octet-stream")
            body = text
            logger.debug("HTTP-01 challenge answered", metadata: ["uri": "\(request.uri)"])
        case .notFound:
            status = .notFound
        case .redirect(let location):
            status = .movedPermanently
            headers.add(name: "Location", value: location)
        case .badRequest:
            status = .badRequest
        }
        headers.add(name: "Content-Length", value: String(body.utf8.count))
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        if request.method != .HEAD, !body.isEmpty {
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
        }
        let done = context.eventLoop.makePromise(of: Void.self)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: done)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        done.futureResult.whenComplete { _ in loopBound.value.close(promise: nil) }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }
}

@available(*, unavailable)
extension HTTP01Handler: Sendable {}
