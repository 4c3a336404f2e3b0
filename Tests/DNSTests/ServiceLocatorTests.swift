import DNS
import Testing
import TestSupport

private func srv(_ priority: UInt16, _ weight: UInt16, _ port: UInt16, _ target: String) -> SRVRecord {
    SRVRecord(priority: priority, weight: weight, port: port, target: target)
}

private let noService = srv(0, 0, 0, ".")

@Suite struct ServiceLocatorTests {
    // MARK: Static overrides

    @Test func aStaticOverrideWinsAndSkipsDNS() async throws {
        let resolver = FakeResolver(srv: ["_xmpp-server._tcp.example.com": .success(.secure([srv(0, 0, 5269, "dns.example.com")]))])
        let locator = XMPPServiceLocator(
            resolver: resolver,
            overrides: ["Example.com": [StaticTarget(host: "10.0.0.1", port: 5270, directTLS: true), StaticTarget(host: "backup.example.net")]]
        )
        let location = try await locator.locateServer("example.com")
        #expect(location == .targets([
            ServiceTarget(host: "10.0.0.1", port: 5270, directTLS: true, srvSecure: false, viaSRV: false),
            ServiceTarget(host: "backup.example.net", port: 5269, directTLS: false, srvSecure: false, viaSRV: false),
        ]))
        #expect(resolver.queried.isEmpty)
    }

    @Test func overrideKeysMatchWhicheverLabelFormIsUsed() async throws {
        let resolver = FakeResolver()
        let locator = XMPPServiceLocator(resolver: resolver, overrides: ["bücher.example": [StaticTarget(host: "h.example")]])
        #expect(try await locator.locateServer("xn--bcher-kva.example") == .targets([
            ServiceTarget(host: "h.example", port: 5269, directTLS: false, srvSecure: false, viaSRV: false)
        ]))
        #expect(try await locator.locateServer("BÜCHER.example.") != .noService)
        #expect(resolver.queried.isEmpty)
    }

    @Test func anEmptyOverrideMeansNoService() async throws {
        let locator = XMPPServiceLocator(resolver: FakeResolver(), overrides: ["example.com": []])
        #expect(try await locator.locateServer("example.com") == .noService)
    }

    // MARK: Merging and ordering

    @Test func bothServicesMergeIntoOneOrderByPriority() async throws {
        let resolver = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .success(.secure([srv(5, 0, 5270, "tls.example.com"), srv(30, 0, 443, "tls443.example.com")])),
            "_xmpp-server._tcp.example.com": .success(.insecure([srv(10, 0, 5269, "a.example.com"), srv(20, 0, 5269, "b.example.com")])),
        ])
        let location = try await XMPPServiceLocator(resolver: resolver, random: .seeded(1)).locateServer("example.com")
        #expect(location == .targets([
            ServiceTarget(host: "tls.example.com", port: 5270, directTLS: true, srvSecure: true, viaSRV: true),
            ServiceTarget(host: "a.example.com", port: 5269, directTLS: false, srvSecure: false, viaSRV: true),
            ServiceTarget(host: "b.example.com", port: 5269, directTLS: false, srvSecure: false, viaSRV: true),
            ServiceTarget(host: "tls443.example.com", port: 443, directTLS: true, srvSecure: true, viaSRV: true),
        ]))
        #expect(Set(resolver.queried) == ["_xmpps-server._tcp.example.com", "_xmpp-server._tcp.example.com"])
    }

    @Test func aFixedSeedGivesAFixedOrder() async throws {
        let resolver = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .success(.secure([srv(10, 20, 5270, "d1.example.com")])),
            "_xmpp-server._tcp.example.com": .success(.secure([
                srv(10, 50, 5269, "s1.example.com"), srv(10, 30, 5269, "s2.example.com"),
                srv(10, 0, 5269, "s0.example.com"), srv(20, 10, 5269, "late.example.com"),
            ])),
        ])
        func hosts(_ seed: UInt64) async throws -> [String] {
            guard case .targets(let targets) = try await XMPPServiceLocator(resolver: resolver, random: .seeded(seed)).locateServer("example.com") else {
                Issue.record("no targets")
                return []
            }
            return targets.map(\.host)
        }
        let first = try await hosts(42)
        #expect(first == ["s2.example.com", "d1.example.com", "s1.example.com", "s0.example.com", "late.example.com"])
        #expect(try await hosts(42) == first, "same seed, same order")
        // Priority always dominates weight.
        for seed in UInt64(0) ..< 50 {
            #expect(try await hosts(seed).last == "late.example.com")
        }
    }

    @Test func weightsDecideTheFirstPickProportionally() {
        // RFC 2782 draws from 0...sum (inclusive), so with weights 60/30/10 the first entry
        // wins 61 of 101 draws, the others 30 and 10.
        let items = [("a", UInt16(60)), ("b", 30), ("c", 10)]
        let random = RandomSource.seeded(7)
        var firsts: [String: Int] = [:]
        var seconds: [String: Int] = [:]
        let draws = 10_000
        for _ in 0 ..< draws {
            let order = XMPPServiceLocator.rfc2782Order(items, priority: { _ in 0 }, weight: { $0.1 }, random: random)
            #expect(order.count == 3 && Set(order.map(\.0)) == ["a", "b", "c"])
            firsts[order[0].0, default: 0] += 1
            seconds[order[1].0, default: 0] += 1
        }
        func share(_ count: Int?) -> Double { Double(count ?? 0) / Double(draws) }
        #expect(abs(share(firsts["a"]) - 61.0 / 101) < 0.02)
        #expect(abs(share(firsts["b"]) - 30.0 / 101) < 0.02)
        #expect(abs(share(firsts["c"]) - 10.0 / 101) < 0.015)
        // Second place: after a (p 61/101) b wins 31/41; after b, a wins 61/71; after c, a 61/91.
        let expectedSecondB = 61.0 / 101 * 31.0 / 41 + 10.0 / 101 * 30.0 / 91
        #expect(abs(share(seconds["b"]) - expectedSecondB) < 0.02)
    }

    @Test func zeroWeightEntriesAreRarelyFirst() {
        let items = [("heavy", UInt16(100)), ("zero", 0)]
        let random = RandomSource.seeded(99)
        var zeroFirst = 0
        for _ in 0 ..< 10_000 {
            if XMPPServiceLocator.rfc2782Order(items, priority: { _ in 0 }, weight: { $0.1 }, random: random)[0].0 == "zero" {
                zeroFirst += 1
            }
        }
        // Expected 1/101 of the draws, about 99.
        #expect((40 ... 170).contains(zeroFirst))
    }

    @Test func allZeroWeightsKeepTheAnswerOrder() {
        let items = ["x", "y", "z"]
        let order = XMPPServiceLocator.rfc2782Order(items, priority: { _ in 1 }, weight: { _ in 0 }, random: .seeded(3))
        #expect(order == items)
    }

    // MARK: "." targets

    @Test func aDotInXMPPServerMeansNoService() async throws {
        let resolver = FakeResolver(srv: ["_xmpp-server._tcp.example.com": .success(.secure([noService]))])
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("example.com") == .noService)
    }

    @Test func aDotInXMPPSServerOnlyRemovesDirectTLS() async throws {
        let resolver = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .success(.secure([noService])),
            "_xmpp-server._tcp.example.com": .success(.secure([srv(0, 0, 5269, "xmpp.example.com")])),
        ])
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("example.com") == .targets([
            ServiceTarget(host: "xmpp.example.com", port: 5269, directTLS: false, srvSecure: true, viaSRV: true)
        ]))
    }

    @Test func aDotInXMPPSServerWithNothingElseIsNoServiceNotAFallback() async throws {
        // XEP-0368 §5: the "." shows SRV is in use, so no A/AAAA fallback.
        let resolver = FakeResolver(srv: ["_xmpps-server._tcp.example.com": .success(.secure([noService]))])
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("example.com") == .noService)
    }

    @Test func dotsInBothServicesAreNoService() async throws {
        let resolver = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .success(.insecure([noService])),
            "_xmpp-server._tcp.example.com": .success(.insecure([noService])),
        ])
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("example.com") == .noService)
    }

    @Test func aDotInXMPPServerLeavesDirectTLSTargets() async throws {
        // Each "." speaks only for its own service.
        let resolver = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .success(.insecure([srv(0, 0, 5270, "tls.example.com")])),
            "_xmpp-server._tcp.example.com": .success(.insecure([noService])),
        ])
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("example.com") == .targets([
            ServiceTarget(host: "tls.example.com", port: 5270, directTLS: true, srvSecure: false, viaSRV: true)
        ]))
    }

    @Test func aDotMixedWithRealTargetsIsIgnored() async throws {
        let resolver = FakeResolver(srv: [
            "_xmpp-server._tcp.example.com": .success(.insecure([noService, srv(1, 0, 5269, "real.example.com")]))
        ])
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("example.com") == .targets([
            ServiceTarget(host: "real.example.com", port: 5269, directTLS: false, srvSecure: false, viaSRV: true)
        ]))
    }

    // MARK: Fallback

    @Test func noSRVAtAllFallsBackToTheDomainOn5269() async throws {
        let nx = FakeResolver()
        #expect(try await XMPPServiceLocator(resolver: nx).locateServer("Example.com") == .targets([
            ServiceTarget(host: "example.com", port: 5269, directTLS: false, srvSecure: false, viaSRV: false)
        ]))
        let provenAbsent = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .success(.nodata(secure: true)),
            "_xmpp-server._tcp.example.com": .success(.nxdomain(secure: true)),
        ])
        #expect(try await XMPPServiceLocator(resolver: provenAbsent).locateServer("example.com") == .targets([
            ServiceTarget(host: "example.com", port: 5269, directTLS: false, srvSecure: true, viaSRV: false)
        ]))
    }

    @Test func uLabelDomainsAreQueriedAsALabels() async throws {
        let resolver = FakeResolver()
        let location = try await XMPPServiceLocator(resolver: resolver).locateServer("bücher.example")
        #expect(location == .targets([ServiceTarget(host: "xn--bcher-kva.example", port: 5269, directTLS: false, srvSecure: false, viaSRV: false)]))
        #expect(Set(resolver.queried) == ["_xmpps-server._tcp.xn--bcher-kva.example", "_xmpp-server._tcp.xn--bcher-kva.example"])
    }

    @Test func ipLiteralDomainsNeedNoDNS() async throws {
        let resolver = FakeResolver()
        #expect(try await XMPPServiceLocator(resolver: resolver).locateServer("[2001:db8::1]") == .targets([
            ServiceTarget(host: "2001:db8::1", port: 5269, directTLS: false, srvSecure: false, viaSRV: false)
        ]))
        #expect(resolver.queried.isEmpty)
    }

    // MARK: Failures

    @Test(arguments: ["_xmpps-server._tcp.example.com", "_xmpp-server._tcp.example.com"])
    func aBogusSRVAnswerFailsClosed(_ bogusName: String) async throws {
        let good = "_xmpps-server._tcp.example.com" == bogusName ? "_xmpp-server._tcp.example.com" : "_xmpps-server._tcp.example.com"
        let resolver = FakeResolver(srv: [
            bogusName: .success(.bogus("signature expired")),
            good: .success(.secure([srv(0, 0, 5269, "xmpp.example.com")])),
        ])
        let location = try await XMPPServiceLocator(resolver: resolver).locateServer("example.com")
        #expect(location == .bogus("\(bogusName): signature expired"))
    }

    @Test func aFailedLookupThrows() async {
        let resolver = FakeResolver(srv: [
            "_xmpps-server._tcp.example.com": .failure(.serverFailure(name: "_xmpps-server._tcp.example.com", type: .srv)),
            "_xmpp-server._tcp.example.com": .success(.insecure([srv(0, 0, 5269, "xmpp.example.com")])),
        ])
        await #expect(throws: DNSError.serverFailure(name: "_xmpps-server._tcp.example.com", type: .srv)) {
            try await XMPPServiceLocator(resolver: resolver).locateServer("example.com")
        }
    }

    @Test func invalidDomainsThrow() async {
        await #expect(throws: DNSError.self) {
            try await XMPPServiceLocator(resolver: FakeResolver()).locateServer("bad..domain")
        }
    }

    // MARK: TLSA

    @Test func tlsaNameIsPortTcpHost() {
        let locator = XMPPServiceLocator(resolver: FakeResolver())
        #expect(locator.tlsaName(for: ServiceTarget(host: "xmpp.example.com", port: 5270, directTLS: true, srvSecure: true, viaSRV: true)) == "_5270._tcp.xmpp.example.com")
    }
}

@Suite struct ReconnectBackoffTests {
    @Test func theFirstDelayIsWithinTheInitialWindow() {
        for seed in UInt64(0) ..< 500 {
            var backoff = ReconnectBackoff(random: .seeded(seed))
            let delay = backoff.nextDelay()
            #expect(delay >= .zero && delay <= .seconds(60))
        }
    }

    @Test func laterDelaysGrowExponentiallyWithJitterUpToTheCap() {
        var backoff = ReconnectBackoff(initialWindow: .milliseconds(100), base: .seconds(1), maximum: .seconds(10), random: .seeded(5))
        #expect(backoff.nextDelay() <= .milliseconds(100))
        let ceilings: [Duration] = [.seconds(1), .seconds(2), .seconds(4), .seconds(8), .seconds(10), .seconds(10), .seconds(10)]
        for ceiling in ceilings {
            let delay = backoff.nextDelay()
            #expect(delay >= ceiling / 2 && delay <= ceiling, "\(delay) outside \(ceiling / 2)...\(ceiling)")
        }
        #expect(backoff.attempts == 8)
        // Far along, still capped and no overflow.
        for _ in 0 ..< 200 {
            #expect(backoff.nextDelay() <= .seconds(10))
        }
    }

    @Test func resetStartsOverWithTheInitialWindow() {
        var backoff = ReconnectBackoff(initialWindow: .milliseconds(50), base: .seconds(30), maximum: .seconds(60), random: .seeded(11))
        for _ in 0 ..< 5 { _ = backoff.nextDelay() }
        backoff.reset()
        #expect(backoff.attempts == 0)
        #expect(backoff.nextDelay() <= .milliseconds(50))
        #expect(backoff.nextDelay() >= .seconds(15))
    }

    @Test func jitterSpreadsTheFirstDelay() {
        var delays: Set<Duration> = []
        for seed in UInt64(0) ..< 50 {
            var backoff = ReconnectBackoff(random: .seeded(seed))
            delays.insert(backoff.nextDelay())
        }
        #expect(delays.count > 40)
    }

    @Test func defaultsFollowRFC6120() {
        let backoff = ReconnectBackoff()
        #expect(backoff.initialWindow == .seconds(60))
        #expect(backoff.maximum >= backoff.base)
    }
}
