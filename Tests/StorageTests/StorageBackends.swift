import Foundation
import Logging
import NIOPosix
import Synchronization
import Testing
import TestSupport
import XMPPCore
@testable import Storage

/// The backends every storage behaviour test runs on.
enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite
    case postgresql

    var testDescription: String { rawValue }
}

/// Where one test's data lives: a fresh SQLite file, or a fresh PostgreSQL database on the
/// suite's server. ``open()`` gives a new instance on it each time (a second process, a
/// restart); every instance is closed when the test ends.
final class StorageLocation: Sendable {
    let backend: Backend
    private let place: String
    private let opened = Mutex<[any Storage]>([])

    private init(backend: Backend, place: String) {
        self.backend = backend
        self.place = place
    }

    static func quietLogger() -> Logger {
        var logger = Logger(label: "braid.storage.test")
        logger.logLevel = .critical
        return logger
    }

    func open() async throws -> any Storage {
        let storage: any Storage
        switch backend {
        case .sqlite:
            storage = try SQLiteStorage(path: place, logger: Self.quietLogger())
        case .postgresql:
            var settings = try PostgresConnectionSettings(url: place)
            // Behaviour, not deadlines: two hundred concurrent stores queue for one account's
            // row lock, which on a loaded machine takes longer than a server's default bound.
            settings.operationTimeout = .seconds(120)
            storage = try PostgresStorage(settings: settings, eventLoopGroup: MultiThreadedEventLoopGroup.singleton, logger: Self.quietLogger())
        }
        try await storage.prepare()
        opened.withLock { $0.append(storage) }
        return storage
    }

    /// Runs `body` with a new location and closes what it opened.
    static func with<T>(_ backend: Backend, _ body: (StorageLocation) async throws -> T) async throws -> T {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-storage-tests-\(UUID().uuidString)", isDirectory: true)
        let place: String
        switch backend {
        case .sqlite:
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            place = directory.appendingPathComponent("braid.sqlite").path
        case .postgresql:
            guard let server = PostgresTestServer.current else {
                throw PostgresTestServer.Unavailable(description: "no PostgreSQL server: attach .postgresServer to the suite")
            }
            place = try await server.createDatabase()
        }
        let location = StorageLocation(backend: backend, place: place)
        defer { try? FileManager.default.removeItem(at: directory) }
        do {
            let result = try await body(location)
            await location.closeAll()
            return result
        } catch {
            await location.closeAll()
            throw error
        }
    }

    private func closeAll() async {
        for storage in opened.withLock({ $0 }) { await storage.close() }
    }
}

/// A new, empty store on `backend`.
func withEmptyStorage(_ backend: Backend, _ body: (any Storage) async throws -> Void) async throws {
    try await StorageLocation.with(backend) { location in try await body(try await location.open()) }
}

/// A new store on `backend` with `example.com` hosted.
func withStorage(_ backend: Backend, _ body: (any Storage) async throws -> Void) async throws {
    try await withEmptyStorage(backend) { storage in
        #expect(try await storage.addDomain("example.com"))
        try await body(storage)
    }
}

/// Two instances on one store (the server and the CLI, or two servers).
func withTwoInstances(_ backend: Backend, _ body: (any Storage, any Storage) async throws -> Void) async throws {
    try await StorageLocation.with(backend) { location in
        try await body(try await location.open(), try await location.open())
    }
}
