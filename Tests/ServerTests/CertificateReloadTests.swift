import Foundation
import Testing
import Trust
@testable import Server

@Suite("Certificate reload (SIGHUP)")
struct CertificateReloadTests {
    @Test("A renewed certificate is presented from the next handshake; a broken file keeps the last good one")
    func renewedCertificateIsPresented() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-reload-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let files = BraidConfiguration.CertificateFiles(certificate: "\(directory)/a.crt", key: "\(directory)/a.key")
        try SelfSignedCertificate.generate(domains: ["a.example"]).write(certificatePath: files.certificate, keyPath: files.key)

        let server = try await TestServer.start(domains: ["a.example"], users: []) { configuration in
            configuration.tls.certificates = [files]
        }
        func presented() async throws -> [UInt8] {
            let client = try await server.client(directTLS: "a.example")
            defer { Task { await client.close() } }
            try await client.sendHeader(to: "a.example")
            _ = try await client.nextElement()
            return try await client.serverEndPoint()
        }
        do {
            let first = try await presented()

            // Nothing changed on disk: nothing reported.
            #expect(server.server.reloadCertificates() == .init(changed: [], failures: []))

            try SelfSignedCertificate.generate(domains: ["a.example"]).write(certificatePath: files.certificate, keyPath: files.key)
            let outcome = server.server.reloadCertificates()
            #expect(outcome == .init(changed: ["a.example"], failures: []))
            let second = try await presented()
            #expect(second != first)
            let installed = try #require(server.context.certificates.store.certificateDER(for: "a.example"))
            #expect(second == (try TLSEndPoint.hash(installed)))

            // A half-written renewal: the domain keeps the certificate it had.
            try Data("-----BEGIN CERTIFICATE-----\ntruncated".utf8).write(to: URL(fileURLWithPath: files.certificate))
            let broken = server.server.reloadCertificates()
            #expect(broken.changed.isEmpty)
            #expect(broken.failures == [files.certificate])
            #expect(try await presented() == second)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
