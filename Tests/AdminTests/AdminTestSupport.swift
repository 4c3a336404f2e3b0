import AsyncHTTPClient
import Foundation
import Hummingbird
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle
@testable import Admin
@testable import Federation
import Trust

// Fixtures for AdminServerTests. Everything runs over real sockets on 127.0.0.1: Braid's
// admin and POSH listeners, a second HTTPS server standing in for a tenant's web site and
// for redirectors, and the real POSH fetcher, verifying certificates against a test CA.

/// Runs `operation`, failing if it takes longer than `seconds`.
func bounded<T: Sendable>(_ seconds: Int = 20, _ what: String = "operation", _ operation: @escaping @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T.self) { group in
        group.addTask { try await operation() }
        group.addTask {
            try await Task.sleep(for: .seconds(seconds))
            throw TimedOut(what: what)
        }
        defer { group.cancelAll() }
        guard let result = try await group.next() else { throw TimedOut(what: what) }
        return result
    }
}

struct TimedOut: Error, CustomStringConvertible {
    var what: String
    var description: String { "\(what) timed out" }
}

let quietLogger = Logger(label: "braid.admin.test", factory: { _ in SwiftLogNoOpLogHandler() })

/// The DER of a leaf certificate, as BoringSSL serialises it (independently of Trust).
func leafDER(_ credentials: PEMCredentials) throws -> [UInt8] {
    try NIOSSLCertificate(bytes: Array(credentials.certificateChainPEM.utf8), format: .pem).toDERBytes()
}

/// One test CA, certificates for two hosted domains, the provider's host name, a domain
/// with a certificate that is not hosted, and a tenant/redirector site.
struct Certificates: Sendable {
    let ca: TestCertificateAuthority
    let caFile: String
    let alpha: PEMCredentials
    let beta: PEMCredentials
    let provider: PEMCredentials
    let unhosted: PEMCredentials
    let site: PEMCredentials
    let stranger: PEMCredentials

    static func make() throws -> Certificates {
        let ca = try TestCertificateAuthority(commonName: "Admin Test CA")
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("braid-admin-ca-\(UUID().uuidString).pem").path
        try ca.certificatePEM.write(toFile: file, atomically: true, encoding: .utf8)
        return Certificates(
            ca: ca,
            caFile: file,
            alpha: try ca.issueXMPPServerCertificate(domains: ["alpha.example"]),
            beta: try ca.issueXMPPServerCertificate(domains: ["beta.example"]),
            provider: try ca.issueXMPPServerCertificate(domains: ["hosting.example.net"]),
            unhosted: try ca.issueXMPPServerCertificate(domains: ["unhosted.example"]),
            site: try ca.issueXMPPServerCertificate(domains: ["tenant.example", "redirect.example"]),
            stranger: try ca.issueXMPPServerCertificate(domains: ["stranger.example"]))
    }
}

/// Braid's AdminServer with its POSH and admin listeners, plus a second HTTPS site, plus a
/// fetcher that reaches all the names on 127.0.0.1.
final class Harness: Sendable {
    static let expires = 3600
    static let hosted: Set<String> = ["alpha.example", "beta.example"]
    static let metricsText = "braid_c2s_sessions 3\nbraid_s2s_links{direction=\"outgoing\"} 1\n"

    let certificates: Certificates
    let server: AdminServer
    let adminPort: Int
    let poshPort: Int
    let site: TestSite
    let fetcher: POSHHTTPFetcher
    let snapshots: [LinkSnapshot]

    private init(certificates: Certificates, server: AdminServer, adminPort: Int, poshPort: Int, site: TestSite, fetcher: POSHHTTPFetcher, snapshots: [LinkSnapshot]) {
        self.certificates = certificates
        self.server = server
        self.adminPort = adminPort
        self.poshPort = poshPort
        self.site = site
        self.fetcher = fetcher
        self.snapshots = snapshots
    }

    static func make(fetcherTimeout: Duration = .seconds(5)) async throws -> Harness {
        let certificates = try Certificates.make()
        let store = TLSContextStore(logger: quietLogger)
        try store.install(certificates.alpha, for: ["alpha.example"])
        try store.install(certificates.beta, for: ["beta.example"])
        try store.install(certificates.provider, for: ["hosting.example.net"])
        try store.install(certificates.unhosted, for: ["unhosted.example"])

        let snapshots = Self.sampleLinks()
        let configuration = AdminConfiguration(
            adminAddress: "127.0.0.1", adminPort: 0,
            poshAddress: "127.0.0.1", poshPort: 0,
            poshHostName: "Hosting.Example.NET", poshExpiresSeconds: expires)
        let server = AdminServer(
            configuration: configuration,
            tls: store,
            isHosted: { hosted.contains($0) },
            metrics: { metricsText },
            links: { snapshots },
            logger: quietLogger)
        let ports = try await bounded(20, "AdminServer.start") { try await server.start() }
        guard let adminPort = ports.admin, let poshPort = ports.posh else {
            await server.shutdown()
            throw TimedOut(what: "a listener did not start: \(ports)")
        }
        let site = try await TestSite.start(credentials: certificates.site, documentFor: try leafDER(certificates.alpha))
        let local = { (port: Int) in ServerTarget(host: "127.0.0.1", port: port) }
        let fetcher = try POSHHTTPFetcher(
            trustAnchorFiles: [certificates.caFile],
            useSystemTrustStore: false,
            timeout: fetcherTimeout,
            connectOverrides: [
                "alpha.example": local(poshPort), "beta.example": local(poshPort),
                "hosting.example.net": local(poshPort), "unhosted.example": local(poshPort),
                "tenant.example": local(site.port), "redirect.example": local(site.port),
            ])
        return Harness(certificates: certificates, server: server, adminPort: adminPort, poshPort: poshPort, site: site, fetcher: fetcher, snapshots: snapshots)
    }

    func close() async {
        await fetcher.shutdown()
        _ = try? await bounded(20, "shutdown") { [self] in
            await server.shutdown()
            await site.stop()
        }
        try? FileManager.default.removeItem(atPath: certificates.caFile)
    }

    func adminGET(_ path: String) async throws -> (status: Int, contentType: String?, body: [UInt8]) {
        let response = try await HTTPClient.shared.execute(HTTPClientRequest(url: "http://127.0.0.1:\(adminPort)\(path)"), timeout: .seconds(5))
        let body = try await response.body.collect(upTo: 1 << 20)
        return (Int(response.status.code), response.headers.first(name: "Content-Type"), Array(body.readableBytesView))
    }

    static let created = Date(timeIntervalSince1970: 1_800_000_000)

    static func sampleLinks() -> [LinkSnapshot] {
        [
            LinkSnapshot(
                id: "link-2", origin: .incoming, peerAddress: "198.51.100.7:40112", createdAt: created + 60,
                pairs: [
                    PairAuthorization(pair: DomainPair(local: "beta.example", remote: "peer.example"), direction: .inbound, method: .dialback, authorizedAt: created + 61, expires: nil),
                ],
                stanzasSent: 0, stanzasReceived: 12, closed: false),
            LinkSnapshot(
                id: "link-1", origin: .outgoing, peerAddress: "203.0.113.5:5269", createdAt: created,
                pairs: [
                    PairAuthorization(pair: DomainPair(local: "beta.example", remote: "peer.example"), direction: .outbound, method: .pkix, authorizedAt: created + 2, expires: created + 86_400),
                    PairAuthorization(pair: DomainPair(local: "alpha.example", remote: "peer.example"), direction: .outbound, method: .posh, authorizedAt: created + 1, expires: created + 3600),
                ],
                stanzasSent: 5, stanzasReceived: 7, closed: false, bidirectional: true, queued: 1, unacknowledged: 2),
        ]
    }
}

/// A second HTTPS site for the tests: a tenant publishing a POSH reference, and redirectors.
final class TestSite: Sendable {
    let port: Int
    private let group: ServiceGroup
    private let task: Task<Void, Never>

    private init(port: Int, group: ServiceGroup, task: Task<Void, Never>) {
        self.port = port
        self.group = group
        self.task = task
    }

    /// - Parameter documentFor: the DER of the certificate the redirect chains end at.
    static func start(credentials: PEMCredentials, documentFor der: [UInt8]) async throws -> TestSite {
        let store = TLSContextStore(logger: quietLogger)
        try store.install(credentials, for: [])
        let router = Router()
        router.get("/.well-known/posh/xmpp-server.json") { _, _ in
            // The tenant delegates to the provider, with a longer lifetime than the
            // provider's own document, so the lower one (the provider's) must win.
            json(POSHPublisher.referenceDocument(url: "https://hosting.example.net/.well-known/posh/xmpp-server.json", expires: 7200))
        }
        router.get("/hop/:count") { _, context -> Response in
            let count = try context.parameters.require("count", as: Int.self)
            guard count > 0 else {
                return json(POSHPublisher.fingerprintsDocument(certificateDER: [der], expires: 600))
            }
            return Response(status: .found, headers: [.location: "/hop/\(count - 1)"])
        }
        router.get("/to-braid") { _, _ in
            Response(status: .temporaryRedirect, headers: [.location: "https://alpha.example/.well-known/posh/xmpp-server.json"])
        }
        router.get("/insecure") { _, _ in
            Response(status: .movedPermanently, headers: [.location: "http://redirect.example/hop/0"])
        }
        router.get("/big") { _, _ in
            json(String(repeating: " ", count: 100 * 1024) + POSHPublisher.fingerprintsDocument(certificateDER: [der], expires: 600))
        }
        router.get("/teapot") { _, _ in Response(status: .init(code: 418)) }
        router.get("/slow") { _, _ -> Response in
            try await Task.sleep(for: .seconds(3))
            return json("{}")
        }

        var tls = store.makeServerConfiguration(defaultDomain: "redirect.example", alpn: ["http/1.1"])
        tls.shutdownTimeout = .seconds(1)
        let started = AsyncStream<Int>.makeStream()
        let application = Application(
            router: router,
            server: try .tls(.http1(), tlsConfiguration: tls),
            configuration: ApplicationConfiguration(address: .hostname("127.0.0.1", port: 0)),
            onServerRunning: { channel in
                started.continuation.yield(channel.localAddress?.port ?? 0)
                started.continuation.finish()
            },
            logger: quietLogger)
        let group = ServiceGroup(configuration: .init(services: [application], logger: quietLogger))
        let task = Task {
            try? await group.run()
            started.continuation.finish()
        }
        let port = try await bounded(20, "test site start") {
            var iterator = started.stream.makeAsyncIterator()
            return await iterator.next() ?? 0
        }
        guard port > 0 else { throw TimedOut(what: "test site did not start") }
        return TestSite(port: port, group: group, task: task)
    }

    func stop() async {
        await group.triggerGracefulShutdown()
        let task = self.task
        let deadline = Task {
            try? await Task.sleep(for: .seconds(5))
            task.cancel()
        }
        await task.value
        deadline.cancel()
    }
}

func json(_ text: String) -> Response {
    Response(status: .ok, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(string: text)))
}
