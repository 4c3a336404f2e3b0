/// Why a DNS look-up produced no usable answer.
///
/// A DNSSEC validation failure is *not* an error: it is an answer whose status is
/// ``DNSSECStatus/bogus(reason:)``, so that callers cannot mistake it for "no records".
public enum DNSError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The name cannot be turned into a DNS query name (bad IDNA, empty label, too long).
    case invalidName(String)
    /// Record data from the network does not parse as the type says.
    case malformedRecord(type: DNSRecordType, reason: String)
    /// The server answered SERVFAIL without a DNSSEC failure behind it (a broken or
    /// unreachable authoritative server, for example).
    case serverFailure(name: String, type: DNSRecordType)
    /// Any other non-success RCODE, such as REFUSED (5).
    case responseCode(name: String, type: DNSRecordType, rcode: Int)
    /// libunbound itself failed (its `ub_ctx_err` code and message).
    case resolver(code: Int32, message: String)
    /// The resolver's configuration was rejected (an option, trust anchor or address).
    case configuration(String)
    /// No answer within the configured timeout.
    case timeout(name: String, type: DNSRecordType)
    /// The resolver was shut down.
    case shutdown

    public var description: String {
        switch self {
        case .invalidName(let name): "invalid DNS name \(name)"
        case .malformedRecord(let type, let reason): "malformed \(type) record: \(reason)"
        case .serverFailure(let name, let type): "SERVFAIL for \(name) \(type)"
        case .responseCode(let name, let type, let rcode): "RCODE \(rcode) for \(name) \(type)"
        case .resolver(let code, let message): "resolver error \(code): \(message)"
        case .configuration(let message): "resolver configuration: \(message)"
        case .timeout(let name, let type): "timed out resolving \(name) \(type)"
        case .shutdown: "resolver is shut down"
        }
    }
}
