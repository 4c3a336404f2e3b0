import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Synchronization
import Trust
import XMPPCore
import XMPPStream
@testable import Server

/// A minimal XMPP client for integration tests, speaking to a real server over loopback with
/// real TLS. Reads are pulled one event at a time with a bounded wait.
final class TestClient: Sendable {
    let channel: any Channel
    private let events: EventQueue
    /// Elements read while waiting for something else, handed out first afterwards.
    private let backlog = Mutex<[XMLElement]>([])
    /// The stream features offered after authentication, from the last `login`.
    private let authenticatedFeatures = Mutex<XMLElement?>(nil)
    var featuresAfterAuthentication: XMLElement? { authenticatedFeatures.withLock { $0 } }
    let port: Int

    enum ClientEvent: Sendable {
        case stream(StreamEvent)
        case error(String)
        case closed
        case tlsEstablished
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private init(channel: any Channel, events: EventQueue, port: Int) {
        self.channel = channel
        self.events = events
        self.port = port
    }

    /// Connects without TLS (for STARTTLS) or with TLS from the first byte. A server peer
    /// (`jabber:server`) may present `clientCertificate` when TLS starts.
    static func connect(port: Int, directTLS: String? = nil, group: any EventLoopGroup,
                        contentNamespace: String = XMLNamespace.client, clientCertificate: PEMCredentials? = nil) async throws -> TestClient {
        let queue = EventQueue()
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .none
        if let clientCertificate {
            tls.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(clientCertificate.certificateChainPEM.utf8)).map { .certificate($0) }
            tls.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(clientCertificate.privateKeyPEM.utf8), format: .pem))
        }
        let sslContext = try NIOSSLContext(configuration: tls)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let decoder = XMLStreamDecoder(contentNamespace: contentNamespace, limits: XMLStreamLimits(maximumStanzaBytes: 1 << 20))
                    if let directTLS {
                        var direct = tls
                        direct.applicationProtocols = [contentNamespace == XMLNamespace.client ? "xmpp-client" : "xmpp-server"]
                        let context = try NIOSSLContext(configuration: direct)
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: directTLS))
                    }
                    try channel.pipeline.syncOperations.addHandler(decoder)
                    try channel.pipeline.syncOperations.addHandler(XMLStreamEncoder(contentNamespace: contentNamespace))
                    try channel.pipeline.syncOperations.addHandler(Collector(decoder: decoder, queue: queue, sslContext: sslContext))
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        return TestClient(channel: channel, events: queue, port: port)
    }

    /// A server-to-server header (`jabber:server`, `xmlns:db`).
    func sendServerHeader(to: String, from: String?) async throws {
        try await channel.writeAndFlush(StreamOutput.header(StreamHeader(to: to, from: from, contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback])))
    }

    // MARK: Sending

    func send(_ element: XMLElement) async throws {
        try await channel.writeAndFlush(StreamOutput.element(element))
    }

    func sendHeader(to domain: String, version: String? = "1.0") async throws {
        try await channel.writeAndFlush(StreamOutput.header(StreamHeader(to: domain, version: version, contentNamespace: XMLNamespace.client)))
    }

    /// Writes bytes as they are, below the XML encoder (and above TLS).
    func sendRaw(_ text: String) async throws {
        let channel = self.channel
        try await channel.eventLoop.flatSubmit { () -> EventLoopFuture<Void> in
            do {
                let context = try channel.pipeline.syncOperations.context(handlerType: XMLStreamEncoder.self)
                return context.writeAndFlush(NIOAny(ByteBuffer(string: text)))
            } catch {
                return channel.eventLoop.makeFailedFuture(error)
            }
        }.get()
    }

    func sendEnd() async throws {
        try await channel.writeAndFlush(StreamOutput.end)
    }

    // MARK: Receiving

    /// The next event, or a failure after `timeout`.
    func next(timeout: Duration = .seconds(5)) async throws -> ClientEvent {
        guard let event = await events.next(timeout: timeout) else {
            throw Failure(description: "no event within \(timeout)")
        }
        return event
    }

    /// The next first-level element, skipping headers.
    func nextElement(timeout: Duration = .seconds(5)) async throws -> XMLElement {
        if let waiting = backlog.withLock({ $0.isEmpty ? nil : $0.removeFirst() }) { return waiting }
        return try await readElement(timeout: timeout)
    }

    private func readElement(timeout: Duration) async throws -> XMLElement {
        while true {
            switch try await next(timeout: timeout) {
            case .stream(.element(let element)): return element
            case .stream(.streamStart), .tlsEstablished: continue
            case .stream(.streamEnd): throw Failure(description: "stream ended")
            case .error(let error): throw Failure(description: "decoder error: \(error)")
            case .closed: throw Failure(description: "connection closed")
            }
        }
    }

    /// Waits for the first element satisfying `predicate`; others are kept, in order, for
    /// later reads.
    func waitFor(timeout: Duration = .seconds(5), _ predicate: (XMLElement) -> Bool) async throws -> XMLElement {
        let stashed = backlog.withLock { backlog -> XMLElement? in
            guard let index = backlog.firstIndex(where: predicate) else { return nil }
            return backlog.remove(at: index)
        }
        if let stashed { return stashed }
        let deadline = ContinuousClock.now + timeout
        while true {
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { throw Failure(description: "no matching element within \(timeout)") }
            let element = try await readElement(timeout: remaining)
            if predicate(element) { return element }
            backlog.withLock { $0.append(element) }
        }
    }

    /// Nil when no new element arrives within `window`; otherwise the element that did.
    func expectSilence(for window: Duration = .milliseconds(300)) async -> XMLElement? {
        do {
            return try await readElement(timeout: window)
        } catch {
            return nil
        }
    }

    /// Reads until the stream closes and returns the stream error condition, if one was sent.
    func streamErrorCondition(timeout: Duration = .seconds(5)) async throws -> StreamError.Condition? {
        var condition: StreamError.Condition?
        while true {
            switch try await next(timeout: timeout) {
            case .stream(.element(let element)):
                if let error = StreamError(element: element) { condition = error.condition }
            case .stream(.streamEnd), .closed:
                return condition
            case .error:
                return condition
            case .stream(.streamStart), .tlsEstablished:
                continue
            }
        }
    }

    func close() async {
        try? await channel.close()
    }

    // MARK: Login

    struct LoginOptions {
        var mechanism = "SCRAM-SHA-256"
        /// The channel-binding type a -PLUS mechanism binds to.
        var bindingType = "tls-exporter"
        var resource: String? = "test"
        var useTLS = true
    }

    /// STARTTLS after the features offering it: `<starttls/>`, `<proceed/>`, the handshake.
    /// The caller sends the new stream header (RFC 6120 §5.4.3.3).
    func startTLS() async throws {
        try await send(XMLElement(name: "starttls", namespace: XMLNamespace.tls))
        _ = try await waitFor { $0.name == "proceed" }
        guard case .tlsEstablished = try await next() else { throw Failure(description: "TLS did not start") }
    }

    /// Negotiates STARTTLS (unless direct TLS), authenticates and binds. Returns the bound JID.
    @discardableResult
    func login(domain: String, username: String, password: String, options: LoginOptions = LoginOptions(), directTLS: Bool = false) async throws -> JID {
        try await sendHeader(to: domain)
        var features = try await nextElement()
        if !directTLS && options.useTLS {
            guard features.firstChild(name: "starttls", namespace: XMLNamespace.tls) != nil else { throw Failure(description: "no starttls offered") }
            try await startTLS()
            try await sendHeader(to: domain)
            features = try await nextElement()
        }
        try await authenticate(features: features, username: username, password: password, mechanism: options.mechanism, bindingType: options.bindingType)
        try await sendHeader(to: domain)
        features = try await nextElement()
        guard features.firstChild(name: "bind", namespace: XMLNamespace.bind) != nil else { throw Failure(description: "no bind offered: \(features)") }
        let offered = features
        authenticatedFeatures.withLock { $0 = offered }
        return try await bind(resource: options.resource)
    }

    func authenticate(features: XMLElement, username: String, password: String, mechanism: String, bindingType: String = "tls-exporter") async throws {
        let offered = features.firstChild(name: "mechanisms", namespace: XMLNamespace.sasl)?.children(name: "mechanism", namespace: XMLNamespace.sasl).map(\.text) ?? []
        guard offered.contains(mechanism) else { throw Failure(description: "\(mechanism) not offered: \(offered)") }
        if mechanism == "PLAIN" {
            let message = [UInt8](("\0" + username + "\0" + password).utf8)
            try await send(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", "PLAIN")], text: Base64.encode(message)))
            let reply = try await nextElement()
            guard reply.name == "success" else { throw Failure(description: "PLAIN failed: \(reply)") }
            return
        }
        let hash: SCRAMHash = mechanism.hasPrefix("SCRAM-SHA-256") ? .sha256 : .sha1
        var binding: ChannelBinding?
        if mechanism.hasSuffix("-PLUS") {
            let data = bindingType == "tls-exporter" ? try await exporter() : try await serverEndPoint()
            binding = ChannelBinding(type: bindingType, data: data)
        }
        var client = SCRAMClient(hash: hash, username: username, password: password, channelBinding: binding, clientSupportsChannelBinding: binding != nil)
        try await send(XMLElement(name: "auth", namespace: XMLNamespace.sasl, attributes: [XMLAttribute("mechanism", mechanism)], text: Base64.encode(try client.clientFirstMessage())))
        let challenge = try await nextElement()
        guard challenge.name == "challenge", let serverFirst = Base64.decode(challenge.text) else {
            throw SASLFailed(condition: challenge.firstElement?.name ?? challenge.name)
        }
        let clientFinal = try client.serverFirstReceived(serverFirst)
        try await send(XMLElement(name: "response", namespace: XMLNamespace.sasl, text: Base64.encode(clientFinal)))
        let outcome = try await nextElement()
        guard outcome.name == "success" else {
            throw SASLFailed(condition: outcome.firstElement?.name ?? outcome.name)
        }
        guard let serverFinal = Base64.decode(outcome.text) else { throw Failure(description: "bad success data") }
        try client.serverFinalReceived(serverFinal)
    }

    struct SASLFailed: Error, Equatable {
        var condition: String
    }

    func bind(resource: String?) async throws -> JID {
        var children: [XMLNode] = []
        if let resource { children.append(.element(XMLElement(name: "resource", namespace: XMLNamespace.bind, text: resource))) }
        try await send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "set"), XMLAttribute("id", "bind")], children: [
            .element(XMLElement(name: "bind", namespace: XMLNamespace.bind, children: children)),
        ]))
        let result = try await waitFor { $0.name == "iq" && $0.attribute("id") == "bind" }
        guard result.attribute("type") == "result",
              let text = result.firstChild(name: "bind", namespace: XMLNamespace.bind)?.firstChild(name: "jid", namespace: XMLNamespace.bind)?.text else {
            throw BindFailed(condition: result.firstChild(name: "error", namespace: XMLNamespace.client)?.firstElement?.name ?? "unknown")
        }
        return try JID(text)
    }

    struct BindFailed: Error, Equatable {
        var condition: String
    }

    /// The `tls-exporter` binding (RFC 9266) of this connection's TLS session, read on the
    /// client's side of the connection.
    func exporter() async throws -> [UInt8] {
        let channel = self.channel
        let value = try await channel.eventLoop.submit { () -> [UInt8]? in
            let handler = try channel.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self)
            return TLSChannelBindings.tlsExporter(of: handler)
        }.get()
        guard let value else { throw Failure(description: "no tls-exporter value (TLS 1.2, or swift-nio-ssl changed)") }
        return value
    }

    /// The `tls-server-end-point` binding computed from the certificate the server presented.
    func serverEndPoint() async throws -> [UInt8] {
        guard let certificate = try await channel.nioSSL_peerCertificate().get() else { throw Failure(description: "no server certificate") }
        return try TLSEndPoint.hash(try certificate.toDERBytes())
    }

    // MARK: Conveniences

    /// A roster get and its answer: the server handles one session's stanzas in order, so
    /// everything this client sent before has been processed when it returns.
    func roundTrip() async throws {
        let reply = try await iq(.get, payload: XMLElement(name: "query", namespace: "jabber:iq:roster"))
        guard reply.attribute("type") == "result" else { throw Failure(description: "roster get failed: \(reply)") }
    }

    /// Sends an IQ and waits for its reply.
    /// Sends an IQ and waits for its reply (`timeout` for requests that write much, on a
    /// loaded machine).
    func iq(_ type: IQType, to: String? = nil, id: String = ServerContext.randomIdentifier(bytes: 4), timeout: Duration = .seconds(5),
            payload: XMLElement) async throws -> XMLElement {
        var attributes = [XMLAttribute("type", type.rawValue), XMLAttribute("id", id)]
        if let to { attributes.append(XMLAttribute("to", to)) }
        try await send(XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: attributes, children: [.element(payload)]))
        return try await waitFor(timeout: timeout) { $0.name == "iq" && $0.attribute("id") == id && ($0.attribute("type") == "result" || $0.attribute("type") == "error") }
    }

    func sendMessage(to: String, body: String, type: String = "chat", id: String? = nil) async throws {
        var attributes = [XMLAttribute("to", to), XMLAttribute("type", type)]
        if let id { attributes.append(XMLAttribute("id", id)) }
        try await send(XMLElement(name: "message", namespace: XMLNamespace.client, attributes: attributes, children: [
            .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: body)),
        ]))
    }

    func sendPresence(type: String? = nil, to: String? = nil, priority: Int? = nil) async throws {
        var attributes: [XMLAttribute] = []
        if let type { attributes.append(XMLAttribute("type", type)) }
        if let to { attributes.append(XMLAttribute("to", to)) }
        var children: [XMLNode] = []
        if let priority { children.append(.element(XMLElement(name: "priority", namespace: XMLNamespace.client, text: "\(priority)"))) }
        try await send(XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: attributes, children: children))
    }
}

/// Hands decoder events to the test and performs the client's stream restarts itself: TLS
/// after `<proceed/>`, a new stream after `<success/>`.
private final class Collector: ChannelInboundHandler {
    typealias InboundIn = StreamEvent

    let decoder: XMLStreamDecoder
    let continuation: EventQueue
    let sslContext: NIOSSLContext?

    init(decoder: XMLStreamDecoder, queue: EventQueue, sslContext: NIOSSLContext? = nil) {
        self.decoder = decoder
        self.continuation = queue
        self.sslContext = sslContext
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let event = unwrapInboundIn(data)
        continuation.push(.stream(event))
        guard case .element(let element) = event else { return }
        if element.name == "proceed" && element.namespace == XMLNamespace.tls {
            decoder.restart(leftover: .reject, context: context)
            do {
                var tls = TLSConfiguration.makeClientConfiguration()
                tls.certificateVerification = .none
                let sslContext = try self.sslContext ?? NIOSSLContext(configuration: tls)
                try context.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: sslContext, serverHostname: nil), position: .first)
            } catch {
                continuation.push(.error("\(error)"))
            }
        } else if element.name == "success" && element.namespace == XMLNamespace.sasl {
            decoder.restart(leftover: .parse, context: context)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case TLSUserEvent.handshakeCompleted = event {
            continuation.push(.tlsEstablished)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        continuation.push(.error("\(error)"))
    }

    func channelInactive(context: ChannelHandlerContext) {
        continuation.push(.closed)
    }
}

enum TLSEndPoint {
    static func hash(_ der: [UInt8]) throws -> [UInt8] {
        guard let hash = Trust.TLSContextStore.tlsServerEndPointHash(certificateDER: der) else { throw TestClient.Failure(description: "cannot hash certificate") }
        return hash
    }
}


/// Events from the channel, handed to one waiting reader at a time with a timeout.
final class EventQueue: Sendable {
    private struct State {
        var buffer: [TestClient.ClientEvent] = []
        var waiter: (id: Int, continuation: CheckedContinuation<TestClient.ClientEvent?, Never>)?
        var nextID = 0
        var closed = false
    }

    private let state = Mutex(State())

    func push(_ event: TestClient.ClientEvent) {
        let waiter: CheckedContinuation<TestClient.ClientEvent?, Never>? = state.withLock { state in
            if case .closed = event { state.closed = true }
            if let waiter = state.waiter {
                state.waiter = nil
                return waiter.continuation
            }
            state.buffer.append(event)
            return nil
        }
        waiter?.resume(returning: event)
    }

    func next(timeout: Duration) async -> TestClient.ClientEvent? {
        let id = state.withLock { state -> Int in
            state.nextID += 1
            return state.nextID
        }
        let timer = Task { [self] in
            try? await Task.sleep(for: timeout)
            let waiter: CheckedContinuation<TestClient.ClientEvent?, Never>? = state.withLock { state in
                guard let waiter = state.waiter, waiter.id == id else { return nil }
                state.waiter = nil
                return waiter.continuation
            }
            waiter?.resume(returning: nil)
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { continuation in
            let immediate: TestClient.ClientEvent?? = state.withLock { state in
                if !state.buffer.isEmpty { return .some(state.buffer.removeFirst()) }
                if state.closed { return .some(.closed) }
                state.waiter = (id, continuation)
                return .none
            }
            if let immediate { continuation.resume(returning: immediate) }
        }
    }
}
