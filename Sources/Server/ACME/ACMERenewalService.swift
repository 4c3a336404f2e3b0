import Admin
import Crypto
import Federation
import Foundation
import Logging
import Metrics
import NIOCore
import Synchronization
import Trust
import X509
import XMPPCore
import XMPPStream

/// `braid_acme_orders_total{outcome}`: orders placed, by how they ended (`success`,
/// `failure`, `rate_limited`). Kept here rather than in ``ServerMetrics`` since only this
/// service counts them.
struct ACMEMetrics: Sendable {
    static let ordersLabel = "braid_acme_orders_total"

    /// `braid_https_malformed_client_hello_total`: HTTPS connections closed because their
    /// ClientHello could not be parsed (read only when TLS-ALPN-01 is on).
    static let malformedClientHelloLabel = "braid_https_malformed_client_hello_total"

    let success: Counter
    let failure: Counter
    let rateLimited: Counter
    let malformedClientHello: Counter

    init(registry: MetricsRegistry) {
        success = Counter(label: Self.ordersLabel, dimensions: [("outcome", "success")], factory: registry)
        failure = Counter(label: Self.ordersLabel, dimensions: [("outcome", "failure")], factory: registry)
        rateLimited = Counter(label: Self.ordersLabel, dimensions: [("outcome", "rate_limited")], factory: registry)
        malformedClientHello = Counter(label: Self.malformedClientHelloLabel, factory: registry)
    }
}

/// Keeps a CA-issued certificate on every hosted domain (`acme`, RFC 8555).
///
/// Every `renew_check_interval_seconds` it walks the hosted domains; for each one not
/// excluded it reads `<data>/certs/DOMAIN.crt` and places one order covering the domain and
/// its service domains when that certificate is missing, self-signed, lacks one of the
/// names, or is past two thirds of its lifetime. The new certificate and key are written
/// beside it (each atomically) and the server's reload path installs them, so new
/// handshakes present them at once. A failed order changes no file, so the old certificate
/// stays; the domain is then left alone for a delay that doubles with each failure (capped),
/// and at least as long as the CA's Retry-After.
public final class ACMERenewalService: Sendable {
    /// Why a domain gets an order.
    public enum Reason: String, Sendable, Equatable {
        case missing, selfSigned = "self-signed", namesMissing = "names-missing", renewal
    }

    /// What the service knows about one hosted domain.
    public struct DomainStatus: Sendable, Equatable {
        /// Failed orders in a row.
        public var failures = 0
        /// No order before this time (after a failure).
        public var notBefore: Date?
        public var lastError: String?
        public var lastIssued: Date?
    }

    /// First delay after a failure, and the longest.
    public static let backoffBase: TimeInterval = 60
    public static let backoffCap: TimeInterval = 86_400
    /// A rate limit without Retry-After waits at least this long.
    public static let rateLimitFloor: TimeInterval = 3600
    /// How often the hosted-domain list is looked at for new domains between full passes.
    static let newDomainPollInterval: Duration = .seconds(2)

    private let settings: BraidConfiguration.ACMESettings
    private let configuration: BraidConfiguration
    private let dataDirectory: String
    private let certificatesDirectory: String
    private let domains: DomainRegistry
    private let clock: WallClock
    private let metrics: ACMEMetrics
    private let group: any EventLoopGroup
    private let logger: Logger
    private let excluded: Set<String>
    /// HTTP-01 key authorisations on offer, by token.
    public let tokens = ACMEChallengeTokens()
    /// TLS-ALPN-01 validation certificates on offer, by name.
    public let tlsALPNCertificates = ACMETLSALPNCertificates()

    private struct Running: Sendable {
        var client: ACMEClient?
        var listener: HTTP01Listener?
        /// `acme.challenges` less those with no listener to answer them.
        var challenges: [ACMEChallengeType] = []
        var loop: Task<Void, Never>?
        var checking = false
        var passes = 0
        var statuses: [String: DomainStatus] = [:]
    }

    private let state = Mutex(Running())

    init(configuration: BraidConfiguration, certificatesDirectory: String, domains: DomainRegistry, clock: WallClock,
         registry: MetricsRegistry, group: any EventLoopGroup, logger: Logger) {
        self.settings = configuration.acme
        self.configuration = configuration
        self.dataDirectory = configuration.dataDirectory
        self.certificatesDirectory = certificatesDirectory
        self.domains = domains
        self.clock = clock
        self.metrics = ACMEMetrics(registry: registry)
        self.group = group
        self.logger = logger
        self.excluded = Set(configuration.acme.excludeDomains.map { (try? JID(domain: $0).domainpart) ?? $0.lowercased() })
    }

    /// What the HTTPS listener needs to answer TLS-ALPN-01 validations; nil when
    /// `tls-alpn-01` is not among `acme.challenges` (the listener then reads no ClientHello).
    var listenerChallenges: TLSALPNChallenges? {
        guard settings.challenges.contains(.tlsALPN01) else { return nil }
        let certificates = tlsALPNCertificates
        let counter = metrics.malformedClientHello
        return TLSALPNChallenges(context: { certificates.context(forServerName: $0) }, malformed: { _ in counter.increment() })
    }

    /// The challenge types in use once started.
    public var challenges: [ACMEChallengeType] {
        state.withLock { $0.challenges }
    }

    /// The HTTP-01 listener's port once started.
    public var httpPort: Int? {
        state.withLock { $0.listener?.port }
    }

    /// Passes over the hosted domains finished so far (tests wait on it).
    public var passesCompleted: Int {
        state.withLock { $0.passes }
    }

    public func status(for domain: String) -> DomainStatus? {
        state.withLock { $0.statuses[domain] }
    }

    /// Loads (or creates) the account key, binds the HTTP-01 listener and starts the checks.
    /// - Parameters:
    ///   - httpsPort: the HTTPS listener's port, nil when it is not running (no TLS-ALPN-01).
    ///   - installed: the server's reload path, called after certificates were written.
    func start(httpsPort: Int?, installed: @escaping @Sendable () -> Void) async throws {
        var challenges = settings.challenges.reduce(into: [ACMEChallengeType]()) { if !$0.contains($1) { $0.append($1) } }
        if httpsPort == nil, challenges.contains(.tlsALPN01) {
            challenges.removeAll { $0 == .tlsALPN01 }
            logger.warning("ACME: tls-alpn-01 needs the HTTPS listener (admin.posh_port), which is not running; not answering it")
        }
        guard !challenges.isEmpty else {
            throw ConfigurationError("acme.challenges: no challenge type can be answered (tls-alpn-01 needs admin.posh_port; the list is \(settings.challenges.map(\.rawValue)))")
        }
        let key = try ACMEAccountKey.loadOrCreate(at: "\(dataDirectory)/acme/account.key")
        let client = try ACMEClient(directoryURL: settings.directoryURL, key: key, contact: settings.contact,
                                    trustRootsFile: settings.caCertificateFile.isEmpty ? nil : settings.caCertificateFile,
                                    eventLoopGroup: group, logger: logger)
        // Port 80 is bound only for http-01: an operator who cannot bind it answers
        // tls-alpn-01 alone.
        var listener: HTTP01Listener?
        if challenges.contains(.http01) {
            do {
                listener = try await HTTP01Listener.bind(host: settings.httpAddress, port: settings.httpPort, tokens: tokens, group: group, logger: logger)
            } catch {
                await client.shutdown()
                throw ListenerBindFailure(listener: "acme_http", host: settings.httpAddress, port: settings.httpPort, underlying: error)
            }
        }
        let interval = Duration.milliseconds(Int64(max(settings.renewCheckIntervalSeconds, 0.01) * 1000))
        // A domain added with `braid domain add` should not wait a whole interval for its
        // certificate: between full passes, newly hosted domains get a pass of their own.
        let step = min(interval, Self.newDomainPollInterval)
        let loop = Task { [self] in
            var seen = Set<String>()
            var nextFullPass = ContinuousClock.now
            while !Task.isCancelled {
                let hosted = domains.all
                if ContinuousClock.now >= nextFullPass {
                    nextFullPass = ContinuousClock.now + interval
                    await checkAll(only: nil, installed: installed)
                } else if !hosted.isSubset(of: seen) {
                    await checkAll(only: hosted.subtracting(seen), installed: installed)
                }
                seen = hosted
                try? await Task.sleep(for: step)
            }
        }
        state.withLock {
            $0.client = client
            $0.listener = listener
            $0.challenges = challenges
            $0.loop = loop
        }
        logger.notice("ACME certificates enabled", metadata: [
            "directory": "\(settings.directoryURL)", "challenges": "\(challenges.map(\.rawValue).joined(separator: ","))",
            "http_port": "\(listener?.port.map(String.init) ?? "-")", "https_port": "\(httpsPort.map(String.init) ?? "-")",
            "excluded": "\(excluded.sorted().joined(separator: ","))",
        ])
    }

    func shutdown() async {
        let (client, listener, loop) = state.withLock { running in
            defer { running.client = nil; running.listener = nil; running.loop = nil }
            return (running.client, running.listener, running.loop)
        }
        loop?.cancel()
        await loop?.value
        await listener?.close()
        await client?.shutdown()
    }

    /// One pass over every hosted domain (or only those in `only`); a pass already running
    /// makes this a no-op.
    func checkAll(only: Set<String>?, installed: @Sendable () -> Void) async {
        let alreadyChecking = state.withLock { running in
            defer { running.checking = true }
            return running.checking
        }
        guard !alreadyChecking else { return }
        defer { state.withLock { $0.checking = false; $0.passes += 1 } }
        guard let client = state.withLock({ $0.client }) else { return }

        let served: [CheckedName]
        do {
            // The names `braid check` looks at: each hosted domain and its service domains.
            served = try CheckedName.served(hosted: (only ?? domains.all).sorted(), configuration: configuration)
        } catch {
            logger.error("ACME: cannot list the served names", metadata: ["error": "\(error)"])
            return
        }
        var services: [String: [String]] = [:]
        for name in served where name.kind == .service && !excluded.contains(name.domain) {
            if let parent = name.parent { services[parent, default: []].append(name.domain) }
        }
        // `domains.acmeManages`: a domain that opted out through the provisioning API.
        let orders = served.filter { $0.kind == .hosted && !excluded.contains($0.domain) && domains.acmeManages($0.domain) }
            .map { (domain: $0.domain, names: [$0.domain] + (services[$0.domain] ?? [])) }
        for order in orders {
            guard !Task.isCancelled else { return }
            let outcome = await check(domain: order.domain, names: order.names, client: client, installed: installed)
            // An unreachable CA fails every order the same way; the rest wait for the next
            // pass instead of each logging (and backing off for) the same outage.
            if case .failed(let error) = outcome, error.code == .transport {
                logger.warning("ACME CA unreachable; the remaining domains wait for the next pass", metadata: ["error": "\(error)"])
                return
            }
        }
    }

    private enum Outcome {
        case nothingToDo, issued, failed(ACMEError)
    }

    private func check(domain: String, names: [String], client: ACMEClient, installed: @Sendable () -> Void) async -> Outcome {
        let now = clock.now()
        let (notBefore, failuresSoFar, challenges) = state.withLock { ($0.statuses[domain]?.notBefore, $0.statuses[domain]?.failures ?? 0, $0.challenges) }
        if let notBefore, now < notBefore { return .nothingToDo }
        let paths = CertificateManager.paths(for: domain, in: certificatesDirectory)
        let existing = try? PEMCredentials.load(certificatePath: paths.certificate, keyPath: paths.key).leafCertificate()
        guard let reason = Self.reasonToOrder(existing: existing, names: names, now: now) else { return .nothingToDo }

        var logger = self.logger
        logger[metadataKey: "domain"] = "\(domain)"
        let preference = Self.challengeOrder(challenges, failures: failuresSoFar)
        logger.info("ordering a certificate", metadata: [
            "reason": "\(reason.rawValue)", "names": "\(names.joined(separator: ","))",
            "challenges": "\(preference.map(\.rawValue).joined(separator: ","))",
        ])
        do throws(ACMEError) {
            let ascii = try names.map { name throws(ACMEError) -> String in
                do { return try JID(domain: name).asciiDomain } catch { throw ACMEError(.configuration, "\(name) is not a domain name: \(error)") }
            }
            let key = P256.Signing.PrivateKey()
            let tokens = self.tokens
            let certificates = self.tlsALPNCertificates
            let chain = try await client.issue(
                names: ascii, certificateKey: key, challenges: preference,
                publish: { answer throws(ACMEError) in
                    switch answer.type {
                    case .http01: tokens.publish(token: answer.token, keyAuthorization: answer.keyAuthorization)
                    case .tlsALPN01: try certificates.publish(name: answer.identifier, keyAuthorization: answer.keyAuthorization)
                    }
                },
                withdraw: { answer in
                    switch answer.type {
                    case .http01: tokens.withdraw(token: answer.token)
                    case .tlsALPN01: certificates.withdraw(name: answer.identifier)
                    }
                })
            let credentials = PEMCredentials(certificateChainPEM: chain, privateKeyPEM: key.pemRepresentation)
            do {
                try credentials.validate()
                try FileManager.default.createDirectory(atPath: certificatesDirectory, withIntermediateDirectories: true)
                try credentials.write(certificatePath: paths.certificate, keyPath: paths.key)
            } catch {
                throw ACMEError(.internal, "cannot install the issued certificate: \(error)")
            }
            removeSupersededSelfSigned(names.filter { $0 != domain })
            installed()
            metrics.success.increment()
            let leaf = try? credentials.leafCertificate()
            state.withLock { $0.statuses[domain] = DomainStatus(lastIssued: now) }
            logger.notice("certificate issued", metadata: [
                "names": "\(names.joined(separator: ","))",
                "not_after": "\(leaf.map { "\($0.notValidAfter)" } ?? "?")",
            ])
            return .issued
        } catch {
            // Shutting down mid-order is not the CA's failure: no back-off, no metric.
            if Task.isCancelled { return .failed(error) }
            let failures = (state.withLock { $0.statuses[domain]?.failures } ?? 0) + 1
            let delay = Self.backoff(failures: failures, error: error)
            (error.isRateLimited ? metrics.rateLimited : metrics.failure).increment()
            let notBefore = now.addingTimeInterval(delay)
            state.withLock { running in
                var status = running.statuses[domain] ?? DomainStatus()
                status.failures = failures
                status.notBefore = notBefore
                status.lastError = error.description
                running.statuses[domain] = status
            }
            logger.error("certificate order failed; the current certificate stays", metadata: [
                "error": "\(error)", "failures": "\(failures)", "retry_seconds": "\(Int(delay))",
            ])
            return .failed(error)
        }
    }

    /// The challenge types in the order to offer them after `failures` failed orders in a
    /// row: the configured order, rotated by one per failure, so that when one way cannot
    /// work (port 80 blocked, a proxy in front of 443) the next attempt leads with another.
    static func challengeOrder(_ configured: [ACMEChallengeType], failures: Int) -> [ACMEChallengeType] {
        guard configured.count > 1 else { return configured }
        let shift = max(failures, 0) % configured.count
        return Array(configured[shift...] + configured[..<shift])
    }

    /// How long a domain is left alone after its `failures`-th failure in a row: doubling
    /// from ``backoffBase`` up to ``backoffCap``, and never less than the CA's Retry-After
    /// (or ``rateLimitFloor`` for a rate limit without one).
    static func backoff(failures: Int, error: ACMEError) -> TimeInterval {
        var delay = min(backoffBase * pow(2, Double(min(max(failures, 1), 32) - 1)), backoffCap)
        if let retryAfter = error.retryAfter {
            delay = max(delay, Double(retryAfter.components.seconds))
        } else if error.isRateLimited {
            delay = max(delay, rateLimitFloor)
        }
        return delay
    }

    /// Why `existing` should be replaced for `names` at `now`, or nil when it is fine.
    static func reasonToOrder(existing: Certificate?, names: [String], now: Date) -> Reason? {
        guard let existing else { return .missing }
        if existing.issuer == existing.subject { return .selfSigned }
        let covered = (try? CertificateIdentity(certificate: existing).allDomains) ?? []
        if !names.allSatisfy(covered.contains) { return .namesMissing }
        let lifetime = existing.notValidAfter.timeIntervalSince(existing.notValidBefore)
        if now >= existing.notValidBefore.addingTimeInterval(lifetime * 2 / 3) { return .renewal }
        return nil
    }

    /// Service domains may have a self-signed certificate of their own, made on first use
    /// before the order; the new certificate covers them, and a leftover file would compete
    /// with it on the next reload. Only self-signed ones are removed: an operator's file is
    /// left alone.
    private func removeSupersededSelfSigned(_ names: [String]) {
        for name in names {
            let paths = CertificateManager.paths(for: name, in: certificatesDirectory)
            guard let leaf = try? PEMCredentials.load(certificatePath: paths.certificate, keyPath: paths.key).leafCertificate(),
                  leaf.issuer == leaf.subject else { continue }
            try? FileManager.default.removeItem(atPath: paths.certificate)
            try? FileManager.default.removeItem(atPath: paths.key)
        }
    }
}
