import Crypto
import Federation
import Logging
import NIOCore
import Storage
import Synchronization
import Trust
import XMPPCore
import XMPPStream

/// The services every part of a running server shares. Created once by ``BraidServer``.
public final class ServerContext: Sendable {
    public let configuration: BraidConfiguration
    public let storage: any Storage
    public let domains: DomainRegistry
    public let sessions: SessionRegistry
    public let resumption: ResumptionTable
    public let certificates: CertificateManager
    public let metrics: ServerMetrics
    /// Time and timers for client streams and sessions.
    public let sessionClock: SessionClock
    public let logger: Logger
    /// A random secret for this server process: it keys fake SCRAM salts so unknown users
    /// look like real ones (RFC 6120 §13) and stream ids.
    public let secret: [UInt8]
    /// Set once the router exists; the router needs the context, so it is wired after.
    private let routerBox = Mutex<Router?>(nil)
    /// The port the HTTPS listener (`admin.posh_port`) bound, once it has: the configured one,
    /// or the one the system chose for port 0. URLs that name the listener use it.
    private let httpsPortBox = Mutex<Int?>(nil)

    public var boundHTTPSPort: Int? { httpsPortBox.withLock { $0 } }

    /// This node's part in a cluster, when there is one (set once at start).
    private let clusterBox = Mutex<ClusterBridge?>(nil)
    var cluster: ClusterBridge? { clusterBox.withLock { $0 } }
    func install(cluster: ClusterBridge) { clusterBox.withLock { $0 = cluster } }

    /// The federation links now (empty without federation), for the provisioning API.
    private let linksBox = Mutex<(@Sendable () async -> [LinkSnapshot])?>(nil)

    func federationLinks() async -> [LinkSnapshot] {
        guard let links = linksBox.withLock({ $0 }) else { return [] }
        return await links()
    }

    func install(links: @escaping @Sendable () async -> [LinkSnapshot]) {
        linksBox.withLock { $0 = links }
    }

    func httpsListenerBound(port: Int?) {
        httpsPortBox.withLock { $0 = port }
    }

    /// The XML name cache of each event loop, shared by the client streams on it.
    let nameCaches = XMLNameCaches()
    /// Serializes, per account, the operations whose order matters: roster changes, and
    /// the choice between live delivery and offline storage against presence changes.
    let accounts = AccountSerializer()
    /// Session tasks still processing inbound stanzas; shutdown waits for them.
    let activeProcessing = Atomic<Int>(0)
    /// In-band registration attempts per client address (XEP-0077).
    let registrationThrottle = RegistrationThrottle()

    init(configuration: BraidConfiguration, storage: any Storage, domains: DomainRegistry, certificates: CertificateManager, metrics: ServerMetrics,
         sessionClock: SessionClock = .system, logger: Logger) {
        self.configuration = configuration
        self.storage = storage
        self.domains = domains
        self.sessions = SessionRegistry()
        self.resumption = ResumptionTable()
        self.certificates = certificates
        self.metrics = metrics
        self.sessionClock = sessionClock
        self.logger = logger
        var secret = [UInt8](repeating: 0, count: 32)
        var generator = SystemRandomNumberGenerator()
        for index in secret.indices { secret[index] = generator.next() }
        self.secret = secret
    }

    public var router: Router {
        guard let router = routerBox.withLock({ $0 }) else { preconditionFailure("router used before the server started") }
        return router
    }

    func install(router: Router) {
        routerBox.withLock { $0 = router }
    }

    /// A fresh random identifier (stream ids, generated resources, XEP-0198 ids).
    static func randomIdentifier(bytes: Int = 12) -> String {
        var generator = SystemRandomNumberGenerator()
        let raw = (0..<bytes).map { _ in UInt8.random(in: 0...255, using: &generator) }
        // Base64 without padding or '/' and '+', so it is safe in resources and attributes.
        return Base64.encode(raw).replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}

/// XEP-0198 sessions that can be resumed, by id.
public final class ResumptionTable: Sendable {
    private let sessions = Mutex<[String: ClientSession]>([:])

    public init() {}

    func register(_ session: ClientSession) {
        sessions.withLock { $0[session.id] = session }
    }

    func session(id: String) -> ClientSession? {
        sessions.withLock { $0[id] }
    }

    func remove(_ session: ClientSession) {
        sessions.withLock { table in
            if table[session.id] === session { table[session.id] = nil }
        }
    }

    func replace(_ session: ClientSession) {
        sessions.withLock { $0[session.id] = session }
    }
}

/// Runs operations one at a time per account, in arrival order.
actor AccountSerializer {
    private var tails: [JID: Task<Void, Never>] = [:]

    func run<T: Sendable>(_ account: JID, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let previous = tails[account]
        let task = Task<Result<T, any Error>, Never> {
            await previous?.value
            do {
                return .success(try await body())
            } catch {
                return .failure(error)
            }
        }
        let tail = Task<Void, Never> { _ = await task.value }
        tails[account] = tail
        let result = await task.value
        if tails[account] == tail { tails[account] = nil }
        return try result.get()
    }
}
