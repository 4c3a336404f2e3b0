import Federation
import Foundation
import Logging
import NIOPosix
import Storage
import XMPPCore
import XMPPStream
@testable import Server

/// A real Braid server on loopback with ephemeral ports and a temporary data directory,
/// started and stopped by one test.
final class TestServer: Sendable {
    let server: BraidServer
    let directory: String
    let group: MultiThreadedEventLoopGroup

    var context: ServerContext { server.context }
    var starttlsPort: Int { server.boundPorts[.c2sStartTLS] ?? 0 }
    var directTLSPort: Int { server.boundPorts[.c2sDirectTLS] ?? 0 }
    var metrics: MetricsRegistry { server.metricsRegistry }

    static let password = "pencil-✓"

    /// Starts a server hosting `domains`, with the accounts `users` (all with ``password``).
    static func start(
        domains: [String] = ["a.example", "b.example"],
        users: [String] = ["alice@a.example", "bob@b.example", "carol@a.example"],
        wallClock: WallClock = .system,
        sessionClock: SessionClock = .system,
        modules: [any BraidModule] = [],
        directory given: String? = nil,
        configure: (inout BraidConfiguration) -> Void = { _ in }
    ) async throws -> TestServer {
        let directory = given ?? FileManager.default.temporaryDirectory.appendingPathComponent("braid-test-\(UUID().uuidString)").path
        var configuration = BraidConfiguration()
        configuration.dataDirectory = directory
        configuration.defaultDomain = domains[0]
        configuration.c2s.address = "127.0.0.1"
        configuration.c2s.starttlsPort = 0
        configuration.c2s.directTLSPort = 0
        // Low iterations keep tests fast; production uses 10,000.
        configuration.auth.scramIterations = 4096
        // No federation unless a test asks for it: no s2s listeners on fixed ports, no DNS.
        configuration.s2s.enabled = false
        configuration.s2s.address = "127.0.0.1"
        configuration.s2s.starttlsPort = 0
        configuration.s2s.directTLSPort = 0
        // The HTTP side on ephemeral loopback ports, so parallel tests do not collide.
        configuration.admin.adminAddress = "127.0.0.1"
        configuration.admin.adminPort = 0
        configuration.admin.poshAddress = "127.0.0.1"
        configuration.admin.poshPort = 0
        configure(&configuration)
        var logger = Logger(label: "braid.test")
        logger.logLevel = ProcessInfo.processInfo.environment["BRAID_TEST_LOG"].flatMap(Logger.Level.init(rawValue:)) ?? .critical
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let server: BraidServer
        do {
            server = try BraidServer(configuration: configuration, logger: logger, eventLoopGroup: group, wallClock: wallClock, sessionClock: sessionClock, modules: modules)
        } catch {
            try? await group.shutdownGracefully()
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
        for domain in domains {
            try await server.context.storage.addDomain(try JID(domain: domain).domainpart)
        }
        for user in users {
            try await server.context.storage.createUser(try JID(user), credentials: try Self.credentials(password: password))
        }
        do {
            try await server.start()
        } catch {
            await server.shutdown()
            try? await group.shutdownGracefully()
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
        return TestServer(server: server, directory: directory, group: group)
    }

    private init(server: BraidServer, directory: String, group: MultiThreadedEventLoopGroup) {
        self.server = server
        self.directory = directory
        self.group = group
    }

    static func credentials(password: String) throws -> StoredCredentials {
        func convert(_ keys: SCRAMServerKeys) -> ScramCredentials {
            ScramCredentials(salt: keys.salt, iterations: keys.iterations, storedKey: keys.storedKey, serverKey: keys.serverKey)
        }
        return StoredCredentials(
            sha1: convert(try SCRAMKeyDerivation.newKeys(password: password, iterations: 4096, hash: .sha1)),
            sha256: convert(try SCRAMKeyDerivation.newKeys(password: password, iterations: 4096, hash: .sha256)))
    }

    /// A client connected to the STARTTLS port (or direct TLS with `sni`).
    func client(directTLS sni: String? = nil) async throws -> TestClient {
        try await TestClient.connect(port: sni == nil ? starttlsPort : directTLSPort, directTLS: sni, group: group)
    }

    /// A client logged in as `user` with the standard password.
    func loggedIn(_ user: String, resource: String = "test", mechanism: String = "SCRAM-SHA-256", bindingType: String = "tls-exporter") async throws -> (TestClient, JID) {
        let jid = try JID(user)
        let client = try await client()
        var options = TestClient.LoginOptions()
        options.resource = resource
        options.mechanism = mechanism
        options.bindingType = bindingType
        let bound = try await client.login(domain: jid.domainpart, username: jid.localpart ?? "", password: Self.password, options: options)
        return (client, bound)
    }

    /// A client authenticated as `user` (SCRAM-SHA-256 over STARTTLS) whose stream was
    /// restarted after SASL and whose features were read, with no resource bound: where an
    /// XEP-0198 `<resume/>` goes.
    func authenticatedWithoutBind(_ user: String) async throws -> TestClient {
        let jid = try JID(user)
        let client = try await client()
        try await client.sendHeader(to: jid.domainpart)
        _ = try await client.nextElement()
        try await client.startTLS()
        try await client.sendHeader(to: jid.domainpart)
        try await client.authenticate(features: try await client.nextElement(), username: jid.localpart ?? "", password: Self.password, mechanism: "SCRAM-SHA-256")
        try await client.sendHeader(to: jid.domainpart)
        _ = try await client.nextElement()
        return client
    }

    func stop() async {
        await stopKeepingData()
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Stops the server and leaves its data directory for another start (a restart).
    func stopKeepingData() async {
        await server.shutdown()
        try? await group.shutdownGracefully()
    }
}

/// Runs `body` with a started server and always stops it.
func withServer(
    domains: [String] = ["a.example", "b.example"],
    users: [String] = ["alice@a.example", "bob@b.example", "carol@a.example"],
    sessionClock: SessionClock = .system,
    modules: [any BraidModule] = [],
    configure: (inout BraidConfiguration) -> Void = { _ in },
    _ body: (TestServer) async throws -> Void
) async throws {
    let server = try await TestServer.start(domains: domains, users: users, sessionClock: sessionClock, modules: modules, configure: configure)
    do {
        try await body(server)
    } catch {
        await server.stop()
        throw error
    }
    await server.stop()
}
