/// A configured connection target that replaces DNS discovery for one domain.
public struct StaticTarget: Sendable, Hashable {
    public var host: String
    public var port: Int
    /// Connect with TLS straight away (XEP-0368) instead of STARTTLS.
    public var directTLS: Bool

    public init(host: String, port: Int = XMPPServiceLocator.defaultPort, directTLS: Bool = false) {
        self.host = host
        self.port = port
        self.directTLS = directTLS
    }
}

/// One place to try to connect to, in the order ``XMPPServiceLocator`` chose.
public struct ServiceTarget: Sendable, Hashable, CustomStringConvertible {
    /// The host to resolve and connect to: a lower-case A-label name without trailing dot,
    /// or an IP address.
    public var host: String
    public var port: Int
    /// From `_xmpps-server` (XEP-0368): TLS from the first byte, SNI = the service domain,
    /// ALPN `xmpp-server`, never STARTTLS. Otherwise STARTTLS as in RFC 6120.
    public var directTLS: Bool
    /// The SRV answer this target came from was DNSSEC-secure, so the target host is an
    /// authenticated delegate of the service domain: it may be added as a reference
    /// identifier, and DANE (TLSA at ``XMPPServiceLocator/tlsaName(for:)``) applies once its
    /// addresses are secure too (RFC 7673 §3.1, §4.1). For the no-SRV fallback it means both
    /// SRV look-ups securely proved that no records exist.
    public var srvSecure: Bool
    /// The target came from SRV; false for the RFC 6120 fallback and for static overrides.
    public var viaSRV: Bool

    public init(host: String, port: Int, directTLS: Bool, srvSecure: Bool, viaSRV: Bool) {
        self.host = host
        self.port = port
        self.directTLS = directTLS
        self.srvSecure = srvSecure
        self.viaSRV = viaSRV
    }

    public var description: String {
        "\(host):\(port)\(directTLS ? " (direct TLS)" : "")\(srvSecure ? " [secure]" : "")\(viaSRV ? "" : " [no SRV]")"
    }
}

/// What discovery found for a domain.
public enum ServiceLocation: Sendable, Hashable {
    /// Try these in order. Stop at the first that connects; see ``XMPPServiceLocator`` for
    /// why the caller must not then try the domain's own A/AAAA records.
    case targets([ServiceTarget])
    /// The domain says it offers no server-to-server service (SRV target `.`), or a static
    /// override lists no targets.
    case noService
    /// DNSSEC validation of an SRV answer failed. Fail closed: do not connect at all
    /// (RFC 7673 §3.1).
    case bogus(String)
}

/// Finds where to connect for server-to-server traffic to a domain (RFC 6120 §3.2,
/// XEP-0368, RFC 7673 §3.1).
///
/// Rules, in order:
/// 1. A static override for the domain wins and no DNS is asked (an empty override list
///    means ``ServiceLocation/noService``). An IP-literal domain is used as it is, on 5269.
/// 2. `_xmpps-server._tcp.D` and `_xmpp-server._tcp.D` are queried in parallel. If either
///    answer is bogus, the result is ``ServiceLocation/bogus(_:)``. If either look-up throws
///    (SERVFAIL, timeout, ...), `locateServer` throws: RFC 7673 §3.1 says to abort on any
///    failure other than "no records".
/// 3. If neither name has any record (NXDOMAIN or NODATA for both), the domain itself on
///    port 5269 with STARTTLS (RFC 6120 §3.2.2), `viaSRV == false`.
/// 4. Otherwise `.` targets are dropped. A `.` in `_xmpp-server` means no STARTTLS service
///    (RFC 6120 §3.2.1) and a `.` in `_xmpps-server` no direct TLS (XEP-0368 §5). If no
///    target is left, the result is ``ServiceLocation/noService``: SRV records existed, so
///    there is no A/AAAA fallback (XEP-0368 §5). Note that `_xmpps-server` targets alone
///    still count when `_xmpp-server` is `.`: each `.` speaks only for its own service.
/// 5. The remaining targets of both services form one set (XEP-0368 §3): ascending priority,
///    and within a priority the RFC 2782 weighted random order.
///
/// **The caller's duty (RFC 6120 §3.2.1, last step).** When SRV targets were returned and
/// none of them can be connected to, the caller must give up (`remote-server-not-found` /
/// `remote-server-timeout`). It must *not* then try A/AAAA of the domain itself: that
/// fallback exists only when no SRV records exist, and this type already returns it as a
/// target in that case.
public struct XMPPServiceLocator: Sendable {
    /// The port of the RFC 6120 fallback, registered for xmpp-server.
    public static let defaultPort = 5269

    public let resolver: any DNSResolver
    /// Static targets by domain, keyed by the domain's A-label form.
    public let overrides: [String: [StaticTarget]]
    public let random: RandomSource

    public init(resolver: any DNSResolver, overrides: [String: [StaticTarget]] = [:], random: RandomSource = .system) {
        self.resolver = resolver
        var normalized: [String: [StaticTarget]] = [:]
        for (domain, targets) in overrides {
            let key = (try? DNSName.queryName(domain)) ?? domain.lowercased()
            normalized[key, default: []] += targets
        }
        self.overrides = normalized
        self.random = random
    }

    /// Discovers the connection targets for `domain` (U-label or A-label form).
    public func locateServer(_ domain: String) async throws -> ServiceLocation {
        switch try await discoverServer(domain) {
        case .configured(let location):
            return location
        case .answers(let ascii, let direct, let startTLS):
            return location(ascii, direct: direct, startTLS: startTLS)
        }
    }

    /// What discovery rests on: a configured location (a static override, or an IP-literal
    /// domain), or the two SRV answers (XEP-0368) as DNS gave them, with their DNSSEC status
    /// and TTLs. ``locateServer(_:)`` orders the targets; the DANE prooftype takes the
    /// secure ones from the same answers (RFC 7673 §3.1), so both follow one reading of the
    /// domain's records.
    public enum ServerDiscovery: Sendable {
        /// No DNS was asked: nothing here is DNS-authenticated.
        case configured(ServiceLocation)
        /// `name` is the domain's A-label form.
        case answers(name: String, direct: DNSAnswer<SRVRecord>, startTLS: DNSAnswer<SRVRecord>)
    }

    /// Rule 1 and the queries of rule 2 (see the type's rules); throws when a look-up fails.
    public func discoverServer(_ domain: String) async throws -> ServerDiscovery {
        if let literal = DNSName.ipLiteral(domain) {
            if let targets = overrides[domain.lowercased()] { return .configured(Self.location(for: targets)) }
            return .configured(.targets([ServiceTarget(host: literal.description, port: Self.defaultPort, directTLS: false, srvSecure: false, viaSRV: false)]))
        }
        let ascii = try DNSName.queryName(domain)
        if let targets = overrides[ascii] {
            return .configured(Self.location(for: targets))
        }
        async let directAnswer = resolver.srv("_xmpps-server._tcp." + ascii)
        async let startTLSAnswer = resolver.srv("_xmpp-server._tcp." + ascii)
        let (direct, startTLS) = try await (directAnswer, startTLSAnswer)
        return .answers(name: ascii, direct: direct, startTLS: startTLS)
    }

    /// Why the SRV answers for `ascii` cannot be used, if either failed DNSSEC validation
    /// (RFC 7673 §3.1: abort).
    public static func bogusReason(_ ascii: String, direct: DNSAnswer<SRVRecord>, startTLS: DNSAnswer<SRVRecord>) -> String? {
        if case .bogus(let reason) = direct.status { return "_xmpps-server._tcp.\(ascii): \(reason)" }
        if case .bogus(let reason) = startTLS.status { return "_xmpp-server._tcp.\(ascii): \(reason)" }
        return nil
    }

    /// Rules 2 (bogus) to 5 on the two answers for `ascii`.
    private func location(_ ascii: String, direct: DNSAnswer<SRVRecord>, startTLS: DNSAnswer<SRVRecord>) -> ServiceLocation {
        if let reason = Self.bogusReason(ascii, direct: direct, startTLS: startTLS) {
            return .bogus(reason)
        }
        if direct.records.isEmpty, startTLS.records.isEmpty {
            return .targets([
                ServiceTarget(
                    host: ascii, port: Self.defaultPort, directTLS: false,
                    srvSecure: direct.status.isSecure && startTLS.status.isSecure, viaSRV: false
                )
            ])
        }

        var candidates: [Candidate] = []
        for record in direct.records where !record.isNoService {
            candidates.append(Candidate(record: record, directTLS: true, secure: direct.status.isSecure))
        }
        for record in startTLS.records where !record.isNoService {
            candidates.append(Candidate(record: record, directTLS: false, secure: startTLS.status.isSecure))
        }
        guard !candidates.isEmpty else { return .noService }
        let ordered = Self.rfc2782Order(candidates, priority: \.record.priority, weight: \.record.weight, random: random)
        return .targets(ordered.map { candidate in
            ServiceTarget(
                host: candidate.record.target, port: Int(candidate.record.port), directTLS: candidate.directTLS,
                srvSecure: candidate.secure, viaSRV: true
            )
        })
    }

    /// The TLSA owner name for a target: `_PORT._tcp.HOST` (RFC 7673 §3.3, RFC 6698 §3).
    public func tlsaName(for target: ServiceTarget) -> String {
        "_\(target.port)._tcp.\(target.host)"
    }

    private struct Candidate {
        var record: SRVRecord
        var directTLS: Bool
        var secure: Bool
    }

    private static func location(for targets: [StaticTarget]) -> ServiceLocation {
        guard !targets.isEmpty else { return .noService }
        return .targets(targets.map { target in
            ServiceTarget(host: target.host, port: target.port, directTLS: target.directTLS, srvSecure: false, viaSRV: false)
        })
    }

    /// Orders `items` as RFC 2782 describes: by ascending priority; within a priority,
    /// repeatedly pick one at random with probability proportional to its weight. As the RFC
    /// says, zero-weight items are put first before each pick, and the random number is
    /// drawn from `0 ... sum of weights`, so a zero-weight item is picked only when the draw
    /// is 0. Otherwise items keep their input order. Stable for equal inputs.
    public static func rfc2782Order<Item>(
        _ items: [Item],
        priority: (Item) -> UInt16,
        weight: (Item) -> UInt16,
        random: RandomSource
    ) -> [Item] {
        let byPriority = Dictionary(grouping: items.indices, by: { priority(items[$0]) })
        var ordered: [Item] = []
        ordered.reserveCapacity(items.count)
        for level in byPriority.keys.sorted() {
            guard let indices = byPriority[level] else { continue }
            // Zero weights first, otherwise input order.
            var remaining = indices.filter { weight(items[$0]) == 0 } + indices.filter { weight(items[$0]) != 0 }
            while !remaining.isEmpty {
                let total = remaining.reduce(UInt64(0)) { $0 + UInt64(weight(items[$1])) }
                let draw = random.uniform(in: 0 ... total)
                var running: UInt64 = 0
                var chosen = remaining.count - 1
                for (position, index) in remaining.enumerated() {
                    running += UInt64(weight(items[index]))
                    if running >= draw {
                        chosen = position
                        break
                    }
                }
                ordered.append(items[remaining.remove(at: chosen)])
            }
        }
        return ordered
    }
}
