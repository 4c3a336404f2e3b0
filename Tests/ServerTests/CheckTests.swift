import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Testing
import TestSupport
import Trust
import X509
@testable import Server

/// `braid check` (issue 17) against a real authoritative DNS server: knot serves a signed
/// zone with one domain per fault, an unsigned zone with TLSA records, and a signed zone
/// whose trust anchor is wrong (bogus). Two TCP listeners on 127.0.0.1 stand for Braid's
/// s2s ports, and a small HTTPS site on loopback serves POSH documents. The checks run as
/// the CLI runs them (``ServerCheck/runLive``): the resolver and the POSH fetcher are built
/// from the configuration, so the lab is wired in through `dns.forwarders`,
/// `dns.trust_anchor_file` and `s2s.posh_connect_overrides`.
@Suite("braid check: DNS, DNSSEC, DANE, POSH, certificates, reachability", .serialized, .enabled(if: KnotFixture.isAvailable), CheckLabTrait())
struct CheckTests {
    var lab: CheckLab {
        get throws { try #require(CheckLab.current) }
    }

    func check(_ label: String, adjust: (inout BraidConfiguration) -> Void = { _ in }) async throws -> CheckReport {
        let lab = try self.lab
        var configuration = lab.configuration
        adjust(&configuration)
        return try await ServerCheck.runLive(configuration: configuration, names: [CheckedName(domain: lab.name(label))], timeout: .seconds(5),
                                             eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: quietLogger)
    }

    func only(_ report: CheckReport) throws -> DomainCheckReport {
        try #require(report.domains.count == 1)
        return report.domains[0]
    }

    func single(_ domain: DomainCheckReport, _ name: CheckName, containing text: String) throws -> CheckResult {
        let matching = domain.results(name).filter { $0.message.contains(text) }
        try #require(matching.count == 1, "\(name.rawValue) results containing '\(text)': \(domain.results(name))")
        return matching[0]
    }

    @Test("A domain with everything right: every check ok, exit code 0")
    func everythingRight() async throws {
        let report = try await check("good")
        let domain = try only(report)
        #expect(domain.checks.allSatisfy { $0.status == .ok }, "\(domain.checks.filter { $0.status != .ok })")
        #expect(report.configuration.allSatisfy { $0.status == .ok }, "\(report.configuration)")
        #expect(report.exitCode == 0)
        // Four SRV record sets, all pointing where Braid listens.
        #expect(domain.results(.srv).count == 4)
        let lab = try self.lab
        #expect(try single(domain, .srv, containing: "_xmpp-server._tcp").message.contains("xmpp.good.\(CheckLab.zone):\(lab.starttlsPort)"))
        #expect(try single(domain, .dnssec, containing: "secure").message.contains("every answer is DNSSEC-secure"))
        // TLSA at both server targets (3 1 1 and 3 0 1) match the certificate presented.
        #expect(domain.results(.tlsa).count == 2)
        #expect(domain.results(.tlsa).allSatisfy { $0.message.contains("matches the certificate presented") })
        #expect(domain.results(.reachability).count == 2)
        #expect(domain.results(.reachability).allSatisfy { $0.message.contains("accepts connections") })
        // No POSH document: not needed, the certificate names the domain.
        #expect(try single(domain, .posh, containing: "no POSH document at https://good.\(CheckLab.zone)/.well-known/posh/xmpp-server.json").message.contains("not needed"))
        #expect(try single(domain, .certificateExpiry, containing: "valid until").status == .ok)
    }

    @Test("TLSA that matches no certificate Braid presents is an error naming the record and the fix")
    func tlsaMismatch() async throws {
        let report = try await check("badtlsa")
        let lab = try self.lab
        let result = try single(try only(report), .tlsa, containing: "_\(lab.starttlsPort)._tcp.xmpp.badtlsa")
        #expect(result.status == .error)
        #expect(result.message.contains("matches no certificate presented"))
        #expect(result.hint?.contains("IN TLSA 3 1 1 ") == true)
        #expect(report.exitCode == 1)
    }

    @Test("No SRV records: a warning per record set, with the record to publish at the configured ports")
    func noSRV() async throws {
        let report = try await check("nosrv")
        let lab = try self.lab
        let domain = try only(report)
        let server = try single(domain, .srv, containing: "_xmpp-server._tcp.nosrv")
        #expect(server.status == .warning)
        #expect(server.message.contains("no SRV record"))
        #expect(server.hint?.contains("_xmpp-server._tcp.nosrv.\(CheckLab.zone). 3600 IN SRV 0 5 \(lab.starttlsPort) ") == true)
        let direct = try single(domain, .srv, containing: "_xmpps-server._tcp.nosrv")
        #expect(direct.status == .warning)
        #expect(direct.hint?.contains(" \(lab.directTLSPort) ") == true)
        let client = try single(domain, .srv, containing: "_xmpp-client._tcp.nosrv")
        #expect(client.status == .warning)
        #expect(client.hint?.contains("SRV 0 5 5222 ") == true)
    }

    @Test("A server SRV record at a port Braid does not listen on is an error")
    func wrongPort() async throws {
        let report = try await check("wrongport")
        let lab = try self.lab
        let result = try single(try only(report), .srv, containing: "_xmpp-server._tcp.wrongport")
        #expect(result.status == .error)
        #expect(result.message.contains("points to port \(lab.closedPort), but Braid listens on \(lab.starttlsPort)"))
        #expect(result.hint?.contains("s2s.starttls_port") == true)
        #expect(report.exitCode == 1)
    }

    @Test("An SRV target nothing accepts connections on is an error; the record itself is fine")
    func unreachable() async throws {
        let report = try await check("closed")
        let lab = try self.lab
        let domain = try only(report)
        #expect(try single(domain, .srv, containing: "_xmpp-server._tcp.closed").status == .ok)
        let result = try single(domain, .reachability, containing: "xmpp.closed.\(CheckLab.zone):\(lab.starttlsPort)")
        #expect(result.status == .error)
        #expect(result.message.contains("cannot connect"))
        #expect(result.message.contains("127.0.0.2"))
        #expect(report.exitCode == 1)
    }

    @Test("TLSA in a zone without DNSSEC is a warning (peers ignore it); DNSSEC says insecure")
    func tlsaInsecureZone() async throws {
        let lab = try self.lab
        let report = try await ServerCheck.runLive(configuration: lab.configuration, names: [CheckedName(domain: CheckLab.plainZone)], timeout: .seconds(5),
                                                   eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: quietLogger)
        let domain = try only(report)
        let tlsa = try single(domain, .tlsa, containing: "_\(lab.starttlsPort)._tcp.xmpp.\(CheckLab.plainZone)")
        #expect(tlsa.status == .warning)
        #expect(tlsa.message.contains("insecure zone"))
        #expect(tlsa.hint?.contains("DNSSEC") == true)
        let dnssec = try single(domain, .dnssec, containing: "insecure")
        #expect(dnssec.status == .ok)
        #expect(report.exitCode == 0, "warnings alone keep the exit code 0: \(report.allResults.filter { $0.status == .error })")
    }

    @Test("Answers that fail DNSSEC validation (bogus) are an error")
    func bogus() async throws {
        let lab = try self.lab
        let report = try await ServerCheck.runLive(configuration: lab.configuration, names: [CheckedName(domain: CheckLab.bogusZone)], timeout: .seconds(5),
                                                   eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: quietLogger)
        let result = try single(try only(report), .dnssec, containing: "bogus")
        #expect(result.status == .error)
        #expect(result.message.contains("_xmpp-server._tcp.\(CheckLab.bogusZone)"))
        #expect(report.exitCode == 1)
    }

    @Test("An expired certificate is an error, one expiring within 14 days a warning")
    func expiry() async throws {
        let expired = try single(try only(try await check("expired")), .certificateExpiry, containing: "expired")
        #expect(expired.status == .error)
        #expect(expired.hint?.contains("Renew") == true)
        let soon = try single(try only(try await check("soon")), .certificateExpiry, containing: "expires in")
        #expect(soon.status == .warning)
        #expect(soon.message.contains("expires in 4 days") || soon.message.contains("expires in 5 days"))
    }

    @Test("A self-signed certificate is a warning: fine for testing, not for production")
    func selfSigned() async throws {
        let result = try single(try only(try await check("selfsigned")), .certificate, containing: "self-signed")
        #expect(result.status == .warning)
        #expect(result.message.contains("fine for testing, not for production"))
    }

    @Test("A name without a certificate: an error, or a warning when the server would self-sign one")
    func noCertificate() async throws {
        let missing = try single(try only(try await check("nocert")), .certificate, containing: "no certificate covers")
        #expect(missing.status == .error)
        #expect(missing.hint?.contains("tls.certificates") == true)

        let report = try await check("nocert") { $0.tls.selfSignMissing = true }
        let selfSigning = try single(try only(report), .certificate, containing: "no certificate covers")
        #expect(selfSigning.status == .warning)
        #expect(selfSigning.message.contains("self-signed one on first use"))
        // And the configuration check says self-signing and federation do not mix.
        #expect(report.configuration.contains { $0.status == .warning && $0.message.contains("tls.self_sign_missing") })
    }

    @Test("POSH listing the certificate presented is ok; listing another one is an error")
    func posh() async throws {
        let match = try single(try only(try await check("posh")), .posh, containing: "POSH at")
        #expect(match.status == .ok)
        #expect(match.message.contains("lists the certificate presented"))

        let report = try await check("poshbad")
        let mismatch = try single(try only(report), .posh, containing: "POSH at")
        #expect(mismatch.status == .error)
        #expect(mismatch.message.contains("does not list the certificate"))
        #expect(mismatch.hint?.contains("braid posh poshbad.\(CheckLab.zone)") == true)
        #expect(report.exitCode == 1)
    }

    @Test("No POSH for a domain whose certificate does not name it is a warning; unreachable POSH with a naming certificate is only information")
    func poshAbsent() async throws {
        let tenant = try only(try await check("tenant"))
        let absent = try single(tenant, .posh, containing: "no POSH document")
        #expect(absent.status == .warning)
        #expect(absent.message.contains("no POSH document at https://tenant.\(CheckLab.zone)"))
        #expect(absent.message.contains("does not name it"))
        #expect(absent.hint?.contains("braid posh tenant.\(CheckLab.zone)") == true)
        #expect(try single(tenant, .certificate, containing: "does not name it").status == .warning)

        let unreachable = try single(try only(try await check("nohttps")), .posh, containing: "cannot be fetched")
        #expect(unreachable.status == .ok)
        #expect(unreachable.message.contains("not needed: the certificate names nohttps.\(CheckLab.zone)"))
    }

    @Test("A malformed POSH document is a warning naming the problem")
    func poshMalformed() async throws {
        let result = try single(try only(try await check("malformed")), .posh, containing: "unusable")
        #expect(result.status == .warning)
        #expect(result.message.contains("malformed"))
    }

    @Test("Configuration: require_certificates with no CA trusted and no DNSSEC is an error")
    func requireCertificatesWithoutAnchors() async throws {
        var configuration = BraidConfiguration()
        configuration.s2s.requireCertificates = true
        configuration.s2s.useSystemTrustStore = false
        configuration.s2s.trustAnchorFiles = []
        configuration.tls.selfSignMissing = false
        configuration.dataDirectory = try lab.directory + "/empty"
        let report = try await ServerCheck.runLive(configuration: configuration, names: [], timeout: .seconds(2),
                                                   eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: quietLogger)
        let result = try #require(report.configuration.first { $0.message.contains("s2s.require_certificates") })
        #expect(result.status == .error)
        #expect(result.hint?.contains("s2s.trust_anchor_files") == true)
        #expect(report.configuration.contains { $0.status == .warning && $0.message.contains("dns.trust_anchor_file is not set") })
        #expect(report.exitCode == 1)
    }
}

/// What needs no DNS: the names checked, the JSON shape and the exit-code rule.
@Suite("braid check: names, report shape, exit code")
struct CheckReportTests {
    @Test("Every hosted domain brings its service domains, where the services settings put them")
    func servedNames() throws {
        let names = try CheckedName.served(hosted: ["example.com", "example.net"], configuration: BraidConfiguration())
        #expect(names.map(\.domain) == ["example.com", "conference.example.com", "upload.example.com",
                                        "example.net", "conference.example.net", "upload.example.net"])
        #expect(names[1].kind == .service && names[1].parent == "example.com")

        var configuration = BraidConfiguration()
        configuration.services["muc"] = .init(subdomain: "rooms")
        configuration.services["upload"] = .init(enabled: false)
        #expect(try CheckedName.served(hosted: ["example.com"], configuration: configuration).map(\.domain) == ["example.com", "rooms.example.com"])
        // A hosted domain named like a service stays hosted.
        let both = try CheckedName.served(hosted: ["example.com", "conference.example.com"], configuration: BraidConfiguration())
        #expect(both.filter { $0.domain == "conference.example.com" }.map(\.kind) == [.hosted])
    }

    static let sample = CheckReport(
        domains: [DomainCheckReport(domain: "example.com", kind: .hosted, parent: nil, checks: [
            CheckResult(.srv, .ok, "_xmpp-server._tcp.example.com → xmpp.example.com:5269"),
            CheckResult(.certificateExpiry, .warning, "the certificate for example.com expires in 3 days", hint: "Renew it."),
        ])],
        configuration: [CheckResult(.configuration, .ok, "configuration: nothing to report")])

    @Test("The JSON shape: domains with checks, configuration, summary; every key present")
    func jsonShape() throws {
        let json = Self.sample.json()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        #expect(Set(object.keys) == ["domains", "configuration", "summary"])
        let domains = try #require(object["domains"] as? [[String: Any]])
        #expect(domains.first?["domain"] as? String == "example.com")
        #expect(domains.first?["kind"] as? String == "hosted")
        #expect(domains.first?.keys.contains("parent") == true)
        let checks = try #require(domains.first?["checks"] as? [[String: Any]])
        #expect(checks.map { Set($0.keys) } == [["name", "status", "message", "hint"], ["name", "status", "message", "hint"]])
        #expect(checks[0]["hint"] is NSNull)
        #expect(checks[1]["name"] as? String == "certificate-expiry")
        #expect(checks[1]["status"] as? String == "warning")
        let summary = try #require(object["summary"] as? [String: Any])
        #expect(summary["ok"] as? Int == 2 && summary["warnings"] as? Int == 1 && summary["errors"] as? Int == 0)
        #expect(summary["exit_code"] as? Int == 0 && summary["domains"] as? Int == 1)
        // It reads back.
        #expect(try JSONDecoder().decode(CheckReport.self, from: Data(json.utf8)) == Self.sample)
    }

    @Test("Exit code: 0 with warnings alone, 1 with any error")
    func exitCode() {
        #expect(CheckReport.exitCode(for: []) == 0)
        #expect(CheckReport.exitCode(for: [CheckResult(.srv, .ok, "x"), CheckResult(.posh, .warning, "y")]) == 0)
        #expect(CheckReport.exitCode(for: [CheckResult(.srv, .warning, "x"), CheckResult(.tlsa, .error, "y")]) == 1)
        var report = Self.sample
        #expect(report.exitCode == 0)
        report.configuration.append(CheckResult(.configuration, .error, "broken"))
        #expect(report.exitCode == 1 && report.summary.exitCode == 1)
    }

    @Test("Text: a line per result with its mark, the hint indented under problems only")
    func text() {
        let text = Self.sample.text()
        #expect(text.contains("example.com\n  ✔ _xmpp-server._tcp.example.com → xmpp.example.com:5269\n  ! the certificate for example.com expires in 3 days\n      Renew it.\n"))
        #expect(text.contains("1 name checked: 0 errors, 1 warning, 2 ok"))
    }
}

// MARK: - The lab

private let quietLogger: Logger = {
    var logger = Logger(label: "braid.check.test")
    logger.logLevel = .critical
    return logger
}()

/// Knot, two accepting listeners, a closed port and a POSH site, for the whole suite.
final class CheckLab: Sendable {
    static let zone = "check.braid.test"
    static let plainZone = "plain-check.braid.test"
    static let bogusZone = "bogus-check.braid.test"

    @TaskLocal static var current: CheckLab?

    let directory: String
    let configuration: BraidConfiguration
    let starttlsPort: Int
    let directTLSPort: Int
    /// A port nothing listens on, held bound (not listening) for the suite.
    let closedPort: Int
    private let closed: LoopbackPorts.ClosedTCPPort
    private let knot: KnotFixture
    private let listeners: [any Channel]
    private let site: any Channel

    func name(_ label: String) -> String { "\(label).\(Self.zone)" }

    private init(directory: String, configuration: BraidConfiguration, starttlsPort: Int, directTLSPort: Int, closed: LoopbackPorts.ClosedTCPPort,
                 knot: KnotFixture, listeners: [any Channel], site: any Channel) {
        self.directory = directory
        self.configuration = configuration
        self.starttlsPort = starttlsPort
        self.directTLSPort = directTLSPort
        self.closedPort = closed.port
        self.closed = closed
        self.knot = knot
        self.listeners = listeners
        self.site = site
    }

    static func start() async throws -> CheckLab {
        let directory = NSTemporaryDirectory() + "braid-check-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var channels: [any Channel] = []
        do {
            return try await start(directory: directory, channels: &channels)
        } catch {
            for channel in channels { try? await channel.close() }
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    private static func start(directory: String, channels: inout [any Channel]) async throws -> CheckLab {
        let group = MultiThreadedEventLoopGroup.singleton
        // Braid's s2s ports: listeners that accept and hold the connection, as a server would.
        func listen() async throws -> (any Channel, Int) {
            let channel = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .bind(host: "127.0.0.1", port: 0).get()
            channels.append(channel)
            return (channel, try #require(channel.localAddress?.port))
        }
        let (starttls, starttlsPort) = try await listen()
        let (direct, directTLSPort) = try await listen()
        let closed = try LoopbackPorts.closedTCPPort()
        let closedPort = closed.port

        // Certificates: one CA; per domain a file in tls.certificates.
        let ca = try TestCertificateAuthority(commonName: "Check Lab CA")
        let caFile = directory + "/ca.pem"
        try ca.certificatePEM.write(toFile: caFile, atomically: true, encoding: .utf8)
        func name(_ label: String) -> String { "\(label).\(zone)" }
        let now = Date()
        var files: [BraidConfiguration.CertificateFiles] = []
        var leaves: [String: Certificate] = [:]
        func install(_ domain: String, _ credentials: PEMCredentials) throws {
            let certificate = "\(directory)/\(domain).crt", key = "\(directory)/\(domain).key"
            try credentials.write(certificatePath: certificate, keyPath: key)
            files.append(.init(certificate: certificate, key: key, domains: [domain]))
            leaves[domain] = try credentials.leafCertificate()
        }
        let labels = ["good", "badtlsa", "nosrv", "wrongport", "closed", "posh", "poshbad", "nohttps", "malformed", "expired", "soon", "selfsigned", "nocert", "tenant"]
        for label in ["good", "badtlsa", "nosrv", "wrongport", "closed", "posh", "poshbad", "nohttps", "malformed"] {
            try install(name(label), try ca.issueXMPPServerCertificate(domains: [name(label)]))
        }
        for domain in [plainZone, bogusZone] {
            try install(domain, try ca.issueXMPPServerCertificate(domains: [domain]))
        }
        try install(name("expired"), try ca.issueXMPPServerCertificate(domains: [name("expired")], notValidBefore: now - 86_400 * 60, notValidAfter: now - 86_400))
        try install(name("soon"), try ca.issueXMPPServerCertificate(domains: [name("soon")], notValidAfter: now + 86_400 * 5 - 60))
        try install(name("selfsigned"), try SelfSignedCertificate.generate(domains: [name("selfsigned")]))
        // The provider's certificate, installed for a tenant it does not name.
        try install(name("tenant"), try ca.issueXMPPServerCertificate(domains: ["provider.\(zone)"]))
        let stranger = try ca.issueXMPPServerCertificate(domains: [name("good")]).leafCertificate()

        func tlsa(_ usage: UInt8, _ selector: UInt8, _ matching: UInt8, _ certificate: Certificate?) throws -> String {
            try TLSAAssociation(usage: usage, selector: selector, matchingType: matching, certificate: try #require(certificate)).description
        }
        let p1 = starttlsPort, p2 = directTLSPort
        let signed = KnotFixture.Zone(name: zone, body: """
            _xmpp-client._tcp.good SRV 0 5 5222 xmpp.good
            _xmpps-client._tcp.good SRV 0 5 5223 xmpp.good
            _xmpp-server._tcp.good SRV 0 5 \(p1) xmpp.good
            _xmpps-server._tcp.good SRV 0 5 \(p2) xmpp.good
            xmpp.good A 127.0.0.1
            _\(p1)._tcp.xmpp.good TLSA \(try tlsa(3, 1, 1, leaves[name("good")]))
            _\(p2)._tcp.xmpp.good TLSA \(try tlsa(3, 0, 1, leaves[name("good")]))
            _xmpp-server._tcp.badtlsa SRV 0 5 \(p1) xmpp.badtlsa
            xmpp.badtlsa A 127.0.0.1
            _\(p1)._tcp.xmpp.badtlsa TLSA \(try tlsa(3, 1, 1, stranger))
            nosrv A 127.0.0.1
            _xmpp-server._tcp.wrongport SRV 0 5 \(closedPort) xmpp.good
            _xmpp-server._tcp.closed SRV 0 5 \(p1) xmpp.closed
            xmpp.closed A 127.0.0.2
            """, signed: true)
        let plain = KnotFixture.Zone(name: plainZone, body: """
            _xmpp-server._tcp SRV 0 5 \(p1) xmpp
            xmpp A 127.0.0.1
            _\(p1)._tcp.xmpp TLSA \(try tlsa(3, 1, 1, leaves[plainZone]))
            """, signed: false)
        let bogus = KnotFixture.Zone(name: bogusZone, body: """
            _xmpp-server._tcp SRV 0 5 \(p1) xmpp
            xmpp A 127.0.0.1
            """, signed: true)
        let knot = try await KnotFixture.start(zones: [signed, plain, bogus])
        do {
            // The bogus zone's anchor is its real DS with the digest's last digit changed.
            let realBogus = try knot.ds(for: bogusZone)
            let last = try #require(realBogus.last)
            let wrongBogus = String(realBogus.dropLast()) + (last == "0" ? "1" : "0")
            let anchors = directory + "/anchors"
            try ([try knot.ds(for: zone), wrongBogus].joined(separator: "\n") + "\n").write(toFile: anchors, atomically: true, encoding: .utf8)

            // The POSH site: one certificate for every name, documents by Host.
            // Every lab name is sent to the site (404 unless it has a document), so no POSH
            // fetch leaves the machine; nohttps is sent to a closed port instead.
            let siteNames = labels.filter { $0 != "nohttps" }.map(name) + [plainZone, bogusZone]
            let siteCredentials = try ca.issue(commonName: "posh site", dnsIDs: siteNames)
            func der(_ certificate: Certificate?) throws -> [UInt8] {
                try #require(certificate).serializeAsPEM().derBytes
            }
            let documents = [
                name("posh"): POSHPublisher.fingerprintsDocument(certificateDER: [try der(leaves[name("posh")])], expires: 600),
                name("poshbad"): POSHPublisher.fingerprintsDocument(certificateDER: [try der(stranger)], expires: 600),
                name("malformed"): "{\"fingerprints\": 42}",
            ]
            let store = TLSContextStore(logger: quietLogger)
            try store.install(siteCredentials, for: [])
            let tls = try NIOSSLContext(configuration: store.makeServerConfiguration(defaultDomain: name("posh"), alpn: ["http/1.1"]))
            let site = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls))
                        try channel.pipeline.syncOperations.addHandler(POSHResponder(documents: documents))
                    }
                }
                .bind(host: "127.0.0.1", port: 0).get()
            channels.append(site)
            let sitePort = try #require(site.localAddress?.port)

            var configuration = BraidConfiguration()
            configuration.dataDirectory = directory + "/data"
            configuration.tls.selfSignMissing = false
            configuration.tls.certificates = files
            configuration.s2s.starttlsPort = p1
            configuration.s2s.directTLSPort = p2
            configuration.s2s.useSystemTrustStore = false
            configuration.s2s.trustAnchorFiles = [caFile]
            configuration.dns.forwarders = [knot.address]
            configuration.dns.trustAnchorFile = anchors
            for siteName in siteNames {
                configuration.s2s.poshConnectOverrides[siteName] = "127.0.0.1:\(sitePort)"
            }
            // Nothing listens there: POSH cannot be fetched.
            configuration.s2s.poshConnectOverrides[name("nohttps")] = "127.0.0.1:\(closedPort)"
            return CheckLab(directory: directory, configuration: configuration, starttlsPort: starttlsPort, directTLSPort: directTLSPort,
                            closed: closed, knot: knot, listeners: [starttls, direct], site: site)
        } catch {
            await knot.stop()
            closed.release()
            throw error
        }
    }

    func stop() async {
        for channel in listeners + [site] { try? await channel.close() }
        await knot.stop()
        closed.release()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

struct CheckLabTrait: SuiteTrait, TestScoping {
    var isRecursive: Bool { false }

    func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        let lab = try await CheckLab.start()
        do {
            try await CheckLab.$current.withValue(lab) { try await function() }
            await lab.stop()
        } catch {
            await lab.stop()
            throw error
        }
    }
}

/// Answers one HTTP/1.1 GET: the POSH document for the Host asked, else 404. Enough for the
/// POSH fetcher, which sends one request per connection here.
final class POSHResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private let documents: [String: String]
    private var received = ""

    init(documents: [String: String]) {
        self.documents = documents
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        received += buffer.readString(length: buffer.readableBytes) ?? ""
        guard let end = received.range(of: "\r\n\r\n") else { return }
        let lines = received[..<end.lowerBound].split(separator: "\r\n")
        received = ""
        let path = lines.first?.split(separator: " ").dropFirst().first.map(String.init) ?? ""
        let host = lines.first { $0.lowercased().hasPrefix("host:") }
            .flatMap { $0.dropFirst(5).trimmingCharacters(in: .whitespaces).split(separator: ":").first }
            .map { $0.lowercased() } ?? ""
        let response: String
        if path == POSHPublisher.wellKnownPath(), let body = documents[host] {
            response = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)"
        } else {
            response = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        }
        context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: response)), promise: nil)
    }
}
