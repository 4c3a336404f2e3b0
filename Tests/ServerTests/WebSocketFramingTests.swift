import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOWebSocket
import Testing
import XMPPCore
import XMPPStream
@testable import Server

/// RFC 7395 framing on its own (the whole path, upgrade to bind, runs against the real
/// server in Tests/Interop/test_browser.py): what a WebSocket message becomes, and what the
/// client receives.
@Suite("XMPP over WebSocket framing (RFC 7395)")
struct WebSocketFramingTests {
    /// Collects what the framing passes up.
    final class Sink: ChannelInboundHandler {
        typealias InboundIn = StreamEvent
        var events: [StreamEvent] = []
        var errors: [any Error] = []
        var activity = 0

        func channelRead(context: ChannelHandlerContext, data: NIOAny) { events.append(unwrapInboundIn(data)) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { errors.append(error) }
        func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
            if event is ClientActivity { activity += 1 }
        }
    }

    static func channel() throws -> (EmbeddedChannel, Sink) {
        let sink = Sink()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(WebSocketXMPPFraming(limits: .client, names: XMLNameCache(), logger: Logger(label: "test")))
        try channel.pipeline.syncOperations.addHandler(sink)
        return (channel, sink)
    }

    static func text(_ string: String) -> WebSocketFrame {
        WebSocketFrame(fin: true, opcode: .text, data: ByteBuffer(string: string))
    }

    /// The text messages written to the client, in order.
    static func written(_ channel: EmbeddedChannel) throws -> [(WebSocketOpcode, String)] {
        var frames: [(WebSocketOpcode, String)] = []
        while let frame = try channel.readOutbound(as: WebSocketFrame.self) {
            frames.append((frame.opcode, String(buffer: frame.unmaskedData)))
        }
        return frames
    }

    @Test("<open/> is the stream header, <close/> its end, other elements pass as they are")
    func inbound() throws {
        let (channel, sink) = try Self.channel()
        try channel.writeInbound(Self.text("<?xml version='1.0'?><open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='a.example' version='1.0' xml:lang='de'/>"))
        try channel.writeInbound(Self.text("<message xmlns='jabber:client' to='b@a.example' id='m1'><body>hi</body></message>"))
        try channel.writeInbound(Self.text("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"))
        #expect(sink.errors.isEmpty)
        #expect(sink.events.count == 3)
        guard case .streamStart(let header) = sink.events.first else {
            Issue.record("no stream start: \(sink.events)")
            return
        }
        #expect(header.to == "a.example")
        #expect(header.version == "1.0")
        #expect(header.language == "de")
        guard case .element(let message) = sink.events[1] else {
            Issue.record("no element: \(sink.events)")
            return
        }
        #expect(message.name == "message" && message.namespace == XMLNamespace.client && message.attribute("id") == "m1")
        #expect(sink.events[2] == .streamEnd)
    }

    @Test("Two elements in one message, half an element, text that is not XML, binary: a stream error, and nothing after it is read",
          arguments: ["<presence xmlns='jabber:client'/><presence xmlns='jabber:client'/>", "<message xmlns='jabber:client'>",
                      "this is not XML <<", "binary"])
    func badMessages(message: String) throws {
        let (channel, sink) = try Self.channel()
        if message == "binary" {
            try channel.writeInbound(WebSocketFrame(fin: true, opcode: .binary, data: ByteBuffer(string: "<presence/>")))
        } else {
            try channel.writeInbound(Self.text(message))
        }
        #expect(sink.events.isEmpty)
        let condition = (sink.errors.first as? any StreamErrorConvertible)?.streamError.condition
        #expect(condition != nil, "no stream error for \(message)")
        try channel.writeInbound(Self.text("<presence xmlns='jabber:client'/>"))
        #expect(sink.events.isEmpty)
    }

    @Test("A WebSocket protocol error (a message over the size limit) becomes XMPP's policy-violation")
    func oversized() throws {
        let (channel, sink) = try Self.channel()
        channel.pipeline.fireErrorCaught(NIOWebSocketError.invalidFrameLength)
        let condition = (sink.errors.first as? any StreamErrorConvertible)?.streamError.condition
        #expect(condition == .policyViolation)
    }

    @Test("The upgrade needs the xmpp subprotocol, and an allowed origin when origins are listed")
    func upgradeRules() async throws {
        try await withServer(users: []) { server in
            func head(_ headers: [(String, String)]) -> HTTPRequestHead {
                HTTPRequestHead(version: .http1_1, method: .GET, uri: "/xmpp-websocket", headers: HTTPHeaders(headers))
            }
            let channel = EmbeddedChannel()
            let open = ClientWebSocketEndpoint(server: server.context, path: "/xmpp-websocket", allowedOrigins: [], logger: Logger(label: "test"))
            let accepted = open.acceptUpgrade(head([("Sec-WebSocket-Protocol", "chat, xmpp"), ("Origin", "https://anywhere.example")]), channel: channel)
            #expect(accepted?.first(name: "Sec-WebSocket-Protocol") == "xmpp")
            #expect(open.acceptUpgrade(head([("Sec-WebSocket-Protocol", "chat")]), channel: channel) == nil)
            #expect(open.acceptUpgrade(head([]), channel: channel) == nil)
            let listed = ClientWebSocketEndpoint(server: server.context, path: "/xmpp-websocket",
                                                 allowedOrigins: ["https://chat.example"], logger: Logger(label: "test"))
            #expect(listed.acceptUpgrade(head([("Sec-WebSocket-Protocol", "xmpp"), ("Origin", "https://chat.example")]), channel: channel) != nil)
            #expect(listed.acceptUpgrade(head([("Sec-WebSocket-Protocol", "xmpp"), ("Origin", "https://evil.example")]), channel: channel) == nil)
            #expect(listed.acceptUpgrade(head([("Sec-WebSocket-Protocol", "xmpp")]), channel: channel) == nil)
            #expect(server.metrics.counterValue("braid_websocket_upgrades_refused_total") == 4)
            _ = try? channel.finish()
        }
    }

    @Test("What the client receives: <open/>, stanzas with their namespace declared (a server stanza re-scoped), <stream:features> with its prefix, an error then <close/> and a close frame")
    func outbound() throws {
        let (channel, sink) = try Self.channel()
        try channel.writeOutbound(StreamOutput.header(StreamHeader(from: "a.example", id: "s1", contentNamespace: XMLNamespace.client)))
        let fromServer = XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("id", "x")],
                                    children: [.element(XMLElement(name: "body", namespace: XMLNamespace.server, text: "hi"))])
        try channel.writeOutbound(StreamOutput.element(fromServer))
        try channel.writeOutbound(StreamOutput.element(XMLElement(name: "features", namespace: XMLNamespace.streams)))
        try channel.writeOutbound(StreamOutput.keepalive)
        try channel.writeOutbound(StreamOutput.error(StreamError(.policyViolation)))
        let frames = try Self.written(channel)
        #expect(frames.map(\.0) == [.text, .text, .text, .ping, .text, .text, .connectionClose])
        #expect(frames[0].1 == "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' from='a.example' id='s1' version='1.0' xml:lang='en'/>")
        #expect(frames[1].1 == "<message xmlns='jabber:client' id='x'><body>hi</body></message>")
        #expect(frames[2].1 == "<stream:features xmlns:stream='http://etherx.jabber.org/streams'/>")
        #expect(frames[4].1.hasPrefix("<stream:error xmlns:stream='http://etherx.jabber.org/streams'><policy-violation"))
        #expect(frames[5].1 == "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>")
        // A ping from the client is answered, and counts as activity (no idle timeout).
        try channel.writeInbound(WebSocketFrame(fin: true, opcode: .ping, data: ByteBuffer(string: "p")))
        let pong = try #require(try channel.readOutbound(as: WebSocketFrame.self))
        #expect(pong.opcode == .pong && String(buffer: pong.unmaskedData) == "p")
        #expect(sink.activity == 1)
    }
}
