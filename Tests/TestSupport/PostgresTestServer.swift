#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import Foundation
import Synchronization
import Testing

/// A real PostgreSQL server for tests (Debian's `postgresql` package): a new cluster in a
/// temporary directory, on a free loopback port, run as the unprivileged `postgres` user when
/// the tests run as root (PostgreSQL refuses root), trusting local connections, and stopped by
/// PID. `fsync` is off: the tests check behaviour, not crash safety.
public final class PostgresTestServer: Sendable {
    public let port: Int
    public let directory: String
    private let binaries: String
    private let process: Mutex<ChildProcess?>
    private let databases = Atomic<Int>(0)

    /// The server of the enclosing suite (see ``PostgresServerTrait``).
    @TaskLocal public static var current: PostgresTestServer?

    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String

        public init(description: String) {
            self.description = description
        }
    }

    /// Certificate and key files when the server offers TLS.
    private let tlsFiles: (certificate: String, key: String)?

    private init(port: Int, directory: String, binaries: String, process: ChildProcess, tlsFiles: (certificate: String, key: String)?) {
        self.port = port
        self.directory = directory
        self.binaries = binaries
        self.process = Mutex(process)
        self.tlsFiles = tlsFiles
    }

    /// The highest installed major version's programs.
    static func locateBinaries() throws -> String {
        let root = "/usr/lib/postgresql"
        let versions = ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).compactMap(Int.init).sorted()
        if let version = versions.last, access("\(root)/\(version)/bin/postgres", X_OK) == 0 {
            return "\(root)/\(version)/bin"
        }
        if let postgres = ChildProcess.locate("postgres"), let initdb = ChildProcess.locate("initdb") {
            let directory = URL(fileURLWithPath: postgres).resolvingSymlinksInPath().deletingLastPathComponent().path
            if access("\(directory)/initdb", X_OK) == 0 { return directory }
            return URL(fileURLWithPath: initdb).deletingLastPathComponent().path
        }
        throw Unavailable(description: "PostgreSQL is not installed (apt-get install postgresql; bash Scripts/setup installs it)")
    }

    /// Runs as `postgres` when we are root.
    private static func command(_ executable: String, _ arguments: [String]) -> (String, [String]) {
        guard geteuid() == 0 else { return (executable, arguments) }
        return ("/usr/bin/setpriv", ["--reuid=postgres", "--regid=postgres", "--clear-groups", "--", executable] + arguments)
    }

    /// Creates a cluster and starts the server; returns once it accepts connections. With
    /// `tls` (PEM certificate and key), it offers TLS too (`ssl=on`); plain connections are
    /// still accepted.
    public static func start(tls: (certificatePEM: String, keyPEM: String)? = nil) async throws -> PostgresTestServer {
        let binaries = try locateBinaries()
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-pg-\(UUID().uuidString.prefix(8))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        if geteuid() == 0 {
            guard let user = getpwnam("postgres") else { throw Unavailable(description: "no 'postgres' user to run PostgreSQL as") }
            chown(directory, user.pointee.pw_uid, user.pointee.pw_gid)
        }
        let (initdb, initArguments) = command("\(binaries)/initdb", ["-D", "\(directory)/data", "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        let initialised = try await ChildProcess.run(initdb, initArguments, outputPath: "\(directory)/initdb.log", timeout: .seconds(60))
        guard initialised.exitCode == 0 else { throw Unavailable(description: "initdb failed: \(initialised.output)") }
        var tlsFiles: (certificate: String, key: String)?
        if let tls {
            let files = (certificate: "\(directory)/server.crt", key: "\(directory)/server.key")
            try tls.certificatePEM.write(toFile: files.certificate, atomically: true, encoding: .utf8)
            try tls.keyPEM.write(toFile: files.key, atomically: true, encoding: .utf8)
            // PostgreSQL refuses a key others may read; it runs as postgres.
            chmod(files.key, 0o600)
            if geteuid() == 0, let user = getpwnam("postgres") {
                chown(files.certificate, user.pointee.pw_uid, user.pointee.pw_gid)
                chown(files.key, user.pointee.pw_uid, user.pointee.pw_gid)
            }
            tlsFiles = files
        }
        var lastFailure = ""
        for _ in 0..<5 {
            let port = try LoopbackPorts.freePort()
            let process = try launch(binaries: binaries, directory: directory, port: port, tlsFiles: tlsFiles)
            let server = PostgresTestServer(port: port, directory: directory, binaries: binaries, process: process, tlsFiles: tlsFiles)
            if await server.waitUntilReady() { return server }
            lastFailure = process.output
            await server.stopProcess()
        }
        throw Unavailable(description: "PostgreSQL did not start: \(lastFailure)")
    }

    private static func launch(binaries: String, directory: String, port: Int, tlsFiles: (certificate: String, key: String)?) throws -> ChildProcess {
        var options = [
            "-D", "\(directory)/data", "-p", "\(port)", "-k", directory,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=300",
        ]
        if let tlsFiles {
            options += ["-c", "ssl=on", "-c", "ssl_cert_file=\(tlsFiles.certificate)", "-c", "ssl_key_file=\(tlsFiles.key)"]
        }
        let (postgres, arguments) = command("\(binaries)/postgres", options)
        return try ChildProcess.spawn(postgres, arguments, outputPath: "\(directory)/postgres-\(port).log")
    }

    private func waitUntilReady() async -> Bool {
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline {
            guard process.withLock({ $0?.isRunning }) == true else { return false }
            if let ready = try? await ChildProcess.run("\(binaries)/pg_isready", ["-h", "127.0.0.1", "-p", "\(port)", "-U", "postgres"],
                                                        outputPath: "\(directory)/isready.log"), ready.exitCode == 0 {
                return true
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return false
    }

    /// A new, empty database; returns its URL.
    public func createDatabase() async throws -> String {
        let name = "braid_test_\(databases.add(1, ordering: .relaxed).newValue)_\(UInt32.random(in: 0 ... .max))"
        let result = try await ChildProcess.run("/usr/bin/psql", ["-h", "127.0.0.1", "-p", "\(port)", "-U", "postgres", "-v", "ON_ERROR_STOP=1",
                                                                  "-c", "CREATE DATABASE \(name)"], outputPath: "\(directory)/psql-\(name).log", timeout: .seconds(30))
        guard result.exitCode == 0 else { throw Unavailable(description: "CREATE DATABASE failed: \(result.output)") }
        return url(database: name)
    }

    public func url(database: String) -> String {
        "postgresql://postgres@127.0.0.1:\(port)/\(database)?sslmode=disable"
    }

    /// Stops the server (fast shutdown: sessions are ended) and starts it again on the same
    /// port and data, for tests of a database restarted under a running server.
    public func restart() async throws {
        await stopProcess()
        let process = try Self.launch(binaries: binaries, directory: directory, port: port, tlsFiles: tlsFiles)
        self.process.withLock { $0 = process }
        guard await waitUntilReady() else { throw Unavailable(description: "PostgreSQL did not come back: \(process.output)") }
    }

    /// Stops the server for a while (a database that went away).
    public func stopServer() async {
        await stopProcess()
    }

    private func stopProcess() async {
        guard let process = self.process.withLock({ $0 }) else { return }
        // SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for every client.
        if process.isRunning { kill(process.pid, SIGINT) }
        if await process.waitForExit(timeout: .seconds(15)) == nil { await process.terminate() }
    }

    /// Stops the server and removes its directory.
    public func stop() async {
        await stopProcess()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Starts one PostgreSQL server for the suite it is attached to (and the suites inside it),
/// available as ``PostgresTestServer/current``, and stops it by PID afterwards.
public struct PostgresServerTrait: SuiteTrait, TestScoping {
    public func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        let server = try await PostgresTestServer.start()
        do {
            try await PostgresTestServer.$current.withValue(server) { try await function() }
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}

extension Trait where Self == PostgresServerTrait {
    /// A real PostgreSQL server for the suite.
    public static var postgresServer: Self { PostgresServerTrait() }
}
