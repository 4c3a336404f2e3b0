import DNS
import Foundation
import Logging
import NIOCore
import Trust
import X509

/// The production set-up of federation: peers found through DNS over the validating
/// resolver, domains proven by PKIX, POSH (RFC 7711) and DANE (RFC 7673), and peer
/// certificates checked for revocation with OCSP.
extension FederationManager {
    public static func live(
        configuration: FederationConfiguration, resolver: any DNSResolver, host: any FederationHost,
        group: any EventLoopGroup, logger: Logger, metrics: FederationMetrics, wallClock: WallClock = .system
    ) throws -> FederationManager {
        // Peers configured with a host and port are not looked up in DNS, and DANE does not
        // apply to them.
        var staticTargets: [String: [StaticTarget]] = [:]
        for (domain, settings) in configuration.peers {
            guard let host = settings.host, let ascii = try? DNSName.queryName(domain) else { continue }
            let directTLS = settings.directTLS ?? false
            staticTargets[ascii] = [StaticTarget(host: host, port: settings.port ?? (directTLS ? 5270 : 5269), directTLS: directTLS)]
        }
        let serviceLocator = XMPPServiceLocator(resolver: resolver, overrides: staticTargets)
        var overrides: [String: ServerTarget] = [:]
        for (name, address) in configuration.poshConnectOverrides {
            guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
                throw FederationConfigurationError("s2s.posh_connect_overrides.\(name): expected host:port, got \(address)")
            }
            overrides[name] = ServerTarget(host: String(address[..<colon]), port: port)
        }
        let poshFetcher = try POSHHTTPFetcher(
            trustAnchorFiles: configuration.trustAnchorFiles, useSystemTrustStore: configuration.useSystemTrustStore,
            timeout: .seconds(configuration.poshTimeoutSeconds), connectOverrides: overrides, eventLoopGroup: group)
        let ocspRequester = OCSPHTTPRequester(eventLoopGroup: group)
        let revocation: (any RevocationChecking)? = configuration.checkRevocation
            ? OCSPRevocationChecking(checker: OCSPChecker(requester: ocspRequester)) : nil
        // A DANE proof lives at least three re-validation intervals, however short the DNS
        // TTLs: every pass renews it once it has less than two intervals left, so one slow or
        // failed look-up (a resolver timing out) no longer lapses it and resets the link
        // (seen in the lab: 30 s proofs renewed every 30 s). A changed TLSA record takes
        // effect within that time.
        let daneLifetime = Duration.seconds(max(30, 3 * configuration.revalidationIntervalSeconds))
        return try FederationManager(
            configuration: configuration, host: host,
            locator: DNSPeerLocator(locator: serviceLocator, logger: logger),
            group: group, logger: logger, metrics: metrics,
            additionalProofs: { validator in
                // Fetched again before a pass would find the proof about to lapse (PairProofs'
                // renewal margin), so a renewal gets a new `expires` while the old one holds.
                [POSHProof(fetcher: poshFetcher, refreshAhead: .seconds(configuration.renewalMarginSeconds)),
                 DANEProof(source: DNSDANESource(locator: serviceLocator, minimumLifetime: daneLifetime), validator: validator)]
            },
            revocation: revocation,
            wallClock: wallClock,
            onShutdown: [
                { await poshFetcher.shutdown() },
                { await ocspRequester.shutdown() },
            ])
    }
}

/// A configuration value federation cannot use.
public struct FederationConfigurationError: Error, Sendable, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// OCSP (RFC 6960) as federation's revocation check. A soft failure (no responder, no
/// answer) is not a revocation; it is tried again later.
struct OCSPRevocationChecking: RevocationChecking {
    let checker: OCSPChecker

    func check(chain: [Certificate], at time: Date) async -> RevocationVerdict {
        switch await checker.check(chain: chain, at: time) {
        case .good(let next):
            RevocationVerdict(status: .good, nextCheck: next)
        case .revoked(let reason):
            RevocationVerdict(status: .revoked(reason), nextCheck: nil)
        case .unknown(let reason, let next):
            RevocationVerdict(status: .unknown(reason), nextCheck: next)
        }
    }
}
