/// The DNS look-ups XMPP federation needs, each with its DNSSEC status.
///
/// ``UnboundResolver`` is the real implementation; tests of the layers above can supply
/// fakes. Names may be given as U-labels; implementations query the A-label form
/// (``DNSName/queryName(_:)``, RFC 7673 §8).
///
/// Contract shared by all implementations:
/// - A name that does not exist is an answer with `nxdomain == true` and no records; a name
///   without records of the type is an answer with no records (NODATA). Neither throws.
/// - A DNSSEC validation failure is an answer with status ``DNSSECStatus/bogus(reason:)``
///   and no records. It never throws and is never reported as insecure.
/// - Everything else that leaves no answer (SERVFAIL, other RCODEs, timeouts, resolver
///   failures, malformed record data) throws a ``DNSError``.
public protocol DNSResolver: Sendable {
    /// SRV records at `name`, e.g. `_xmpp-server._tcp.example.com`.
    func srv(_ name: String) async throws -> DNSAnswer<SRVRecord>
    /// A and AAAA records of `host`, merged (IPv6 first, then IPv4, each in answer order).
    /// The status is the weaker of the two answers' (``DNSSECStatus/combined(with:)``), the
    /// TTL the smaller, and `nxdomain` is set only when both say so.
    func addresses(_ host: String) async throws -> DNSAnswer<IPAddress>
    /// TLSA records at `name`, e.g. `_5269._tcp.xmpp.example.com`.
    func tlsa(_ name: String) async throws -> DNSAnswer<TLSARecord>
}

extension DNSAnswer where Record == IPAddress {
    /// Merges the AAAA and A answers for one host as ``DNSResolver/addresses(_:)`` describes.
    public static func merging(aaaa: DNSAnswer<IPAddress>, a: DNSAnswer<IPAddress>) -> DNSAnswer<IPAddress> {
        let status = aaaa.status.combined(with: a.status)
        return DNSAnswer(
            records: status.isBogus ? [] : aaaa.records + a.records,
            status: status,
            ttl: min(aaaa.ttl, a.ttl),
            nxdomain: aaaa.nxdomain && a.nxdomain
        )
    }
}
