import Foundation
import Logging
import NIOCore
import NIOSSL
import PostgresNIO

/// The `storage` configuration section: which backend holds Braid's data.
public struct StorageSettings: Codable, Sendable, Equatable {
    public enum Backend: String, Codable, Sendable, CaseIterable {
        /// One file under `data_directory`, embedded: nothing to install.
        case sqlite
        /// A PostgreSQL server (`url`), for backups, replication and several Braid nodes.
        case postgresql
    }

    public var backend: Backend = .sqlite
    /// `postgresql://USER:PASSWORD@HOST:PORT/DATABASE?sslmode=…&sslrootcert=…`; the
    /// `BRAID_STORAGE_URL` environment variable keeps the password out of the file.
    public var url: String?
    /// Connections kept at most.
    public var poolSize: Int = 16
    /// How long a connection (and the check at start) may take.
    public var connectTimeoutSeconds: Int = 10
    /// How long one operation may wait (for a connection, then for its answer) before it
    /// fails: while the database is away, clients get errors instead of hanging.
    public var operationTimeoutSeconds: Int = 10

    public init() {}

    enum CodingKeys: String, CodingKey {
        case backend, url
        case poolSize = "pool_size"
        case connectTimeoutSeconds = "connect_timeout_seconds"
        case operationTimeoutSeconds = "operation_timeout_seconds"
    }

    /// Writes `url` even when nil: the configuration's keys (and the `BRAID_STORAGE_URL`
    /// environment override) come from the encoded defaults, so an optional left out would
    /// be an unknown key.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(backend, forKey: .backend)
        try container.encode(url, forKey: .url)
        try container.encode(poolSize, forKey: .poolSize)
        try container.encode(connectTimeoutSeconds, forKey: .connectTimeoutSeconds)
        try container.encode(operationTimeoutSeconds, forKey: .operationTimeoutSeconds)
    }

    /// Opens the configured backend. SQLite opens (and migrates) at once; PostgreSQL
    /// connects in ``Storage/prepare()``.
    public func open(dataDirectory: String, logger: Logger, eventLoopGroup: any EventLoopGroup) throws -> any Storage {
        switch backend {
        case .sqlite:
            return try SQLiteStorage(path: "\(dataDirectory)/braid.sqlite", logger: logger)
        case .postgresql:
            guard let url, !url.isEmpty else {
                throw PostgresConnectionSettings.Invalid("storage.url is required with storage.backend: postgresql")
            }
            var settings = try PostgresConnectionSettings(url: url)
            settings.maximumConnections = max(1, poolSize)
            settings.connectTimeout = .seconds(max(1, connectTimeoutSeconds))
            settings.operationTimeout = .seconds(max(1, operationTimeoutSeconds))
            return try PostgresStorage(settings: settings, eventLoopGroup: eventLoopGroup, logger: logger)
        }
    }
}

/// Where a PostgreSQL database is, from a `postgresql://` URL (libpq's form): user,
/// password, host (or a Unix socket directory with `?host=/path`), port, database, and TLS
/// (`sslmode=disable|prefer|require|verify-full`, `sslrootcert=FILE`).
public struct PostgresConnectionSettings: Sendable, Equatable {
    public struct Invalid: Error, CustomStringConvertible, Sendable {
        public var description: String
        public init(_ description: String) { self.description = description }
    }

    public enum TLSMode: String, Sendable {
        case disable, prefer, require
        /// `require` plus the server's certificate and name checked (libpq's `verify-full`).
        case verifyFull = "verify-full"
    }

    public var host: String
    public var port: Int
    /// A directory holding the server's socket (`.s.PGSQL.PORT`), instead of TCP.
    public var socketDirectory: String?
    public var username: String
    public var password: String?
    public var database: String
    public var tls: TLSMode
    public var rootCertificateFile: String?
    public var maximumConnections = 16
    public var connectTimeout: Duration = .seconds(10)
    public var operationTimeout: Duration = .seconds(10)

    public init(url: String) throws {
        guard let components = URLComponents(string: url), let scheme = components.scheme, ["postgresql", "postgres"].contains(scheme) else {
            throw Invalid("storage.url must be a postgresql:// URL")
        }
        let query = Dictionary((components.queryItems ?? []).map { ($0.name, $0.value ?? "") }, uniquingKeysWith: { $1 })
        for name in query.keys where !["sslmode", "sslrootcert", "host"].contains(name) {
            throw Invalid("storage.url: unknown parameter \(name)")
        }
        socketDirectory = query["host"].flatMap { $0.hasPrefix("/") ? $0 : nil }
        host = components.host.flatMap { $0.isEmpty ? nil : $0 } ?? "localhost"
        port = components.port ?? 5432
        username = components.user.flatMap { $0.removingPercentEncoding } ?? "braid"
        password = components.password.flatMap { $0.removingPercentEncoding }
        let path = components.path.hasPrefix("/") ? String(components.path.dropFirst()) : components.path
        database = path.isEmpty ? username : (path.removingPercentEncoding ?? path)
        let mode = query["sslmode"] ?? "prefer"
        guard let tls = TLSMode(rawValue: mode) else {
            throw Invalid("storage.url: sslmode must be disable, prefer, require or verify-full, not \(mode)")
        }
        self.tls = tls
        // verify-full without sslrootcert: the system's roots.
        rootCertificateFile = query["sslrootcert"]
    }

    /// The URL without its password, for logs and errors.
    public var redactedDescription: String {
        let where_ = socketDirectory.map { "\($0) (socket)" } ?? "\(host):\(port)"
        return "\(username)@\(where_)/\(database)"
    }

    public func clientConfiguration() throws -> PostgresClient.Configuration {
        var configuration: PostgresClient.Configuration
        if let socketDirectory {
            configuration = .init(unixSocketPath: "\(socketDirectory)/.s.PGSQL.\(port)", username: username, password: password, database: database)
        } else {
            configuration = .init(host: host, port: port, username: username, password: password, database: database, tls: try tlsSetting())
        }
        configuration.options.maximumConnections = maximumConnections
        configuration.options.connectTimeout = connectTimeout
        return configuration
    }

    private func tlsSetting() throws -> PostgresClient.Configuration.TLS {
        switch tls {
        case .disable:
            return .disable
        case .prefer, .require:
            // libpq's prefer and require encrypt without checking the certificate.
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateVerification = .none
            return self.tls == .prefer ? .prefer(tls) : .require(tls)
        case .verifyFull:
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.certificateVerification = .fullVerification
            if let rootCertificateFile {
                tls.trustRoots = .file(rootCertificateFile)
            }
            return .require(tls)
        }
    }
}
