import Foundation
import Testing
import X509
@testable import Trust

/// The rules of combining proofs, without a link or a network: each proof here answers what
/// the test says, so the order, the pins and POSH's validity window are what is tested.
@Suite("How proofs of a peer domain are combined")
struct DomainProofPolicyTests {
    static let ca = try! TestCertificateAuthority(commonName: "Policy Test CA")

    /// A proof that gives a fixed answer (the real ones need DNS, HTTPS or a CA; their own
    /// suites test them).
    struct Fixed: DomainProof {
        var method: ProofMethod
        var outcome: ProofOutcome
        func prove(_ domain: String, evidence: PeerEvidence) async -> ProofOutcome { outcome }
    }

    static let later = Date() + 3600

    func policy(pkix: ProofOutcome, posh: ProofOutcome, dane: ProofOutcome) -> DomainProofPolicy {
        DomainProofPolicy(proofs: [Fixed(method: .pkix, outcome: pkix), Fixed(method: .posh, outcome: posh), Fixed(method: .dane, outcome: dane)],
                          minimumRemainingLifetime: 10)
    }

    func evidence(connecting: Bool, notValidAfter: Date = Date() + 86_400) throws -> PeerEvidence {
        let chain = try Self.ca.issueXMPPServerCertificate(domains: ["peer.example"], notValidAfter: notValidAfter).certificateChain()
        return PeerEvidence(certificateChain: chain, time: Date(), connectedTarget: connecting ? ServerTarget(host: "xmpp.peer.example", port: 5269) : nil)
    }

    func run(_ policy: DomainProofPolicy, connecting: Bool, pin: PeerTrustRule? = nil, notValidAfter: Date = Date() + 86_400) async throws -> ProofOutcome {
        let ordered = policy.ordered(connecting: connecting, pin: pin) { _ in Fixed(method: .pkix, outcome: .notApplicable("no chain to the pinned CA")) }
        return await policy.prove("peer.example", evidence: try evidence(connecting: connecting, notValidAfter: notValidAfter), ordered: ordered, pin: pin)
    }

    @Test("Connecting: DANE first, and its refusal is final even when PKIX would prove (RFC 7673 §4.2)")
    func daneFirstWhenConnecting() async throws {
        let policy = policy(pkix: .proven(.pkix, expires: Self.later), posh: .notApplicable("none"), dane: .refuted("TLSA mismatch"))
        #expect(policy.ordered(connecting: true, pin: nil) { _ in Fixed(method: .pkix, outcome: .notApplicable("")) }.map(\.method) == [.dane, .pkix, .posh])
        #expect(try await run(policy, connecting: true) == .refuted("dane: TLSA mismatch"))
    }

    @Test("Receiving: PKIX, POSH, DANE in that order; a DANE refusal does not override PKIX")
    func receivingOrder() async throws {
        let policy = policy(pkix: .proven(.pkix, expires: Self.later), posh: .notApplicable("none"), dane: .refuted("TLSA mismatch"))
        #expect(policy.ordered(connecting: false, pin: nil) { _ in Fixed(method: .pkix, outcome: .notApplicable("")) }.map(\.method) == [.pkix, .posh, .dane])
        #expect(try await run(policy, connecting: false) == .proven(.pkix, expires: Self.later))
    }

    @Test("A refusal stands when nothing proves the domain, and yields to a later proof")
    func refusalUnlessProven() async throws {
        let refused = policy(pkix: .notApplicable("untrusted"), posh: .refuted("other fingerprints"), dane: .notApplicable("no TLSA"))
        #expect(try await run(refused, connecting: false) == .refuted("posh: other fingerprints"))
        let rescued = policy(pkix: .notApplicable("untrusted"), posh: .refuted("other fingerprints"), dane: .proven(.dane, expires: nil))
        #expect(try await run(rescued, connecting: false) == .proven(.dane, expires: nil))
    }

    @Test("POSH proves only within the certificate's validity, and lapses with it (RFC 7711 §6)")
    func poshWindow() async throws {
        let policy = policy(pkix: .notApplicable("untrusted"), posh: .proven(.posh, expires: Date() + 86_400 * 30), dane: .notApplicable("no TLSA"))
        let expiry = Date() + 86_400
        guard case .proven(.posh, let expires?) = try await run(policy, connecting: false, notValidAfter: expiry) else {
            Issue.record("POSH did not prove")
            return
        }
        #expect(abs(expires.timeIntervalSince(expiry)) < 2, "the proof lapses with the certificate, not the document")
        // Five seconds left, fewer than the minimum remaining lifetime: not relied on.
        let nearlyExpired = try await run(policy, connecting: false, notValidAfter: Date() + 5)
        guard case .notApplicable(let why) = nearlyExpired else { Issue.record("relied on an expiring certificate: \(nearlyExpired)"); return }
        #expect(why.contains("validity period"))
    }

    static let pinCases: [(Set<ProofMethod>, [ProofMethod])] = [
        ([], [.pkix]),
        ([.posh], [.pkix, .posh]),
        ([.dane, .posh, .dialback], [.pkix, .posh, .dane]),
    ]

    @Test("A pin: PKIX to its roots only; other methods only when it allows them", arguments: pinCases)
    func pins(allowed: Set<ProofMethod>, tried: [ProofMethod]) async throws {
        let pin = PeerTrustRule(name: "peers.peer.example", domains: ["peer.example"], roots: [Self.ca.certificate], allowedProofs: allowed)
        let policy = policy(pkix: .proven(.pkix, expires: Self.later), posh: .proven(.posh, expires: nil), dane: .proven(.dane, expires: nil))
        let ordered = policy.ordered(connecting: false, pin: pin) { _ in Fixed(method: .pkix, outcome: .notApplicable("no chain to the pinned CA")) }
        #expect(ordered.map(\.method) == tried)
        let outcome = await policy.prove("peer.example", evidence: try evidence(connecting: false), ordered: ordered, pin: pin)
        if allowed.isEmpty {
            // The general PKIX proof was replaced by the pinned one, which fails here.
            guard case .notApplicable(let why) = outcome else { Issue.record("pinned peer proven: \(outcome)"); return }
            #expect(why.contains("pinned by peers.peer.example"))
        } else {
            guard case .proven(.posh, _) = outcome else { Issue.record("allowed POSH did not prove: \(outcome)"); return }
        }
    }
}
