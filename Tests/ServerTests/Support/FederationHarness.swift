import Foundation
import NIOCore
import NIOPosix
import Server
import TestSupport
import Trust
import X509
import XMPPCore
@testable import Federation

/// How the two test providers prove themselves to each other.
enum PeerCertificates {
    /// Certificates from a CA both providers trust: SASL EXTERNAL and PKIX proofs.
    case trustedCA
    /// Self-signed certificates nobody trusts: only dialback can authenticate.
    case selfSigned
    /// One certificate per domain, each naming only its domain, from a CA both trust: how
    /// a host with one certificate per customer domain is set up.
    case perDomain
    /// A per-domain (A), B one certificate naming all its domains, from a CA both trust.
    case perDomainA
}

/// Two Braid providers federating over loopback: A hosts `aDomains`, B hosts `bDomains`.
/// Each knows the other's s2s port through static peer settings, so no DNS is involved.
struct FederatedPair {
    let a: TestServer
    let b: TestServer
    let directory: String
    let ca: TestCertificateAuthority
    /// The certificate B presents.
    let bCertificate: Certificate


    static func start(
        aDomains: [String] = ["a.example"], aUsers: [String] = ["alice@a.example"],
        bDomains: [String] = ["b.example"], bUsers: [String] = ["bob@b.example"],
        certificates: PeerCertificates = .trustedCA,
        aCertified: [String]? = nil, bCertified: [String]? = nil, bNotValidAfter: Date? = nil, ocspPort: Int? = nil,
        aClock: WallClock = .system,
        modules: [any BraidModule] = [],
        configureA: @escaping (inout BraidConfiguration) -> Void = { _ in },
        configureB: @escaping (inout BraidConfiguration) -> Void = { _ in }
    ) async throws -> FederatedPair {
        // The s2s ports are chosen before binding (each server must know the other's), so
        // another test may take one in between: try again with fresh ports.
        for attempt in 1... {
            do {
                return try await startOnce(aDomains: aDomains, aUsers: aUsers, bDomains: bDomains, bUsers: bUsers, certificates: certificates,
                                           aCertified: aCertified, bCertified: bCertified, bNotValidAfter: bNotValidAfter, ocspPort: ocspPort,
                                           aClock: aClock, modules: modules, configureA: configureA, configureB: configureB)
            } catch where attempt < 5 && "\(error)".contains("Address already in use") {
                continue
            }
        }
        preconditionFailure("unreachable")
    }

    private static func startOnce(
        aDomains: [String], aUsers: [String], bDomains: [String], bUsers: [String],
        certificates: PeerCertificates, aCertified: [String]?, bCertified: [String]?, bNotValidAfter: Date?, ocspPort: Int?,
        aClock: WallClock,
        modules: [any BraidModule],
        configureA: @escaping (inout BraidConfiguration) -> Void,
        configureB: @escaping (inout BraidConfiguration) -> Void
    ) async throws -> FederatedPair {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-fed-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // With `ocspPort`, every certificate names an OCSP responder there (which the test runs).
        let ca = try TestCertificateAuthority(ocspResponderURL: ocspPort.map { "http://127.0.0.1:\($0)" })
        let caFile = "\(directory)/ca.pem"
        try ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
        let aPort = try LoopbackPorts.freePort()
        let bPort = try LoopbackPorts.freePort()

        /// One certificate for every domain of a provider; with `certified`, the trusted
        /// certificate names only those (the others must be proven another way).
        func certificateFiles(for domains: [String], certified: [String]?, notValidAfter: Date?, name: String) throws -> BraidConfiguration.CertificateFiles {
            let credentials = certificates != .selfSigned
                ? try ca.issueXMPPServerCertificate(domains: certified ?? domains, notValidAfter: notValidAfter ?? Date() + 86_400 * 30)
                : try SelfSignedCertificate.generate(domains: domains)
            let files = BraidConfiguration.CertificateFiles(certificate: "\(directory)/\(name).crt", key: "\(directory)/\(name).key", domains: domains)
            try credentials.write(certificatePath: files.certificate, keyPath: files.key)
            return files
        }
        /// The provider's certificate files: one, or one per domain.
        func providerFiles(for domains: [String], certified: [String]?, notValidAfter: Date?, name: String) throws -> [BraidConfiguration.CertificateFiles] {
            guard certificates == .perDomain || (certificates == .perDomainA && name == "a") else {
                return [try certificateFiles(for: domains, certified: certified, notValidAfter: notValidAfter, name: name)]
            }
            return try domains.filter { certified?.contains($0) ?? true }.map { domain in
                try certificateFiles(for: [domain], certified: nil, notValidAfter: notValidAfter, name: "\(name)-\(domain)")
            }
        }
        // With service modules, each provider's certificates also name its service domains
        // (`echo.a.example`), as a provider's would (a SAN per service, or a wildcard).
        var builder = ModuleBuilder()
        for module in StandardModules.all() + modules { builder.add(module) }
        let labels = try builder.freeze().serviceLabels.sorted()
        func withServices(_ domains: [String]) -> [String] {
            domains + labels.flatMap { label in domains.map { "\(label).\($0)" } }
        }
        let aFiles = try providerFiles(for: withServices(aDomains), certified: aCertified.map(withServices), notValidAfter: nil, name: "a")
        let bFiles = try providerFiles(for: withServices(bDomains), certified: bCertified.map(withServices), notValidAfter: bNotValidAfter, name: "b")

        func federate(_ configuration: inout BraidConfiguration, port: Int, files: [BraidConfiguration.CertificateFiles], peers: [String], peerPort: Int) {
            // The peer's service domains (`echo.b.example`) are at the same place, as the SRV
            // records a provider publishes for them would say.
            configuration.federateOnLoopback(port: port, certificates: files, caFile: caFile, peers: withServices(peers), peerPort: peerPort)
        }
        let a = try await TestServer.start(domains: aDomains, users: aUsers, wallClock: aClock, modules: modules) { configuration in
            federate(&configuration, port: aPort, files: aFiles, peers: bDomains, peerPort: bPort)
            configureA(&configuration)
        }
        let b: TestServer
        do {
            b = try await TestServer.start(domains: bDomains, users: bUsers, modules: modules) { configuration in
                federate(&configuration, port: bPort, files: bFiles, peers: aDomains, peerPort: aPort)
                configureB(&configuration)
            }
        } catch {
            await a.stop()
            throw error
        }
        let bCertificate = try PEMCredentials.load(certificatePath: bFiles[0].certificate, keyPath: bFiles[0].key).certificateChain()[0]
        return FederatedPair(a: a, b: b, directory: directory, ca: ca, bCertificate: bCertificate)
    }

    func stop() async {
        await a.stop()
        await b.stop()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Runs `body` with two federating servers and always stops them.
func withFederation(
    aDomains: [String] = ["a.example"], aUsers: [String] = ["alice@a.example"],
    bDomains: [String] = ["b.example"], bUsers: [String] = ["bob@b.example"],
    certificates: PeerCertificates = .trustedCA,
    aCertified: [String]? = nil, bCertified: [String]? = nil, bNotValidAfter: Date? = nil, ocspPort: Int? = nil,
    aClock: WallClock = .system,
    modules: [any BraidModule] = [],
    configureA: @escaping (inout BraidConfiguration) -> Void = { _ in },
    configureB: @escaping (inout BraidConfiguration) -> Void = { _ in },
    _ body: (FederatedPair) async throws -> Void
) async throws {
    let pair = try await FederatedPair.start(aDomains: aDomains, aUsers: aUsers, bDomains: bDomains, bUsers: bUsers,
                                             certificates: certificates, aCertified: aCertified, bCertified: bCertified, bNotValidAfter: bNotValidAfter, ocspPort: ocspPort,
                                             aClock: aClock, modules: modules, configureA: configureA, configureB: configureB)
    do {
        try await body(pair)
    } catch {
        await pair.stop()
        throw error
    }
    await pair.stop()
}

extension TestServer {
    /// Logs every user in with presence, so messages to their bare JIDs are delivered live.
    func clientsWithPresence(_ users: [String]) async throws -> [String: TestClient] {
        var clients: [String: TestClient] = [:]
        for user in users {
            let (client, _) = try await loggedIn(user)
            try await client.sendPresence()
            clients[user] = client
        }
        return clients
    }

    /// The links of this server's federation that are still open.
    var openLinkSnapshots: [LinkSnapshot] {
        get async { (await server.federation?.links ?? []).filter { !$0.closed } }
    }
}

extension BraidConfiguration {
    /// Federation on loopback without DNS, for tests: s2s on `port` (STARTTLS only), the
    /// provider's `certificates`, peers trusted through `caFile` only, and every name in
    /// `peers` reached at `127.0.0.1:peerPort`.
    mutating func federateOnLoopback(port: Int, certificates: [CertificateFiles], caFile: String, peers: [String], peerPort: Int) {
        tls.certificates = certificates
        tls.selfSignMissing = false
        s2s.enabled = true
        s2s.address = "127.0.0.1"
        s2s.starttlsPort = port
        s2s.directTLSPort = nil
        s2s.useSystemTrustStore = false
        s2s.trustAnchorFiles = [caFile]
        s2s.negotiationTimeoutSeconds = 10
        // No DNS: a resolver that answers nothing (a closed port on loopback), fast.
        dns.forwarders = ["127.0.0.1@9"]
        dns.timeoutSeconds = 1
        for peer in peers {
            s2s.peers[peer] = FederationConfiguration.PeerSettings(host: "127.0.0.1", port: peerPort)
        }
    }
}
