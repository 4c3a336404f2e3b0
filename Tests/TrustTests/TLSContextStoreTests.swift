import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Testing
import Trust
import X509

@Suite("TLS context store")
struct TLSContextStoreTests {
    @Test("Look-ups resolve the exact domain, then a covering certificate, else nothing")
    func lookUps() throws {
        let authority = try TestCertificateAuthority()
        let a = try SelfSignedCertificate.generate(domains: ["a.example"])
        let wildcard = try authority.issue(commonName: "w.example", dnsIDs: ["w.example", "*.w.example"])
        let store = TLSContextStore()
        try store.install(a, for: ["a.example"])
        try store.install(wildcard, for: ["w.example"])

        #expect(store.domains == ["a.example", "w.example"])
        #expect(store.certificateDER(for: "a.example") == (try Fixtures.der(a.certificateChainPEM)))
        #expect(store.certificateDER(for: "A.EXAMPLE.") == (try Fixtures.der(a.certificateChainPEM)))
        // Not installed, but covered by the wildcard DNS-ID.
        #expect(store.certificateDER(for: "chat.w.example") == (try Fixtures.der(wildcard.certificateChainPEM)))
        #expect(store.serverContext(for: "chat.w.example") === store.serverContext(for: "w.example"))
        // Covered by nothing.
        #expect(store.certificateDER(for: "b.example") == nil)
        #expect(store.serverContext(for: "b.example") == nil)
        #expect(store.serverContext(for: "a.b.w.example") == nil)
        #expect(store.certificateIdentity(for: "a.example")?.allDomains == ["a.example"])

        store.remove(domain: "a.example")
        #expect(store.domains == ["w.example"])
        #expect(store.serverContext(for: "a.example") == nil)
    }

    @Test("One set of credentials serves several domains with one shared context")
    func sharedCredentials() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["one.example", "two.example"])
        let store = TLSContextStore()
        try store.install(credentials, for: ["one.example"])
        try store.install(credentials, for: ["two.example"])
        let one = try #require(store.serverContext(for: "one.example"))
        let two = try #require(store.serverContext(for: "two.example"))
        #expect(one === two)
        #expect(one.configuration.minimumTLSVersion == .tlsv12)
        #expect(one.configuration.certificateVerification == .none)
        let s2s = try #require(try store.serverContextRequestingClientCertificate(for: "one.example"))
        #expect(s2s !== one)
        #expect(s2s.configuration.certificateVerification == .optionalVerification)
        #expect(try store.serverContextRequestingClientCertificate(for: "two.example") === s2s)
    }

    @Test("Direct TLS configurations use TLS 1.2+, the ALPN list, and request client certificates only for s2s")
    func directTLSConfiguration() throws {
        let store = TLSContextStore()
        try store.install(try SelfSignedCertificate.generate(domains: ["a.example"]), for: ["a.example"])
        let c2s = store.makeServerConfiguration(defaultDomain: "a.example", alpn: ["xmpp-client"])
        #expect(c2s.minimumTLSVersion == .tlsv12)
        #expect(c2s.applicationProtocols == ["xmpp-client"])
        #expect(c2s.certificateVerification == .none)
        #expect(c2s.certificateChain.count == 1)
        #expect(c2s.sslContextCallback != nil)
        let s2s = store.makeServerConfiguration(defaultDomain: "a.example", alpn: ["xmpp-server"], requestClientCertificate: true)
        #expect(s2s.applicationProtocols == ["xmpp-server"])
        #expect(s2s.certificateVerification == .optionalVerification)

        // Without credentials for the default domain there is nothing to present up front,
        // yet a context can be built; the SNI callback supplies certificates later.
        let empty = TLSContextStore().makeServerConfiguration(defaultDomain: "none.example", alpn: [])
        #expect(empty.certificateChain.isEmpty)
        #expect(empty.privateKey == nil)
        #expect(empty.certificateVerification == .none)
        #expect(empty.minimumTLSVersion == .tlsv12)
        _ = try NIOSSLContext(configuration: empty)
    }

    @Test("Installing without domains uses the names the certificate covers")
    func installWithoutDomains() throws {
        let credentials = try SelfSignedCertificate.generate(domains: ["one.example", "münchen.example"])
        let store = TLSContextStore()
        try store.install(credentials, for: [])
        #expect(store.domains == ["one.example", "münchen.example"])
        #expect(store.serverContext(for: "xn--mnchen-3ya.example") != nil)
    }

    @Test("Bad credentials are refused and leave the store as it was")
    func badCredentials() throws {
        let a = try SelfSignedCertificate.generate(domains: ["a.example"])
        let b = try SelfSignedCertificate.generate(domains: ["b.example"])
        let store = TLSContextStore()
        try store.install(a, for: ["a.example"])
        let mismatched = PEMCredentials(certificateChainPEM: b.certificateChainPEM, privateKeyPEM: a.privateKeyPEM)
        #expect(throws: TrustError(.keyDoesNotMatchCertificate, "")) { try store.install(mismatched, for: ["a.example"]) }
        #expect(throws: TrustError(.invalidDomain, "")) { try store.install(b, for: ["b.example", "bad domain"]) }
        #expect(store.domains == ["a.example"])
        #expect(store.certificateDER(for: "a.example") == (try Fixtures.der(a.certificateChainPEM)))
    }

    @Test("A real handshake on loopback presents the certificate chosen by SNI")
    func sniHandshake() async throws {
        let a = try SelfSignedCertificate.generate(domains: ["a.example"])
        let b = try SelfSignedCertificate.generate(domains: ["b.example"])
        let store = TLSContextStore()
        try store.install(a, for: ["a.example"])
        try store.install(b, for: ["b.example"])
        let aDER = try Fixtures.der(a.certificateChainPEM)
        let bDER = try Fixtures.der(b.certificateChainPEM)

        let serverContext = try NIOSSLContext(configuration: store.makeServerConfiguration(defaultDomain: "a.example", alpn: ["xmpp-client"]))
        let loop = try LoopbackTLS(serverContext: { serverContext })
        do {
            let trusted = try [a, b].map { try NIOSSLCertificate(bytes: Array($0.certificateChainPEM.utf8), format: .pem) }

            let toB = try await loop.handshake(serverName: "b.example", trusting: trusted, verifyHostname: true)
            #expect(toB.certificateDER == bDER)
            #expect(toB.negotiatedProtocol == "xmpp-client")
            #expect(try CertificateIdentity(derEncoded: toB.certificateDER).matches(domain: "b.example", service: .xmppClient) == .srvID)

            let toA = try await loop.handshake(serverName: "a.example", trusting: trusted, verifyHostname: true)
            #expect(toA.certificateDER == aDER)

            // An unknown name gets the default domain's certificate.
            let toUnknown = try await loop.handshake(serverName: "unknown.example", trusting: trusted, verifyHostname: false)
            #expect(toUnknown.certificateDER == aDER)

            // So does a client that sends no SNI at all.
            let noSNI = try await loop.handshake(serverName: nil, trusting: trusted, verifyHostname: false)
            #expect(noSNI.certificateDER == aDER)

            // Control: a client that trusts only a.example's certificate refuses b.example's,
            // so the checks above really went through certificate verification.
            await #expect(throws: NIOSSLError.self) {
                _ = try await loop.handshake(serverName: "b.example", trusting: [trusted[0]], verifyHostname: true)
            }

            // A certificate installed after the configuration was made is used at once.
            let c = try SelfSignedCertificate.generate(domains: ["c.example"])
            try store.install(c, for: ["c.example"])
            let cTrusted = try NIOSSLCertificate(bytes: Array(c.certificateChainPEM.utf8), format: .pem)
            let toC = try await loop.handshake(serverName: "c.example", trusting: [cTrusted], verifyHostname: true)
            #expect(toC.certificateDER == (try Fixtures.der(c.certificateChainPEM)))
        } catch {
            try await loop.shutdown()
            throw error
        }
        try await loop.shutdown()
    }

    @Test("A STARTTLS-style context for the stream's 'to' presents that domain's certificate without SNI")
    func contextForStreamTo() async throws {
        let a = try SelfSignedCertificate.generate(domains: ["a.example"])
        let b = try SelfSignedCertificate.generate(domains: ["b.example"])
        let store = TLSContextStore()
        try store.install(a, for: ["a.example"])
        try store.install(b, for: ["b.example"])
        let context = try #require(store.serverContext(for: "b.example"))
        let loop = try LoopbackTLS(serverContext: { context })
        do {
            let trusted = [try NIOSSLCertificate(bytes: Array(b.certificateChainPEM.utf8), format: .pem)]
            let result = try await loop.handshake(serverName: nil, trusting: trusted, verifyHostname: false)
            #expect(result.certificateDER == (try Fixtures.der(b.certificateChainPEM)))
            #expect(result.negotiatedProtocol == nil)
            #expect(store.certificateDER(for: "b.example") == result.certificateDER)
        } catch {
            try await loop.shutdown()
            throw error
        }
        try await loop.shutdown()
    }
}

/// A TLS server on 127.0.0.1 with an ephemeral port, and a client that completes handshakes
/// against it and reports what the server presented.
struct LoopbackTLS {
    struct Result {
        var certificateDER: [UInt8]
        var negotiatedProtocol: String?
    }

    let group: MultiThreadedEventLoopGroup
    let server: any Channel
    let port: Int

    init(serverContext: @escaping @Sendable () -> NIOSSLContext) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            let server = try ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: serverContext()))
                    }
                }
                .bind(host: "127.0.0.1", port: 0)
                .wait()
            guard let port = server.localAddress?.port else { throw ChannelError.unknownLocalAddress }
            self.group = group
            self.server = server
            self.port = port
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
    }

    func handshake(serverName: String?, trusting roots: [NIOSSLCertificate], verifyHostname: Bool) async throws -> Result {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(roots)
        configuration.certificateVerification = verifyHostname ? .fullVerification : .noHostnameVerification
        configuration.applicationProtocols = ["xmpp-client"]
        configuration.minimumTLSVersion = .tlsv12
        let context = try NIOSSLContext(configuration: configuration)
        let handshakeDone = group.next().makePromise(of: String?.self)
        let channel = try await ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: context, serverHostname: serverName))
                    try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: handshakeDone))
                }
            }
            .connect(host: "127.0.0.1", port: port)
            .get()
        do {
            let negotiated = try await handshakeDone.futureResult.get()
            guard let certificate = try await channel.nioSSL_peerCertificate().get() else {
                throw ChannelError.inappropriateOperationForState
            }
            let result = Result(certificateDER: try certificate.toDERBytes(), negotiatedProtocol: negotiated)
            try await channel.close()
            return result
        } catch {
            try? await channel.close()
            throw error
        }
    }

    func shutdown() async throws {
        try await server.close()
        try await group.shutdownGracefully()
    }
}

/// Completes a promise when the TLS handshake finishes, or fails it when the connection
/// errors or closes first.
final class HandshakeWaiter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let promise: EventLoopPromise<String?>
    private var completed = false

    init(promise: EventLoopPromise<String?>) {
        self.promise = promise
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? TLSUserEvent, case .handshakeCompleted(let negotiatedProtocol) = event, !completed {
            completed = true
            promise.succeed(negotiatedProtocol)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !completed {
            completed = true
            promise.fail(error)
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !completed {
            completed = true
            promise.fail(ChannelError.ioOnClosedChannel)
        }
        context.fireChannelInactive()
    }
}

@available(*, unavailable)
extension HandshakeWaiter: Sendable {}
