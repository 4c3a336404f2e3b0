#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

import AsyncHTTPClient
import Foundation
import NIOCore
import NIOSSL
import TestSupport
import Trust
import X509

/// Pebble, Let's Encrypt's test CA (`apt-get install pebble`), on loopback ports in a
/// temporary directory, validating HTTP-01 on `httpPort` and TLS-ALPN-01 on `tlsPort` at the
/// addresses knot gives. Stopped by PID.
final class PebbleFixture: Sendable {
    let directory: String
    let port: Int
    /// Pebble's management interface (`/roots/0`: the root its chains lead to).
    let managementPort: Int
    /// The CA that signed Pebble's HTTPS certificate, for `acme.ca_certificate_file`.
    let trustFile: String
    private let process: ChildProcess

    var directoryURL: String { "https://localhost:\(port)/dir" }

    static var isAvailable: Bool { ChildProcess.locate("pebble") != nil }

    private init(directory: String, port: Int, managementPort: Int, trustFile: String, process: ChildProcess) {
        self.directory = directory
        self.port = port
        self.managementPort = managementPort
        self.trustFile = trustFile
        self.process = process
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// - Parameter tlsPort: where TLS-ALPN-01 is validated (Braid's HTTPS listener); nil: a
    ///   free port where nothing listens.
    static func start(httpPort: Int, tlsPort: Int? = nil, dnsServer: String) async throws -> PebbleFixture {
        guard let pebble = ChildProcess.locate("pebble"), let env = ChildProcess.locate("env") else {
            throw Failure(description: "pebble is not installed")
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-pebble-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let authority = try TestCertificateAuthority(commonName: "Braid Pebble Test CA")
        let serving = try authority.issue(commonName: "localhost", dnsIDs: ["localhost"])
        try serving.write(certificatePath: directory + "/cert.pem", keyPath: directory + "/key.pem")
        let trustFile = directory + "/ca.pem"
        try authority.certificatePEM.write(toFile: trustFile, atomically: true, encoding: .utf8)
        var lastError: any Error = Failure(description: "pebble did not start")
        for _ in 0 ..< 3 {
            let port = try LoopbackPorts.freePort()
            let managementPort = try LoopbackPorts.freePort()
            let config = """
                {"pebble": {"listenAddress": "127.0.0.1:\(port)", "managementListenAddress": "127.0.0.1:\(managementPort)",
                 "certificate": "\(directory)/cert.pem", "privateKey": "\(directory)/key.pem",
                 "httpPort": \(httpPort), "tlsPort": \(try tlsPort ?? LoopbackPorts.freePort()), "ocspResponderURL": "",
                 "externalAccountBindingRequired": false}}
                """
            try config.write(toFile: directory + "/pebble.json", atomically: true, encoding: .utf8)
            // `env` execs pebble in place, so the PID is pebble's. No random sleeps before
            // validation; the default 5 % of nonces refused exercises the badNonce retry.
            let process = try ChildProcess.spawn(env, ["PEBBLE_VA_NOSLEEP=1", pebble, "-config", directory + "/pebble.json", "-dnsserver", dnsServer],
                                                 outputPath: directory + "/pebble.log")
            let deadline = ContinuousClock.now + .seconds(20)
            while process.isRunning, !process.output.contains("ACME directory available"), ContinuousClock.now < deadline {
                try await Task.sleep(for: .milliseconds(20))
            }
            if process.isRunning, process.output.contains("ACME directory available") {
                return PebbleFixture(directory: directory, port: port, managementPort: managementPort, trustFile: trustFile, process: process)
            }
            lastError = Failure(description: "pebble did not start: \(process.output)")
            await process.terminate()
        }
        try? FileManager.default.removeItem(atPath: directory)
        throw lastError
    }

    var log: String { process.output }

    /// The root Pebble's chains lead to (made anew at each start), from its management
    /// interface.
    func rootCertificate(group: any EventLoopGroup) async throws -> Certificate {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(trustFile)
        let http = HTTPClient(eventLoopGroup: group, configuration: .init(tlsConfiguration: tls))
        do {
            let response = try await http.execute(HTTPClientRequest(url: "https://localhost:\(managementPort)/roots/0"), timeout: .seconds(10))
            let pem = String(buffer: try await response.body.collect(upTo: 1 << 20))
            try await http.shutdown()
            return try Certificate(pemEncoded: pem)
        } catch {
            try? await http.shutdown()
            throw error
        }
    }

    func stop() async {
        await process.terminate()
        try? FileManager.default.removeItem(atPath: directory)
    }
}

/// Holds a loopback TCP port for a test while Braid's HTTP-01 listener is not (yet, or
/// between a stop and a restart) bound to it: Pebble validates at one fixed port, and other
/// suites' fixtures pick free ports meanwhile. Bound with SO_REUSEADDR and never listening,
/// so Braid's listener (SO_REUSEADDR too) binds beside it on Linux, while another bind
/// without the option (`LoopbackPorts.freePort`'s probe) finds the port taken.
final class PortReservation: Sendable {
    let port: Int
    private let descriptor: Int32

    init() throws {
        for _ in 0 ..< 20 {
            let port = try LoopbackPorts.freePort()
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { continue }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if bound == 0 {
                self.port = port
                descriptor = fd
                return
            }
            close(fd)
        }
        throw PebbleFixture.Failure(description: "no loopback port to reserve")
    }

    deinit {
        close(descriptor)
    }
}
