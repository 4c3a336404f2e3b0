#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import Foundation
import Testing
import TestSupport

@testable import DNS

/// The signed lab zone. Domains: a (both services, three priorities, TLSA), b (only
/// _xmpp-server), c ("." in _xmpp-server), d ("." in _xmpps-server, real _xmpp-server),
/// e (no SRV, addresses only), f (only "." in _xmpps-server), bücher (IDN).
let labZone = KnotFixture.Zone(name: "lab.braid.test", body: """
    _xmpps-server._tcp.a SRV 5 0 5270 xmpp1.a
    _xmpp-server._tcp.a  SRV 10 60 5269 xmpp1.a
    _xmpp-server._tcp.a  SRV 10 40 5269 xmpp2.a
    _xmpp-server._tcp.a  SRV 20 0 5269 backup.a
    xmpp1.a A 127.0.0.10
    xmpp1.a AAAA 2001:db8::10
    xmpp2.a A 127.0.0.11
    backup.a A 127.0.0.12
    _5269._tcp.xmpp1.a TLSA 3 1 1 0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20
    _5270._tcp.xmpp1.a TLSA 2 0 1 a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebf
    _xmpp-server._tcp.b SRV 0 0 5269 host.b
    host.b A 127.0.0.20
    _xmpp-server._tcp.c SRV 0 0 0 .
    _xmpps-server._tcp.d SRV 0 0 0 .
    _xmpp-server._tcp.d SRV 0 0 5269 host.d
    host.d A 127.0.0.25
    e A 127.0.0.30
    e AAAA 2001:db8::30
    _xmpps-server._tcp.f SRV 0 0 0 .
    f A 127.0.0.40
    _xmpp-server._tcp.xn--bcher-kva SRV 0 0 5269 host.b
    """, signed: true)

/// An unsigned zone on the same server, outside every trust anchor.
let plainZone = KnotFixture.Zone(name: "plain.braid.test", body: """
    _xmpp-server._tcp SRV 0 0 5269 host
    host A 127.0.0.50
    """, signed: false)

private let tlsaDigest: [UInt8] = (1 ... 32).map { UInt8($0) }

/// A DS line with the last digit of its digest changed: a trust anchor that matches no key.
func corrupted(_ ds: String) -> String {
    guard let last = ds.last else { return ds }
    return String(ds.dropLast()) + (last == "0" ? "1" : "0")
}

@Suite(.knot([labZone, plainZone, .failing("broken.braid.test")]))
struct UnboundResolverTests {
    var knot: KnotFixture {
        get throws { try #require(KnotFixture.current) }
    }

    /// A resolver that asks knot directly for both zones. resolv.conf points at a closed
    /// loopback port, so nothing leaves the machine.
    func makeResolver(trustAnchors: [String], timeout: Duration = .seconds(10)) throws -> UnboundResolver {
        let knot = try self.knot
        let resolvConf = knot.directory + "/resolv.conf"
        try "nameserver 127.0.0.1\n".write(toFile: resolvConf, atomically: true, encoding: .utf8)
        return try UnboundResolver(configuration: .init(
            resolvConf: resolvConf,
            stubZones: [(zone: "lab.braid.test", addresses: [knot.address]), (zone: "plain.braid.test", addresses: [knot.address])],
            trustAnchors: trustAnchors,
            timeout: timeout
        ))
    }

    func withResolver<T: Sendable>(trustAnchors: [String], _ body: (UnboundResolver) async throws -> T) async throws -> T {
        let resolver = try makeResolver(trustAnchors: trustAnchors)
        do {
            let result = try await body(resolver)
            await resolver.shutdown()
            return result
        } catch {
            await resolver.shutdown()
            throw error
        }
    }

    @Test func theFixtureServesASignedZone() throws {
        let knot = try self.knot
        let ds = try knot.ds(for: "lab.braid.test")
        #expect(ds.hasPrefix("lab.braid.test. DS "))
        #expect(ds.split(separator: " ").count == 6, "owner DS tag algorithm digest-type digest")
        #expect(knot.dsRecords["plain.braid.test"] == nil)
        #expect(kill(knot.pid, 0) == 0, "knotd runs")
    }

    @Test func secureSRVAddressesAndTLSA() async throws {
        let anchor = try knot.ds(for: "lab.braid.test")
        try await withResolver(trustAnchors: [anchor]) { resolver in
            let xmpp = try await resolver.srv("_xmpp-server._tcp.a.lab.braid.test")
            #expect(xmpp.status == .secure)
            #expect(!xmpp.nxdomain)
            #expect(xmpp.ttl > 0 && xmpp.ttl <= 300)
            #expect(Set(xmpp.records) == [
                SRVRecord(priority: 10, weight: 60, port: 5269, target: "xmpp1.a.lab.braid.test"),
                SRVRecord(priority: 10, weight: 40, port: 5269, target: "xmpp2.a.lab.braid.test"),
                SRVRecord(priority: 20, weight: 0, port: 5269, target: "backup.a.lab.braid.test"),
            ])

            let addresses = try await resolver.addresses("xmpp1.a.lab.braid.test")
            #expect(addresses.status == .secure)
            #expect(addresses.records.map(\.description) == ["2001:db8::10", "127.0.0.10"])

            let v4only = try await resolver.addresses("XMPP2.a.lab.braid.test.")
            #expect(v4only.status == .secure)
            #expect(v4only.records.map(\.description) == ["127.0.0.11"])

            let tlsa = try await resolver.tlsa("_5269._tcp.xmpp1.a.lab.braid.test")
            #expect(tlsa.status == .secure)
            #expect(tlsa.records == [TLSARecord(usage: 3, selector: 1, matchingType: 1, data: tlsaDigest)])
        }
    }

    @Test func secureNegativeAnswers() async throws {
        let anchor = try knot.ds(for: "lab.braid.test")
        try await withResolver(trustAnchors: [anchor]) { resolver in
            let nx = try await resolver.srv("_xmpp-server._tcp.nowhere.lab.braid.test")
            #expect(nx.nxdomain && nx.records.isEmpty && nx.status == .secure)
            let nxService = try await resolver.srv("_xmpps-server._tcp.b.lab.braid.test")
            #expect(nxService.nxdomain && nxService.status == .secure)

            // The name exists (it has an A record) but has no SRV.
            let nodata = try await resolver.srv("host.b.lab.braid.test")
            #expect(!nodata.nxdomain && nodata.records.isEmpty && nodata.status == .secure)

            let noTLSA = try await resolver.tlsa("_5269._tcp.host.b.lab.braid.test")
            #expect(noTLSA.records.isEmpty && noTLSA.status == .secure)

            let noV6 = try await resolver.addresses("host.b.lab.braid.test")
            #expect(noV6.records.map(\.description) == ["127.0.0.20"] && noV6.status == .secure)
        }
    }

    @Test func uLabelNamesAreQueriedAsALabels() async throws {
        let anchor = try knot.ds(for: "lab.braid.test")
        try await withResolver(trustAnchors: [anchor]) { resolver in
            let answer = try await resolver.srv("_xmpp-server._tcp.bücher.lab.braid.test")
            #expect(answer.status == .secure)
            #expect(answer.records == [SRVRecord(priority: 0, weight: 0, port: 5269, target: "host.b.lab.braid.test")])
        }
    }

    @Test func anUnsignedZoneOutsideTheAnchorIsInsecure() async throws {
        let anchor = try knot.ds(for: "lab.braid.test")
        try await withResolver(trustAnchors: [anchor]) { resolver in
            let answer = try await resolver.srv("_xmpp-server._tcp.plain.braid.test")
            #expect(answer.status == .insecure)
            #expect(answer.records == [SRVRecord(priority: 0, weight: 0, port: 5269, target: "host.plain.braid.test")])
        }
    }

    @Test func withoutAnyTrustAnchorEverythingIsInsecure() async throws {
        try await withResolver(trustAnchors: []) { resolver in
            let answer = try await resolver.srv("_xmpp-server._tcp.a.lab.braid.test")
            #expect(answer.status == .insecure)
            #expect(answer.records.count == 3)
            let tlsa = try await resolver.tlsa("_5269._tcp.xmpp1.a.lab.braid.test")
            #expect(tlsa.status == .insecure && tlsa.records.count == 1)
        }
    }

    @Test func aWrongTrustAnchorMakesEverythingBogus() async throws {
        let wrong = corrupted(try knot.ds(for: "lab.braid.test"))
        try await withResolver(trustAnchors: [wrong]) { resolver in
            let answer = try await resolver.srv("_xmpp-server._tcp.a.lab.braid.test")
            guard case .bogus(let reason) = answer.status else {
                Issue.record("expected bogus, got \(answer.status)")
                return
            }
            #expect(!reason.isEmpty)
            #expect(answer.records.isEmpty)

            #expect(try await resolver.addresses("xmpp1.a.lab.braid.test").status.isBogus)
            #expect(try await resolver.tlsa("_5269._tcp.xmpp1.a.lab.braid.test").status.isBogus)

            let location = try await XMPPServiceLocator(resolver: resolver).locateServer("a.lab.braid.test")
            guard case .bogus(let why) = location else {
                Issue.record("expected the locator to fail closed, got \(location)")
                return
            }
            #expect(why.contains("_xmpp"))

            // The unsigned zone is not under the (wrong) anchor and still resolves.
            #expect(try await resolver.srv("_xmpp-server._tcp.plain.braid.test").status == .insecure)
        }
    }

    @Test func theLocatorOverRealDNS() async throws {
        let anchor = try knot.ds(for: "lab.braid.test")
        try await withResolver(trustAnchors: [anchor]) { resolver in
            let locator = XMPPServiceLocator(resolver: resolver, random: .seeded(2))

            guard case .targets(let a) = try await locator.locateServer("a.lab.braid.test") else {
                Issue.record("a: no targets")
                return
            }
            #expect(a.count == 4)
            #expect(a.first == ServiceTarget(host: "xmpp1.a.lab.braid.test", port: 5270, directTLS: true, srvSecure: true, viaSRV: true))
            #expect(Set(a[1 ... 2].map(\.host)) == ["xmpp1.a.lab.braid.test", "xmpp2.a.lab.braid.test"])
            #expect(a.last == ServiceTarget(host: "backup.a.lab.braid.test", port: 5269, directTLS: false, srvSecure: true, viaSRV: true))
            #expect(a.allSatisfy { $0.srvSecure && $0.viaSRV })
            #expect(locator.tlsaName(for: a[0]) == "_5270._tcp.xmpp1.a.lab.braid.test")
            let tlsa = try await resolver.tlsa(locator.tlsaName(for: a[0]))
            #expect(tlsa.status == .secure && tlsa.records.first?.usage == 2)

            #expect(try await locator.locateServer("b.lab.braid.test") == .targets([
                ServiceTarget(host: "host.b.lab.braid.test", port: 5269, directTLS: false, srvSecure: true, viaSRV: true)
            ]))
            #expect(try await locator.locateServer("c.lab.braid.test") == .noService)
            #expect(try await locator.locateServer("d.lab.braid.test") == .targets([
                ServiceTarget(host: "host.d.lab.braid.test", port: 5269, directTLS: false, srvSecure: true, viaSRV: true)
            ]))
            #expect(try await locator.locateServer("e.lab.braid.test") == .targets([
                ServiceTarget(host: "e.lab.braid.test", port: 5269, directTLS: false, srvSecure: true, viaSRV: false)
            ]))
            #expect(try await locator.locateServer("f.lab.braid.test") == .noService)
            #expect(try await locator.locateServer("bücher.lab.braid.test") == .targets([
                ServiceTarget(host: "host.b.lab.braid.test", port: 5269, directTLS: false, srvSecure: true, viaSRV: true)
            ]))
            #expect(try await locator.locateServer("plain.braid.test") == .targets([
                ServiceTarget(host: "host.plain.braid.test", port: 5269, directTLS: false, srvSecure: false, viaSRV: true)
            ]))
        }
    }

    @Test func manyConcurrentQueries() async throws {
        let anchor = try knot.ds(for: "lab.braid.test")
        try await withResolver(trustAnchors: [anchor]) { resolver in
            let names = ["a", "b", "c", "d", "e", "f", "nowhere"].map { "_xmpp-server._tcp.\($0).lab.braid.test" }
            try await withThrowingTaskGroup(of: DNSSECStatus.self) { group in
                for index in 0 ..< 60 {
                    group.addTask { try await resolver.srv(names[index % names.count]).status }
                }
                for try await status in group {
                    #expect(status == .secure)
                }
            }
        }
    }

    @Test func aServfailIsAnErrorNotAnEmptyAnswer() async throws {
        // knot cannot load broken.braid.test and answers SERVFAIL for it.
        let knot = try self.knot
        let resolver = try UnboundResolver(configuration: .init(
            forwarders: ["127.0.0.1@1"],
            stubZones: [(zone: "broken.braid.test", addresses: [knot.address])],
            timeout: .seconds(20)
        ))
        let start = ContinuousClock.now
        await #expect(throws: DNSError.serverFailure(name: "_xmpp-server._tcp.broken.braid.test", type: .srv)) {
            try await resolver.srv("_xmpp-server._tcp.broken.braid.test")
        }
        #expect(ContinuousClock.now - start < .seconds(10), "a SERVFAIL comes back, not a timeout")
        await resolver.shutdown()
    }

    @Test func queriesRacingTheirTimeoutNeitherHangNorLeak() async throws {
        // Timeouts close to the answer time make cancellation and delivery race; every
        // query must end with an answer or a timeout, and nothing may stay registered.
        let knot = try self.knot
        let anchor = try knot.ds(for: "lab.braid.test")
        for timeout in [Duration.microseconds(200), .milliseconds(3), .milliseconds(15), .milliseconds(60)] {
            let resolver = try makeResolver(trustAnchors: [anchor], timeout: timeout)
            let outcomes = try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0 ..< 100 {
                    group.addTask {
                        do {
                            _ = try await resolver.srv("_xmpp-server._tcp.q\(index).lab.braid.test")
                            return true
                        } catch DNSError.timeout {
                            return false
                        }
                    }
                }
                return try await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(outcomes.count == 100)
            // Answers whose cancellation came too late are still delivered and unregistered
            // (bounded generously: a run shares the 2 cores with every other suite).
            try await waitUntil(timeout: .seconds(25), "late answers unregistered") { resolver.inFlightCount == 0 }
            await resolver.shutdown()
        }
    }

    @Test func shutdownFailsLaterQueriesAndIsIdempotent() async throws {
        let resolver = try makeResolver(trustAnchors: [])
        _ = try await resolver.srv("_xmpp-server._tcp.b.lab.braid.test")
        await resolver.shutdown()
        await resolver.shutdown()
        await #expect(throws: DNSError.shutdown) { try await resolver.srv("_xmpp-server._tcp.b.lab.braid.test") }
    }
}

/// Failure paths that need no authoritative server at all.
@Suite struct UnboundResolverFailureTests {
    @Test func aSilentServerTimesOutWithinTheConfiguredTime() async throws {
        let blackHole = try LoopbackPorts.silentUDPSocket()
        defer { close(blackHole.fd) }
        let resolver = try UnboundResolver(configuration: .init(
            forwarders: ["127.0.0.1@\(blackHole.port)"],
            stubZones: [(zone: "void.braid.test", addresses: ["127.0.0.1@\(blackHole.port)"])],
            timeout: .milliseconds(300)
        ))
        let start = ContinuousClock.now
        await #expect(throws: DNSError.timeout(name: "_xmpp-server._tcp.void.braid.test", type: .srv)) {
            try await resolver.srv("_xmpp-server._tcp.void.braid.test")
        }
        // The configured 300 ms, not libunbound's minutes of retries; generous for a loaded
        // machine (the suites run in parallel with a PostgreSQL server and the lab).
        #expect(ContinuousClock.now - start < .seconds(10))

        #expect(resolver.inFlightCount == 0)
        await resolver.shutdown()

        // Cancelling the calling task ends the query too: with a timeout long enough that
        // the cancellation always comes first, however loaded the machine (with 300 ms, a
        // slow wake-up let the timeout win).
        let patient = try UnboundResolver(configuration: .init(
            forwarders: ["127.0.0.1@\(blackHole.port)"],
            stubZones: [(zone: "void.braid.test", addresses: ["127.0.0.1@\(blackHole.port)"])],
            timeout: .seconds(60)
        ))
        let task = Task { try await patient.addresses("host.void.braid.test") }
        try await waitUntil { patient.inFlightCount > 0 }
        task.cancel()
        let result = await task.result
        #expect(throws: CancellationError.self) { try result.get() }
        // The queries were withdrawn from libunbound (ub_cancel), not left dangling.
        #expect(patient.inFlightCount == 0)
        await patient.shutdown()
    }

    @Test func shutdownFailsQueriesStillWaiting() async throws {
        let blackHole = try LoopbackPorts.silentUDPSocket()
        defer { close(blackHole.fd) }
        let resolver = try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1@\(blackHole.port)"], timeout: .seconds(120)))
        let task = Task { try await resolver.tlsa("_5269._tcp.host.example.net") }
        // Wait (bounded) until the query is with libunbound: 5 s ran out once, in CI's fourth
        // Swift run with every suite of the run on the 2 cores.
        try await waitUntil(timeout: .seconds(25), "the query with libunbound") { resolver.inFlightCount > 0 }
        #expect(resolver.inFlightCount == 1)
        let start = ContinuousClock.now
        await resolver.shutdown()
        let result = await task.result
        #expect(throws: DNSError.shutdown) { try result.get() }
        // Well below the 120 s timeout: the shutdown ended the query, not the timeout (5 s was
        // exceeded once, 5.3 s, with two test runs and a lab on the 2 cores).
        #expect(ContinuousClock.now - start < .seconds(20))
        #expect(resolver.inFlightCount == 0)
    }

    @Test func invalidConfigurationIsRejected() {
        #expect(throws: DNSError.self) {
            try UnboundResolver(configuration: .init(forwarders: ["not an address"]))
        }
        #expect(throws: DNSError.self) {
            try UnboundResolver(configuration: .init(resolvConf: "/nonexistent/resolv.conf"))
        }
        #expect(throws: DNSError.self) {
            try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1"], stubZones: [(zone: "x.test", addresses: [])]))
        }
        #expect(throws: DNSError.self) {
            try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1"], trustAnchors: ["lab.braid.test. DS not-a-number 13 2 00"]))
        }
        #expect(throws: DNSError.self) {
            try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1"], trustAnchorFile: "/nonexistent/root.key"))
        }
    }

    @Test func ipLiteralsResolveToThemselves() async throws {
        let resolver = try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1"]))
        let answer = try await resolver.addresses("[2001:db8::5]")
        #expect(answer.records.map(\.description) == ["2001:db8::5"])
        #expect(answer.status == .insecure)
        await resolver.shutdown()
    }

    @Test func resolverWithoutShutdownIsReleasedCleanly() async throws {
        // deinit stops the poller thread and frees the context on its own.
        for _ in 0 ..< 5 {
            _ = try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1"]))
        }
        // Also after libunbound's background thread has started.
        let blackHole = try LoopbackPorts.silentUDPSocket()
        defer { close(blackHole.fd) }
        for _ in 0 ..< 3 {
            let resolver = try UnboundResolver(configuration: .init(forwarders: ["127.0.0.1@\(blackHole.port)"], timeout: .milliseconds(50)))
            await #expect(throws: DNSError.self) { try await resolver.srv("_xmpp-server._tcp.example.com") }
        }
    }
}
