import NIOCore
import NIOEmbedded
import NIOPosix
import Synchronization
import Testing
import XMPPCore
import XMPPStream
@testable import Federation

/// Counts the stanzas a link writes, and swallows them (the socket under it is never
/// written to, so it stays writable and only the link's own logic decides what goes out).
private final class WrittenCounter: ChannelOutboundHandler, Sendable {
    typealias OutboundIn = StreamOutput
    typealias OutboundOut = StreamOutput
    let count = Atomic<Int>(0)

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .element(let element) = unwrapOutboundIn(data), element.name == "message" {
            count.add(1, ordering: .relaxed)
        }
        promise?.succeed()
    }

    func flush(context: ChannelHandlerContext) {}
}

/// Issue 9, "nothing waits forever": stanzas queued on a healthy link while it drains must
/// all go out. A stanza queued between the drain's last look at the queue and its end was
/// left behind with the drain still marked as scheduled, so nothing sent it, nor anything
/// queued after it, until the link closed: a stalled link with no error anywhere. Since
/// issue 10 the queue lives on the link's event loop, where senders hand their stanzas (as
/// the manager does): the drain and the senders' steps interleave there, thousands of times.
@Suite("Link draining under concurrent senders")
struct LinkDrainTests {
    @Test("Every stanza handed to the link from many threads at once is written, none left in the queue")
    func concurrentEnqueue() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { $0.eventLoop.makeSucceededVoidFuture() }
            .bind(host: "127.0.0.1", port: 0).get()
        let counter = WrittenCounter()
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(counter) } }
            .connect(to: server.localAddress!).get()
        let link = FederationLink(origin: .outgoing, peerAddress: "test", channel: channel)
        let senders = 8
        let perSender = 20000
        let pair = DomainPair(local: "a.example", remote: "b.example")
        await withTaskGroup(of: Void.self) { tasks in
            for sender in 0..<senders {
                tasks.addTask {
                    for index in 0..<perSender {
                        let element = XMLElement(name: "message", namespace: XMLNamespace.server, attributes: [XMLAttribute("id", "\(sender)-\(index)")])
                        let stanza = Stanza(element)!
                        link.eventLoop.execute { link.enqueue(stanza, for: pair) }
                        // Let the drain catch up now and then, so the queue empties often:
                        // the race is at the moment it becomes empty.
                        if index % 50 == 0 { await Task.yield() }
                    }
                }
            }
        }
        let total = senders * perSender
        let deadline = ContinuousClock.now + .seconds(10)
        while counter.count.load(ordering: .relaxed) < total && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(counter.count.load(ordering: .relaxed) == total)
        #expect(await link.onLoop { $0.queuedCount } == 0)
        try await channel.close()
        try await server.close()
        try await group.shutdownGracefully()
    }

    @Test("A retiring link takes no more outbound stanzas, but still accepts what the peer sends until it closes")
    func retiringLink() throws {
        let link = FederationLink(origin: .outgoing, peerAddress: "test", channel: EmbeddedChannel())
        let pair = DomainPair(local: "a.example", remote: "b.example")
        link.authorize(pair, .outbound, method: .pkix, expires: nil)
        link.authorize(pair, .inbound, method: .pkix, expires: nil)
        #expect(link.isAuthorized(pair, .outbound))
        #expect(link.beginRetiring())
        #expect(!link.isAuthorized(pair, .outbound))
        #expect(link.isAuthorized(pair, .inbound))
    }
}
