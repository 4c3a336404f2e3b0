import Admin
import Logging
import NIOCore
import NIOHTTP1
import NIOWebSocket
import XMPPCore
import XMPPStream

/// XMPP over WebSocket (RFC 7395): the endpoint the HTTPS listener upgrades to, and the
/// framing that turns WebSocket messages into the same ``StreamEvent``s a TCP stream gives.
/// Behind the framing runs the TCP clients' ``ClientConnectionHandler``: one negotiation, one
/// set of limits and stream errors for both.
struct ClientWebSocketEndpoint: WebSocketEndpoint {
    let server: ServerContext
    let path: String
    /// Origins allowed to open a stream (the `Origin` header); empty: every origin.
    let allowedOrigins: Set<String>
    let logger: Logger

    var maximumMessageBytes: Int { max(server.configuration.c2s.maxStanzaBytes, XMLStreamLimits.minimumStanzaBytes) }

    func acceptUpgrade(_ head: HTTPRequestHead, channel: any Channel) -> HTTPHeaders? {
        // RFC 7395 §3.1: the client offers the `xmpp` subprotocol and the server selects it;
        // without it this is not an XMPP client.
        let offered = head.headers[canonicalForm: "sec-websocket-protocol"].map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        guard offered.contains("xmpp") else {
            refused(head, channel: channel, reason: "no xmpp subprotocol offered (RFC 7395 §3.1)")
            return nil
        }
        if !allowedOrigins.isEmpty {
            guard let origin = head.headers.first(name: "origin"), allowedOrigins.contains(origin.lowercased()) else {
                refused(head, channel: channel, reason: "origin not allowed: \(head.headers.first(name: "origin") ?? "none")")
                return nil
            }
        }
        return HTTPHeaders([("Sec-WebSocket-Protocol", "xmpp")])
    }

    private func refused(_ head: HTTPRequestHead, channel: any Channel, reason: String) {
        server.metrics.webSocketUpgradesRefused.increment()
        logger.notice("WebSocket upgrade refused", metadata: [
            "peer": "\(channel.remoteAddress.map { "\($0)" } ?? "?")", "reason": "\(reason)", "uri": "\(head.uri)"])
    }

    func configure(_ channel: any Channel, head: HTTPRequestHead) throws {
        let limits = XMLStreamLimits(maximumStanzaBytes: server.configuration.c2s.maxStanzaBytes)
        let operations = channel.pipeline.syncOperations
        // Fragments are joined into one message, up to the stanza limit (RFC 7395 §3.3.3: a
        // message is one element).
        try operations.addHandler(NIOWebSocketFrameAggregator(
            minNonFinalFragmentSize: 0, maxAccumulatedFrameCount: 1024, maxAccumulatedFrameSize: maximumMessageBytes))
        try operations.addHandler(WebSocketXMPPFraming(limits: limits, names: server.nameCaches.cache(on: channel.eventLoop), logger: logger))
        let handler = ClientConnectionHandler(server: server, decoder: nil, listener: .c2sWebSocket, logger: logger)
        try operations.addHandler(handler)
        // The WebSocket pipeline is added to a channel that is already active: the handler
        // starts its timers and counts the connection as a TCP handler would.
        if let context = try? operations.context(handler: handler) {
            handler.channelActive(context: context)
        }
    }
}

/// Seen by ``ClientConnectionHandler``: the peer showed it is alive without sending a stanza
/// (a WebSocket pong), which keeps an idle browser client from timing out.
struct ClientActivity: Sendable {}

/// RFC 7395 framing: each text message is one complete XML element, `<open/>` and
/// `<close/>` in the framing namespace stand for the stream's opening and closing tags, and
/// every element declares its namespace itself (there is no stream header to inherit it
/// from).
///
/// Inbound messages are parsed by one ``XMLStreamParser`` for the whole connection, inside a
/// root this handler writes first, so the limits, namespace checks and restricted-XML rules
/// are those of TCP streams.
final class WebSocketXMPPFraming: ChannelDuplexHandler {
    typealias InboundIn = WebSocketFrame
    typealias InboundOut = StreamEvent
    typealias OutboundIn = StreamOutput
    typealias OutboundOut = WebSocketFrame

    static let framing = "urn:ietf:params:xml:ns:xmpp-framing"

    private let parser: XMLStreamParser
    private let logger: Logger
    private var failed = false
    private var closeFrameSent = false

    init(limits: XMLStreamLimits, names: XMLNameCache, logger: Logger) {
        parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: limits, names: names)
        self.logger = logger
        parser.feed(Array("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>".utf8))
        // The root's own event: not the client's, so not passed on.
        _ = try? parser.nextEvent()
    }

    // MARK: Inbound

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.opcode {
        case .text:
            guard !failed else { return }
            message(frame.unmaskedData, context: context)
        case .binary:
            // RFC 7395 §3.2: XMPP is carried in text messages only.
            fail(StreamError(.unsupportedEncoding, text: "XMPP over WebSocket is text (RFC 7395 §3.2)"), context: context)
        case .ping:
            context.fireUserInboundEventTriggered(ClientActivity())
            context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .pong, data: frame.unmaskedData)), promise: nil)
        case .pong:
            context.fireUserInboundEventTriggered(ClientActivity())
        case .connectionClose:
            // The client closed the WebSocket without `<close/>` (or after it): answer the
            // close (RFC 6455 §5.5.1) and end the connection; the session may be resumed.
            sendCloseFrame(context: context).whenComplete { _ in context.close(promise: nil) }
        default:
            break
        }
    }

    private func message(_ payload: ByteBuffer, context: ChannelHandlerContext) {
        var payload = payload
        Self.dropXMLDeclaration(&payload)
        parser.feed(payload)
        var events: [StreamEvent] = []
        do {
            while let event = try parser.nextEvent() { events.append(event) }
        } catch {
            failed = true
            context.fireErrorCaught(error)
            return
        }
        guard events.count == 1, case .element(let element) = events[0] else {
            failed = true
            context.fireErrorCaught(XMLStreamError(.notWellFormed, "a WebSocket message must be exactly one complete XML element (RFC 7395 §3.3.3); got \(events.count) events"))
            return
        }
        if element.namespace == Self.framing {
            switch element.name {
            case "open":
                // RFC 7395 §3.3.2: `<open/>` carries what the stream header would.
                let header = StreamHeader(
                    to: element.attribute("to"), from: element.attribute("from"), id: element.attribute("id"),
                    version: element.attribute("version"), language: element.language, contentNamespace: XMLNamespace.client)
                context.fireChannelRead(wrapInboundOut(.streamStart(header)))
            case "close":
                context.fireChannelRead(wrapInboundOut(.streamEnd))
            default:
                failed = true
                context.fireErrorCaught(XMLStreamError(.unsupportedStanzaType, "<\(element.name)/> in the framing namespace"))
            }
            return
        }
        context.fireChannelRead(wrapInboundOut(.element(element)))
    }

    /// Some clients start each message with an XML declaration; inside our root it would be
    /// malformed, and it says nothing we need (UTF-8, version 1.0).
    static func dropXMLDeclaration(_ buffer: inout ByteBuffer) {
        let view = buffer.readableBytesView
        guard let first = view.firstIndex(where: { !XMLStreamParser.isXMLWhitespace($0) }),
              view[first...].starts(with: "<?xml".utf8),
              let end = view[first...].firstIndex(of: UInt8(ascii: ">")) else { return }
        buffer.moveReaderIndex(forwardBy: end + 1 - view.startIndex)
    }

    /// WebSocket protocol errors (a frame or message over the size limit, an unmasked client
    /// frame, bad fragmentation) end the stream as XMPP's errors do (RFC 6120 §4.9.3.16
    /// policy-violation for the size, RFC 7395 §3.6 for the close).
    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let webSocketError = error as? NIOWebSocketError {
            let tooLarge = webSocketError == .invalidFrameLength
            fail(StreamError(tooLarge ? .policyViolation : .badFormat,
                             text: tooLarge ? "WebSocket message larger than the stanza limit" : "WebSocket protocol error: \(webSocketError)"),
                 context: context)
            return
        }
        if error is NIOWebSocketFrameAggregator.Error {
            // Too many or too large fragments for one message.
            fail(StreamError(.policyViolation, text: "WebSocket message over the limits: \(error)"), context: context)
            return
        }
        context.fireErrorCaught(error)
    }

    private func fail(_ error: StreamError, context: ChannelHandlerContext) {
        guard !failed else { return }
        failed = true
        context.fireErrorCaught(error)
    }

    // MARK: Outbound

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .header(let header):
            var attributes: [XMLAttribute] = []
            if let from = header.from { attributes.append(XMLAttribute("from", from)) }
            if let id = header.id { attributes.append(XMLAttribute("id", id)) }
            if let version = header.version { attributes.append(XMLAttribute("version", version)) }
            if let language = header.language { attributes.append(XMLAttribute("lang", language, namespace: XMLNamespace.xml)) }
            text(XMLElement(name: "open", namespace: Self.framing, attributes: attributes), context: context, promise: promise)
        case .element(let element):
            text(element, context: context, promise: promise)
        case .keepalive:
            // RFC 7395 §3.4: no whitespace between messages; a ping keeps the connection warm
            // and its pong shows the client is there.
            context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .ping, data: context.channel.allocator.buffer(capacity: 0))), promise: promise)
        case .end:
            text(XMLElement(name: "close", namespace: Self.framing), context: context, promise: nil)
            sendCloseFrame(context: context).cascade(to: promise)
        case .error(let error):
            text(error.element, context: context, promise: nil)
            text(XMLElement(name: "close", namespace: Self.framing), context: context, promise: nil)
            sendCloseFrame(context: context).cascade(to: promise)
        }
    }

    private func text(_ element: XMLElement, context: ChannelHandlerContext, promise: EventLoopPromise<Void>?) {
        let payload = Self.serialize(element, allocator: context.channel.allocator)
        context.write(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .text, data: payload)), promise: promise)
    }

    private func sendCloseFrame(context: ChannelHandlerContext) -> EventLoopFuture<Void> {
        guard !closeFrameSent else { return context.eventLoop.makeSucceededVoidFuture() }
        closeFrameSent = true
        var code = context.channel.allocator.buffer(capacity: 2)
        code.write(webSocketErrorCode: .normalClosure)
        return context.writeAndFlush(wrapOutboundOut(WebSocketFrame(fin: true, opcode: .connectionClose, data: code)))
    }

    /// One element as a self-contained message: its namespace declared on it (RFC 7395
    /// §3.3.3), stanzas in `jabber:client` (those from server streams re-scoped, RFC 6120
    /// §4.8.3), stream elements as `<stream:…>` with the prefix declared.
    static func serialize(_ element: XMLElement, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 256)
        if element.namespace == XMLNamespace.streams {
            let declared = XMLElement(name: element.name, namespace: element.namespace,
                                      attributes: [XMLAttribute("xmlns:stream", XMLNamespace.streams)] + element.attributes,
                                      children: element.children)
            XMLWriter.write(declared, inheritedNamespace: "", streamPrefix: ("stream", XMLNamespace.streams), to: &buffer)
        } else if XMLNamespace.isContent(element.namespace) {
            var body = allocator.buffer(capacity: 256)
            XMLWriter.write(element, inheritedNamespace: XMLNamespace.client, to: &body)
            // The writer left the (inherited) default namespace undeclared: declare it right
            // after `<name`.
            let nameEnd = 1 + element.name.utf8.count
            buffer.writeBytes(body.readableBytesView.prefix(nameEnd))
            buffer.writeStaticString(" xmlns='jabber:client'")
            buffer.writeBytes(body.readableBytesView.dropFirst(nameEnd))
        } else {
            XMLWriter.write(element, inheritedNamespace: "", to: &buffer)
        }
        return buffer
    }
}

@available(*, unavailable)
extension WebSocketXMPPFraming: Sendable {}
