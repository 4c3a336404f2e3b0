import DNS
import Synchronization

/// A scripted ``DNSResolver`` for testing the layers above DNS. Names not scripted answer
/// NXDOMAIN (insecure). Every queried name is logged, in the A-label form a real resolver
/// would send.
final class FakeResolver: DNSResolver {
    private let srvAnswers: [String: Result<DNSAnswer<SRVRecord>, DNSError>]
    private let addressAnswers: [String: Result<DNSAnswer<IPAddress>, DNSError>]
    private let tlsaAnswers: [String: Result<DNSAnswer<TLSARecord>, DNSError>]
    private let log = Mutex<[String]>([])

    init(
        srv: [String: Result<DNSAnswer<SRVRecord>, DNSError>] = [:],
        addresses: [String: Result<DNSAnswer<IPAddress>, DNSError>] = [:],
        tlsa: [String: Result<DNSAnswer<TLSARecord>, DNSError>] = [:]
    ) {
        self.srvAnswers = srv
        self.addressAnswers = addresses
        self.tlsaAnswers = tlsa
    }

    var queried: [String] { log.withLock { $0 } }

    func srv(_ name: String) async throws -> DNSAnswer<SRVRecord> {
        try answer(name, srvAnswers)
    }

    func addresses(_ host: String) async throws -> DNSAnswer<IPAddress> {
        try answer(host, addressAnswers)
    }

    func tlsa(_ name: String) async throws -> DNSAnswer<TLSARecord> {
        try answer(name, tlsaAnswers)
    }

    private func answer<Record>(_ name: String, _ table: [String: Result<DNSAnswer<Record>, DNSError>]) throws -> DNSAnswer<Record> {
        let qname = try DNSName.queryName(name)
        log.withLock { $0.append(qname) }
        return try table[qname]?.get() ?? DNSAnswer(records: [], status: .insecure, ttl: 0, nxdomain: true)
    }
}

extension DNSAnswer {
    static func secure(_ records: [Record]) -> Self {
        DNSAnswer(records: records, status: .secure, ttl: 300, nxdomain: false)
    }

    static func insecure(_ records: [Record]) -> Self {
        DNSAnswer(records: records, status: .insecure, ttl: 300, nxdomain: false)
    }

    static func bogus(_ reason: String) -> Self {
        DNSAnswer(records: [], status: .bogus(reason: reason), ttl: 0, nxdomain: false)
    }

    static func nxdomain(secure: Bool = false) -> Self {
        DNSAnswer(records: [], status: secure ? .secure : .insecure, ttl: 300, nxdomain: true)
    }

    static func nodata(secure: Bool = false) -> Self {
        DNSAnswer(records: [], status: secure ? .secure : .insecure, ttl: 300, nxdomain: false)
    }
}
