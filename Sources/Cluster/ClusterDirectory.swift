import Foundation
import Logging
import NIOCore
import PostgresNIO
import Storage
import Synchronization

/// A node as the database knows it.
public struct ClusterMember: Sendable, Equatable {
    public var name: String
    /// Where its node-link listener is reached (`HOST:PORT`).
    public var address: String
    public var incarnation: UInt64
    /// Seconds since its last heartbeat, by the database's clock (so the nodes' own clocks
    /// need not agree).
    public var heartbeatAge: Double
    public var startedSecondsAgo: Double
    /// Bound sessions, as of its last heartbeat.
    public var sessions: Int
    /// Its s2s links to peer servers, as of its last heartbeat (only the holder of the
    /// federation lease has any).
    public var links: Int
    /// It said goodbye (graceful shutdown).
    public var left: Bool

    public func isAlive(deadAfter: Double) -> Bool { !left && heartbeatAge < deadAfter }
}

/// Membership, heartbeats and the session directory, in the PostgreSQL database the nodes
/// share (issue 18): no consensus protocol of Braid's own; the database the operator already
/// replicates and fails over is the one place that says who is in the cluster.
public final class ClusterDirectory: Sendable {
    /// The connection pool and the task running it. Replaced as a whole when a call goes
    /// unanswered for the operation timeout (see ``within(_:)``).
    private struct Pool: Sendable {
        let client: PostgresClient
        let runner: Task<Void, Never>
    }

    private let pool: Mutex<Pool>
    private let configuration: PostgresClient.Configuration
    private let eventLoopGroup: any EventLoopGroup
    private let logger: Logger
    let operationTimeout: Duration

    public init(settings: PostgresConnectionSettings, eventLoopGroup: any EventLoopGroup, logger: Logger) throws {
        var configuration = try settings.clientConfiguration()
        // Heartbeats and directory writes only: a few connections are plenty.
        configuration.options.maximumConnections = 4
        self.configuration = configuration
        self.eventLoopGroup = eventLoopGroup
        self.logger = logger
        operationTimeout = settings.operationTimeout
        pool = Mutex(Self.makePool(configuration: configuration, eventLoopGroup: eventLoopGroup, logger: logger))
    }

    private static func makePool(configuration: PostgresClient.Configuration, eventLoopGroup: any EventLoopGroup, logger: Logger) -> Pool {
        let client = PostgresClient(configuration: configuration, eventLoopGroup: eventLoopGroup, backgroundLogger: logger)
        return Pool(client: client, runner: Task { await client.run() })
    }

    public func close() {
        pool.withLock { $0.runner.cancel() }
    }

    /// Creates the tables if missing. Several nodes may start at once, so the creation runs
    /// under a transaction-scoped advisory lock.
    public func prepare() async throws {
        try await within { client in
            try await client.withTransaction(logger: self.logger) { connection in
                try await connection.query("SELECT pg_advisory_xact_lock(hashtext('braid_cluster_schema'))", logger: self.logger)
                try await connection.query("""
                    CREATE TABLE IF NOT EXISTS cluster_nodes (
                        name text PRIMARY KEY,
                        address text NOT NULL,
                        incarnation bigint NOT NULL,
                        started_at timestamptz NOT NULL DEFAULT now(),
                        heartbeat_at timestamptz NOT NULL DEFAULT now(),
                        sessions integer NOT NULL DEFAULT 0,
                        left_at timestamptz
                    )
                    """, logger: self.logger)
                try await connection.query("ALTER TABLE cluster_nodes ADD COLUMN IF NOT EXISTS links integer NOT NULL DEFAULT 0", logger: self.logger)
                try await connection.query("""
                    CREATE TABLE IF NOT EXISTS cluster_sessions (
                        jid text PRIMARY KEY,
                        node text NOT NULL,
                        bound_at timestamptz NOT NULL DEFAULT now()
                    )
                    """, logger: self.logger)
                try await connection.query("CREATE INDEX IF NOT EXISTS cluster_sessions_node ON cluster_sessions (node)", logger: self.logger)
                try await connection.query("""
                    CREATE TABLE IF NOT EXISTS cluster_secrets (
                        name text PRIMARY KEY,
                        value text NOT NULL
                    )
                    """, logger: self.logger)
                try await connection.query("""
                    CREATE TABLE IF NOT EXISTS cluster_leases (
                        name text PRIMARY KEY,
                        node text NOT NULL,
                        incarnation bigint NOT NULL,
                        expires_at timestamptz NOT NULL
                    )
                    """, logger: self.logger)
            }
        }
    }

    /// Registers this run of the node, and forgets sessions an earlier run left behind (it
    /// crashed: they are gone with it).
    public func register(node: String, address: String, incarnation: UInt64) async throws {
        let incarnationValue = Int64(bitPattern: incarnation)
        try await within { client in
            try await client.withTransaction(logger: self.logger) { connection in
                try await connection.query("""
                    INSERT INTO cluster_nodes (name, address, incarnation, started_at, heartbeat_at, sessions, left_at)
                    VALUES (\(node), \(address), \(incarnationValue), now(), now(), 0, NULL)
                    ON CONFLICT (name) DO UPDATE SET address = EXCLUDED.address, incarnation = EXCLUDED.incarnation,
                        started_at = now(), heartbeat_at = now(), sessions = 0, left_at = NULL
                    """, logger: self.logger)
                try await connection.query("DELETE FROM cluster_sessions WHERE node = \(node)", logger: self.logger)
            }
        }
    }

    /// Writes the heartbeat. False when the row now belongs to another run (two processes
    /// configured with one node name).
    public func heartbeat(node: String, incarnation: UInt64, sessions: Int, links: Int = 0) async throws -> Bool {
        let incarnationValue = Int64(bitPattern: incarnation)
        return try await within { client in
            let rows = try await client.query("""
                UPDATE cluster_nodes SET heartbeat_at = now(), sessions = \(sessions), links = \(links)
                WHERE name = \(node) AND incarnation = \(incarnationValue) RETURNING name
                """, logger: self.logger)
            var count = 0
            for try await _ in rows { count += 1 }
            return count == 1
        }
    }

    /// Every node that ever registered, with its heartbeat's age.
    public func members() async throws -> [ClusterMember] {
        try await within { client in
            var members: [ClusterMember] = []
            let rows = try await client.query("""
                SELECT name, address, incarnation, sessions, links,
                       extract(epoch FROM now() - heartbeat_at)::float8,
                       extract(epoch FROM now() - started_at)::float8,
                       left_at IS NOT NULL
                FROM cluster_nodes ORDER BY name
                """, logger: self.logger)
            for try await (name, address, incarnation, sessions, links, age, started, left) in rows.decode((String, String, Int64, Int32, Int32, Double, Double, Bool).self) {
                members.append(ClusterMember(name: name, address: address, incarnation: UInt64(bitPattern: incarnation), heartbeatAge: age,
                                             startedSecondsAgo: started, sessions: Int(sessions), links: Int(links), left: left))
            }
            return members
        }
    }

    /// Graceful shutdown: the others need not wait for the heartbeat to age.
    public func leave(node: String, incarnation: UInt64) async throws {
        let incarnationValue = Int64(bitPattern: incarnation)
        try await within { client in
            try await client.withTransaction(logger: self.logger) { connection in
                try await connection.query("UPDATE cluster_nodes SET left_at = now(), sessions = 0 WHERE name = \(node) AND incarnation = \(incarnationValue)", logger: self.logger)
                try await connection.query("DELETE FROM cluster_sessions WHERE node = \(node)", logger: self.logger)
            }
        }
    }

    /// Removes the directory rows of a node that is dead (its heartbeat too old, or it left),
    /// checked in the same statement so a node that came back meanwhile keeps its rows.
    public func forgetSessions(ofDeadNode node: String, deadAfter: Double) async throws {
        _ = try await within { client in
            try await client.query("""
                DELETE FROM cluster_sessions WHERE node = \(node) AND NOT EXISTS (
                    SELECT 1 FROM cluster_nodes WHERE name = \(node) AND left_at IS NULL
                    AND heartbeat_at > now() - make_interval(secs => \(deadAfter)))
                """, logger: self.logger)
        }
    }

    /// Takes the lease `name` if it is free or expired, or renews it if this run holds it,
    /// for `seconds`; returns the node holding it afterwards (one statement, so two nodes
    /// asking at once cannot both get it).
    public func acquireLease(_ name: String, node: String, incarnation: UInt64, seconds: Double) async throws -> String? {
        let incarnationValue = Int64(bitPattern: incarnation)
        return try await within { client in
            try await client.query("""
                INSERT INTO cluster_leases (name, node, incarnation, expires_at)
                VALUES (\(name), \(node), \(incarnationValue), now() + make_interval(secs => \(seconds)))
                ON CONFLICT (name) DO UPDATE SET node = EXCLUDED.node, incarnation = EXCLUDED.incarnation, expires_at = EXCLUDED.expires_at
                WHERE cluster_leases.expires_at < now()
                   OR (cluster_leases.node = EXCLUDED.node AND cluster_leases.incarnation = EXCLUDED.incarnation)
                """, logger: self.logger)
            var holder: String?
            for try await (owner, expired) in try await client.query(
                "SELECT node, expires_at < now() FROM cluster_leases WHERE name = \(name)", logger: self.logger).decode((String, Bool).self) where !expired {
                holder = owner
            }
            return holder
        }
    }

    /// The secret `name` every node shares: made by the first node that asks (random, 256
    /// bits), read by the others.
    public func sharedSecret(_ name: String) async throws -> String {
        var generator = SystemRandomNumberGenerator()
        let candidate = (0..<32).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &generator)) }.joined()
        return try await within { client in
            try await client.query("INSERT INTO cluster_secrets (name, value) VALUES (\(name), \(candidate)) ON CONFLICT (name) DO NOTHING", logger: self.logger)
            for try await value in try await client.query("SELECT value FROM cluster_secrets WHERE name = \(name)", logger: self.logger).decode(String.self) {
                return value
            }
            throw ClusterError.configuration("the shared secret \(name) could not be read back")
        }
    }

    /// Gives the lease up (graceful shutdown), if this run holds it.
    public func releaseLease(_ name: String, node: String, incarnation: UInt64) async throws {
        let incarnationValue = Int64(bitPattern: incarnation)
        _ = try await within { client in
            try await client.query("DELETE FROM cluster_leases WHERE name = \(name) AND node = \(node) AND incarnation = \(incarnationValue)", logger: self.logger)
        }
    }

    /// A change to the session directory.
    public enum Change: Sendable {
        case bound(jid: String, node: String)
        case unbound(jid: String, node: String)
    }

    /// Applies directory changes in order, in one transaction.
    public func apply(_ changes: [Change]) async throws {
        guard !changes.isEmpty else { return }
        try await within { client in
            try await client.withTransaction(logger: self.logger) { connection in
                for change in changes {
                    switch change {
                    case .bound(let jid, let node):
                        try await connection.query("""
                            INSERT INTO cluster_sessions (jid, node, bound_at) VALUES (\(jid), \(node), now())
                            ON CONFLICT (jid) DO UPDATE SET node = EXCLUDED.node, bound_at = EXCLUDED.bound_at
                            """, logger: self.logger)
                    case .unbound(let jid, let node):
                        try await connection.query("DELETE FROM cluster_sessions WHERE jid = \(jid) AND node = \(node)", logger: self.logger)
                    }
                }
            }
        }
    }

    /// The directory: every bound full JID and its node.
    public func sessions(node: String? = nil) async throws -> [(jid: String, node: String)] {
        try await within { client in
            var result: [(jid: String, node: String)] = []
            let rows = try await client.query("SELECT jid, node FROM cluster_sessions ORDER BY node, jid", logger: self.logger)
            for try await (jid, owner) in rows.decode((String, String).self) where node == nil || node == owner {
                result.append((jid, owner))
            }
            return result
        }
    }

    /// Runs `body` on the current pool, failing after the storage's operation timeout
    /// (``DeadlineExceeded``): a database that is away must not stall heartbeats.
    ///
    /// A call without an answer for that long may be stuck on a connection that stopped
    /// answering without closing (the database host gone from the network, a failover that
    /// moved its address): postgres-nio cannot cancel a query in flight, so the call would keep
    /// its connection, and after four such calls every later one would wait for a connection in
    /// vain. So the pool is replaced: closing the old one fails whatever is stuck on it, and the
    /// next call connects afresh. With the database simply down, this only restarts the wait.
    private func within<T: Sendable>(_ body: @escaping @Sendable (PostgresClient) async throws -> T) async throws -> T {
        let client = pool.withLock { $0.client }
        do {
            return try await withDeadline(operationTimeout) { try await body(client) }
        } catch let error as DeadlineExceeded {
            let replaced: Task<Void, Never>? = pool.withLock { pool in
                // Another call may have replaced it already.
                guard pool.client === client else { return nil }
                let old = pool.runner
                pool = Self.makePool(configuration: configuration, eventLoopGroup: eventLoopGroup, logger: logger)
                return old
            }
            if let replaced {
                replaced.cancel()
                logger.warning("cluster database call unanswered; connections replaced", metadata: ["timeout": "\(operationTimeout)"])
            }
            throw error
        }
    }
}
