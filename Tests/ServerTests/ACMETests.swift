#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

import Admin
import AsyncHTTPClient
import Crypto
import Federation
import Foundation
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization
import TestSupport
import Testing
import Trust
import X509
import XMPPCore
@testable import Server

/// Names under `acme.test`: `a`, `b` and `skip` (and every label under them) at 127.0.0.1,
/// where Braid's HTTP-01 listener is; `bad` at 127.0.0.2, where nothing listens.
func acmeZone() -> KnotFixture.Zone {
    KnotFixture.Zone(name: "acme.test", body: """
        a A 127.0.0.1
        *.a A 127.0.0.1
        b A 127.0.0.1
        *.b A 127.0.0.1
        skip A 127.0.0.1
        *.skip A 127.0.0.1
        bad A 127.0.0.2
        *.bad A 127.0.0.2
        """, signed: false)
}

@Suite("ACME certificates from Pebble (RFC 8555, HTTP-01)", .enabled(if: PebbleFixture.isAvailable && KnotFixture.isAvailable), .knot([acmeZone()]))
struct ACMETests {
    /// A test's wall clock, moved forward to reach the renewal point.
    final class MovableClock: Sendable {
        let offset = Mutex<TimeInterval>(0)
        var clock: WallClock { WallClock { Date().addingTimeInterval(self.offset.withLock { $0 }) } }
    }

    /// Pebble, then a server hosting `domains` with ACME on, talking to it; both stopped after `body`.
    /// Pebble validates HTTP-01 at the HTTP-01 listener's port and TLS-ALPN-01 at the HTTPS
    /// listener's, both reserved before either starts.
    func withACMEServer(domains: [String], wallClock: WallClock = .system, exclude: [String] = [], interval: Double = 0.1,
                        challenges: [ACMEChallengeType] = BraidConfiguration.ACMESettings().challenges,
                        prepare: (String) throws -> Void = { _ in },
                        _ body: (TestServer, PebbleFixture) async throws -> Void) async throws {
        let knot = try #require(KnotFixture.current)
        let reservation = try PortReservation()
        let httpsReservation = try PortReservation()
        defer { withExtendedLifetime((reservation, httpsReservation)) {} }
        let httpPort = reservation.port
        let pebble = try await PebbleFixture.start(httpPort: httpPort, tlsPort: httpsReservation.port, dnsServer: "127.0.0.1:\(knot.port)")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-acme-\(UUID().uuidString)").path
        do {
            try FileManager.default.createDirectory(atPath: directory + "/certs", withIntermediateDirectories: true)
            try prepare(directory + "/certs")
            let server = try await Self.startServer(domains: domains, directory: directory, pebble: pebble, httpPort: httpPort,
                                                    httpsPort: httpsReservation.port, wallClock: wallClock, exclude: exclude,
                                                    interval: interval, challenges: challenges)
            do {
                try await body(server, pebble)
            } catch {
                Issue.record("pebble log:\n\(pebble.log.suffix(3000))")
                await server.stop()
                throw error
            }
            await server.stop()
        } catch {
            await pebble.stop()
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
        await pebble.stop()
    }

    static func startServer(domains: [String], directory: String, pebble: PebbleFixture, httpPort: Int, httpsPort: Int = 0,
                            wallClock: WallClock = .system, exclude: [String] = [], interval: Double = 0.1,
                            challenges: [ACMEChallengeType] = BraidConfiguration.ACMESettings().challenges) async throws -> TestServer {
        try await TestServer.start(domains: domains, users: [], wallClock: wallClock, directory: directory) { configuration in
            configuration.admin.poshPort = httpsPort
            configuration.acme.enabled = true
            configuration.acme.challenges = challenges
            configuration.acme.directoryURL = pebble.directoryURL
            configuration.acme.caCertificateFile = pebble.trustFile
            configuration.acme.contact = "hostmaster@acme.test"
            configuration.acme.httpAddress = "127.0.0.1"
            configuration.acme.httpPort = httpPort
            configuration.acme.excludeDomains = exclude
            configuration.acme.renewCheckIntervalSeconds = interval
        }
    }

    @Test("After a restart the account key is reused (the CA finds the account) and a valid certificate is not ordered again")
    func restartKeepsAccountAndCertificate() async throws {
        let knot = try #require(KnotFixture.current)
        // Held across the restart, when no listener is bound.
        let reservation = try PortReservation()
        defer { withExtendedLifetime(reservation) {} }
        let httpPort = reservation.port
        let pebble = try await PebbleFixture.start(httpPort: httpPort, dnsServer: "127.0.0.1:\(knot.port)")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-acme-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        do {
            let first = try await Self.startServer(domains: ["a.acme.test"], directory: directory, pebble: pebble, httpPort: httpPort)
            let issued: Certificate
            let accountKey: String
            do {
                try await waitUntil(timeout: .seconds(60), "issued") { Self.isPebble(Self.certificateFile(first, "a.acme.test")) }
                issued = try #require(Self.certificateFile(first, "a.acme.test"))
                accountKey = try String(contentsOfFile: directory + "/acme/account.key", encoding: .utf8)
            } catch {
                await first.stopKeepingData()
                throw error
            }
            await first.stopKeepingData()

            // b.acme.test is new: its order goes through newAccount with the same key, which
            // the CA answers with the existing account (RFC 8555 §7.3.1).
            let second = try await Self.startServer(domains: ["a.acme.test", "b.acme.test"], directory: directory, pebble: pebble, httpPort: httpPort)
            do {
                let acme = try #require(second.server.acme)
                try await waitUntil(timeout: .seconds(60), "b.acme.test issued") { Self.isPebble(Self.certificateFile(second, "b.acme.test")) }
                let passes = acme.passesCompleted
                try await waitUntil("three more checks") { acme.passesCompleted >= passes + 3 }
                #expect(Self.orders(second, "success") == 1)
                #expect(Self.orders(second, "failure") == 0)
                #expect(Self.certificateFile(second, "a.acme.test") == issued)
                #expect(try await Self.presented(second, "conference.a.acme.test") == issued)
                #expect(try String(contentsOfFile: directory + "/acme/account.key", encoding: .utf8) == accountKey)
            } catch {
                Issue.record("pebble log:\n\(pebble.log.suffix(3000))")
                await second.stop()
                throw error
            }
            await second.stop()
        } catch {
            await pebble.stop()
            throw error
        }
        await pebble.stop()
    }

    static func orders(_ server: TestServer, _ outcome: String) -> Int64 {
        server.metrics.counterValue(ACMEMetrics.ordersLabel, [("outcome", outcome)])
    }

    static func certificateFile(_ server: TestServer, _ domain: String) -> Certificate? {
        let paths = CertificateManager.paths(for: domain, in: server.directory + "/certs")
        return try? PEMCredentials.load(certificatePath: paths.certificate, keyPath: paths.key).leafCertificate()
    }

    static func isPebble(_ certificate: Certificate?) -> Bool {
        certificate.map { "\($0.issuer)".contains("Pebble Intermediate CA") } ?? false
    }

    /// The leaf a new direct-TLS handshake with SNI `name` presents (taken during the
    /// handshake: service domains take no client stream, so nothing more is said).
    static func presented(_ server: TestServer, _ name: String) async throws -> Certificate {
        try await TLSHandshake.run(group: server.group, port: server.directTLSPort, serverName: name, protocols: ["xmpp-client"]).leaf
    }

    /// The leaf the HTTPS listener presents to a browser-like handshake for `name`.
    static func presentedHTTPS(_ server: TestServer, _ name: String) async throws -> Certificate {
        let port = try #require(server.server.adminPorts.posh)
        return try await TLSHandshake.run(group: server.group, port: port, serverName: name, protocols: ["http/1.1"]).leaf
    }

    @Test("Two hosted domains get a certificate each, covering their service domains, and new handshakes present it")
    func issuesForEveryHostedDomain() async throws {
        try await withACMEServer(domains: ["a.acme.test", "b.acme.test"]) { server, _ in
            // The success counter moves after the reload, so new handshakes present them
            // (the files alone are written a moment before).
            try await waitUntil(timeout: .seconds(60), "both certificates issued and installed") {
                Self.orders(server, "success") == 2
                    && Self.isPebble(Self.certificateFile(server, "a.acme.test")) && Self.isPebble(Self.certificateFile(server, "b.acme.test"))
            }
            let labels = try CheckedName.served(hosted: ["a.acme.test"], configuration: server.server.configuration).filter { $0.kind == .service }
                .map { $0.domain.replacingOccurrences(of: ".a.acme.test", with: "") }
            #expect(labels.contains("conference"))
            #expect(labels.contains("upload"))
            for domain in ["a.acme.test", "b.acme.test"] {
                let names = [domain] + labels.map { "\($0).\(domain)" }
                let file = try #require(Self.certificateFile(server, domain))
                #expect(try CertificateIdentity(certificate: file).allDomains.isSuperset(of: names))
                for name in names {
                    let presented = try await Self.presented(server, name)
                    #expect(presented == file, "\(name)")
                    #expect(Self.isPebble(presented), "\(name): \(presented.issuer)")
                }
                let keyPath = CertificateManager.paths(for: domain, in: server.directory + "/certs").key
                #expect((try FileManager.default.attributesOfItem(atPath: keyPath)[.posixPermissions] as? Int) == 0o600)
            }
            let accountKey = server.directory + "/acme/account.key"
            #expect((try FileManager.default.attributesOfItem(atPath: accountKey)[.posixPermissions] as? Int) == 0o600)
            #expect(Self.orders(server, "success") == 2)
            #expect(Self.orders(server, "failure") == 0)
            let acme = try #require(server.server.acme)
            #expect(acme.status(for: "a.acme.test")?.lastIssued != nil)
        }
    }

    @Test("A domain hosted while the server runs gets its certificate without waiting for the next full pass")
    func newDomainIsOrderedPromptly() async throws {
        try await withACMEServer(domains: ["a.acme.test"], interval: 3600) { server, _ in
            try await waitUntil(timeout: .seconds(60), "a.acme.test issued") { Self.isPebble(Self.certificateFile(server, "a.acme.test")) }
            try await server.context.storage.addDomain("b.acme.test")
            try await waitUntil(timeout: .seconds(60), "b.acme.test issued and installed") {
                Self.orders(server, "success") == 2 && Self.isPebble(Self.certificateFile(server, "b.acme.test"))
            }
            #expect(Self.isPebble(try await Self.presented(server, "upload.b.acme.test")))
            #expect(Self.orders(server, "success") == 2)
        }
    }

    @Test("A certificate past two thirds of its lifetime is renewed and presented")
    func renewsPastTwoThirds() async throws {
        let moving = MovableClock()
        try await withACMEServer(domains: ["a.acme.test"], wallClock: moving.clock) { server, _ in
            try await waitUntil(timeout: .seconds(60), "first certificate") { Self.isPebble(Self.certificateFile(server, "a.acme.test")) }
            let first = try #require(Self.certificateFile(server, "a.acme.test"))
            // Checks keep running; before two thirds nothing is ordered.
            let acme = try #require(server.server.acme)
            let passes = acme.passesCompleted
            try await waitUntil("three more checks") { acme.passesCompleted >= passes + 3 }
            #expect(Self.orders(server, "success") == 1)

            let lifetime = first.notValidAfter.timeIntervalSince(first.notValidBefore)
            let due = first.notValidBefore.addingTimeInterval(lifetime * 2 / 3 + 60)
            moving.offset.withLock { $0 = due.timeIntervalSinceNow }
            // (A read between the two renames finds a key that does not match and gives nil.)
            try await waitUntil(timeout: .seconds(60), "renewed") {
                Self.certificateFile(server, "a.acme.test").map { $0.serialNumber != first.serialNumber } ?? false
            }
            // Back to the real time, so the new certificate is not itself due.
            moving.offset.withLock { $0 = 0 }
            // Compared with the file as it is now, in case a pass ordered once more before the
            // clock went back.
            try await waitUntil("the renewed certificate presented") {
                guard let file = Self.certificateFile(server, "a.acme.test") else { return false }
                return try await Self.presented(server, "a.acme.test") == file
            }
            let renewed = try #require(Self.certificateFile(server, "a.acme.test"))
            #expect(Self.isPebble(renewed))
            #expect(renewed.serialNumber != first.serialNumber)
            #expect(try await Self.presented(server, "conference.a.acme.test") == renewed)
            #expect(Self.orders(server, "success") >= 2)
        }
    }

    @Test("A failed challenge leaves the old certificate in place and backs off")
    func failedChallengeKeepsOldCertificate() async throws {
        // A CA-issued certificate past two thirds of its life, so an order is due; the CA
        // then finds nothing at bad.acme.test (127.0.0.2).
        let authority = try TestCertificateAuthority(commonName: "Old CA")
        let old = try authority.issueXMPPServerCertificate(domains: ["bad.acme.test", "conference.bad.acme.test", "upload.bad.acme.test"],
                                                           notValidBefore: Date() - 80 * 86_400, notValidAfter: Date() + 10 * 86_400)
        let oldLeaf = try old.leafCertificate()
        try await withACMEServer(domains: ["bad.acme.test"], prepare: { certs in
            let paths = CertificateManager.paths(for: "bad.acme.test", in: certs)
            try old.write(certificatePath: paths.certificate, keyPath: paths.key)
        }) { server, _ in
            let acme = try #require(server.server.acme)
            try await waitUntil(timeout: .seconds(60), "the order failed") { Self.orders(server, "failure") == 1 }
            let status = try #require(acme.status(for: "bad.acme.test"))
            #expect(status.failures == 1)
            #expect(status.lastError?.contains("challengeFailed") == true, "\(status.lastError ?? "")")
            #expect(status.lastError?.contains("bad.acme.test") == true)
            let notBefore = try #require(status.notBefore)
            #expect(notBefore > Date().addingTimeInterval(ACMERenewalService.backoffBase - 10))

            #expect(Self.certificateFile(server, "bad.acme.test") == oldLeaf)
            #expect(try await Self.presented(server, "bad.acme.test") == oldLeaf)
            #expect(try await Self.presented(server, "conference.bad.acme.test") == oldLeaf)
            // Backing off: later checks place no order.
            let passes = acme.passesCompleted
            try await waitUntil("five more checks") { acme.passesCompleted >= passes + 5 }
            #expect(Self.orders(server, "failure") == 1)
            #expect(Self.orders(server, "success") == 0)
        }
    }

    @Test("An excluded domain is not ordered; the HTTP listener answers challenges only and redirects the rest to https")
    func excludedDomainAndRedirects() async throws {
        try await withACMEServer(domains: ["a.acme.test", "skip.acme.test"], exclude: ["skip.acme.test"]) { server, _ in
            let acme = try #require(server.server.acme)
            try await waitUntil(timeout: .seconds(60), "a.acme.test issued") { Self.isPebble(Self.certificateFile(server, "a.acme.test")) }
            let passes = acme.passesCompleted
            try await waitUntil("three more checks") { acme.passesCompleted >= passes + 3 }
            #expect(Self.certificateFile(server, "skip.acme.test") == nil)
            #expect(acme.status(for: "skip.acme.test") == nil)
            #expect(Self.orders(server, "success") == 1)

            let port = try #require(acme.httpPort)
            let http = HTTPClient(eventLoopGroup: server.group, configuration: .init(redirectConfiguration: .disallow))
            do {
                func get(_ path: String, host: String = "a.acme.test") async throws -> (Int, String?, String) {
                    var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)")
                    request.headers.replaceOrAdd(name: "Host", value: host)
                    let response = try await http.execute(request, timeout: .seconds(10))
                    let body = try await response.body.collect(upTo: 4096)
                    return (Int(response.status.code), response.headers.first(name: "Location"), String(buffer: body))
                }
                let redirected = try await get("/some/page?x=1", host: "a.acme.test:80")
                #expect(redirected.0 == 301)
                #expect(redirected.1 == "https://a.acme.test/some/page?x=1")
                #expect(try await get("/.well-known/acme-challenge/unknown-token").0 == 404)
                acme.tokens.publish(token: "tok-en_1", keyAuthorization: "tok-en_1.thumb")
                let challenge = try await get("/.well-known/acme-challenge/tok-en_1")
                #expect(challenge.0 == 200)
                #expect(challenge.2 == "tok-en_1.thumb")
                acme.tokens.withdraw(token: "tok-en_1")
                #expect(try await get("/.well-known/acme-challenge/tok-en_1").0 == 404)
            } catch {
                try? await http.shutdown()
                throw error
            }
            try await http.shutdown()
        }
    }
}

extension ACMETests {
    @Test("TLS-ALPN-01: Pebble validates at the HTTPS listener; port 80 is not bound; the certificate is presented there and on direct TLS")
    func issuesWithTLSALPN() async throws {
        try await withACMEServer(domains: ["a.acme.test"], challenges: [.tlsALPN01]) { server, _ in
            let acme = try #require(server.server.acme)
            #expect(acme.challenges == [.tlsALPN01])
            #expect(acme.httpPort == nil, "no HTTP-01 listener without http-01")
            try await waitUntil(timeout: .seconds(60), "issued over tls-alpn-01 and installed") {
                Self.orders(server, "success") == 1 && Self.isPebble(Self.certificateFile(server, "a.acme.test"))
            }
            let file = try #require(Self.certificateFile(server, "a.acme.test"))
            // Every name was validated at the HTTPS listener, and nothing stays on offer.
            #expect(acme.tlsALPNCertificates.pendingNames.isEmpty)
            for name in ["a.acme.test", "conference.a.acme.test", "upload.a.acme.test"] {
                #expect(try await Self.presentedHTTPS(server, name) == file, "\(name)")
                #expect(try await Self.presented(server, name) == file, "\(name)")
            }
            #expect(Self.orders(server, "success") == 1)
            #expect(server.metrics.counterValue(ACMEMetrics.malformedClientHelloLabel, []) == 0)
        }
    }

    @Test("A failed TLS-ALPN-01 challenge leaves the old certificate in place and presented, and withdraws the validation certificate")
    func failedTLSALPNKeepsOldCertificate() async throws {
        // Due for renewal; the CA then connects to bad.acme.test (127.0.0.2), where no
        // HTTPS listener is.
        let authority = try TestCertificateAuthority(commonName: "Old CA")
        let names = ["bad.acme.test", "conference.bad.acme.test", "upload.bad.acme.test"]
        let old = try authority.issueXMPPServerCertificate(domains: names, notValidBefore: Date() - 80 * 86_400, notValidAfter: Date() + 10 * 86_400)
        let oldLeaf = try old.leafCertificate()
        try await withACMEServer(domains: ["bad.acme.test"], challenges: [.tlsALPN01], prepare: { certs in
            let paths = CertificateManager.paths(for: "bad.acme.test", in: certs)
            try old.write(certificatePath: paths.certificate, keyPath: paths.key)
        }) { server, _ in
            let acme = try #require(server.server.acme)
            try await waitUntil(timeout: .seconds(60), "the order failed") { Self.orders(server, "failure") == 1 }
            let status = try #require(acme.status(for: "bad.acme.test"))
            #expect(status.failures == 1)
            #expect(status.lastError?.contains("challengeFailed") == true, "\(status.lastError ?? "")")
            #expect(status.lastError?.contains("tls-alpn-01") == true, "\(status.lastError ?? "")")
            #expect(acme.tlsALPNCertificates.pendingNames.isEmpty)
            #expect(Self.certificateFile(server, "bad.acme.test") == oldLeaf)
            for name in names {
                #expect(try await Self.presentedHTTPS(server, name) == oldLeaf, "\(name)")
            }
            #expect(try await Self.presented(server, "bad.acme.test") == oldLeaf)
            #expect(Self.orders(server, "success") == 0)
        }
    }
}

/// The HTTPS listener's side of TLS-ALPN-01 without a CA: a validation certificate
/// published by hand, handshakes with and without `acme-tls/1`, and bad ClientHellos.
@Suite("TLS-ALPN-01 on the HTTPS listener")
struct TLSALPNListenerTests {
    @Test("acme-tls/1 for a pending name gets the validation certificate and the protocol, then the server closes; anything else is unchanged; bad ClientHellos are closed and counted")
    func listener() async throws {
        // A CA that is never reached: the renewal pass fails to connect and places nothing.
        let closed = try LoopbackPorts.closedTCPPort()
        try await withServer(domains: ["a.acme.test"], users: []) { configuration in
            configuration.acme.enabled = true
            configuration.acme.directoryURL = "https://127.0.0.1:\(closed.port)/dir"
            configuration.acme.challenges = [.tlsALPN01]
            configuration.acme.renewCheckIntervalSeconds = 3600
        } _: { server in
            let acme = try #require(server.server.acme)
            let port = try #require(server.server.adminPorts.posh)
            let normal = try await TLSHandshake.run(group: server.group, port: port, serverName: "a.acme.test", protocols: ["http/1.1"])
            #expect(normal.negotiatedProtocol == "http/1.1")
            #expect(normal.leaf.extensions[oid: [1, 3, 6, 1, 5, 5, 7, 1, 31]] == nil)

            let keyAuthorization = "tok-en.thumbprint"
            try acme.tlsALPNCertificates.publish(name: "a.acme.test", keyAuthorization: keyAuthorization)
            let validation = try await TLSHandshake.run(group: server.group, port: port, serverName: "a.acme.test",
                                                        protocols: [TLSALPNChallenges.protocolName], keepOpen: true)
            #expect(validation.negotiatedProtocol == "acme-tls/1")
            let leaf = validation.leaf
            #expect(leaf.issuer == leaf.subject, "self-signed")
            let identifier = try #require(leaf.extensions[oid: [1, 3, 6, 1, 5, 5, 7, 1, 31]])
            #expect(identifier.critical)
            #expect(Array(identifier.value) == [0x04, 0x20] + Array(SHA256.hash(data: Data(keyAuthorization.utf8))))
            let san = try #require(try leaf.extensions.subjectAlternativeNames)
            #expect(Array(san) == [.dnsName("a.acme.test")])
            // RFC 8737 §3: the server may close once the handshake is done; it does.
            try await waitUntil("the validation connection closed by the server") { !validation.channel.isActive }

            // The same name without acme-tls/1, and acme-tls/1 for a name with nothing
            // pending: the listener's own certificate, as before.
            #expect(try await TLSHandshake.run(group: server.group, port: port, serverName: "a.acme.test", protocols: ["http/1.1"]).leaf == normal.leaf)
            let unpending = try await TLSHandshake.run(group: server.group, port: port, serverName: "upload.a.acme.test",
                                                       protocols: [TLSALPNChallenges.protocolName, "http/1.1"])
            #expect(unpending.negotiatedProtocol == "http/1.1")
            #expect(unpending.leaf.extensions[oid: [1, 3, 6, 1, 5, 5, 7, 1, 31]] == nil)
            acme.tlsALPNCertificates.withdraw(name: "a.acme.test")
            let withdrawn = try await TLSHandshake.run(group: server.group, port: port, serverName: "a.acme.test", protocols: [TLSALPNChallenges.protocolName])
            #expect(withdrawn.leaf == normal.leaf)
            #expect(withdrawn.negotiatedProtocol == nil)

            // HTTP through the sniffer still reaches the router.
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateVerification = .none
            let http = HTTPClient(eventLoopGroupProvider: .shared(server.group), configuration: .init(tlsConfiguration: tls))
            do {
                let response = try await http.execute(HTTPClientRequest(url: "https://127.0.0.1:\(port)/api/v1/status"), timeout: .seconds(10))
                #expect(response.status == .unauthorized)
            } catch {
                try? await http.shutdown()
                throw error
            }
            try await http.shutdown()

            // Plain HTTP on the HTTPS port, and a record claiming 64 KiB: closed and counted.
            for bytes in [Array("GET / HTTP/1.1\r\nHost: a.acme.test\r\n\r\n".utf8), [0x16, 0x03, 0x01, 0xFF, 0xFF, 0x01]] {
                let channel = try await ClientBootstrap(group: server.group).connect(host: "127.0.0.1", port: port).get()
                try await channel.writeAndFlush(ByteBuffer(bytes: bytes))
                try await waitUntil("closed by the server") { !channel.isActive }
            }
            #expect(server.metrics.counterValue(ACMEMetrics.malformedClientHelloLabel, []) == 2)
            withExtendedLifetime(closed) {}
        }
    }
}

/// The ClientHello reader on made-up and real hellos, whole, cut short and corrupted.
@Suite("ClientHello parser")
struct ClientHelloParserTests {
    /// A ClientHello record: TLS 1.2 header, one cipher suite, the given extensions (none at
    /// all with `extensions: nil`).
    static func record(extensions: [(UInt16, [UInt8])]?, recordLength: Int? = nil, messageLength: Int? = nil) -> ByteBuffer {
        var body: [UInt8] = [0x03, 0x03] + [UInt8](repeating: 7, count: 32) + [0] + [0x00, 0x02, 0x13, 0x01] + [1, 0]
        if let extensions {
            var block: [UInt8] = []
            for (type, data) in extensions {
                block += [UInt8(type >> 8), UInt8(type & 0xFF), UInt8(data.count >> 8), UInt8(data.count & 0xFF)] + data
            }
            body += [UInt8(block.count >> 8), UInt8(block.count & 0xFF)] + block
        }
        let length = messageLength ?? body.count
        let message: [UInt8] = [1, UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF)] + body
        let recordSize = recordLength ?? message.count
        return ByteBuffer(bytes: [0x16, 0x03, 0x01, UInt8(recordSize >> 8 & 0xFF), UInt8(recordSize & 0xFF)] + message)
    }

    static func sni(_ name: String) -> (UInt16, [UInt8]) {
        let bytes = Array(name.utf8)
        let entry: [UInt8] = [0, UInt8(bytes.count >> 8), UInt8(bytes.count & 0xFF)] + bytes
        return (0, [UInt8(entry.count >> 8), UInt8(entry.count & 0xFF)] + entry)
    }

    static func alpn(_ names: [String]) -> (UInt16, [UInt8]) {
        let list = names.flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) }
        return (16, [UInt8(list.count >> 8), UInt8(list.count & 0xFF)] + list)
    }

    @Test("Made-up hellos: SNI and ALPN read; no extensions; every malformed length refused")
    func madeUp() {
        let good = Self.record(extensions: [(10, [0, 2, 0, 23]), Self.sni("A.Acme.Test"), Self.alpn(["acme-tls/1", "h2"])])
        #expect(ClientHello.parse(good) == .hello(ClientHello(serverName: "a.acme.test", applicationProtocols: ["acme-tls/1", "h2"])))
        #expect(ClientHello.parse(Self.record(extensions: nil)) == .hello(ClientHello()))
        #expect(ClientHello.parse(Self.record(extensions: [])) == .hello(ClientHello()))
        // Every prefix of a whole record is "need more", never a verdict.
        for cut in 0 ..< good.readableBytes {
            #expect(ClientHello.parse(good.getSlice(at: 0, length: cut) ?? ByteBuffer()) == .needMore, "cut at \(cut)")
        }
        // A hello longer than its record is left to the TLS library.
        #expect(ClientHello.parse(Self.record(extensions: [Self.sni("a.acme.test")], messageLength: 60_000)) == .fragmented)

        func isMalformed(_ buffer: ByteBuffer) -> Bool {
            if case .malformed = ClientHello.parse(buffer) { return true }
            return false
        }
        #expect(isMalformed(ByteBuffer(string: "GET / HTTP/1.1\r\n\r\n")))
        #expect(isMalformed(ByteBuffer(bytes: [0x16, 0x03, 0x01, 0xFF, 0xFF])), "record longer than TLS allows")
        #expect(isMalformed(ByteBuffer(bytes: [0x16, 0x02, 0x00, 0x00, 0x10])), "SSL 2 record version")
        #expect(isMalformed(ByteBuffer(bytes: [0x16, 0x03, 0x01, 0x00, 0x00])), "empty record")
        #expect(isMalformed(ByteBuffer(bytes: [0x16, 0x03, 0x01, 0x00, 0x04, 2, 0, 0, 0])), "server_hello first")
        // The message claims less than its parts: each vector overruns it.
        var shortMessage = Self.record(extensions: [Self.sni("a.acme.test")])
        let claimed = shortMessage.readableBytes - 5 - 4 - 10
        shortMessage.setBytes([UInt8(claimed >> 16), UInt8(claimed >> 8 & 0xFF), UInt8(claimed & 0xFF)], at: 6)
        #expect(isMalformed(shortMessage))
        #expect(isMalformed(Self.record(extensions: [(0, [0xFF, 0xFF, 0, 0, 1, 0x61])])), "server_name list longer than the extension")
        #expect(isMalformed(Self.record(extensions: [(0, [0x00, 0x04, 0, 0xFF, 0xFF, 0x61])])), "host_name longer than the list")
        // Well framed, but not a DNS name: no name (the normal TLS handler decides), not refused.
        #expect(ClientHello.parse(Self.record(extensions: [Self.sni("bad name")])) == .hello(ClientHello()))
        #expect(ClientHello.parse(Self.record(extensions: [Self.sni("a.acme.test."), Self.alpn(["acme-tls/1"])]))
            == .hello(ClientHello(serverName: nil, applicationProtocols: ["acme-tls/1"])))
        #expect(isMalformed(Self.record(extensions: [(16, [0x00, 0x02, 0x05, 0x61])])), "protocol name longer than the list")
        #expect(isMalformed(Self.record(extensions: [(16, [0x00, 0x01, 0x00])])), "empty protocol name")
        #expect(isMalformed(Self.record(extensions: [(16, [0x00, 0x00])])), "empty protocol list")
        #expect(isMalformed(Self.record(extensions: [Self.alpn(["h2"]), Self.alpn(["acme-tls/1"])])), "ALPN twice")
        #expect(isMalformed(Self.record(extensions: [(10, [0, 2])] + [(0xFF01, [])]).withExtraByte()), "bytes after the extensions")
        var overlong = Self.record(extensions: [Self.sni("a.acme.test")])
        // The extensions block claims 0xFFFF bytes.
        let extensionsLength = overlong.readableBytes - 5 - 4 - (2 + 32 + 1 + 4 + 2) - 2
        #expect(overlong.getInteger(at: 5 + 4 + 41, as: UInt16.self) == UInt16(extensionsLength))
        overlong.setInteger(UInt16(0xFFFF), at: 5 + 4 + 41)
        #expect(isMalformed(overlong))
    }

    @Test("A real ClientHello from swift-nio-ssl, then every byte of it corrupted: read or refused, never a crash")
    func realAndCorrupted() throws {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.applicationProtocols = ["acme-tls/1", "http/1.1"]
        let context = try NIOSSLContext(configuration: tls)
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: "Conference.A.Acme.Test"))
        try channel.connect(to: try SocketAddress(ipAddress: "127.0.0.1", port: 443)).wait()
        var hello = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { hello.writeBuffer(&part) }
        #expect(ClientHello.parse(hello) == .hello(ClientHello(serverName: "conference.a.acme.test", applicationProtocols: ["acme-tls/1", "http/1.1"])))

        for cut in stride(from: 0, to: hello.readableBytes, by: 7) {
            #expect(ClientHello.parse(hello.getSlice(at: 0, length: cut) ?? ByteBuffer()) == .needMore)
        }
        // Each byte set to 0x00 and 0xFF, and seeded random changes: any verdict but a trap.
        var verdicts = 0
        for index in 0 ..< hello.readableBytes {
            for value: UInt8 in [0x00, 0xFF] {
                var corrupted = hello
                corrupted.setInteger(value, at: corrupted.readerIndex + index)
                _ = ClientHello.parse(corrupted)
                verdicts += 1
            }
        }
        var generator = SeededGenerator(seed: 17)
        for _ in 0 ..< 2000 {
            var corrupted = hello
            for _ in 0 ..< Int.random(in: 1 ... 8, using: &generator) {
                corrupted.setInteger(UInt8.random(in: 0 ... 255, using: &generator), at: Int.random(in: 0 ..< hello.readableBytes, using: &generator))
            }
            _ = ClientHello.parse(corrupted)
            verdicts += 1
        }
        #expect(verdicts == hello.readableBytes * 2 + 2000)
    }

    /// A small deterministic generator (SplitMix64), so a failure can be replayed.
    struct SeededGenerator: RandomNumberGenerator {
        var state: UInt64
        init(seed: UInt64) { state = seed }
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }
}

private extension ByteBuffer {
    /// The record with one byte more in the message than its parts use (record and message
    /// lengths adjusted).
    func withExtraByte() -> ByteBuffer {
        var bytes = Array(readableBytesView) + [0]
        let record = Int(bytes[3]) << 8 | Int(bytes[4]) + 1
        bytes[3] = UInt8(record >> 8)
        bytes[4] = UInt8(record & 0xFF)
        let message = Int(bytes[6]) << 16 | Int(bytes[7]) << 8 | Int(bytes[8]) + 1
        bytes[6] = UInt8(message >> 16)
        bytes[7] = UInt8(message >> 8 & 0xFF)
        bytes[8] = UInt8(message & 0xFF)
        return ByteBuffer(bytes: bytes)
    }
}

@Suite("ACME pieces without a CA")
struct ACMEUnitTests {
    @Test("An order is due when the certificate is missing, self-signed, lacks a name, or is past two thirds")
    func reasonToOrder() throws {
        let now = Date()
        let names = ["x.example", "conference.x.example"]
        #expect(ACMERenewalService.reasonToOrder(existing: nil, names: names, now: now) == .missing)
        let selfSigned = try SelfSignedCertificate.generate(domains: names).leafCertificate()
        #expect(ACMERenewalService.reasonToOrder(existing: selfSigned, names: names, now: now) == .selfSigned)
        let authority = try TestCertificateAuthority()
        let partial = try authority.issueXMPPServerCertificate(domains: ["x.example"]).leafCertificate()
        #expect(ACMERenewalService.reasonToOrder(existing: partial, names: names, now: now) == .namesMissing)
        let fresh = try authority.issueXMPPServerCertificate(domains: names, notValidBefore: now - 86_400, notValidAfter: now + 89 * 86_400).leafCertificate()
        #expect(ACMERenewalService.reasonToOrder(existing: fresh, names: names, now: now) == nil)
        #expect(ACMERenewalService.reasonToOrder(existing: fresh, names: names, now: now + 58 * 86_400) == nil)
        #expect(ACMERenewalService.reasonToOrder(existing: fresh, names: names, now: now + 60 * 86_400) == .renewal)
    }

    @Test("JWS: ES256 over protected.payload verifies with the account key; the thumbprint is stable")
    func jwsSignature() throws {
        let key = ACMEAccountKey(privateKey: .init())
        let body = try key.sign(payload: Data("{}".utf8), url: "https://ca.example/new-order", nonce: "n1", signer: .kid("https://ca.example/acct/1"))
        let object = try #require(try JSONSerialization.jsonObject(with: body) as? [String: String])
        let protected = try #require(object["protected"])
        let payload = try #require(object["payload"])
        let signature = try #require(object["signature"].flatMap(Self.decode))
        let verified = key.privateKey.publicKey.isValidSignature(try .init(rawRepresentation: signature), for: Data("\(protected).\(payload)".utf8))
        #expect(verified)
        let headerBytes = try #require(Self.decode(protected))
        let header = try #require(try JSONSerialization.jsonObject(with: headerBytes) as? [String: String])
        #expect(header == ["alg": "ES256", "kid": "https://ca.example/acct/1", "nonce": "n1", "url": "https://ca.example/new-order"])
        #expect(key.thumbprint == key.thumbprint)
        #expect(key.keyAuthorization(token: "abc") == "abc.\(key.thumbprint)")
        #expect(ACMEClient.isToken("abc-_1"))
        #expect(!ACMEClient.isToken("../etc"))
    }

    static func decode(_ text: String) -> Data? {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64 += "=" }
        return Data(base64Encoded: base64)
    }
}

extension ACMEUnitTests {
    @Test("Back-off doubles per failure up to the cap, and honours Retry-After and rate limits")
    func backoff() {
        let plain = ACMEError(.challengeFailed, "nobody home")
        #expect(ACMERenewalService.backoff(failures: 1, error: plain) == ACMERenewalService.backoffBase)
        #expect(ACMERenewalService.backoff(failures: 3, error: plain) == ACMERenewalService.backoffBase * 4)
        #expect(ACMERenewalService.backoff(failures: 40, error: plain) == ACMERenewalService.backoffCap)
        let limited = ACMEError(.problem, "too many", problemType: "urn:ietf:params:acme:error:rateLimited")
        #expect(limited.isRateLimited)
        #expect(ACMERenewalService.backoff(failures: 1, error: limited) == ACMERenewalService.rateLimitFloor)
        let told = ACMEError(.problem, "too many", problemType: "urn:ietf:params:acme:error:rateLimited", retryAfter: .seconds(7200))
        #expect(ACMERenewalService.backoff(failures: 1, error: told) == 7200)
        let shortRetry = ACMEError(.problem, "busy", retryAfter: .seconds(5))
        #expect(ACMERenewalService.backoff(failures: 2, error: shortRetry) == ACMERenewalService.backoffBase * 2)
    }

    @Test("Challenge types: the configured order first, then rotated by one per failed order")
    func challengeOrder() throws {
        let both: [ACMEChallengeType] = [.http01, .tlsALPN01]
        #expect(ACMERenewalService.challengeOrder(both, failures: 0) == [.http01, .tlsALPN01])
        #expect(ACMERenewalService.challengeOrder(both, failures: 1) == [.tlsALPN01, .http01])
        #expect(ACMERenewalService.challengeOrder(both, failures: 2) == [.http01, .tlsALPN01])
        #expect(ACMERenewalService.challengeOrder([.tlsALPN01], failures: 3) == [.tlsALPN01])
        #expect(BraidConfiguration().acme.challenges == both)
        #expect(try BraidConfiguration.parse(yaml: "acme:\n  challenges: [tls-alpn-01]\n").acme.challenges == [.tlsALPN01])
        #expect(throws: ConfigurationError.self) { try BraidConfiguration.parse(yaml: "acme:\n  challenges: [dns-01]\n") }
    }

    @Test("Retry-After in seconds or as an HTTP date")
    func retryAfterHeader() {
        var headers = HTTPHeaders()
        headers.add(name: "Retry-After", value: "120")
        #expect(ACMEClient.retryAfter(headers) == .seconds(120))
        var dated = HTTPHeaders()
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss 'GMT'"
        dated.add(name: "Retry-After", value: formatter.string(from: Date().addingTimeInterval(3600)))
        let seconds = ACMEClient.retryAfter(dated)?.components.seconds ?? 0
        #expect((3590 ... 3601).contains(seconds))
        #expect(ACMEClient.retryAfter(HTTPHeaders()) == nil)
    }
}
