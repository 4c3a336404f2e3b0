#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

import AsyncHTTPClient
import Federation
import Foundation
import NIOCore
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

/// Pebble, Let's Encrypt's test CA (`apt-get install pebble`), on loopback ports in a
/// temporary directory, validating HTTP-01 on `httpPort` at the addresses knot gives.
/// Stopped by PID.
final class PebbleFixture: Sendable {
    let directory: String
    let port: Int
    /// The CA that signed Pebble's HTTPS certificate, for `acme.ca_certificate_file`.
    let trustFile: String
    private let process: ChildProcess

    var directoryURL: String { "https://localhost:\(port)/dir" }

    static var isAvailable: Bool { ChildProcess.locate("pebble") != nil }

    private init(directory: String, port: Int, trustFile: String, process: ChildProcess) {
        self.directory = directory
        self.port = port
        self.trustFile = trustFile
        self.process = process
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func start(httpPort: Int, dnsServer: String) async throws -> PebbleFixture {
        guard let pebble = ChildProcess.locate("pebble"), let env = ChildProcess.locate("env") else {
            throw Failure(description: "pebble is not installed")
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-pebble-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let authority = try TestCertificateAuthority(commonName: "Braid Pebble Test CA")
        let serving = try authority.issue(commonName: "localhost", dnsIDs: ["localhost"])
        try serving.write(certificatePath: directory + "/cert.pem", keyPath: directory + "/key.pem")
        let trustFile = directory + "/ca.pem"
        try authority.certificatePEM.write(toFile: trustFile, atomically: true, encoding: .utf8)
        var lastError: any Error = Failure(description: "pebble did not start")
        for _ in 0 ..< 3 {
            let port = try LoopbackPorts.freePort()
            let config = """
                {"pebble": {"listenAddress": "127.0.0.1:\(port)", "managementListenAddress": "",
                 "certificate": "\(directory)/cert.pem", "privateKey": "\(directory)/key.pem",
                 "httpPort": \(httpPort), "tlsPort": \(try LoopbackPorts.freePort()), "ocspResponderURL": "",
                 "externalAccountBindingRequired": false}}
                """
            try config.write(toFile: directory + "/pebble.json", atomically: true, encoding: .utf8)
            // `env` execs pebble in place, so the PID is pebble's. No random sleeps before
            // validation; the default 5 % of nonces refused exercises the badNonce retry.
            let process = try ChildProcess.spawn(env, ["PEBBLE_VA_NOSLEEP=1", pebble, "-config", directory + "/pebble.json", "-dnsserver", dnsServer],
                                                 outputPath: directory + "/pebble.log")
            let deadline = ContinuousClock.now + .seconds(20)
            while process.isRunning, !process.output.contains("ACME directory available"), ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            if process.isRunning, process.output.contains("ACME directory available") {
                return PebbleFixture(directory: directory, port: port, trustFile: trustFile, process: process)
            }
            lastError = Failure(description: "pebble did not start: \(process.output)")
            await process.terminate()
        }
        try? FileManager.default.removeItem(atPath: directory)
        throw lastError
    }

    var log: String { process.output }

    func stop() async {
        await process.terminate()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Holds a loopback TCP port for a test while Braid's HTTP-01 listener is not (yet, or
/// between a stop and a restart) bound to it: Pebble validates at one fixed port, and other
/// suites' fixtures pick free ports meanwhile. Bound with SO_REUSEADDR and never listening,
/// so Braid's listener (SO_REUSEADDR too) binds beside it on Linux, while another bind
/// without the option (`LoopbackPorts.freePort`'s probe) finds the port taken.
final class PortReservation: Sendable {
    let port: Int
    private let descriptor: Int32

    init() throws {
        for _ in 0 ..< 20 {
            let port = try LoopbackPorts.freePort()
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if bound == 0 {
                self.port = port
                descriptor = fd
                return
            }
            close(fd)
        }
        throw PebbleFixture.Failure(description: "no loopback port to reserve")
    }

    deinit {
        close(descriptor)
    }
}

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
    func withACMEServer(domains: [String], wallClock: WallClock = .system, exclude: [String] = [], interval: Double = 0.1,
                        prepare: (String) throws -> Void = { _ in },
                        _ body: (TestServer, PebbleFixture) async throws -> Void) async throws {
        let knot = try #require(KnotFixture.current)
        let reservation = try PortReservation()
        defer { withExtendedLifetime(reservation) {} }
        let httpPort = reservation.port
        let pebble = try await PebbleFixture.start(httpPort: httpPort, dnsServer: "127.0.0.1:\(knot.port)")
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-acme-\(UUID().uuidString)").path
        do {
            try FileManager.default.createDirectory(atPath: directory + "/certs", withIntermediateDirectories: true)
            try prepare(directory + "/certs")
            let server = try await Self.startServer(domains: domains, directory: directory, pebble: pebble, httpPort: httpPort,
                                                    wallClock: wallClock, exclude: exclude, interval: interval)
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

    static func startServer(domains: [String], directory: String, pebble: PebbleFixture, httpPort: Int, wallClock: WallClock = .system,
                            exclude: [String] = [], interval: Double = 0.1) async throws -> TestServer {
        try await TestServer.start(domains: domains, users: [], wallClock: wallClock, directory: directory) { configuration in
            configuration.acme.enabled = true
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
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .noHostnameVerification
        tls.applicationProtocols = ["xmpp-client"]
        let context = try NIOSSLContext(configuration: tls)
        let leaf = server.group.next().makePromise(of: NIOSSLCertificate.self)
        let channel = try await ClientBootstrap(group: server.group).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                let handler = try NIOSSLClientHandler(context: context, serverHostname: name) { chain, verdict in
                    if let first = chain.first { leaf.succeed(first) } else { leaf.fail(PebbleFixture.Failure(description: "no certificate")) }
                    verdict.succeed(.certificateVerified)
                }
                try channel.pipeline.syncOperations.addHandler(handler)
            }
        }.connect(host: "127.0.0.1", port: server.directTLSPort).get()
        defer { channel.close(promise: nil) }
        let certificate = try await leaf.futureResult.get()
        return try Certificate(derEncoded: try certificate.toDERBytes())
    }

    @Test("Two hosted domains get a certificate each, covering their service domains, and new handshakes present it")
    func issuesForEveryHostedDomain() async throws {
        try await withACMEServer(domains: ["a.acme.test", "b.acme.test"]) { server, _ in
            try await waitUntil(timeout: .seconds(60), "both certificates issued") {
                Self.isPebble(Self.certificateFile(server, "a.acme.test")) && Self.isPebble(Self.certificateFile(server, "b.acme.test"))
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
            try await waitUntil(timeout: .seconds(60), "b.acme.test issued") { Self.isPebble(Self.certificateFile(server, "b.acme.test")) }
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
