import Admin
import Cluster
import DNS
import Federation
import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// A running Braid server: storage, hosted domains, certificates, client listeners and the
/// router, as one swift-service-lifecycle `Service`.
///
/// On graceful shutdown (SIGTERM) every stream gets `<system-shutdown/>`; stanzas still in
/// flight are processed to the end, so each is delivered, stored offline or bounced, and
/// never dropped.
public final class BraidServer: Service {
    public let configuration: BraidConfiguration
    public let context: ServerContext
    public let metricsRegistry: MetricsRegistry
    let group: MultiThreadedEventLoopGroup
    private let ownsGroup: Bool
    private let logger: Logger
    private let listeners = Mutex<[ListenerKind: any Channel]>([:])
    private let poller = Mutex<Task<Void, Never>?>(nil)
    /// Server-to-server federation, when enabled.
    public let federation: FederationManager?
    private let resolver: UnboundResolver?
    private let boundFederationPorts = Mutex<[String: Int]>([:])
    /// The HTTP side: POSH documents for every hosted domain, metrics, the links API.
    public let admin: AdminServer
    private let boundAdminPorts = Mutex<(admin: Int?, posh: Int?)>((nil, nil))
    /// Certificates from an ACME CA (`acme.enabled`), and its HTTP-01 listener.
    public let acme: ACMERenewalService?
    /// This node's part in a cluster (`cluster.enabled`), and what joins it to the sessions.
    public let cluster: ClusterService?
    private let clusterBridge: ClusterBridge?

    /// How often the hosted-domain list is re-read; `braid domain add|remove` takes effect
    /// within this interval.
    public static let domainPollInterval: Duration = .milliseconds(50)

    /// Opens storage and loads certificates; nothing listens until ``start()``.
    /// - Parameters:
    ///   - wallClock: where federation reads the time of day; tests move it forward.
    ///   - sessionClock: where client streams and sessions read time and set their timers
    ///     (timeouts, keepalives, rate limits, XEP-0198); tests move it forward too.
    ///   - modules: feature modules beyond the standard ones (``StandardModules``).
    public init(configuration: BraidConfiguration, logger: Logger, eventLoopGroup: MultiThreadedEventLoopGroup? = nil,
                wallClock: WallClock = .system, sessionClock: SessionClock = .system, modules: [any BraidModule] = []) throws {
        let started = ContinuousClock.now
        self.configuration = configuration
        self.logger = logger
        let dataDirectory = configuration.dataDirectory
        try FileManager.default.createDirectory(atPath: dataDirectory, withIntermediateDirectories: true)
        metricsRegistry = MetricsRegistry()
        let metrics = ServerMetrics(registry: metricsRegistry)
        if let eventLoopGroup {
            group = eventLoopGroup
            ownsGroup = false
        } else {
            group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
            ownsGroup = true
        }
        // SQLite opens here; PostgreSQL connects in start() (an unreachable server is
        // reported there, before anything listens).
        let storage = try configuration.storage.open(dataDirectory: dataDirectory, logger: logger, eventLoopGroup: group)
        guard ["domain", "local", "anyone"].contains(configuration.muc.roomCreators) else {
            throw ConfigurationError("muc.room_creators: '\(configuration.muc.roomCreators)' is not domain, local or anyone")
        }
        if let problem = configuration.contactAddresses.problems.first {
            throw ConfigurationError(problem)
        }
        // Modules register once, and the tables freeze before anything runs.
        let dispatcher = try ModuleBuilder.with(StandardModules.all(configuration) + modules, serviceSettings: configuration.services).freeze()
        let domains = DomainRegistry(serviceLabels: dispatcher.serviceLabels, serviceModules: dispatcher.serviceModules)
        let certificates = CertificateManager(directory: "\(dataDirectory)/certs", selfSignMissing: configuration.tls.selfSignMissing, domains: domains, logger: logger)
        try certificates.loadConfigured(configuration.tls.certificates)
        try certificates.loadDirectory()
        context = ServerContext(configuration: configuration, storage: storage, domains: domains, certificates: certificates, metrics: metrics,
                                sessionClock: sessionClock, logger: logger)
        let router = Router(server: context, remote: NoFederation(), modules: dispatcher)
        context.install(router: router)
        if configuration.cluster.enabled {
            if let problem = configuration.cluster.problems(storageIsPostgreSQL: configuration.storage.backend == .postgresql).first {
                throw ConfigurationError(problem)
            }
            let settings = try PostgresConnectionSettings(url: configuration.storage.url ?? "")
            let directory = try ClusterDirectory(settings: settings, eventLoopGroup: group, logger: logger)
            let cluster = ClusterService(settings: configuration.cluster, directory: directory, logger: logger, metrics: metricsRegistry)
            let bridge = ClusterBridge(cluster: cluster, context: context, group: group, logger: logger)
            cluster.install(host: bridge)
            context.sessions.install(observer: bridge)
            context.install(cluster: bridge)
            self.cluster = cluster
            clusterBridge = bridge
        } else {
            cluster = nil
            clusterBridge = nil
        }
        if configuration.s2s.enabled {
            let dns = configuration.dns
            let resolver = try UnboundResolver(configuration: .init(
                resolvConf: dns.resolvConf, forwarders: dns.forwarders, trustAnchorFile: dns.trustAnchorFile,
                timeout: .seconds(dns.timeoutSeconds)), logger: logger)
            self.resolver = resolver
            let federation = try FederationManager.live(
                configuration: configuration.s2s, resolver: resolver, host: FederationBridge(context: context),
                group: group, logger: logger, metrics: FederationMetrics(factory: metricsRegistry), wallClock: wallClock)
            self.federation = federation
            router.setRemoteRoute(FederationRoute(manager: federation))
            metricsRegistry.onExport { await federation.recordGauges() }
        } else {
            federation = nil
            resolver = nil
        }
        let registry = metricsRegistry
        let federationManager = federation
        let serverContext = context
        context.install(links: { await federationManager?.links ?? [] })
        let webSocket = configuration.admin.webSocketPath.map { path in
            ClientWebSocketEndpoint(server: serverContext, path: path,
                                    allowedOrigins: Set(configuration.admin.webSocketAllowedOrigins.map { $0.lowercased() }), logger: logger)
        }
        // Before the HTTPS listener: it answers ACME's TLS-ALPN-01 validations.
        let acme = configuration.acme.enabled
            ? ACMERenewalService(configuration: configuration, certificatesDirectory: certificates.directory, domains: domains,
                                 clock: wallClock, registry: metricsRegistry, group: group, logger: logger)
            : nil
        self.acme = acme
        let webRoutes = WebExtensions(routes: { router in
            for install in dispatcher.httpRoutes { install(router, serverContext) }
        }, webSocket: webSocket, tlsALPN: acme?.listenerChallenges)
        admin = AdminServer(configuration: configuration.admin, tls: context.certificates.store,
                            isHosted: { domains.isServed($0) }, metrics: { await registry.prometheusText() },
                            links: { await federationManager?.links ?? [] }, web: webRoutes, logger: logger)
        metrics.startupSeconds.set(Self.seconds(ContinuousClock.now - started))
    }

    /// The ports the listeners are bound to (useful when the configuration asks for port 0).
    public var boundPorts: [ListenerKind: Int] {
        listeners.withLock { $0.compactMapValues { $0.localAddress?.port } }
    }

    /// The admin and POSH listener ports (nil when disabled).
    public var adminPorts: (admin: Int?, posh: Int?) {
        boundAdminPorts.withLock { $0 }
    }

    /// The s2s listener ports, by kind (`s2s_starttls`, `s2s_direct_tls`).
    public var federationPorts: [String: Int] {
        boundFederationPorts.withLock { $0 }
    }

    // MARK: Lifecycle

    public func run() async throws {
        try await start()
        // Returns when a graceful shutdown is requested (SIGTERM) or the task is cancelled.
        try? await gracefulShutdown()
        await shutdown()
    }

    /// With no domain hosted yet, hosts the configured default (`localhost` out of the box)
    /// and returns it. Every command applies the same rule, so `braid user add
    /// alice@localhost` works in a fresh directory before or after `braid serve`.
    public static func hostDefaultDomainIfNone(storage: any Storage, configuration: BraidConfiguration) async throws -> String? {
        guard try await storage.domains().isEmpty else { return nil }
        let domain = try JID(domain: configuration.defaultDomain).domainpart
        try await storage.addDomain(domain)
        return domain
    }

    /// Makes sure a domain is hosted, loads the domains, and binds the listeners.
    public func start() async throws {
        let started = ContinuousClock.now
        try await context.storage.prepare()
        if let domain = try await Self.hostDefaultDomainIfNone(storage: context.storage, configuration: configuration) {
            logger.notice("no domain hosted yet; added the default domain", metadata: ["domain": "\(domain)"])
        }
        try await context.domains.synchronize(from: context.storage)
        context.metrics.hostedDomains.set(Int64(context.domains.count))
        let defaultDomain = try JID(domain: configuration.defaultDomain).domainpart
        if context.domains.isHosted(defaultDomain) {
            await context.certificates.prepareCertificate(for: defaultDomain)
        }
        reportCertificates()
        if let federation, let clusterBridge {
            clusterBridge.serve(federation: federation) { [weak self] bound in self?.boundFederationPorts.withLock { $0 = bound } }
        }
        // Before the client listeners: every session bound here is told to the other nodes.
        try await cluster?.start()
        if let cluster, let federation, configuration.s2s.dialbackSecret.isEmpty {
            // One dialback secret for the whole cluster, kept in its database: a key issued
            // by the node that held the federation lease still verifies after another took it.
            federation.useDialbackSecret(try await cluster.sharedSecret(named: "dialback"))
        }

        let c2s = configuration.c2s
        if let port = c2s.starttlsPort {
            try await bind(.c2sStartTLS, host: c2s.address, port: port, tls: nil)
        }
        if let port = c2s.directTLSPort {
            let tls = try NIOSSLContext(configuration: context.certificates.directTLSConfiguration(defaultDomain: tlsDefaultDomain(defaultDomain), alpn: ["xmpp-client"]))
            try await bind(.c2sDirectTLS, host: c2s.address, port: port, tls: tls)
        }
        if let federation {
            // In a cluster only the holder of the federation lease listens (docs/cluster.md).
            let ports = try await federation.start(defaultDomain: tlsDefaultDomain(defaultDomain), listen: cluster.map(\.holdsFederationLease) ?? true)
            boundFederationPorts.withLock { $0 = ports }
        }
        let adminPorts = try await admin.start()
        boundAdminPorts.withLock { $0 = adminPorts }
        context.httpsListenerBound(port: adminPorts.posh)
        try await acme?.start(httpsPort: adminPorts.posh) { [weak self] in self?.reloadCertificates() }
        startDomainPolling()
        context.metrics.startupSeconds.set(Self.seconds(ContinuousClock.now - started) + (context.metrics.registry.gaugeValue("braid_startup_seconds") ?? 0))
        logger.info("Braid is serving", metadata: [
            "domains": "\(context.domains.count)",
            "ports": "\((boundPorts.map { "\($0.key.rawValue)=\($0.value)" } + federationPorts.map { "\($0.key)=\($0.value)" } + [adminPorts.admin.map { "admin=\($0)" }, adminPorts.posh.map { "posh=\($0)" }].compactMap { $0 }).sorted().joined(separator: ","))",
        ])
    }

    /// The domain whose certificate direct TLS presents without a usable SNI name.
    private func tlsDefaultDomain(_ preferred: String) -> String {
        context.certificates.covers(preferred) ? preferred : (context.domains.all.sorted().first ?? preferred)
    }

    private func bind(_ kind: ListenerKind, host: String, port: Int, tls: NIOSSLContext?) async throws {
        let server = context
        let limits = XMLStreamLimits(maximumStanzaBytes: configuration.c2s.maxStanzaBytes)
        let outboundLimit = configuration.c2s.maxOutboundBytes
        let logger = self.logger
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: outboundLimit / 2, high: outboundLimit))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let decoder = XMLStreamDecoder(contentNamespace: XMLNamespace.client, limits: limits,
                                                   names: server.nameCaches.cache(on: channel.eventLoop))
                    try StreamPipeline.install(on: channel, directTLS: tls.map { NIOSSLServerHandler(context: $0) }, decoder: decoder,
                                               contentNamespace: XMLNamespace.client,
                                               handler: ClientConnectionHandler(server: server, decoder: decoder, listener: kind, logger: logger))
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.bind(host: host, port: port).get()
        } catch {
            throw ListenerBindFailure(listener: kind.rawValue, host: host, port: port, underlying: error)
        }
        listeners.withLock { $0[kind] = channel }
    }

    private func startDomainPolling() {
        let context = self.context
        let logger = self.logger
        let task = Task {
            // SQLite is polled; PostgreSQL tells (LISTEN/NOTIFY). Ends when cancelled.
            for await _ in context.storage.domainChanges(pollInterval: Self.domainPollInterval) {
                do {
                    let change = try await context.domains.synchronize(from: context.storage)
                    guard !change.isEmpty else { continue }
                    context.metrics.hostedDomains.set(Int64(context.domains.count))
                    for domain in change.added.sorted() {
                        logger.notice("now hosting domain", metadata: ["domain": "\(domain)"])
                    }
                    for domain in change.removed.sorted() {
                        let sessions = context.sessions.allSessions(inDomain: domain)
                        logger.notice("no longer hosting domain", metadata: ["domain": "\(domain)", "sessions": "\(sessions.count)"])
                        for session in sessions {
                            session.closeWithError(StreamError(.hostGone, text: "this domain is no longer served here"))
                        }
                        // Its pairs leave every s2s link; the links stay up for the others.
                        await federation?.withdraw(local: domain)
                    }
                } catch {
                    logger.error("reading hosted domains failed", metadata: ["error": "\(error)"])
                }
            }
        }
        poller.withLock { $0 = task }
    }

    /// Re-reads every certificate (what `braid serve` does on SIGHUP) and logs what changed.
    @discardableResult
    public func reloadCertificates() -> CertificateManager.ReloadOutcome {
        let outcome = context.certificates.reload(configuration.tls.certificates)
        reportCertificates()
        logger.notice("certificates reloaded", metadata: [
            "changed": "\(outcome.changed.joined(separator: ","))",
            "failed_files": "\(outcome.failures.joined(separator: ","))",
        ])
        return outcome
    }

    /// The certificate gauges, after certificates were loaded or reloaded.
    func reportCertificates() {
        let expiries = context.certificates.presentedExpiries()
        context.metrics.certificatesPresented.set(expiries.count)
        if let earliest = expiries.min() {
            context.metrics.certificateEarliestExpiry.set(earliest.timeIntervalSince1970)
        }
    }

    /// Stops listening, closes every stream with `<system-shutdown/>`, and waits (up to ten
    /// seconds) for every session to finish processing what it had received.
    public func shutdown() async {
        poller.withLock { $0?.cancel() }
        await acme?.shutdown()
        let channels = listeners.withLock { listeners in
            defer { listeners = [:] }
            return Array(listeners.values)
        }
        for channel in channels {
            try? await channel.close()
        }
        // The modules speak while clients and peers are still connected (a room's occupants
        // get 332), then federation and the streams close.
        await context.router.modules.shutdown(router: context.router)
        await federation?.shutdown()
        await admin.shutdown()
        let sessions = context.sessions.allSessions()
        logger.notice("shutting down", metadata: ["sessions": "\(sessions.count)"])
        for session in sessions {
            session.closeWithError(StreamError(.systemShutdown))
        }
        let deadline = ContinuousClock.now + .seconds(10)
        while (context.sessions.count > 0 || context.activeProcessing.load(ordering: .relaxed) > 0) && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(20))
        }
        // After the sessions: their ends (and the presence they broadcast) went over the node
        // links first.
        await cluster?.shutdown()
        await resolver?.shutdown()
        await context.storage.close()
        if ownsGroup {
            try? await group.shutdownGracefully()
        }
        logger.notice("stopped")
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}
