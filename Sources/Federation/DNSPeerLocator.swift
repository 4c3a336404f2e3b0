import DNS
import Logging
import NIOCore

/// Finds peers through DNS: SRV for `_xmpps-server` and `_xmpp-server` merged (XEP-0368),
/// the RFC 6120 §3.2 fallback, and DNSSEC status. A bogus answer, "no service", and a failed
/// look-up all fail closed (RFC 7673 §3.1), which senders see as `remote-server-not-found`.
public struct DNSPeerLocator: PeerLocating {
    let locator: XMPPServiceLocator
    let logger: Logger

    public init(locator: XMPPServiceLocator, logger: Logger) {
        self.locator = locator
        self.logger = logger
    }

    public func locate(_ domain: String) async -> PeerLocation {
        do {
            switch try await locator.locateServer(domain) {
            case .targets(let targets):
                return .targets(targets.map { PeerTarget(host: $0.host, port: $0.port, directTLS: $0.directTLS, secure: $0.srvSecure) })
            case .noService:
                return .notFound("\(domain) offers no server-to-server service")
            case .bogus(let reason):
                logger.warning("security: DNSSEC validation failed", metadata: ["domain": "\(domain)", "reason": "\(reason)"])
                return .notFound("DNSSEC validation failed for \(domain)")
            }
        } catch {
            return .notFound("DNS lookup for \(domain) failed: \(error)")
        }
    }

    /// A and AAAA through the validating resolver, never the system's: a bogus answer
    /// skips the target (RFC 7673 §3.2), and so does a name with no addresses.
    public func resolve(_ target: PeerTarget) async throws(TargetResolutionError) -> ResolvedTarget {
        let answer: DNSAnswer<IPAddress>
        do {
            answer = try await locator.resolver.addresses(target.host)
        } catch {
            throw TargetResolutionError(reason: "cannot resolve \(target.host): \(error)")
        }
        if case .bogus(let reason) = answer.status {
            logger.warning("security: DNSSEC validation failed", metadata: ["host": "\(target.host)", "reason": "\(reason)"])
            throw TargetResolutionError(reason: "DNSSEC validation failed for \(target.host)")
        }
        let addresses = answer.records.compactMap { try? $0.socketAddress(port: target.port) }
        guard !addresses.isEmpty else {
            throw TargetResolutionError(reason: "\(target.host) has no address")
        }
        return ResolvedTarget(addresses: addresses, secure: answer.status == .secure)
    }
}
