import NIOCore
import XMPPCore

/// Turns inbound bytes into ``StreamEvent``s.
///
/// Each event is fired before the next byte is parsed, so the handler above can restart the
/// stream (``restart(leftover:)``) in the middle of a read: after `<proceed/>` the bytes that
/// followed must never reach the new TLS layer as if they were protected (RFC 6120 §5.4.3.3),
/// and after SASL success the new header may already be in the same read (§4.3.3).
///
/// A parse failure is fired as ``XMLStreamError`` through `errorCaught`; nothing after it is
/// parsed.
public final class XMLStreamDecoder: ChannelInboundHandler {
    public typealias InboundIn = ByteBuffer
    public typealias InboundOut = StreamEvent

    /// What to do with bytes that arrived after the element that triggered a restart.
    public enum Leftover: Sendable {
        /// Parse them as the start of the new stream (SASL success, XEP-0288 and others).
        case parse
        /// Refuse them: after STARTTLS, cleartext that was sent before the handshake is an
        /// injection attempt (CVE-2011-0411). The restart fails with `policy-violation` if
        /// there is any, except whitespace, which is allowed between elements (RFC 6120
        /// §11.7) and is dropped: go-sendxmpp sends a newline after `<starttls/>`.
        case reject
    }

    private var parser: XMLStreamParser
    private var failed = false
    private var delivering = false
    private var pendingRestart: Leftover?

    /// `names`: the name cache of the event loop the channel runs on (``XMLNameCaches``), or
    /// nil for one of its own.
    public init(contentNamespace: String, limits: XMLStreamLimits, names: XMLNameCache? = nil) {
        parser = XMLStreamParser(contentNamespace: contentNamespace, limits: limits, names: names)
    }

    /// The parser's limits.
    public var limits: XMLStreamLimits { parser.limits }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !failed else { return }
        parser.feed(unwrapInboundIn(data))
        deliver(context: context)
    }

    /// Restarts the stream: the next bytes are parsed as a new document with a new header.
    ///
    /// Safe to call from inside the `channelRead` of the handler above while it handles an
    /// event; the restart happens before the next byte is parsed.
    public func restart(leftover: Leftover, context: ChannelHandlerContext) {
        if delivering {
            pendingRestart = leftover
        } else if applyRestart(leftover, context: context) {
            deliver(context: context)
        }
    }

    /// Resets the parser; returns false when the leftover input failed the stream.
    private func applyRestart(_ leftover: Leftover, context: ChannelHandlerContext) -> Bool {
        let remaining = parser.reset()
        switch leftover {
        case .parse:
            parser.feed(remaining)
            return true
        case .reject:
            let injected = remaining.readableBytesView.contains { !XMLStreamParser.isXMLWhitespace($0) }
            guard !injected else {
                failed = true
                context.fireErrorCaught(XMLStreamError(.policyViolation, "\(remaining.readableBytes) bytes sent before the TLS handshake"))
                return false
            }
            return true
        }
    }

    private func deliver(context: ChannelHandlerContext) {
        guard !delivering else { return }
        delivering = true
        defer { delivering = false }
        while !failed {
            let event: StreamEvent?
            do {
                event = try parser.nextEvent()
            } catch {
                failed = true
                context.fireErrorCaught(error)
                return
            }
            guard let event else { return }
            context.fireChannelRead(wrapInboundOut(event))
            if let restart = pendingRestart {
                pendingRestart = nil
                guard applyRestart(restart, context: context) else { return }
            } else if case .streamEnd = event {
                return
            }
        }
    }
}

@available(*, unavailable)
extension XMLStreamDecoder: Sendable {}

/// What the handlers above write to a stream.
public enum StreamOutput: Sendable {
    /// The opening `<stream:stream>` (with XML declaration).
    case header(StreamHeader)
    /// A first-level element, serialized for this stream's content namespace.
    case element(XMLElement)
    /// A whitespace keepalive (RFC 6120 §4.6.1).
    case keepalive
    /// The closing `</stream:stream>`.
    case end
    /// A stream error followed by the closing tag (RFC 6120 §4.9.1.1).
    case error(StreamError)
}

/// Serializes ``StreamOutput`` into bytes.
public final class XMLStreamEncoder: ChannelOutboundHandler {
    public typealias OutboundIn = StreamOutput
    public typealias OutboundOut = ByteBuffer

    /// The content namespace stanzas are written in: `jabber:client` or `jabber:server`.
    public let contentNamespace: String

    public init(contentNamespace: String) {
        self.contentNamespace = contentNamespace
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        var buffer = context.channel.allocator.buffer(capacity: 256)
        switch unwrapOutboundIn(data) {
        case .header(let header):
            XMLSerializer.writeStreamHeader(header, into: &buffer)
        case .element(let element):
            XMLSerializer.write(element, contentNamespace: contentNamespace, into: &buffer)
        case .keepalive:
            buffer.writeStaticString(" ")
        case .end:
            XMLSerializer.writeStreamEnd(into: &buffer)
        case .error(let error):
            XMLSerializer.write(error.element, contentNamespace: contentNamespace, into: &buffer)
            XMLSerializer.writeStreamEnd(into: &buffer)
        }
        context.write(wrapOutboundOut(buffer), promise: promise)
    }
}

@available(*, unavailable)
extension XMLStreamEncoder: Sendable {}
