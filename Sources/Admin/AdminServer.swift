import Federation
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle
import Synchronization
import Trust
import XMPPCore

/// Why the admin server could not start.
public struct AdminServerError: Error, Sendable, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// Braid's HTTP side, on Hummingbird: two listeners.
///
/// - **POSH (HTTPS)**: serves `/.well-known/posh/xmpp-server.json` and `xmpp-client.json`
///   (RFC 7711 §3, RFC 7712 §5.2) for every hosted domain and for the provider's own host
///   name: a fingerprints document (§3.1) of the certificate Braid presents for the name the
///   request's `Host` gives. The TLS certificate is chosen by SNI from the same store the
///   XMPP listeners use, so a domain whose web address points at Braid can publish POSH with
///   no further setup, and tenants elsewhere can publish a reference (§3.2) to the
///   provider's document.
/// - **Admin (plain HTTP, loopback by default)**: `GET /metrics` (Prometheus text),
///   `GET /api/links` (the federation links and their authorised pairs, JSON) and
///   `GET /api/health`. There is no authentication: keep it on loopback or behind a proxy.
///
/// Call ``start()`` once, then ``shutdown()``.
public final class AdminServer: Sendable {
    public let configuration: AdminConfiguration
    private let tls: TLSContextStore
    private let isHosted: @Sendable (String) -> Bool
    private let metrics: @Sendable () async -> String
    private let links: @Sendable () async -> [LinkSnapshot]
    private let web: WebExtensions
    private let logger: Logger
    /// The provider host name in canonical form, if configured and valid.
    private let providerHostName: String?
    private let listeners = Mutex<[Listener]>([])

    /// One running Hummingbird application, under its own service group so that it can be
    /// shut down gracefully without signals.
    private struct Listener: Sendable {
        let name: String
        let group: ServiceGroup
        let task: Task<Void, Never>
    }

    /// How long ``shutdown()`` lets open connections finish before cancelling them.
    static let shutdownGrace: Duration = .seconds(5)

    /// - Parameters:
    ///   - configuration: addresses, ports and POSH settings.
    ///   - tls: the certificates Braid presents, per hosted domain.
    ///   - isHosted: whether a domain (canonical U-label form) is hosted; POSH documents are
    ///     served only for hosted domains and the provider's host name.
    ///   - metrics: the Prometheus text exposition of the server's metrics.
    ///   - links: the federation links now.
    ///   - web: what the server serves on the HTTPS listener besides POSH.
    ///   - logger: for the listeners.
    public init(
        configuration: AdminConfiguration,
        tls: TLSContextStore,
        isHosted: @escaping @Sendable (String) -> Bool,
        metrics: @escaping @Sendable () async -> String,
        links: @escaping @Sendable () async -> [LinkSnapshot],
        web: WebExtensions = WebExtensions(),
        logger: Logger
    ) {
        self.configuration = configuration
        self.tls = tls
        self.isHosted = isHosted
        self.metrics = metrics
        self.links = links
        self.web = web
        self.logger = logger
        self.providerHostName = configuration.poshHostName.flatMap { try? JID(domain: $0).domainpart }
    }

    // MARK: Lifecycle

    /// Starts the configured listeners and returns the ports they are bound to (nil for one
    /// that is disabled, or for POSH when its port needs privileges the process lacks).
    ///
    /// - Throws: when a listener cannot start for any other reason; nothing is left running.
    public func start() async throws -> (admin: Int?, posh: Int?) {
        var adminPort: Int?
        var poshPort: Int?
        do {
            if let port = configuration.adminPort {
                adminPort = try await launch(
                    name: "admin",
                    router: makeAdminRouter(),
                    server: .http1(configuration: .init(idleTimeout: .seconds(60))),
                    address: configuration.adminAddress,
                    port: port)
                logger.info("admin listener started", metadata: ["address": "\(configuration.adminAddress)", "port": "\(adminPort ?? port)"])
            }
            if let port = configuration.poshPort {
                let defaultDomain = providerHostName ?? tls.domains.sorted().first ?? "localhost"
                var tlsConfiguration = tls.makeServerConfiguration(defaultDomain: defaultDomain, alpn: ["http/1.1"])
                // On shutdown an idle keep-alive client may never answer our close_notify
                // (it is not reading); do not wait NIOSSL's default 5 s for it.
                tlsConfiguration.shutdownTimeout = .seconds(1)
                do {
                    poshPort = try await launch(
                        name: "posh",
                        router: makePOSHRouter(),
                        server: try httpsServer(tlsConfiguration: tlsConfiguration),
                        address: configuration.poshAddress,
                        port: port)
                    logger.info("POSH listener started", metadata: ["address": "\(configuration.poshAddress)", "port": "\(poshPort ?? port)"])
                } catch let error where Self.isPermissionDenied(error) {
                    // Port 443 needs CAP_NET_BIND_SERVICE or root. POSH is one proof among
                    // several (digest §9.4), so the server runs without it rather than not at
                    // all.
                    logger.warning(
                        "cannot bind the POSH listener (no permission); POSH documents will not be served",
                        metadata: ["address": "\(configuration.poshAddress)", "port": "\(port)", "error": "\(error)"])
                }
            }
        } catch {
            await shutdown()
            throw error
        }
        return (adminPort, poshPort)
    }

    /// Stops the listeners: open connections get ``shutdownGrace`` to finish, then are cut.
    public func shutdown() async {
        let running = listeners.withLock { listeners in
            defer { listeners = [] }
            return listeners
        }
        for listener in running {
            await listener.group.triggerGracefulShutdown()
        }
        for listener in running {
            let task = listener.task
            let deadline = Task {
                try? await Task.sleep(for: Self.shutdownGrace)
                task.cancel()
            }
            await task.value
            deadline.cancel()
            logger.debug("listener stopped", metadata: ["listener": "\(listener.name)"])
        }
    }

    private func launch(
        name: String,
        router: Router<BasicRequestContext>,
        server: HTTPServerBuilder,
        address: String,
        port: Int
    ) async throws -> Int {
        let signal = StartupSignal()
        let application = Application(
            router: router,
            server: server,
            configuration: ApplicationConfiguration(address: .hostname(address, port: port)),
            onServerRunning: { channel in signal.succeed(channel.localAddress?.port ?? port) },
            logger: logger)
        let group = ServiceGroup(configuration: .init(services: [application], logger: logger))
        let logger = self.logger
        let task = Task {
            do {
                try await group.run()
                signal.fail(AdminServerError("the \(name) listener stopped before it started"))
            } catch {
                signal.fail(error)
                logger.debug("listener ended", metadata: ["listener": "\(name)", "error": "\(error)"])
            }
        }
        listeners.withLock { $0.append(Listener(name: name, group: group, task: task)) }
        do {
            return try await signal.wait()
        } catch {
            listeners.withLock { $0.removeAll { $0.name == name } }
            await task.value
            throw error
        }
    }

    /// The HTTPS listener's child channels: TLS, then HTTP and the WebSocket upgrade. With
    /// TLS-ALPN-01 challenges to answer, a ClientHello sniffer goes in front of TLS to pick
    /// the validation certificate (``ClientHelloSniffer``).
    private func httpsServer(tlsConfiguration: TLSConfiguration) throws -> HTTPServerBuilder {
        let web = self.web
        guard let challenges = web.tlsALPN else {
            return try .tls(HTTPServerBuilder { responder in
                WebChannel(responder: responder, webSocket: web.webSocket, idleTimeout: .seconds(30))
            }, tlsConfiguration: tlsConfiguration)
        }
        let logger = self.logger
        return HTTPServerBuilder { responder in
            try SniffingTLSChannel(WebChannel(responder: responder, webSocket: web.webSocket, idleTimeout: .seconds(30)),
                                   tlsConfiguration: tlsConfiguration, challenges: challenges, logger: logger)
        }
    }

    static func isPermissionDenied(_ error: any Error) -> Bool {
        if let error = error as? IOError {
            return error.errnoCode == EACCES || error.errnoCode == EPERM
        }
        let text = String(describing: error)
        return text.contains("Permission denied") || text.contains("EACCES")
    }

    // MARK: POSH

    /// The services POSH documents are served for (RFC 7712 §5.2; RFC 7711 §8 asks that the
    /// name match the SRV service).
    static let poshServices = ["xmpp-server", "xmpp-client"]

    private func makePOSHRouter() -> Router<BasicRequestContext> {
        let router = Router(options: .autoGenerateHeadEndpoints)
        for service in Self.poshServices {
            router.get(RouterPath(POSHPublisher.wellKnownPath(service: service))) { [self] request, _ -> Response in
                guard let document = poshDocument(forHost: request.head.authority) else {
                    return Response(status: .notFound)
                }
                return Response(
                    status: .ok,
                    headers: [.contentType: "application/json"],
                    body: ResponseBody(byteBuffer: ByteBuffer(string: document)))
            }
        }
        if let webSocket = web.webSocket {
            addHostMeta(to: router, webSocketPath: webSocket.path)
        }
        web.routes(router)
        return router
    }

    // MARK: XEP-0156 discovery

    /// `/.well-known/host-meta` (XRD, RFC 6415) and `host-meta.json` for every hosted domain,
    /// naming the WebSocket endpoint (XEP-0156 §3.3). Browser clients fetch them from
    /// another origin, hence `Access-Control-Allow-Origin: *` (XEP-0156 §4).
    private func addHostMeta(to router: Router<BasicRequestContext>, webSocketPath: String) {
        router.get("/.well-known/host-meta") { [self] request, _ -> Response in
            guard let url = webSocketURL(forHost: request.head.authority, path: webSocketPath) else { return Response(status: .notFound) }
            let xml = "<?xml version='1.0' encoding='utf-8'?>\n<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n"
                + "  <Link rel='\(HostMeta.webSocketRelation)' href='\(HostMeta.escaped(url))'/>\n</XRD>\n"
            return HostMeta.response(xml, type: "application/xrd+xml; charset=utf-8")
        }
        router.get("/.well-known/host-meta.json") { [self] request, _ -> Response in
            guard let url = webSocketURL(forHost: request.head.authority, path: webSocketPath) else { return Response(status: .notFound) }
            let document = HostMeta.Document(links: [.init(rel: HostMeta.webSocketRelation, href: url)])
            let data = try JSONEncoder().encode(document)
            return HostMeta.response(String(decoding: data, as: UTF8.self), type: "application/json")
        }
        router.on("/.well-known/host-meta", method: .options) { _, _ in HostMeta.preflight() }
        router.on("/.well-known/host-meta.json", method: .options) { _, _ in HostMeta.preflight() }
    }

    /// The WebSocket URL announced to a client that asked `host` (the `Host` header, with
    /// the port it used): the configured one, or this listener under the name the client
    /// reached. Nil for a name that is neither hosted nor the provider's.
    func webSocketURL(forHost host: String?, path: String) -> String? {
        guard let domain = Self.domain(fromHost: host), isHosted(domain) || domain == providerHostName else { return nil }
        if let configured = configuration.webSocketURL {
            return configured.replacingOccurrences(of: "{domain}", with: domain)
        }
        let authority = (host ?? domain).trimmingCharacters(in: .whitespaces)
        return "wss://\(authority)\(path)"
    }

    /// The fingerprints document for the name in a `Host` header, or nil (404) when that
    /// name is neither hosted nor the provider's, or no certificate is presented for it.
    ///
    /// The document lists the certificate Braid presents for the name now; it changes with
    /// every renewal, which is why tenants should publish a reference to the provider's
    /// document instead of copying fingerprints (RFC 7711 §7).
    func poshDocument(forHost host: String?) -> String? {
        guard let domain = Self.domain(fromHost: host) else { return nil }
        guard isHosted(domain) || domain == providerHostName else { return nil }
        guard let der = tls.certificateDER(for: domain) else { return nil }
        if domain == providerHostName {
            // Customer domains delegate here (RFC 7711 §3.2). With a certificate per domain, a
            // link presents whichever domain's certificate opened it: list every one, so a
            // delegating domain is proven on any link (issue 9).
            let others = tls.allCertificateDER.filter { $0 != der }
            return POSHPublisher.fingerprintsDocument(certificateDER: [der] + others, expires: configuration.poshExpiresSeconds)
        }
        return POSHPublisher.fingerprintsDocument(certificateDER: [der], expires: configuration.poshExpiresSeconds)
    }

    /// The canonical domain in a `Host` value (`name` or `name:port`); nil for IP literals
    /// and anything that is not a domain.
    static func domain(fromHost host: String?) -> String? {
        guard var name = host?.trimmingCharacters(in: .whitespaces), !name.isEmpty, !name.hasPrefix("[") else { return nil }
        if let colon = name.lastIndex(of: ":") {
            let port = name[name.index(after: colon)...]
            guard !port.isEmpty, port.allSatisfy(\.isASCII), port.allSatisfy(\.isNumber) else { return nil }
            name = String(name[..<colon])
        }
        guard let jid = try? JID(domain: name), !isIPv4Literal(jid.domainpart) else { return nil }
        return jid.domainpart
    }

    private static func isIPv4Literal(_ name: String) -> Bool {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false)
        return parts.count == 4 && parts.allSatisfy { !$0.isEmpty && $0.allSatisfy(\.isNumber) }
    }

    // MARK: Admin

    private func makeAdminRouter() -> Router<BasicRequestContext> {
        let router = Router(options: .autoGenerateHeadEndpoints)
        router.get("/metrics") { [self] _, _ -> Response in
            Response(
                status: .ok,
                headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(string: await metrics())))
        }
        router.get("/api/links") { [self] _, _ -> Response in
            let view = await links().map(AdminLinkInfo.init).sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
            return try Self.json(view)
        }
        router.get("/api/health") { _, _ -> Response in
            try Self.json(["status": "ok"])
        }
        return router
    }

    private static func json(_ value: some Encodable) throws -> Response {
        let data = try AdminJSON.encoder().encode(value)
        return Response(
            status: .ok,
            headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
    }
}

/// What the server adds to the HTTPS listener besides POSH documents: the feature modules'
/// routes (file upload, host-meta), added when the listener starts.
public struct WebExtensions: Sendable {
    public var routes: @Sendable (Router<BasicRequestContext>) -> Void
    /// XMPP over WebSocket (RFC 7395), announced by the host-meta documents (XEP-0156).
    public var webSocket: (any WebSocketEndpoint)?
    /// TLS-ALPN-01 validations (RFC 8737) to answer on this listener (ACME).
    public var tlsALPN: TLSALPNChallenges?

    public init(routes: @escaping @Sendable (Router<BasicRequestContext>) -> Void = { _ in }, webSocket: (any WebSocketEndpoint)? = nil,
                tlsALPN: TLSALPNChallenges? = nil) {
        self.routes = routes
        self.webSocket = webSocket
        self.tlsALPN = tlsALPN
    }
}

/// The XEP-0156 documents' parts.
enum HostMeta {
    static let webSocketRelation = "urn:xmpp:alt-connections:websocket"

    struct Document: Encodable {
        struct Link: Encodable {
            var rel: String
            var href: String
        }

        var links: [Link]
    }

    static func response(_ body: String, type: String) -> Response {
        Response(status: .ok, headers: [.contentType: type, .accessControlAllowOrigin: "*"], body: ResponseBody(byteBuffer: ByteBuffer(string: body)))
    }

    static func preflight() -> Response {
        Response(status: .noContent, headers: [.accessControlAllowOrigin: "*", .accessControlAllowMethods: "GET, OPTIONS", .accessControlMaxAge: "86400"])
    }

    /// For a single-quoted XML attribute.
    static func escaped(_ value: String) -> String {
        value.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "'", with: "&apos;")
            .replacingOccurrences(of: "<", with: "&lt;")
    }
}

/// Hands the bound port (or the error) from the listener's task to ``AdminServer/start()``.
/// The first outcome wins; later ones are ignored.
private final class StartupSignal: Sendable {
    private struct State {
        var result: Result<Int, any Error>?
        var waiter: CheckedContinuation<Int, any Error>?
    }

    private let state = Mutex(State())

    func succeed(_ port: Int) { resolve(.success(port)) }

    func fail(_ error: any Error) { resolve(.failure(error)) }

    private func resolve(_ result: Result<Int, any Error>) {
        let waiter = state.withLock { state -> CheckedContinuation<Int, any Error>? in
            guard state.result == nil else { return nil }
            state.result = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(with: result)
    }

    func wait() async throws -> Int {
        try await withCheckedThrowingContinuation { continuation in
            let ready = state.withLock { state -> Result<Int, any Error>? in
                if let result = state.result { return result }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(with: ready) }
        }
    }
}
