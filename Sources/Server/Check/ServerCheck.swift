import DNS
import Federation
import Foundation
import Logging
import NIOCore
import Trust
import X509
import XMPPCore

/// One name `braid check` looks at: a hosted domain or one of its service domains.
public struct CheckedName: Sendable, Hashable {
    public enum Kind: String, Sendable, Hashable, Codable {
        /// A hosted domain: accounts, so client records matter too.
        case hosted
        /// `conference.DOMAIN` and the like: peers reach it, clients do not log in to it.
        case service
    }

    /// U-label form.
    public var domain: String
    public var kind: Kind
    /// The hosted domain a service domain belongs to.
    public var parent: String?

    public init(domain: String, kind: Kind = .hosted, parent: String? = nil) {
        self.domain = domain
        self.kind = kind
        self.parent = parent
    }

    /// Every name the server serves for `hosted`: each hosted domain followed by its service
    /// domains. The service labels come from the modules as the server freezes them
    /// (`ModuleBuilder` with the operator's `services` settings, as `BraidServer` does for
    /// its `DomainRegistry`), so a moved or disabled service is checked where it really is.
    public static func served(hosted: [String], configuration: BraidConfiguration) throws(ConfigurationError) -> [CheckedName] {
        let labels = try ModuleBuilder.with(StandardModules.all(configuration), serviceSettings: configuration.services).freeze().serviceLabels.sorted()
        var names: [CheckedName] = []
        var seen = Set<String>()
        // A set: the ACME service asks for every hosted domain at once (10,000 of them).
        let hostedSet = Set(hosted)
        for domain in hosted where seen.insert(domain).inserted {
            names.append(CheckedName(domain: domain))
            for label in labels {
                let service = "\(label).\(domain)"
                // A service name that is itself hosted is checked as the hosted domain it is.
                guard !hostedSet.contains(service), seen.insert(service).inserted else { continue }
                names.append(CheckedName(domain: service, kind: .service, parent: domain))
            }
        }
        return names
    }
}

/// `braid check`: what a peer, a client or a DNS-validating server would find wrong with
/// the names this server serves, before they find it. Reads DNS (SRV, addresses, TLSA, with
/// DNSSEC status), the certificates the server would present, POSH documents, and opens a
/// TCP connection to each server target; changes nothing.
///
/// Certificates are loaded exactly as the server loads them (``CertificateManager``: the
/// configured files, then `<data>/certs`), but none is generated: a missing certificate is
/// reported, not made.
public struct ServerCheck: Sendable {
    public let configuration: BraidConfiguration
    /// The certificates the server would present.
    public let certificates: TLSContextStore
    let resolver: any DNSResolver
    let locator: XMPPServiceLocator
    let posh: (any POSHFetching)?
    let group: any EventLoopGroup
    let connectTimeout: Duration
    /// A certificate expiring sooner than this is a warning.
    let expiryWarning: TimeInterval
    let now: Date
    let logger: Logger
    /// Configured certificate files that could not be loaded.
    let certificateProblems: [CheckResult]
    /// For the PKIX usages of TLSA records (PKIX-TA, PKIX-EE): the roots peers would use.
    let validator: PeerCertificateValidator
    /// Domains checked at the same time.
    let concurrency: Int

    /// - Parameters:
    ///   - resolver: the DNS to ask; the CLI builds it from the `dns` section as the server does.
    ///   - posh: fetches POSH documents; nil skips the POSH check.
    ///   - connectTimeout: for each TCP connect of the reachability check.
    ///   - expiryWarningDays: a certificate with fewer days left is a warning.
    ///   - now: the time certificates are judged at.
    public init(
        configuration: BraidConfiguration, resolver: any DNSResolver, posh: (any POSHFetching)?, eventLoopGroup: any EventLoopGroup,
        connectTimeout: Duration = .seconds(5), expiryWarningDays: Int = 14, now: Date = Date(), concurrency: Int = 8,
        logger: Logger = Logger(label: "braid.check")
    ) {
        self.configuration = configuration
        self.resolver = resolver
        self.locator = XMPPServiceLocator(resolver: resolver)
        self.posh = posh
        self.group = eventLoopGroup
        self.connectTimeout = connectTimeout
        self.expiryWarning = TimeInterval(expiryWarningDays) * 86_400
        self.now = now
        self.logger = logger
        self.concurrency = max(1, concurrency)

        var quiet = logger
        quiet.logLevel = .error
        let manager = CertificateManager(directory: "\(configuration.dataDirectory)/certs", selfSignMissing: false,
                                         domains: DomainRegistry(), logger: quiet)
        var problems: [CheckResult] = []
        for file in configuration.tls.certificates {
            do {
                try manager.loadConfigured([file])
            } catch {
                problems.append(CheckResult(.configuration, .error, "tls.certificates: \(file.certificate) cannot be used: \(error)",
                                            hint: "Fix the file (PEM chain, leaf first, with its key in \(file.key)); the server refuses to start with it."))
            }
        }
        try? manager.loadDirectory()
        certificates = manager.store
        certificateProblems = problems

        var roots: [Certificate] = configuration.s2s.useSystemTrustStore ? PeerTrustAnchors.systemRoots() : []
        for file in configuration.s2s.trustAnchorFiles {
            roots += (try? PeerTrustAnchors.load(pemFile: file)) ?? []
        }
        validator = PeerCertificateValidator(anchors: PeerTrustAnchors(defaultRoots: roots))
    }

    /// Checks the configuration, then every name, `concurrency` names at a time. Domains come
    /// back in the order given.
    public func run(_ names: [CheckedName]) async -> CheckReport {
        logger.info("checking", metadata: ["names": "\(names.count)"])
        let reports = await withTaskGroup(of: (Int, DomainCheckReport).self) { group in
            var collected: [(Int, DomainCheckReport)] = []
            var next = 0
            for _ in 0 ..< min(concurrency, names.count) {
                let index = next
                group.addTask { (index, await self.check(names[index])) }
                next += 1
            }
            while let finished = await group.next() {
                collected.append(finished)
                if next < names.count {
                    let index = next
                    group.addTask { (index, await self.check(names[index])) }
                    next += 1
                }
            }
            return collected.sorted { $0.0 < $1.0 }.map(\.1)
        }
        return CheckReport(domains: reports, configuration: configurationChecks())
    }

    // MARK: Configuration

    /// Findings about options that exist in ``BraidConfiguration`` (once per run).
    public func configurationChecks() -> [CheckResult] {
        var results = certificateProblems
        let s2s = configuration.s2s
        if s2s.enabled {
            var anchorFiles = s2s.trustAnchorFiles.map { ("s2s.trust_anchor_files", $0) }
            for (peer, settings) in s2s.peers.sorted(by: { $0.key < $1.key }) {
                anchorFiles += (settings.trustAnchorFiles ?? []).map { ("s2s.peers.\(peer).trust_anchor_files", $0) }
            }
            for (index, provider) in s2s.providerTrust.enumerated() {
                anchorFiles += provider.trustAnchorFiles.map { ("s2s.provider_trust[\(index)].trust_anchor_files", $0) }
            }
            for (key, file) in anchorFiles {
                do {
                    _ = try PeerTrustAnchors.load(pemFile: file)
                } catch {
                    results.append(CheckResult(.configuration, .error, "\(key): \(file) cannot be read: \(error)",
                                               hint: "Give a PEM file of CA certificates; without it those peers cannot be validated."))
                }
            }
            if s2s.requireCertificates && !s2s.useSystemTrustStore && s2s.trustAnchorFiles.isEmpty {
                // Only DANE-EE proves a certificate without roots, and only with DNSSEC.
                let dane = configuration.dns.trustAnchorFile != nil
                results.append(CheckResult(
                    .configuration, dane ? .warning : .error,
                    "s2s.require_certificates is on but no CA is trusted (use_system_trust_store: false, no trust_anchor_files): "
                        + (dane ? "only peers with DANE-EE records can be accepted" : "no peer can prove its domain, so every peer is refused"),
                    hint: "Set s2s.use_system_trust_store: true, or list CA files in s2s.trust_anchor_files, or turn s2s.require_certificates off."))
            }
            if configuration.tls.selfSignMissing {
                results.append(CheckResult(
                    .configuration, .warning,
                    "tls.self_sign_missing is on while federating: a name without a certificate gets a self-signed one, which peers cannot validate",
                    hint: "Install CA-issued certificates (tls.certificates) and set tls.self_sign_missing: false; keep self-signing for local testing."))
            }
            if s2s.starttlsPort == nil && s2s.directTLSPort == nil {
                results.append(CheckResult(
                    .configuration, .warning, "federation is on but both s2s listeners are off: peers cannot connect to this server",
                    hint: "Set s2s.starttls_port (5269) and/or s2s.direct_tls_port (5270)."))
            }
            if let file = configuration.dns.trustAnchorFile {
                if !FileManager.default.isReadableFile(atPath: file) {
                    results.append(CheckResult(.configuration, .error, "dns.trust_anchor_file: \(file) cannot be read",
                                               hint: "Point it at the DNS root key, e.g. /usr/share/dns/root.key (Debian package dns-root-data)."))
                }
            } else {
                results.append(CheckResult(
                    .configuration, .warning,
                    "dns.trust_anchor_file is not set: no DNS answer validates, so DANE is never used and every DNSSEC status below is insecure",
                    hint: "Set dns.trust_anchor_file: /usr/share/dns/root.key (Debian package dns-root-data)."))
            }
        } else {
            results.append(CheckResult(.configuration, .ok, "federation is off (s2s.enabled: false): server records, TLSA, POSH and reachability are not checked"))
        }
        if !configuration.c2s.requireTLS {
            results.append(CheckResult(.configuration, .warning, "c2s.require_tls is off: clients may log in and chat without encryption",
                                       hint: "Set c2s.require_tls: true (RFC 6120 §5.3.1)."))
        }
        if results.isEmpty {
            results.append(CheckResult(.configuration, .ok, "configuration: nothing to report"))
        }
        return results
    }
}

extension ServerCheck {
    /// Runs the checks as `braid check` does: DNS through a validating resolver built from
    /// the `dns` section and POSH through a fetcher built from the `s2s` section, the way
    /// the server builds them; both are shut down before it returns.
    /// - Parameter timeout: for each DNS query, TCP connect and POSH fetch.
    public static func runLive(configuration: BraidConfiguration, names: [CheckedName], timeout: Duration,
                               eventLoopGroup: any EventLoopGroup, logger: Logger) async throws -> CheckReport {
        let dns = configuration.dns
        let resolver = try UnboundResolver(configuration: .init(
            resolvConf: dns.resolvConf, forwarders: dns.forwarders, trustAnchorFile: dns.trustAnchorFile, timeout: timeout), logger: logger)
        var fetcher: POSHHTTPFetcher?
        if configuration.s2s.enabled {
            var overrides: [String: ServerTarget] = [:]
            // `host:port` per domain, as federation reads s2s.posh_connect_overrides.
            for (name, address) in configuration.s2s.poshConnectOverrides {
                guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else { continue }
                overrides[name] = ServerTarget(host: String(address[..<colon]), port: port)
            }
            do {
                fetcher = try POSHHTTPFetcher(
                    trustAnchorFiles: configuration.s2s.trustAnchorFiles, useSystemTrustStore: configuration.s2s.useSystemTrustStore,
                    timeout: timeout, connectOverrides: overrides, eventLoopGroup: eventLoopGroup)
            } catch {
                // An unreadable trust anchor file is reported by the configuration checks;
                // POSH is then not checked.
                logger.warning("POSH fetcher unavailable", metadata: ["error": "\(error)"])
            }
        }
        let check = ServerCheck(configuration: configuration, resolver: resolver, posh: fetcher, eventLoopGroup: eventLoopGroup,
                                connectTimeout: timeout, logger: logger)
        let report = await check.run(names)
        await fetcher?.shutdown()
        await resolver.shutdown()
        return report
    }
}
