import NIOCore
import Testing
import XMPPCore
@testable import XMPPStream

/// Issue 10, item 10: memory grew with every whitespace keepalive, because the parser kept
/// each input slice (and with it the whole read buffer it was cut from) until the next
/// stanza, and an idle client sends none.
@Suite("Stream parser: whitespace keepalives")
struct KeepaliveMemoryTests {
    /// A keepalive as a socket read delivers it: one byte cut from a 2 KiB buffer.
    func keepalive() -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: 2048)
        buffer.writeString(" ")
        return buffer
    }

    @Test("10,000 keepalives keep at most a couple of input slices; stanzas and restarts still work")
    func keepalivesStayBounded() throws {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: .client)
        parser.feed(ByteBuffer(string: clientHeader + "<presence/>"))
        while try parser.nextEvent() != nil {}
        var most = 0
        for _ in 0..<10_000 {
            parser.feed(keepalive())
            #expect(try parser.nextEvent() == nil)
            most = max(most, parser.retainedSliceCount)
        }
        #expect(most <= 2, "kept \(most) slices")
        // Still one stream: a stanza after the keepalives parses.
        parser.feed(ByteBuffer(string: "\n<message to='a@b'><body>hi</body></message>"))
        guard case .element(let message) = try parser.nextEvent() else {
            Issue.record("no message after the keepalives")
            return
        }
        #expect(message.name == "message")
        // A restart after keepalives hands back only what follows, and starts cleanly.
        parser.feed(keepalive())
        #expect(try parser.nextEvent() == nil)
        let leftover = parser.reset()
        #expect(leftover.readableBytesView.allSatisfy { $0 == UInt8(ascii: " ") })
        parser.feed(ByteBuffer(string: clientHeader))
        guard case .streamStart = try parser.nextEvent() else {
            Issue.record("no header after the restart")
            return
        }
    }
}
