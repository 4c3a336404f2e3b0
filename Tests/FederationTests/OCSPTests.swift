#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

import Federation
import Foundation
import Testing
import TestSupport
import Trust
import X509

@Suite("OCSP checks against openssl ocsp (RFC 6960, RFC 6120 §13.7.2.3)", .serialized, .enabled(if: OCSPResponderFixture.isAvailable))
struct OCSPTests {
    /// A CA whose certificates name a responder on a free loopback port.
    func authority(_ name: String = "OCSP Test CA") throws -> (TestCertificateAuthority, port: Int) {
        let port = try LoopbackPorts.freePort()
        return (try TestCertificateAuthority(commonName: name, ocspResponderURL: "http://127.0.0.1:\(port)"), port)
    }

    func withChecker<T: Sendable>(failureMode: OCSPChecker.FailureMode = .soft, _ body: (OCSPChecker) async throws -> T) async throws -> T {
        let requester = OCSPHTTPRequester(timeout: .seconds(3))
        do {
            let result = try await body(OCSPChecker(requester: requester, failureMode: failureMode))
            await requester.shutdown()
            return result
        } catch {
            await requester.shutdown()
            throw error
        }
    }

    @Test("The test CA writes the responder URL into the leaf's authorityInfoAccess")
    func leafNamesResponder() throws {
        let (ca, port) = try authority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let access = try #require(try leaf.extensions.authorityInformationAccess)
        #expect(access.contains { $0.method == .ocspServer && $0.location == .uniformResourceIdentifier("http://127.0.0.1:\(port)") })
        #expect(try ca.certificate.extensions.authorityInformationAccess == nil, "a root names no responder")
        // Without a responder URL nothing changes.
        let plain = try TestCertificateAuthority().issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        #expect(try plain.extensions.authorityInformationAccess == nil)
    }

    @Test("A good certificate is good until the responder's nextUpdate")
    func good() async throws {
        let (ca, port) = try authority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let status = try await OCSPResponderFixture.with(port: port, issuer: ca, states: [(leaf, .valid)], nextUpdateMinutes: 10) { _ in
            try await withChecker { await $0.check(chain: [leaf, ca.certificate]) }
        }
        guard case .good(let nextCheck) = status else {
            Issue.record("expected good, got \(status)")
            return
        }
        // -nmin 10: nextUpdate is ten minutes after the answer.
        #expect(abs(nextCheck.timeIntervalSinceNow - 600) < 60, "nextCheck \(nextCheck)")
    }

    @Test("A revoked certificate is revoked, with the reason")
    func revoked() async throws {
        let (ca, port) = try authority()
        let good = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let bad = try ca.issueXMPPServerCertificate(domains: ["bad.example"]).leafCertificate()
        let status = try await OCSPResponderFixture.with(port: port, issuer: ca, states: [(good, .valid), (bad, .revoked(reason: "keyCompromise"))]) { _ in
            try await withChecker { checker in
                (await checker.check(chain: [bad, ca.certificate]), await checker.check(chain: [good, ca.certificate]))
            }
        }
        guard case .revoked(let reason) = status.0 else {
            Issue.record("expected revoked, got \(status.0)")
            return
        }
        #expect(reason.contains("keyCompromise"), "\(reason)")
        #expect(status.0.nextCheck == nil)
        guard case .good = status.1 else {
            Issue.record("the good certificate of the same CA: \(status.1)")
            return
        }
    }

    @Test("A certificate the responder does not know is unknown, not revoked")
    func notInIndex() async throws {
        let (ca, port) = try authority()
        let known = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let stranger = try ca.issueXMPPServerCertificate(domains: ["stranger.example"]).leafCertificate()
        let status = try await OCSPResponderFixture.with(port: port, issuer: ca, states: [(known, .valid)]) { _ in
            try await withChecker { await $0.check(chain: [stranger, ca.certificate]) }
        }
        guard case .unknown(_, let nextCheck) = status else {
            Issue.record("expected unknown, got \(status)")
            return
        }
        #expect(nextCheck > Date() + 299)
    }

    @Test("The responder down is unknown with soft-fail, revoked with hard-fail")
    func responderDown() async throws {
        let (ca, _) = try authority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let started = ContinuousClock.now
        let soft = try await withChecker { await $0.check(chain: [leaf, ca.certificate]) }
        #expect(ContinuousClock.now - started < .seconds(10), "bounded")
        guard case .unknown(let reason, let nextCheck) = soft else {
            Issue.record("expected unknown, got \(soft)")
            return
        }
        #expect(reason.contains("unreachable"), "\(reason)")
        // Retried after an hour by default, not in a tight loop.
        #expect(abs(nextCheck.timeIntervalSinceNow - 3600) < 60)

        let hard = try await withChecker(failureMode: .hard) { await $0.check(chain: [leaf, ca.certificate]) }
        guard case .revoked = hard else {
            Issue.record("hard-fail must not accept an unchecked certificate: \(hard)")
            return
        }
    }

    @Test("A 'revoked' answer signed by someone the issuer never authorised is not believed")
    func forgedRevocation() async throws {
        let (ca, port) = try authority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["victim.example"]).leafCertificate()
        // The responder signs with a key of another CA: the answer does not verify.
        let impostor = try TestCertificateAuthority(commonName: "Impostor")
        let signer = PEMCredentials(certificateChainPEM: impostor.certificatePEM, privateKeyPEM: impostor.privateKeyPEM)
        let status = try await OCSPResponderFixture.with(port: port, issuer: ca, signer: signer, states: [(leaf, .revoked(reason: "keyCompromise"))]) { _ in
            try await withChecker { await $0.check(chain: [leaf, ca.certificate]) }
        }
        guard case .unknown = status else {
            Issue.record("an unverifiable revocation must be unknown, got \(status)")
            return
        }
    }

    @Test("A delegated responder (id-kp-OCSPSigning, RFC 6960 §4.2.2.2) is accepted")
    func delegatedResponder() async throws {
        let (ca, port) = try authority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let bad = try ca.issueXMPPServerCertificate(domains: ["bad.example"]).leafCertificate()
        let responder = try ca.issueOCSPResponder()
        let status = try await OCSPResponderFixture.with(port: port, issuer: ca, signer: responder, states: [(leaf, .valid), (bad, .revoked(reason: "superseded"))]) { _ in
            try await withChecker { checker in
                (await checker.check(chain: [leaf, ca.certificate]), await checker.check(chain: [bad, ca.certificate]))
            }
        }
        guard case .good = status.0 else {
            Issue.record("expected good, got \(status.0)")
            return
        }
        guard case .revoked(let reason) = status.1, reason.contains("superseded") else {
            Issue.record("expected revoked (superseded), got \(status.1)")
            return
        }
    }

    @Test("Answers without nextUpdate cannot be verified by the library: unknown, re-checked after 24 h")
    func noNextUpdate() async throws {
        let (ca, port) = try authority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let status = try await OCSPResponderFixture.with(port: port, issuer: ca, states: [(leaf, .valid)], nextUpdateMinutes: nil) { _ in
            try await withChecker { await $0.check(chain: [leaf, ca.certificate]) }
        }
        guard case .unknown(let reason, let nextCheck) = status else {
            Issue.record("expected unknown, got \(status)")
            return
        }
        #expect(reason.contains("nextUpdate"), "\(reason)")
        #expect(abs(nextCheck.timeIntervalSinceNow - 86_400) < 60)
    }

    @Test("Intermediates are checked too: each at its issuer's responder")
    func intermediateChecked() async throws {
        var ports: [Int] = []
        while ports.count < 3 {
            let port = try LoopbackPorts.freePort()
            if !ports.contains(port) { ports.append(port) }
        }
        let (rootPort, goodPort, badPort) = (ports[0], ports[1], ports[2])
        let root = try TestCertificateAuthority(commonName: "OCSP Root", ocspResponderURL: "http://127.0.0.1:\(rootPort)")
        let goodCA = try root.issueIntermediate(commonName: "Good Intermediate", ocspResponderURL: "http://127.0.0.1:\(goodPort)")
        let revokedCA = try root.issueIntermediate(commonName: "Revoked Intermediate", ocspResponderURL: "http://127.0.0.1:\(badPort)")
        let goodChain = try goodCA.issueXMPPServerCertificate(domains: ["good.example"]).certificateChain() + [root.certificate]
        let badChain = try revokedCA.issueXMPPServerCertificate(domains: ["bad.example"]).certificateChain() + [root.certificate]
        #expect(goodChain.count == 3)

        // The root's responder knows both intermediates; each intermediate's responder knows
        // its leaf as good. The second chain fails on its intermediate, not its leaf.
        let results = try await OCSPResponderFixture.with(
            port: rootPort, issuer: root,
            states: [(goodCA.certificate, .valid), (revokedCA.certificate, .revoked(reason: "cACompromise"))]
        ) { _ in
            try await OCSPResponderFixture.with(port: goodPort, issuer: goodCA, states: [(goodChain[0], .valid)]) { _ in
                try await OCSPResponderFixture.with(port: badPort, issuer: revokedCA, states: [(badChain[0], .valid)]) { _ in
                    try await withChecker { checker in
                        (await checker.check(chain: goodChain), await checker.check(chain: badChain))
                    }
                }
            }
        }
        guard case .good = results.0 else {
            Issue.record("expected good, got \(results.0)")
            return
        }
        guard case .revoked(let reason) = results.1, reason.contains("Revoked Intermediate"), reason.contains("cACompromise") else {
            Issue.record("expected the intermediate revoked, got \(results.1)")
            return
        }
    }

    @Test("No responder URL anywhere: unknown, checked again in 24 h")
    func noResponder() async throws {
        let ca = try TestCertificateAuthority()
        let leaf = try ca.issueXMPPServerCertificate(domains: ["good.example"]).leafCertificate()
        let status = try await withChecker { await $0.check(chain: [leaf, ca.certificate]) }
        guard case .unknown(_, let nextCheck) = status else {
            Issue.record("expected unknown, got \(status)")
            return
        }
        #expect(abs(nextCheck.timeIntervalSinceNow - 86_400) < 60)
        let lone = try await withChecker { await $0.check(chain: [leaf]) }
        guard case .unknown = lone else {
            Issue.record("a chain without its issuer cannot be checked: \(lone)")
            return
        }
    }
}
