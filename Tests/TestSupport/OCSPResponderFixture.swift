#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import Foundation
import Trust
import X509

/// `openssl ocsp` as a real OCSP responder on a loopback port, for one CA and an index of
/// certificate states. Files live in a fresh temporary directory; `stop()` kills the
/// responder by PID and deletes the directory.
///
/// Note: OpenSSL 3.0's `-port` takes a port number only, so the responder listens on every
/// interface of the machine for the few seconds a test runs. It serves nothing but the
/// status of throwaway test certificates.
public final class OCSPResponderFixture: Sendable {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    public enum State: Sendable {
        case valid
        case revoked(reason: String)
    }

    public let directory: String
    public let port: Int
    private let process: ChildProcess

    private init(directory: String, port: Int, process: ChildProcess) {
        self.directory = directory
        self.port = port
        self.process = process
    }

    public var url: String { "http://127.0.0.1:\(port)" }

    public static var isAvailable: Bool { ChildProcess.locate("openssl") != nil }

    /// Starts a responder on `port` for the certificates `issuer` issued.
    ///
    /// - Parameters:
    ///   - signer: the responder's certificate and key; nil: the issuer signs its own answers.
    ///   - nextUpdateMinutes: `-nmin`; nil leaves `nextUpdate` out of the answers.
    public static func start(
        port: Int,
        issuer: TestCertificateAuthority,
        signer: PEMCredentials? = nil,
        states: [(Certificate, State)],
        nextUpdateMinutes: Int? = 10
    ) async throws -> OCSPResponderFixture {
        guard let openssl = ChildProcess.locate("openssl") else { throw Failure(description: "openssl is needed") }
        let directory = try makeTemporaryDirectory()
        do {
            try issuer.certificatePEM.write(toFile: directory + "/ca.pem", atomically: true, encoding: .utf8)
            try (signer?.certificateChainPEM ?? issuer.certificatePEM).write(toFile: directory + "/signer.pem", atomically: true, encoding: .utf8)
            try (signer?.privateKeyPEM ?? issuer.privateKeyPEM).write(toFile: directory + "/signer.key", atomically: true, encoding: .utf8)
            try indexFile(states).write(toFile: directory + "/index.txt", atomically: true, encoding: .utf8)
            var arguments = [
                "ocsp", "-index", directory + "/index.txt", "-port", String(port),
                "-rsigner", directory + "/signer.pem", "-rkey", directory + "/signer.key", "-CA", directory + "/ca.pem",
            ]
            if let nextUpdateMinutes { arguments += ["-nmin", String(nextUpdateMinutes)] }
            let process = try ChildProcess.spawn(openssl, arguments, outputPath: directory + "/ocsp.log")
            let fixture = OCSPResponderFixture(directory: directory, port: port, process: process)
            do {
                try await fixture.waitUntilListening(timeout: .seconds(10))
            } catch {
                await fixture.stop()
                throw error
            }
            return fixture
        } catch {
            removeDirectory(directory)
            throw error
        }
    }

    /// Runs `body` with a started responder and always stops it afterwards.
    public static func with<T: Sendable>(
        port: Int,
        issuer: TestCertificateAuthority,
        signer: PEMCredentials? = nil,
        states: [(Certificate, State)],
        nextUpdateMinutes: Int? = 10,
        _ body: (OCSPResponderFixture) async throws -> T
    ) async throws -> T {
        let fixture = try await start(port: port, issuer: issuer, signer: signer, states: states, nextUpdateMinutes: nextUpdateMinutes)
        do {
            let result = try await body(fixture)
            await fixture.stop()
            return result
        } catch {
            await fixture.stop()
            throw error
        }
    }

    public func stop() async {
        // The responder has no state to save and OpenSSL 3.0's ignores SIGTERM while it
        // waits in accept(): a short grace, then SIGKILL (ChildProcess reaps it).
        await process.terminate(grace: .milliseconds(200))
        Self.removeDirectory(directory)
    }

    /// The port was taken before the responder bound it.
    public struct PortTaken: Error, CustomStringConvertible {
        public let port: Int
        public let output: String
        public var description: String { "port \(port) was taken before openssl ocsp bound it: \(output)" }
    }

    /// Runs `body` with a port chosen for a responder; when the responder finds it taken
    /// (``PortTaken``), runs `body` again with another, up to `attempts` times. For tests that
    /// must name the port before starting the responder (certificates carry its URL).
    public static func withResponderPort<T: Sendable>(attempts: Int = 3, _ body: (Int) async throws -> T) async throws -> T {
        var attempt = 1
        while true {
            let port = try LoopbackPorts.freePort()
            do {
                return try await body(port)
            } catch is PortTaken where attempt < attempts {
                attempt += 1
            }
        }
    }

    /// The responder prints its banner once its socket listens; connections queue from then
    /// on. (Do not probe with a connect-and-close: OpenSSL 3.0's single-threaded responder
    /// then blocks on the dead connection and never answers the next one.)
    private func waitUntilListening(timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            guard process.isRunning else {
                // openssl could not bind: something else took the port between our check and
                // its bind (another suite's pick). Callers that can choose again retry.
                if process.output.contains("Error starting accept") || process.output.contains("Address already in use") {
                    throw PortTaken(port: port, output: process.output)
                }
                throw Failure(description: "openssl ocsp exited: \(process.output)")
            }
            if process.output.contains("waiting for OCSP client connections") {
                return
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw Failure(description: "openssl ocsp not listening on \(port) within \(timeout): \(process.output)")
    }

    /// The `openssl ca` index format: status, expiry, revocation[,reason], serial (upper-case
    /// hex as BN_bn2hex prints it), file name, subject; tab-separated.
    public static func indexFile(_ states: [(Certificate, State)]) -> String {
        states.map { certificate, state in
            let expiry = opensslTime(certificate.notValidAfter)
            let serial = serialHex(certificate.serialNumber)
            switch state {
            case .valid:
                return "V\t\(expiry)\t\t\(serial)\tunknown\t/CN=valid\n"
            case .revoked(let reason):
                return "R\t\(expiry)\t\(opensslTime(Date() - 3600)),\(reason)\t\(serial)\tunknown\t/CN=revoked\n"
            }
        }.joined()
    }

    public static func serialHex(_ serial: Certificate.SerialNumber) -> String {
        let digits = Array("0123456789ABCDEF".utf8)
        let bytes = serial.bytes.drop { $0 == 0 }
        guard !bytes.isEmpty else { return "00" }
        var text: [UInt8] = []
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: text, as: UTF8.self)
    }

    /// YYMMDDHHMMSSZ in UTC.
    public static func opensslTime(_ date: Date) -> String {
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyMMddHHmmss"
        return formatter.string(from: date) + "Z"
    }

    private static func makeTemporaryDirectory() throws -> String {
        var template = Array("/tmp/braid-ocsp-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { buffer in
            buffer.baseAddress.map { mkdtemp($0) != nil } ?? false
        }
        guard made else { throw Failure(description: "mkdtemp failed: \(errno)") }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func removeDirectory(_ directory: String) {
        guard directory.hasPrefix("/tmp/braid-ocsp-") else { return }
        try? FileManager.default.removeItem(atPath: directory)
    }
}

