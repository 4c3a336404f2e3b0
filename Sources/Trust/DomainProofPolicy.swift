import Foundation

/// How the proofs of a peer domain are combined: which are tried, in what order, and what a
/// success or refusal of each means. The rules live here, beside the proofs, rather than in
/// the federation code that asks (issue 10), so each is tested without a link:
///
/// - **Role.** When we connected (`PeerEvidence/connectedTarget` set), DANE comes first and a
///   DANE refusal is final: a DNSSEC-secure TLSA record that does not match means the wrong
///   server, whatever PKIX says (RFC 7673 §4.2). When the peer connected: PKIX, POSH, DANE.
/// - **Pins.** A peer covered by a ``PeerTrustRule`` is proven by PKIX to the rule's roots
///   only, and by the other methods only where the rule allows them.
/// - **POSH** replaces the name check only: the certificate must be within its validity period
///   (with `minimumRemainingLifetime` to spare), and the proof lapses with it (RFC 7711 §6).
/// - A refusal by any method (a POSH document listing other certificates, RFC 7711 §3.3)
///   stands unless another method proves the domain.
public struct DomainProofPolicy: Sendable {
    /// The proofs in their receiving-side order (PKIX first).
    public var proofs: [any DomainProof]
    public var minimumRemainingLifetime: TimeInterval

    public init(proofs: [any DomainProof], minimumRemainingLifetime: TimeInterval) {
        self.proofs = proofs
        self.minimumRemainingLifetime = minimumRemainingLifetime
    }

    /// The proofs to try for a peer, in order, given the role and the pin that covers it.
    /// `pinnedPKIX` makes the PKIX proof for a pin's roots.
    public func ordered(connecting: Bool, pin: PeerTrustRule?, pinnedPKIX: (PeerTrustRule) -> any DomainProof) -> [any DomainProof] {
        let byRole = connecting ? proofs.filter { $0.method == .dane } + proofs.filter { $0.method != .dane } : proofs
        guard let pin else { return byRole }
        return byRole.compactMap { proof in
            if proof.method == .pkix { return pinnedPKIX(pin) }
            return pin.permits(proof.method) ? proof : nil
        }
    }

    /// Tries `ordered` proofs of `domain` against `evidence` and combines their outcomes.
    public func prove(_ domain: String, evidence: PeerEvidence, ordered: [any DomainProof], pin: PeerTrustRule?) async -> ProofOutcome {
        var refutation: String?
        var reasons: [String] = []
        for proof in ordered {
            switch await proof.prove(domain, evidence: evidence) {
            case .proven(.posh, let expires):
                guard let leaf = evidence.certificateChain.first, leaf.notValidBefore <= evidence.time,
                      evidence.time + minimumRemainingLifetime < leaf.notValidAfter else {
                    reasons.append("posh: the certificate is outside its validity period")
                    continue
                }
                return .proven(.posh, expires: min(expires ?? leaf.notValidAfter, leaf.notValidAfter))
            case .proven(let method, let expires):
                return .proven(method, expires: expires)
            case .refuted(let why):
                if proof.method == .dane && evidence.connectedTarget != nil { return .refuted("dane: \(why)") }
                refutation = refutation ?? "\(proof.method.rawValue): \(why)"
            case .notApplicable(let why):
                reasons.append("\(proof.method.rawValue): \(why)")
            }
        }
        if let refutation { return .refuted(refutation) }
        if let pin {
            let others = pin.allowedProofs.map(\.rawValue).sorted().joined(separator: ", ")
            reasons.append("pinned by \(pin.name): only a chain to its CAs\(others.isEmpty ? "" : " or " + others)")
        }
        return .notApplicable(reasons.joined(separator: "; "))
    }
}
