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

    @Test("The certificate gauges count each certificate once and follow the earliest expiry through a reload")
    func expiryGauges() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("braid-expiry-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let now = Date()
        let shared = BraidConfiguration.CertificateFiles(certificate: "\(directory)/shared.crt", key: "\(directory)/shared.key")
        let own = BraidConfiguration.CertificateFiles(certificate: "\(directory)/own.crt", key: "\(directory)/own.key")
        // One certificate for two domains, valid 90 days; one for a third, valid 10 days.
        try SelfSignedCertificate.generate(domains: ["a.example", "b.example"], validityDays: 90, now: now).write(certificatePath: shared.certificate, keyPath: shared.key)
        try SelfSignedCertificate.generate(domains: ["c.example"], validityDays: 10, now: now).write(certificatePath: own.certificate, keyPath: own.key)
        let server = try await TestServer.start(domains: ["a.example", "b.example", "c.example"], users: []) { configuration in
            configuration.tls.certificates = [shared, own]
            configuration.tls.selfSignMissing = false
        }
        do {
            let earliest = { server.metrics.gaugeValue("braid_certificate_earliest_expiry_timestamp_seconds") ?? 0 }
            #expect(server.metrics.gaugeValue("braid_certificates") == 2)
            // X.509 times have whole seconds.
            #expect(abs(earliest() - (now.timeIntervalSince1970 + 10 * 86_400)) < 2)

            // Renewed for 60 days, which is still before the shared one's 90.
            try SelfSignedCertificate.generate(domains: ["c.example"], validityDays: 60, now: now).write(certificatePath: own.certificate, keyPath: own.key)
            server.server.reloadCertificates()
            #expect(server.metrics.gaugeValue("braid_certificates") == 2)
            #expect(abs(earliest() - (now.timeIntervalSince1970 + 60 * 86_400)) < 2)
        } catch {
            await server.stop()
            throw error
        }
        await server.stop()
    }
}
