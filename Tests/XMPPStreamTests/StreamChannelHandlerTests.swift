import NIOCore
import NIOEmbedded
import Testing
import XMPPCore
@testable import XMPPStream

/// Records what the decoder fires, and restarts the stream on request like a negotiation
/// handler would after `<proceed/>` or `<success/>`.
final class RecordingHandler: ChannelInboundHandler {
    typealias InboundIn = StreamEvent

    var events: [StreamEvent] = []
    var errors: [any Error] = []
    var restartOn: [String: XMLStreamDecoder.Leftover] = [:]
    let decoder: XMLStreamDecoder

    init(decoder: XMLStreamDecoder) {
        self.decoder = decoder
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let event = unwrapInboundIn(data)
        events.append(event)
        if case .element(let element) = event, let leftover = restartOn[element.name] {
            decoder.restart(leftover: leftover, context: context)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        errors.append(error)
    }
}

@Suite("Stream channel handlers")
struct StreamChannelHandlerTests {
    func makeChannel() throws -> (EmbeddedChannel, RecordingHandler) {
        let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.client, limits: .client)
        let recorder = RecordingHandler(decoder: decoder)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(decoder)
        try channel.pipeline.syncOperations.addHandler(XMLStreamEncoder(contentNamespace: XMLNamespace.client))
        try channel.pipeline.syncOperations.addHandler(recorder)
        return (channel, recorder)
    }

    @Test("The decoder fires one event per element across split reads")
    func splitReads() throws {
        let (channel, recorder) = try makeChannel()
        let bytes = Array((clientHeader + "<presence/><message to='a@b'><body>é</body></message>").utf8)
        for chunk in stride(from: 0, to: bytes.count, by: 7).map({ Array(bytes[$0..<min($0 + 7, bytes.count)]) }) {
            try channel.writeInbound(ByteBuffer(bytes: chunk))
        }
        #expect(recorder.events.count == 3)
        #expect(recorder.errors.isEmpty)
        _ = try channel.finish()
    }

    @Test("A restart after SASL success parses the pipelined new header from the same read")
    func restartParsesLeftover() throws {
        let (channel, recorder) = try makeChannel()
        recorder.restartOn["auth"] = .parse
        let input = clientHeader + "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>" + clientHeader + "<iq type='set' id='1'/>"
        try channel.writeInbound(ByteBuffer(string: input))
        let kinds = recorder.events.map { event -> String in
            switch event {
            case .streamStart: "header"
            case .element(let element): element.name
            case .streamEnd: "end"
            }
        }
        #expect(kinds == ["header", "auth", "header", "iq"])
        #expect(recorder.errors.isEmpty)
        _ = try channel.finish()
    }

    @Test("Whitespace between </auth> and the new header, in one read or the next, starts the new stream cleanly (go-sendxmpp)")
    func restartAfterWhitespace() throws {
        for split in [false, true] {
            let (channel, recorder) = try makeChannel()
            recorder.restartOn["auth"] = .parse
            let auth = clientHeader + "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>" + (split ? "" : "\n")
            let next = (split ? "\n" : "") + clientHeader + "<iq type='set' id='1'/>"
            if split {
                try channel.writeInbound(ByteBuffer(string: auth))
                try channel.writeInbound(ByteBuffer(string: next))
            } else {
                try channel.writeInbound(ByteBuffer(string: auth + next))
            }
            #expect(recorder.errors.isEmpty, "split: \(split): \(recorder.errors)")
            #expect(recorder.events.count == 4, "split: \(split)")
            _ = try? channel.finish()
        }
    }

    @Test("Cleartext sent after <starttls/> in the same read is refused, not parsed")
    func starttlsInjectionRefused() throws {
        let (channel, recorder) = try makeChannel()
        recorder.restartOn["starttls"] = .reject
        let input = clientHeader + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='set' id='evil'/>"
        try channel.writeInbound(ByteBuffer(string: input))
        #expect(recorder.events.count == 2)
        #expect((recorder.errors.first as? XMLStreamError)?.condition == .policyViolation)
        _ = try? channel.finish()
    }

    @Test("Whitespace after <starttls/> in the same read is not an injection (go-sendxmpp sends a newline)",
          arguments: ["\n", "\r\n", " \t\n"])
    func starttlsTrailingWhitespace(whitespace: String) throws {
        let (channel, recorder) = try makeChannel()
        recorder.restartOn["starttls"] = .reject
        try channel.writeInbound(ByteBuffer(string: clientHeader + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>" + whitespace))
        #expect(recorder.errors.isEmpty)
        // The new stream (after the handshake) starts clean: the whitespace was dropped.
        try channel.writeInbound(ByteBuffer(string: clientHeader))
        #expect(recorder.events.count == 3)
        #expect(recorder.errors.isEmpty)
        _ = try channel.finish()
    }

    @Test("Whitespace followed by cleartext after <starttls/> is still refused")
    func starttlsWhitespaceThenInjection() throws {
        let (channel, recorder) = try makeChannel()
        recorder.restartOn["starttls"] = .reject
        try channel.writeInbound(ByteBuffer(string: clientHeader + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\n<iq type='set' id='evil'/>"))
        #expect((recorder.errors.first as? XMLStreamError)?.condition == .policyViolation)
        _ = try? channel.finish()
    }

    @Test("A clean <starttls/> restarts without error")
    func starttlsClean() throws {
        let (channel, recorder) = try makeChannel()
        recorder.restartOn["starttls"] = .reject
        try channel.writeInbound(ByteBuffer(string: clientHeader + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"))
        #expect(recorder.errors.isEmpty)
        try channel.writeInbound(ByteBuffer(string: clientHeader))
        #expect(recorder.events.count == 3)
        _ = try channel.finish()
    }

    @Test("A parse error is fired once and nothing after it is parsed")
    func errorStopsParsing() throws {
        let (channel, recorder) = try makeChannel()
        try channel.writeInbound(ByteBuffer(string: clientHeader + "<presence/><!--x--><presence/>"))
        try channel.writeInbound(ByteBuffer(string: "<presence/>"))
        #expect(recorder.events.count == 2)
        #expect(recorder.errors.count == 1)
        #expect((recorder.errors.first as? XMLStreamError)?.condition == .restrictedXML)
        _ = try? channel.finish()
    }

    @Test("The encoder writes headers, stanzas, keepalives, errors and the end")
    func encoder() throws {
        let (channel, _) = try makeChannel()
        try channel.writeOutbound(StreamOutput.header(StreamHeader(from: "example.com", id: "s1", contentNamespace: XMLNamespace.client)))
        try channel.writeOutbound(StreamOutput.element(XMLElement(name: "presence", namespace: XMLNamespace.server)))
        try channel.writeOutbound(StreamOutput.keepalive)
        try channel.writeOutbound(StreamOutput.error(StreamError(.hostUnknown)))
        var written = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) {
            written += String(buffer: buffer)
        }
        #expect(written == "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='example.com' id='s1' version='1.0' xml:lang='en'><presence/> <stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>")
        _ = try channel.finish()
    }
}
