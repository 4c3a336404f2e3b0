import Testing
import TestSupport

@testable import DNS

/// Wire-format name helper: labels → length-prefixed bytes with the terminating zero.
private func wireName(_ labels: [String]) -> [UInt8] {
    labels.flatMap { [UInt8($0.utf8.count)] + Array($0.utf8) } + [0]
}

@Suite struct SRVRdataTests {
    @Test func parsesPriorityWeightPortAndLowerCasesTheTarget() throws {
        let rdata: [UInt8] = [0, 10, 0, 60, 0x14, 0x95] + wireName(["XMPP1", "Example", "com"])
        let record = try SRVRecord(rdata: rdata)
        #expect(record == SRVRecord(priority: 10, weight: 60, port: 5269, target: "xmpp1.example.com"))
        #expect(!record.isNoService)
    }

    @Test func theRootTargetIsADotAndMeansNoService() throws {
        let record = try SRVRecord(rdata: [0, 0, 0, 0, 0, 0, 0])
        #expect(record.target == ".")
        #expect(record.isNoService)
    }

    @Test func largeFieldValuesAreBigEndian() throws {
        let record = try SRVRecord(rdata: [0xFF, 0xFE, 0x01, 0x02, 0xFF, 0xFF] + wireName(["a"]))
        #expect(record.priority == 0xFFFE)
        #expect(record.weight == 0x0102)
        #expect(record.port == 0xFFFF)
    }

    @Test func oddBytesInALabelAreEscapedNotTakenAsSeparators() throws {
        let rdata: [UInt8] = [0, 0, 0, 0, 0, 1] + [3, UInt8(ascii: "a"), UInt8(ascii: "."), 0xC3] + wireName(["com"])
        let record = try SRVRecord(rdata: rdata)
        #expect(record.target == "a\\046\\195.com")
    }

    @Test(arguments: [
        ("empty", [UInt8]()),
        ("only priority", [0, 1]),
        ("no target", [0, 1, 0, 2, 0, 3]),
        ("label runs past end", [0, 1, 0, 2, 0, 3, 5, 0x61, 0x62]),
        ("missing root label", [0, 1, 0, 2, 0, 3, 1, 0x61]),
        ("compression pointer", [0, 1, 0, 2, 0, 3, 0xC0, 0x0C]),
        ("extended label type", [0, 1, 0, 2, 0, 3, 0x41, 0x61, 0]),
        ("trailing bytes", [0, 1, 0, 2, 0, 3, 1, 0x61, 0, 0xFF]),
    ] as [(String, [UInt8])])
    func malformedSRVIsATypedError(_ label: String, _ rdata: [UInt8]) {
        #expect(throws: DNSError.self, "\(label)") { try SRVRecord(rdata: rdata) }
        do {
            _ = try SRVRecord(rdata: rdata)
        } catch {
            guard case .malformedRecord(let type, _) = error else {
                Issue.record("\(label): unexpected \(error)")
                return
            }
            #expect(type == .srv)
        }
    }

    @Test func aNameLongerThan255OctetsIsRejected() {
        // 5 labels of 63 bytes: 5 × 64 + 1 = 321 octets.
        let label = String(repeating: "a", count: 63)
        let rdata: [UInt8] = [0, 0, 0, 0, 0, 1] + wireName(Array(repeating: label, count: 5))
        #expect(throws: DNSError.self) { try SRVRecord(rdata: rdata) }
    }
}

@Suite struct TLSAAndAddressRdataTests {
    @Test func parsesTLSA() throws {
        let digest = (1 ... 32).map { UInt8($0) }
        let record = try TLSARecord(rdata: [3, 1, 1] + digest)
        #expect(record == TLSARecord(usage: 3, selector: 1, matchingType: 1, data: digest))
        #expect(record.description.hasPrefix("3 1 1 0102030405"))
    }

    @Test(arguments: [[], [3], [3, 1], [3, 1, 1]] as [[UInt8]])
    func truncatedTLSAIsATypedError(_ rdata: [UInt8]) {
        #expect(throws: DNSError.self) { try TLSARecord(rdata: rdata) }
    }

    @Test func parsesAAndAAAA() throws {
        let v4 = try IPAddress(rdata: [192, 0, 2, 1], type: .a)
        #expect(v4.description == "192.0.2.1")
        #expect(v4.family == .v4)
        let v6 = try IPAddress(rdata: [0x20, 0x01, 0x0D, 0xB8] + Array(repeating: 0, count: 11) + [1], type: .aaaa)
        #expect(v6.description == "2001:db8::1")
        #expect(v6.family == .v6)
    }

    @Test(arguments: [
        ([UInt8](), DNSRecordType.a),
        ([1, 2, 3], .a),
        ([1, 2, 3, 4, 5], .a),
        ([1, 2, 3, 4], .aaaa),
        (Array(repeating: 0, count: 17), .aaaa),
        ([1, 2, 3, 4], .srv),
    ] as [([UInt8], DNSRecordType)])
    func wrongAddressLengthsAreTypedErrors(_ rdata: [UInt8], _ type: DNSRecordType) {
        #expect(throws: DNSError.self) { try IPAddress(rdata: rdata, type: type) }
    }

    @Test func addressTextAndSocketAddresses() throws {
        #expect(IPAddress("192.0.2.7")?.bytes == [192, 0, 2, 7])
        #expect(IPAddress("[2001:db8::7]")?.description == "2001:db8::7")
        #expect(IPAddress("::ffff:192.0.2.1")?.family == .v6)
        #expect(IPAddress("example.com") == nil)
        #expect(IPAddress("300.1.1.1") == nil)
        let address = try #require(IPAddress("127.0.0.1")).socketAddress(port: 5269)
        #expect(address.port == 5269)
        #expect(address.ipAddress == "127.0.0.1")
    }
}

@Suite struct UnboundResultMappingTests {
    @Test func bogusWinsOverTheServfailItComesWith() throws {
        let raw = RawResult(rcode: 2, bogus: true, whyBogus: "validation failure <x>: DS hash mismatches key", ttl: 60)
        let mapped = try UnboundResolver.interpret(raw, name: "x", type: .srv)
        #expect(mapped.status == .bogus(reason: "validation failure <x>: DS hash mismatches key"))
        #expect(mapped.rdata.isEmpty)
    }

    @Test func bogusWithoutAReasonStillCarriesOne() throws {
        let mapped = try UnboundResolver.interpret(RawResult(rcode: 0, haveData: true, bogus: true, rdata: [[1]]), name: "x", type: .a)
        guard case .bogus(let reason) = mapped.status else {
            Issue.record("not bogus: \(mapped.status)")
            return
        }
        #expect(!reason.isEmpty)
        #expect(mapped.rdata.isEmpty, "bogus data must not be handed out")
    }

    @Test func servfailWithoutBogusThrows() {
        #expect(throws: DNSError.serverFailure(name: "x", type: .srv)) {
            try UnboundResolver.interpret(RawResult(rcode: 2), name: "x", type: .srv)
        }
    }

    @Test func otherRcodesThrow() {
        #expect(throws: DNSError.responseCode(name: "x", type: .tlsa, rcode: 5)) {
            try UnboundResolver.interpret(RawResult(rcode: 5), name: "x", type: .tlsa)
        }
    }

    @Test func nxdomainAndNodata() throws {
        let nx = try UnboundResolver.interpret(RawResult(rcode: 3, nxdomain: true, secure: true, ttl: 300), name: "x", type: .srv)
        #expect(nx.nxdomain && nx.rdata.isEmpty && nx.status == .secure && nx.ttl == 300)
        let nodata = try UnboundResolver.interpret(RawResult(rcode: 0, haveData: false, secure: false, ttl: -5, rdata: [[1, 2]]), name: "x", type: .srv)
        #expect(!nodata.nxdomain && nodata.rdata.isEmpty && nodata.status == .insecure && nodata.ttl == 0)
    }

    @Test func secureData() throws {
        let mapped = try UnboundResolver.interpret(RawResult(rcode: 0, haveData: true, secure: true, ttl: 42, rdata: [[1, 2, 3, 4]]), name: "x", type: .a)
        #expect(mapped.status == .secure)
        #expect(mapped.rdata == [[1, 2, 3, 4]])
        #expect(mapped.ttl == 42)
    }
}

@Suite struct DNSNameAndStatusTests {
    @Test func queryNamesAreLowerCaseALabels() throws {
        #expect(try DNSName.queryName("Example.COM.") == "example.com")
        #expect(try DNSName.queryName("bücher.example") == "xn--bcher-kva.example")
        #expect(try DNSName.queryName("_xmpp-server._tcp.Bücher.example") == "_xmpp-server._tcp.xn--bcher-kva.example")
        #expect(try DNSName.queryName("_5269._TCP.xmpp.example.") == "_5269._tcp.xmpp.example")
    }

    @Test(arguments: ["", ".", "..", "a..b", "_xmpp-server._tcp", "_bad label.example", "192.0.2.1", "[::1]", "_x._tcp.[::1]", String(repeating: "a.", count: 130) + "com"])
    func invalidQueryNames(_ name: String) {
        #expect(throws: DNSError.invalidName(name)) { try DNSName.queryName(name) }
    }

    @Test func ipLiterals() {
        #expect(DNSName.ipLiteral("192.0.2.1")?.description == "192.0.2.1")
        #expect(DNSName.ipLiteral("[2001:db8::1]")?.description == "2001:db8::1")
        #expect(DNSName.ipLiteral("add.be") == nil)
        #expect(DNSName.ipLiteral("example.com") == nil)
    }

    @Test func statusCombinationTakesTheWeaker() {
        let bogus = DNSSECStatus.bogus(reason: "r")
        #expect(DNSSECStatus.secure.combined(with: .secure) == .secure)
        #expect(DNSSECStatus.secure.combined(with: .insecure) == .insecure)
        #expect(DNSSECStatus.insecure.combined(with: .secure) == .insecure)
        #expect(DNSSECStatus.secure.combined(with: bogus) == bogus)
        #expect(bogus.combined(with: .insecure) == bogus)
        #expect(DNSSECStatus.insecure.combined(with: bogus) == bogus)
    }

    @Test func addressAnswersMerge() throws {
        let v6 = try #require(IPAddress("2001:db8::1"))
        let v4 = try #require(IPAddress("192.0.2.1"))
        let merged = DNSAnswer.merging(
            aaaa: DNSAnswer(records: [v6], status: .secure, ttl: 100, nxdomain: false),
            a: DNSAnswer(records: [v4], status: .insecure, ttl: 50, nxdomain: false)
        )
        #expect(merged == DNSAnswer(records: [v6, v4], status: .insecure, ttl: 50, nxdomain: false))
        let bogus = DNSAnswer.merging(aaaa: .bogus("x"), a: .secure([v4]))
        #expect(bogus.records.isEmpty && bogus.status.isBogus)
        let nx = DNSAnswer<IPAddress>.merging(aaaa: .nxdomain(secure: true), a: .nxdomain(secure: true))
        #expect(nx.nxdomain && nx.status == .secure)
    }
}
