import DNS
import Foundation
import Trust

/// TLSA records for the DANE prooftype, from DNSSEC-validated DNS (RFC 7673 §3).
///
/// The chain of look-ups, and what each answer means (RFC 7673 §3.1–§3.4):
/// 1. **SRV** at `_xmpps-server._tcp.D` and `_xmpp-server._tcp.D` (XEP-0368, RFC 6120 §3.2).
///    A bogus answer, or a look-up failure other than "no records", is ``DANELookup/bogus(_:)``
///    (§3.1: abort). Only targets from a *secure* answer are DNSSEC-authenticated delegates of
///    D, so only they can carry DANE; the targets of an insecure answer get ``DANELookup/none``.
///    With no SRV records at all, the RFC 6120 fallback target `D:5269` counts as secure when
///    both answers securely deny the records (the same rule as ``XMPPServiceLocator``). A
///    static override or an IP-literal domain is not DNS-authenticated: ``DANELookup/none``.
/// 2. **A/AAAA** of the target. Bogus or indeterminate ⇒ `.bogus` (§3.2: do not use that
///    target); insecure or empty ⇒ `.none` (§3.2: no secure address, no TLSA query).
/// 3. **TLSA** at `_PORT._tcp.HOST` (§3.3). Bogus or indeterminate ⇒ `.bogus` (§3.4);
///    insecure or no records ⇒ `.none`; secure records ⇒ ``DANELookup/secure(_:expires:)``.
///
/// For an outgoing connection (`target` given) the target must be one the domain's secure
/// SRV answer lists, host and port; otherwise DANE does not apply (`.none`): the records of
/// some other host say nothing about D. For an incoming one (`target` nil) every secure target
/// of D is looked up (at most ``maximumTargets``) and their associations are merged: any bogus
/// answer among them makes the whole result `.bogus` (fail closed), insecure targets are
/// skipped; each target's records are reduced by digest agility before they are merged.
/// ``DANEProof`` then uses only DANE-EE records for incoming peers.
///
/// Expiry: the look-up time plus the smallest TTL among the SRV, address and TLSA answers
/// used (at least ``minimumLifetime``, so that a record at the end of its cache life does
/// not make every stanza re-prove the domain).
///
/// Names go to DNS in A-label form (RFC 7673 §8): ``DNSName/queryName(_:)``.
public struct DNSDANESource: DANERecordSource {
    public let locator: XMPPServiceLocator
    /// The most SRV targets looked up for an incoming peer, so that a domain with a huge SRV
    /// set cannot make us send hundreds of queries per stream.
    public let maximumTargets: Int
    /// The shortest lifetime given to a result.
    public let minimumLifetime: TimeInterval
    private let now: @Sendable () -> Date

    /// - Parameters:
    ///   - locator: its resolver answers the queries; its static overrides switch DANE off for
    ///     the overridden domains.
    ///   - maximumTargets: SRV targets looked up at most for an incoming peer.
    ///   - minimumLifetime: lower bound of a result's lifetime.
    ///   - now: the clock, for tests.
    public init(
        locator: XMPPServiceLocator,
        maximumTargets: Int = 16,
        minimumLifetime: Duration = .seconds(30),
        now: @escaping @Sendable () -> Date = Date.init
    ) {
        self.locator = locator
        self.maximumTargets = max(1, maximumTargets)
        let components = minimumLifetime.components
        self.minimumLifetime = max(0, TimeInterval(components.seconds) + TimeInterval(components.attoseconds) / 1e18)
        self.now = now
    }

    private var resolver: any DNSResolver { locator.resolver }

    public func associations(for domain: String, target: ServerTarget?) async -> DANELookup {
        let started = now()
        let discovery: Discovery
        do {
            discovery = try await discover(domain)
        } catch {
            // Connecting, a failed SRV look-up aborts (RFC 7673 §3.1). Receiving, a look-up
            // that did not answer is no evidence either way: other proofs may still apply.
            guard target != nil else { return .none }
            return .bogus("SRV look-up for \(domain) failed: \(error) (RFC 7673 §3.1)")
        }
        let secureTargets: [ServerTarget]
        let srvTTL: UInt32
        switch discovery {
        case .bogus(let reason): return .bogus(reason)
        case .notAuthenticated: return .none
        case .targets(let targets, let ttl):
            secureTargets = targets
            srvTTL = ttl
        }

        if let target {
            guard let host = try? DNSName.queryName(target.host),
                  let listed = secureTargets.first(where: { $0.host == host && $0.port == target.port })
            else {
                // Not (securely) a target of this domain: its TLSA records do not speak for it.
                return .none
            }
            switch await lookUp(listed) {
            case .bogus(let reason): return .bogus(reason)
            case .none: return .none
            case .secure(let associations, let ttl):
                return .secure(associations, expires: expiry(started, ttls: [srvTTL, ttl]))
            }
        }

        var found: [TLSAAssociation] = []
        var ttls: [UInt32] = [srvTTL]
        let results = await withTaskGroup(of: TargetResult.self) { group in
            for candidate in secureTargets.prefix(maximumTargets) {
                group.addTask { await self.lookUp(candidate) }
            }
            var collected: [TargetResult] = []
            for await result in group { collected.append(result) }
            return collected
        }
        for result in results {
            switch result {
            case .bogus(let reason): return .bogus(reason)
            case .none: continue
            case .secure(let associations, let ttl):
                ttls.append(ttl)
                // Digest agility is per RRset (RFC 7671 §9): apply it before merging.
                for association in TLSAAssociation.strongestDigests(associations.filter(\.isUsable)) where !found.contains(association) {
                    found.append(association)
                }
            }
        }
        guard !found.isEmpty else { return .none }
        return .secure(found, expires: expiry(started, ttls: ttls))
    }

    // MARK: SRV

    private enum Discovery {
        /// The DNSSEC-authenticated targets (deduplicated) and the smaller SRV TTL.
        case targets([ServerTarget], ttl: UInt32)
        /// No DNS-authenticated target: DANE does not apply.
        case notAuthenticated
        case bogus(String)
    }

    /// The secure targets, from the locator's reading of the domain's SRV answers (one
    /// implementation of overrides, IP literals and the two queries; the second look-up of
    /// the same names is answered from the resolver's cache).
    private func discover(_ domain: String) async throws -> Discovery {
        guard case .answers(let ascii, let direct, let startTLS) = try await locator.discoverServer(domain) else {
            // A static override or an IP-literal domain: not DNS-authenticated.
            return .notAuthenticated
        }
        if let reason = XMPPServiceLocator.bogusReason(ascii, direct: direct, startTLS: startTLS) {
            return .bogus(reason)
        }
        let ttl = min(direct.ttl, startTLS.ttl)
        if direct.records.isEmpty, startTLS.records.isEmpty {
            // RFC 6120 §3.2.2 fallback; authenticated only if both denials are secure.
            guard direct.status.isSecure, startTLS.status.isSecure else { return .notAuthenticated }
            return .targets([ServerTarget(host: ascii, port: XMPPServiceLocator.defaultPort)], ttl: ttl)
        }
        var targets: [ServerTarget] = []
        for answer in [direct, startTLS] where answer.status.isSecure {
            for record in answer.records where !record.isNoService {
                let target = ServerTarget(host: record.target, port: Int(record.port))
                if !targets.contains(target) { targets.append(target) }
            }
        }
        return targets.isEmpty ? .notAuthenticated : .targets(targets, ttl: ttl)
    }

    // MARK: Addresses and TLSA

    private enum TargetResult: Sendable {
        case secure([TLSAAssociation], ttl: UInt32)
        case none
        case bogus(String)
    }

    private func lookUp(_ target: ServerTarget) async -> TargetResult {
        let addresses: DNSAnswer<IPAddress>
        do {
            addresses = try await resolver.addresses(target.host)
        } catch {
            return .bogus("addresses of \(target.host) are indeterminate: \(error) (RFC 7673 §3.2)")
        }
        if case .bogus(let reason) = addresses.status {
            return .bogus("addresses of \(target.host): \(reason) (RFC 7673 §3.2)")
        }
        // §3.2: without a secure address, TLSA must not even be queried.
        guard addresses.status.isSecure, !addresses.records.isEmpty else { return .none }

        let name = "_\(target.port)._tcp.\(target.host)"
        let tlsa: DNSAnswer<TLSARecord>
        do {
            tlsa = try await resolver.tlsa(name)
        } catch {
            return .bogus("TLSA at \(name) is indeterminate: \(error) (RFC 7673 §3.4)")
        }
        if case .bogus(let reason) = tlsa.status {
            return .bogus("TLSA at \(name): \(reason) (RFC 7673 §3.4)")
        }
        guard tlsa.status.isSecure, !tlsa.records.isEmpty else { return .none }
        return .secure(tlsa.records.map(TLSAAssociation.init), ttl: min(addresses.ttl, tlsa.ttl))
    }

    private func expiry(_ start: Date, ttls: [UInt32]) -> Date {
        let ttl = TimeInterval(ttls.min() ?? 0)
        return start + max(ttl, minimumLifetime)
    }
}

extension TLSAAssociation {
    /// The association a DNS TLSA record carries.
    public init(_ record: TLSARecord) {
        self.init(usage: record.usage, selector: record.selector, matchingType: record.matchingType, data: record.data)
    }
}
