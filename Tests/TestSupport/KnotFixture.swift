#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import Foundation
import Testing

/// A real authoritative DNS server for tests: Knot DNS (`knotd`) on 127.0.0.1 and a random
/// free port, serving zones written from strings, optionally DNSSEC-signed by knot itself
/// (`dnssec-signing: on`, one ECDSA P-256 CSK). Everything lives in a fresh temporary
/// directory; `stop()` kills knotd by PID and deletes the directory.
///
/// Typical use:
/// ```swift
/// try await KnotFixture.withKnot(zones: [.init(name: "lab.braid.test", body: "...", signed: true)]) { knot in
///     let resolver = try UnboundResolver(configuration: .init(
///         stubZones: [(zone: "lab.braid.test", addresses: [knot.address])],
///         trustAnchors: [knot.ds(for: "lab.braid.test")]))
///     ...
/// }
/// ```
/// or, once per suite, the ``KnotSuiteTrait`` (`@Suite(.knot(zones))`) with
/// ``KnotFixture/current``.
///
/// Works as root (knot is not told to change user) and as an ordinary user (every path is
/// ours). Every wait is bounded.
public final class KnotFixture: Sendable {
    /// A zone to serve. `body` is zone-file text; `$ORIGIN`, `$TTL`, SOA and NS are added
    /// when it has no SOA of its own, so it may hold only the interesting records, with names
    /// relative to the zone.
    public struct Zone: Sendable {
        public var name: String
        /// Zone-file text, or nil for a zone that is configured but has no file: knot then
        /// answers SERVFAIL for it, which failure tests can use.
        public var body: String?
        public var signed: Bool

        public init(name: String, body: String, signed: Bool) {
            self.name = name.hasSuffix(".") ? String(name.dropLast()) : name
            self.body = body
            self.signed = signed
        }

        /// A zone knot is told about but cannot load, so it answers SERVFAIL.
        public static func failing(_ name: String) -> Zone {
            var zone = Zone(name: name, body: "", signed: false)
            zone.body = nil
            return zone
        }

        var fileContents: String? {
            guard let body else { return nil }
            if body.contains(" SOA ") || body.contains("\tSOA\t") { return body }
            return """
                $ORIGIN \(name).
                $TTL 300
                @ SOA ns1 hostmaster 1 3600 900 604800 300
                @ NS ns1
                ns1 A 127.0.0.1
                \(body)

                """
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The fixture of the enclosing ``KnotSuiteTrait``, if any.
    @TaskLocal public static var current: KnotFixture?

    public let directory: String
    public let port: Int
    public let zones: [Zone]
    /// DS records of each signed zone, as `keymgr ZONE ds` prints them (one per digest type).
    public let dsRecords: [String: [String]]
    private let process: ChildProcess

    /// `127.0.0.1@PORT`, the form unbound (and `UnboundResolver.Configuration`) takes.
    public var address: String { "127.0.0.1@\(port)" }
    public var configPath: String { directory + "/knot.conf" }
    public var logPath: String { process.outputPath }
    public var pid: pid_t { process.pid }

    private init(directory: String, port: Int, zones: [Zone], dsRecords: [String: [String]], process: ChildProcess) {
        self.directory = directory
        self.port = port
        self.zones = zones
        self.dsRecords = dsRecords
        self.process = process
    }

    /// Whether knotd, keymgr and kdig are installed.
    public static var isAvailable: Bool {
        ["knotd", "keymgr", "kdig"].allSatisfy { ChildProcess.locate($0) != nil }
    }

    /// The SHA-256 DS record of a signed zone, as one line for a trust anchor.
    public func ds(for zone: String) throws -> String {
        let name = zone.hasSuffix(".") ? String(zone.dropLast()) : zone
        guard let line = dsRecords[name]?.first(where: { $0.contains(" DS ") && $0.split(separator: " ").dropFirst(4).first == "2" }) else {
            throw Failure(description: "no SHA-256 DS record for \(zone); have \(dsRecords)")
        }
        return line
    }

    /// Runs `body` with a started server and always stops it afterwards.
    public static func withKnot<T: Sendable>(zones: [Zone], _ body: (KnotFixture) async throws -> T) async throws -> T {
        let knot = try await start(zones: zones)
        do {
            let result = try await body(knot)
            await knot.stop()
            return result
        } catch {
            await knot.stop()
            throw error
        }
    }

    /// Starts knotd and waits (bounded by `timeout`) until every zone answers and every
    /// signed zone carries RRSIGs. Retries with another port if the chosen one was taken.
    public static func start(zones: [Zone], timeout: Duration = .seconds(30)) async throws -> KnotFixture {
        guard let knotd = ChildProcess.locate("knotd"), let keymgr = ChildProcess.locate("keymgr"), let kdig = ChildProcess.locate("kdig") else {
            throw Failure(description: "knotd, keymgr and kdig are needed (Debian packages knot and knot-dnsutils)")
        }
        var lastError: any Error = Failure(description: "knotd did not start")
        for _ in 0 ..< 3 {
            let directory = try makeTemporaryDirectory()
            do {
                let port = try LoopbackPorts.freePort()
                try writeFiles(directory: directory, port: port, zones: zones)
                let process = try ChildProcess.spawn(knotd, ["-c", directory + "/knot.conf"], outputPath: directory + "/knotd.log")
                do {
                    try await waitUntilServing(zones: zones, port: port, kdig: kdig, process: process, directory: directory, timeout: timeout)
                    var dsRecords: [String: [String]] = [:]
                    for zone in zones where zone.signed {
                        let (code, output) = try await ChildProcess.run(keymgr, ["-c", directory + "/knot.conf", zone.name, "ds"], outputPath: directory + "/keymgr.out")
                        let lines = output.split(separator: "\n").map(String.init).filter { $0.contains(" DS ") }
                        guard code == 0, !lines.isEmpty else {
                            throw Failure(description: "keymgr \(zone.name) ds failed (\(code)): \(output)")
                        }
                        dsRecords[zone.name] = lines
                    }
                    return KnotFixture(directory: directory, port: port, zones: zones, dsRecords: dsRecords, process: process)
                } catch {
                    await process.terminate()
                    throw error
                }
            } catch {
                lastError = error
                removeDirectory(directory)
            }
        }
        throw lastError
    }

    /// Stops knotd (SIGTERM, then SIGKILL; reaped) and deletes the temporary directory.
    public func stop() async {
        await process.terminate()
        Self.removeDirectory(directory)
    }

    // MARK: Internals

    private static func makeTemporaryDirectory() throws -> String {
        // A short path under /tmp: knot's control socket lives in it, and socket paths are
        // limited to about 100 bytes.
        var template = Array("/tmp/braid-knot-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in
            buffer.baseAddress.map { mkdtemp($0) != nil } ?? false
        }
        guard made else { throw Failure(description: "mkdtemp failed: \(errno)") }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func removeDirectory(_ directory: String) {
        guard directory.hasPrefix("/tmp/braid-knot-") else { return }
        try? FileManager.default.removeItem(atPath: directory)
    }

    private static func writeFiles(directory: String, port: Int, zones: [Zone]) throws {
        for sub in ["db", "zones", "run"] {
            try FileManager.default.createDirectory(atPath: directory + "/" + sub, withIntermediateDirectories: true)
        }
        var zoneSection = "zone:\n"
        for zone in zones {
            try zone.fileContents?.write(toFile: "\(directory)/zones/\(zone.name).zone", atomically: true, encoding: .utf8)
            zoneSection += "  - domain: \(zone.name).\n"
            if zone.signed {
                zoneSection += "    dnssec-signing: on\n    dnssec-policy: lab\n"
            }
        }
        // No `user:` setting: knotd keeps the identity it was started with (root in CI, or
        // the developer), and every path below belongs to that identity. One worker each
        // keeps it light; the signed zone is kept in the journal, not written back.
        let config = """
            server:
                rundir: "\(directory)/run"
                listen: 127.0.0.1@\(port)
                udp-workers: 1
                tcp-workers: 1
                background-workers: 1
            log:
              - target: stderr
                any: info
            database:
                storage: "\(directory)/db"
            policy:
              - id: lab
                algorithm: ecdsap256sha256
                single-type-signing: on
            template:
              - id: default
                storage: "\(directory)/zones"
                file: "%s.zone"
                zonefile-sync: -1
            \(zoneSection)
            """
        try config.write(toFile: directory + "/knot.conf", atomically: true, encoding: .utf8)
    }

    private static func waitUntilServing(zones: [Zone], port: Int, kdig: String, process: ChildProcess, directory: String, timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        var pending = zones.filter { $0.body != nil }
        while !pending.isEmpty {
            guard process.isRunning else {
                throw Failure(description: "knotd exited (\(process.exitCode ?? -1)): \(process.output)")
            }
            guard ContinuousClock.now < deadline else {
                throw Failure(description: "knotd not serving \(pending.map(\.name)) within \(timeout): \(process.output)")
            }
            let zone = pending[0]
            let (code, output) = try await ChildProcess.run(
                kdig,
                ["@127.0.0.1", "-p", String(port), "+dnssec", "+norec", "+timeout=1", "+retry=0", "SOA", zone.name + "."],
                outputPath: directory + "/kdig.out"
            )
            let answered = code == 0 && output.contains("status: NOERROR") && output.contains("\tSOA\t")
            if answered && (!zone.signed || output.contains("\tRRSIG\t")) {
                pending.removeFirst()
            } else {
                try await Task.sleep(for: .milliseconds(100))
            }
        }
    }
}

/// Starts one knotd for a whole suite and makes it available as ``KnotFixture/current``
/// to the suite's tests; stops it when the suite is done.
public struct KnotSuiteTrait: SuiteTrait, TestScoping {
    public let zones: [KnotFixture.Zone]

    public var isRecursive: Bool { false }

    public func provideScope(for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void) async throws {
        let knot = try await KnotFixture.start(zones: zones)
        do {
            try await KnotFixture.$current.withValue(knot) {
                try await function()
            }
            await knot.stop()
        } catch {
            await knot.stop()
            throw error
        }
    }
}

extension Trait where Self == KnotSuiteTrait {
    /// Runs the suite against one knotd serving `zones`.
    public static func knot(_ zones: [KnotFixture.Zone]) -> Self {
        KnotSuiteTrait(zones: zones)
    }
}
