import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Storage
import TestSupport
import Testing
import Trust
import X509
import XMPPCore
@testable import Federation
@testable import Server

/// The names of the journey: the provider's own host and the customer's domain (with every
/// label under it, for its service domains), all at 127.0.0.1, where Pebble validates.
func journeyZone() -> KnotFixture.Zone {
    KnotFixture.Zone(name: "journey.test", body: """
        hub A 127.0.0.1
        customer A 127.0.0.1
        *.customer A 127.0.0.1
        """, signed: false)
}

/// Issue 17's "Done when", end to end: on a fresh data directory with only provider-wide
/// configuration, an operator adds a customer domain through the provisioning API, reads
/// what `braid check` says to publish in DNS, gets a certificate from the lab's ACME CA
/// (Pebble) without touching a file, and sees the domain's federation link in what the
/// dashboard reads once another Braid server federates with it.
@Suite("Operator journey: API → braid check → ACME → federation in the dashboard",
       .enabled(if: PebbleFixture.isAvailable && KnotFixture.isAvailable), .knot([journeyZone()]))
struct OperatorJourneyTests {
    typealias API = ProvisioningAPITests.API

    static let hub = "hub.journey.test"
    static let customer = "customer.journey.test"

    @Test("A customer domain added by API is checked, certified by ACME and federates, with no file written by hand")
    func journey() async throws {
        let knot = try #require(KnotFixture.current)
        let reservation = try PortReservation()
        defer { withExtendedLifetime(reservation) {} }
        let pebble = try await PebbleFixture.start(httpPort: reservation.port, dnsServer: "127.0.0.1:\(knot.port)")
        let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("braid-journey-\(UUID().uuidString)").path
        do {
            try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
            // What a provider trusting Let's Encrypt would have in its store: here, Pebble's root.
            let root = try await pebble.rootCertificate(group: MultiThreadedEventLoopGroup.singleton)
            let rootFile = scratch + "/pebble-root.pem"
            try root.serializeAsPEM().pemString.write(toFile: rootFile, atomically: true, encoding: .utf8)
            try await run(pebble: pebble, root: root, rootFile: rootFile, httpPort: reservation.port, knot: knot)
        } catch {
            Issue.record("pebble log:\n\(pebble.log.suffix(3000))")
            await pebble.stop()
            try? FileManager.default.removeItem(atPath: scratch)
            throw error
        }
        await pebble.stop()
        try? FileManager.default.removeItem(atPath: scratch)
    }

    private func run(pebble: PebbleFixture, root: Certificate, rootFile: String, httpPort: Int, knot: KnotFixture) async throws {
        // Provider A: its own host name with its own certificate (the harness's CA), ACME on
        // for customers, DNS from the lab. Provider B: another Braid that trusts the public
        // CA (Pebble's root) and knows where the customer's domain is served.
        try await withFederation(aDomains: [Self.hub], aUsers: [], bDomains: ["b.example"], bUsers: ["bob@b.example"], configureA: { configuration in
            configuration.acme.enabled = true
            configuration.acme.directoryURL = pebble.directoryURL
            configuration.acme.caCertificateFile = pebble.trustFile
            configuration.acme.contact = "hostmaster@hub.journey.test"
            configuration.acme.httpAddress = "127.0.0.1"
            configuration.acme.httpPort = httpPort
            // The provider's own name brings its own certificate.
            configuration.acme.excludeDomains = [Self.hub]
            configuration.dns.forwarders = [knot.address]
            configuration.admin.poshHostName = Self.hub
        }, configureB: { configuration in
            configuration.s2s.trustAnchorFiles.append(rootFile)
            configuration.s2s.peers[Self.customer] = configuration.s2s.peers[Self.hub]
        }) { pair in
            let a = pair.a
            let dataDirectory = a.directory
            let filesBefore = Set((try? FileManager.default.contentsOfDirectory(atPath: dataDirectory + "/certs")) ?? [])
            #expect(!filesBefore.contains { $0.hasPrefix(Self.customer) })
            let httpsPort = try #require(a.server.adminPorts.posh)
            var tls = TLSConfiguration.makeClientConfiguration()
            // A's own certificate comes from the harness's CA; the operator's client trusts it.
            tls.trustRoots = .file(pair.directory + "/ca.pem")
            tls.certificateVerification = .noHostnameVerification
            let http = HTTPClient(eventLoopGroupProvider: .shared(a.group), configuration: .init(tlsConfiguration: tls))
            do {
                try await journey(pair: pair, api: API(http: http, base: "https://127.0.0.1:\(httpsPort)/api/v1"), root: root)
            } catch {
                try? await http.shutdown()
                throw error
            }
            try await http.shutdown()
        }
    }

    private func journey(pair: FederatedPair, api: API, root: Certificate) async throws {
        let a = pair.a
        // The operator's provider-wide token, as `braid api token add` stores it.
        let (token, stored) = ProvisioningTokens.mint(domains: nil, label: "operator")
        try await a.context.storage.addAPIToken(stored)

        // (a) The customer's domain, through the API.
        let added = try await api.call(.PUT, "/domains/\(Self.customer)", token: token)
        #expect(added.status == .created, "\(added.body)")
        #expect((added.json["services"] as? [String])?.contains("conference.\(Self.customer)") == true)
        try await waitUntil(timeout: .seconds(10), "the domain served") { a.context.domains.isHosted(Self.customer) }

        // (b) `braid check` for it (the API runs the same library): DNS has only A records,
        // so the report says which SRV records to publish, pointing at the provider's host.
        let checked = try await api.call(.GET, "/domains/\(Self.customer)/check", token: token)
        #expect(checked.status == .ok, "\(checked.body)")
        let report = try JSONDecoder().decode(CheckReport.self, from: Data(checked.body.utf8))
        let srvHints = report.domains.first { $0.domain == Self.customer }?.results(.srv).compactMap(\.hint) ?? []
        let clientPort = try #require(a.server.configuration.c2s.starttlsPort)
        let serverPort = try #require(a.server.configuration.s2s.starttlsPort)
        #expect(srvHints.contains("Publish: _xmpp-client._tcp.\(Self.customer). 3600 IN SRV 0 5 \(clientPort) \(Self.hub)."), "\(srvHints)")
        #expect(srvHints.contains("Publish: _xmpp-server._tcp.\(Self.customer). 3600 IN SRV 0 5 \(serverPort) \(Self.hub)."), "\(srvHints)")
        // The human form `braid check` prints carries the same lines.
        #expect(report.text().contains("_xmpp-server._tcp.\(Self.customer). 3600 IN SRV"))

        // (c) The certificate, from Pebble, for the domain and its service domains, served
        // live: handshakes that verify the chain against Pebble's root and the name.
        let names = [Self.customer, "conference.\(Self.customer)", "upload.\(Self.customer)"]
        let httpsPort = try #require(a.server.adminPorts.posh)
        // The success counter moves once the new certificate is installed for new handshakes.
        try await waitUntil(timeout: .seconds(40), "a Pebble certificate for \(Self.customer) installed") {
            a.metrics.counterValue(ACMEMetrics.ordersLabel, [("outcome", "success")]) == 1
        }
        for name in names {
            for port in [a.directTLSPort, httpsPort] {
                let verified = try await TLSHandshake.run(group: a.group, port: port, serverName: name, protocols: ["xmpp-client", "http/1.1"], trustRoots: [root])
                #expect(try CertificateIdentity(certificate: verified.leaf).allDomains.isSuperset(of: names), "\(name) on \(port)")
            }
        }
        // Braid wrote the files, in its data directory.
        let paths = CertificateManager.paths(for: Self.customer, in: a.directory + "/certs")
        #expect(FileManager.default.fileExists(atPath: paths.certificate) && FileManager.default.fileExists(atPath: paths.key))
        #expect(a.metrics.counterValue(ACMEMetrics.ordersLabel, [("outcome", "success")]) == 1)

        // (d) An account for the customer, through the API, writes to B's user; B answers.
        let account = try await api.call(.POST, "/domains/\(Self.customer)/accounts", token: token, body: #"{"username": "juliet", "password": "balcony-1"}"#)
        #expect(account.status == .created, "\(account.body)")
        let juliet = try await a.client()
        _ = try await juliet.login(domain: Self.customer, username: "juliet", password: "balcony-1")
        try await juliet.sendPresence()
        let bob = try await pair.b.clientsWithPresence(["bob@b.example"])["bob@b.example"]
        try await juliet.sendMessage(to: "bob@b.example", body: "hello from a customer")
        let received = try await bob?.waitFor(timeout: .seconds(15)) { $0.name == "message" }
        #expect(received?.attribute("from")?.hasPrefix("juliet@\(Self.customer)") == true)
        try await bob?.sendMessage(to: "juliet@\(Self.customer)", body: "hello back")
        _ = try await juliet.waitFor(timeout: .seconds(15)) { $0.name == "message" }

        // What the dashboard reads: the status summary counts the link and the pair, and the
        // links list names the customer's domain on it.
        try await waitUntil(timeout: .seconds(10), "the link in /status") {
            let status = try await api.call(.GET, "/status", token: token)
            let links = status.json["links"] as? [String: Any]
            return (links?["open"] as? Int ?? 0) >= 1 && (links?["domain_pairs"] as? Int ?? 0) >= 1
        }
        let listed = try await api.call(.GET, "/links", token: token)
        #expect(listed.status == .ok)
        let pairs = ((listed.json["links"] as? [[String: Any]]) ?? []).flatMap { ($0["pairs"] as? [[String: Any]]) ?? [] }
        #expect(pairs.contains { $0["local"] as? String == Self.customer && $0["remote"] as? String == "b.example" }, "\(listed.body)")
        // B proved the customer's domain by its ACME certificate (B trusts the public CA).
        let bPairs = await pair.b.openLinkSnapshots.flatMap(\.pairs)
        #expect(bPairs.contains { $0.pair.remote == Self.customer && $0.method == .pkix }, "\(bPairs)")

        await juliet.close()
        await bob?.close()
    }
}
