import Crypto
import Foundation
import SwiftASN1
@_spi(DisableValidityCheck) import X509

// MARK: - Records and their source

/// One TLSA certificate association (RFC 6698 §2.1), as the DANE prooftype uses it.
///
/// This is Trust's own copy of the record's fields, so that Trust does not depend on the DNS
/// module; the DNS-backed source converts. The meaning of the fields (RFC 6698 §2.1.1–§2.1.3,
/// RFC 7218 acronyms):
/// - usage: PKIX-TA(0), PKIX-EE(1), DANE-TA(2), DANE-EE(3);
/// - selector: Cert(0), the whole certificate; SPKI(1), the SubjectPublicKeyInfo;
/// - matchingType: Full(0), the selected bytes themselves; SHA2-256(1); SHA2-512(2).
public struct TLSAAssociation: Sendable, Hashable, CustomStringConvertible {
    public var usage: UInt8
    public var selector: UInt8
    public var matchingType: UInt8
    public var data: [UInt8]

    public init(usage: UInt8, selector: UInt8, matchingType: UInt8, data: [UInt8]) {
        self.usage = usage
        self.selector = selector
        self.matchingType = matchingType
        self.data = data
    }

    /// The association that `certificate` satisfies with these parameters: what an operator
    /// publishes (e.g. `3 1 1` for DANE-EE, SPKI, SHA2-256, the usual choice: RFC 7671 §5.1
    /// recommends it because it survives certificate renewal with the same key).
    ///
    /// - Throws: ``TrustError`` when the selector or matching type is not one this
    ///   implementation knows, or the certificate cannot be encoded.
    public init(usage: UInt8, selector: UInt8, matchingType: UInt8, certificate: Certificate) throws(TrustError) {
        guard let selected = DANEMatching.selectedBytes(of: certificate, selector: selector) else {
            throw TrustError(.invalidCertificate, "selector \(selector) is unknown or the certificate cannot be encoded")
        }
        guard let data = DANEMatching.digest(selected, matchingType: matchingType) else {
            throw TrustError(.invalidCertificate, "matching type \(matchingType) is unknown")
        }
        self.init(usage: usage, selector: selector, matchingType: matchingType, data: data)
    }

    /// Usages RFC 6698 §2.1.1 defines.
    public static let pkixTA: UInt8 = 0
    public static let pkixEE: UInt8 = 1
    public static let daneTA: UInt8 = 2
    public static let daneEE: UInt8 = 3

    /// Whether this implementation can use the record at all (RFC 7671 §4: records with an
    /// unknown usage, selector or matching type are "unusable" and ignored, and so is a
    /// digest of the wrong length, which can never match).
    public var isUsable: Bool {
        guard usage <= 3, selector <= 1 else { return false }
        switch matchingType {
        case 0: return !data.isEmpty
        case 1: return data.count == 32
        case 2: return data.count == 64
        default: return false
        }
    }

    /// Whether `certificate` is the one (or holds the key) this association names.
    /// The usage is not looked at; that is the caller's business.
    public func matches(_ certificate: Certificate) -> Bool {
        guard isUsable, let selected = DANEMatching.selectedBytes(of: certificate, selector: selector),
              let computed = DANEMatching.digest(selected, matchingType: matchingType)
        else { return false }
        return DANEMatching.constantTimeEqual(computed, data)
    }

    /// Digest agility (RFC 7671 §9) over one TLSA RRset: per usage and selector, only the
    /// records of the strongest digest published are kept (SHA2-512 over SHA2-256), so that
    /// a weaker digest cannot be used to get around a stronger one. Full(0) records are exact
    /// comparisons and always kept. Apply it to the records of **one** server: records of
    /// different servers are independent RRsets.
    public static func strongestDigests(_ associations: [TLSAAssociation]) -> [TLSAAssociation] {
        struct Group: Hashable {
            var usage: UInt8
            var selector: UInt8
        }
        var strongest: [Group: UInt8] = [:]
        for association in associations where association.matchingType != 0 {
            let group = Group(usage: association.usage, selector: association.selector)
            strongest[group] = max(strongest[group] ?? 0, association.matchingType)
        }
        return associations.filter { association in
            association.matchingType == 0
                || association.matchingType == strongest[Group(usage: association.usage, selector: association.selector)]
        }
    }

    public var description: String {
        let digits = Array("0123456789abcdef".utf8)
        var hex: [UInt8] = []
        hex.reserveCapacity(data.count * 2)
        for byte in data {
            hex.append(digits[Int(byte >> 4)])
            hex.append(digits[Int(byte & 0x0F)])
        }
        return "\(usage) \(selector) \(matchingType) \(String(decoding: hex, as: UTF8.self))"
    }
}

/// What DNS says about the TLSA records that apply to a domain (RFC 7673 §3).
public enum DANELookup: Sendable, Hashable {
    /// DNSSEC-secure TLSA records, reached through a secure SRV answer and secure addresses.
    /// The associations hold until `expires` (the smallest TTL of the answers used, counted
    /// from the look-up); after that the proof must be made again (digest §14 Step 7).
    case secure([TLSAAssociation], expires: Date)
    /// DANE does not apply: no TLSA records, or the SRV, the addresses or the TLSA answer
    /// is not DNSSEC-secure (RFC 7673 §3.1, §3.2, §3.4: fall back to non-DANE behaviour).
    case none
    /// DNSSEC validation failed (or the answer was indeterminate) for an answer DANE
    /// depends on. Must fail closed (RFC 7673 §3.1, §3.2, §3.4).
    case bogus(String)
}

/// Where the DANE prooftype gets its TLSA records. The DNS-backed implementation lives in
/// the Federation module (`DNSDANESource`); tests may supply their own.
public protocol DANERecordSource: Sendable {
    /// The associations for `domain`.
    ///
    /// - Parameters:
    ///   - domain: the service domain being proven (the stream's `to` or `from`).
    ///   - target: where we connected (outgoing): the source must check that the domain's
    ///     secure SRV answer lists this host and port, and return the TLSA records of that
    ///     target only (`_PORT._tcp.HOST`, RFC 7673 §3.3). Nil (incoming): the union of the
    ///     TLSA records of every secure SRV target of the domain, each target's RRset first
    ///     reduced by ``TLSAAssociation/strongestDigests(_:)`` (digest agility is per RRset,
    ///     RFC 7671 §9, and cannot be applied after merging).
    func associations(for domain: String, target: ServerTarget?) async -> DANELookup
}

// MARK: - The prooftype

/// DANE as a prooftype (RFC 7712 §5.1, RFC 7673, RFC 6698, RFC 7671): the certificate on
/// the connection is the one the domain's DNSSEC-signed TLSA records name.
///
/// ## Outgoing (we connected; the peer is the TLS server; `evidence.connectedTarget` set)
/// This is what RFC 7673 specifies. The source returns the TLSA records of the target we
/// connected to, provided the domain's SRV answer is secure and lists it. Then, over the
/// *usable* records (known usage, selector and matching type, right digest length, RFC 7671
/// §4), after digest agility (below), the proof holds when any one matches:
/// - **DANE-EE(3)**: the leaf's certificate (selector 0) or SPKI (selector 1) matches. PKIX
///   path validation, name checks and the validity period are all ignored (RFC 7671 §5.1,
///   RFC 7673 §4.2): the DNS record *is* the authentication.
/// - **PKIX-EE(1)**: the leaf matches *and* passes ordinary PKIX validation for the domain
///   with the configured roots (RFC 6698 §2.1.1).
/// - **DANE-TA(2)**: a certificate of the presented chain other than the leaf matches, the
///   leaf chains to it (signatures, basic constraints, key usage and the validity of every
///   certificate below it; the trust anchor's own dates are not checked, as RFC 5280 §6.1
///   does not check a trust anchor's), and the leaf names the service domain or the SRV
///   target host (RFC 7671 §5.2, RFC 7673 §4.2: names are still checked for TA usages). The
///   server must send the trust anchor in its chain (RFC 7671 §5.2.2); a bare key that is not
///   in the chain is not supported.
/// - **PKIX-TA(0)**: the chain passes ordinary PKIX validation for the domain, and a
///   certificate of the validated path other than the leaf matches (RFC 6698 §2.1.1).
///   For both PKIX usages the name is checked by ``PeerCertificateValidator`` against the
///   service domain only (the stricter choice; RFC 7673 §4.1 would also allow the target).
///
/// When usable records exist and none matches, the outcome is `.refuted`: RFC 7673 §4.2 and
/// RFC 6698 §2.1 say the connection must then not be accepted. When no record is usable,
/// DANE does not apply (`.notApplicable`; RFC 7673 §4.1 falls back to PKIX).
///
/// Digest agility (RFC 7671 §9, ``TLSAAssociation/strongestDigests(_:)``): within one usage
/// and selector, when both SHA2-512 and SHA2-256 records are published only the SHA2-512
/// ones are used. Full(0) records are always used.
///
/// ## Incoming (the peer connected to us; its certificate is a TLS client certificate)
/// RFC 7673 says nothing about this (digest §10.4 trap): authenticating a *client*
/// certificate with the TLSA records of the domain's *servers* is implementation practice
/// (Prosody's `mod_s2s_auth_dane_in`). It is sound only when the peer uses the same key or
/// certificate for both roles, so only **DANE-EE(3)** records with selector 0 or 1 and
/// matching type 0–2 are considered, against the union of the TLSA records of every secure
/// SRV target of the claimed domain. TA and PKIX usages are ignored: they would need name
/// rules for clients that no specification gives. A mismatch here is `.notApplicable`, not
/// `.refuted`, because a peer may legitimately use another certificate as a client; another
/// prooftype (or dialback) may still prove the domain.
///
/// ## Failure and expiry
/// A bogus (or indeterminate) answer is `.refuted` in both directions: DANE must fail
/// closed (RFC 7673 §3.1). `.proven(.dane, expires:)` carries the lookup's expiry (the
/// smallest TTL of the SRV, address and TLSA answers used), lowered to the certificate
/// expiry where PKIX or a trust-anchor path was part of the match. **The proof is not
/// re-checked by itself**: the caller must prove the domain again once `expires` has passed
/// (``ProofOutcome/hasLapsed(at:)``) and stop sending for the domain, or reset the stream,
/// if it then fails (digest §14 Step 7; DANE's re-validation is DNS TTLs and RRSIG expiry,
/// not certificate expiry, digest §10.4).
public struct DANEProof: DomainProof {
    public let source: any DANERecordSource
    public let validator: PeerCertificateValidator

    public init(source: any DANERecordSource, validator: PeerCertificateValidator) {
        self.source = source
        self.validator = validator
    }

    public var method: ProofMethod { .dane }

    public func prove(_ domain: String, evidence: PeerEvidence) async -> ProofOutcome {
        guard let leaf = evidence.certificateChain.first else { return .notApplicable("no certificate") }
        let lookup = await source.associations(for: domain, target: evidence.connectedTarget)
        switch lookup {
        case .none:
            return .notApplicable("DANE: no DNSSEC-secure TLSA records apply to \(domain)")
        case .bogus(let reason):
            return .refuted("DANE: DNSSEC validation failed for \(domain): \(reason) (RFC 7673 §3.1: fail closed)")
        case .secure(let associations, let expires):
            if let target = evidence.connectedTarget {
                return await proveAsServer(domain, target: target, leaf: leaf, evidence: evidence, associations: associations, expires: expires)
            }
            return proveAsClient(domain, leaf: leaf, associations: associations, expires: expires)
        }
    }

    // MARK: Outgoing (RFC 7673)

    private func proveAsServer(
        _ domain: String, target: ServerTarget, leaf: Certificate, evidence: PeerEvidence,
        associations: [TLSAAssociation], expires: Date
    ) async -> ProofOutcome {
        let usable = TLSAAssociation.strongestDigests(associations.filter(\.isUsable))
        guard !usable.isEmpty else {
            return .notApplicable("DANE: \(target) publishes no usable TLSA record (RFC 7673 §4.1)")
        }
        let chain = evidence.certificateChain
        var reasons: [String] = []

        // DANE-EE first: it needs no further work and is by far the most common.
        if usable.contains(where: { $0.usage == TLSAAssociation.daneEE && $0.matches(leaf) }) {
            return .proven(.dane, expires: expires)
        }

        // PKIX-EE and PKIX-TA both need the ordinary PKIX result; compute it once.
        let pkixEE = usable.filter { $0.usage == TLSAAssociation.pkixEE }
        let pkixTA = usable.filter { $0.usage == TLSAAssociation.pkixTA }
        if !pkixEE.isEmpty || !pkixTA.isEmpty {
            switch await validator.validate(chain: chain, for: domain, at: evidence.time) {
            case .success(let validated):
                let lapses = min(expires, validated.expires)
                if pkixEE.contains(where: { $0.matches(leaf) }) {
                    return .proven(.dane, expires: lapses)
                }
                let anchors = validated.chain.dropFirst()
                if pkixTA.contains(where: { association in anchors.contains { association.matches($0) } }) {
                    return .proven(.dane, expires: lapses)
                }
                reasons.append("no PKIX-EE/PKIX-TA record matches the validated chain")
            case .failure(let failure):
                reasons.append("PKIX usages need PKIX validation: \(failure)")
            }
        }

        let daneTA = usable.filter { $0.usage == TLSAAssociation.daneTA }
        if !daneTA.isEmpty {
            switch await DANETrustAnchorPath.validate(chain: chain, associations: daneTA, domain: domain, targetHost: target.host, at: evidence.time) {
            case .valid(let pathExpiry):
                return .proven(.dane, expires: min(expires, pathExpiry))
            case .invalid(let reason):
                reasons.append(reason)
            }
        }
        if reasons.isEmpty { reasons.append("no DANE-EE record matches the certificate") }
        return .refuted("DANE: the certificate of \(target) matches none of its \(usable.count) usable TLSA records for \(domain): \(reasons.joined(separator: "; ")) (RFC 7673 §4.2)")
    }

    // MARK: Incoming (implementation practice)

    private func proveAsClient(_ domain: String, leaf: Certificate, associations: [TLSAAssociation], expires: Date) -> ProofOutcome {
        // No digest agility here: the records are the union of several servers' RRsets,
        // which the source has already reduced one by one (see DANERecordSource).
        let usable = associations.filter { $0.isUsable && $0.usage == TLSAAssociation.daneEE }
        guard !usable.isEmpty else {
            return .notApplicable("DANE: \(domain) publishes no usable DANE-EE record; only DANE-EE authenticates an incoming peer")
        }
        if usable.contains(where: { $0.matches(leaf) }) {
            return .proven(.dane, expires: expires)
        }
        return .notApplicable("DANE: the client certificate matches none of the \(usable.count) DANE-EE records of \(domain)'s servers")
    }
}

extension ProofOutcome {
    /// Whether a proof has lapsed at `time` and must be made again before more traffic is
    /// accepted or sent for the domain (digest §14 Step 7). Only `.proven` outcomes with an
    /// expiry lapse; other outcomes are not proofs and are reported as lapsed.
    public func hasLapsed(at time: Date) -> Bool {
        switch self {
        case .proven(_, let expires):
            guard let expires else { return false }
            return time >= expires
        case .notApplicable, .refuted:
            return true
        }
    }
}

// MARK: - Matching

enum DANEMatching {
    /// The bytes a selector picks (RFC 6698 §2.1.2): the certificate's DER (0) or its
    /// SubjectPublicKeyInfo DER exactly as the certificate carries it (1).
    ///
    /// The SPKI is cut out of the signed TBSCertificate bytes rather than re-encoded from the
    /// parsed key: re-encoding could change the form of a key (a compressed EC point, RSA
    /// parameters) and so the hash.
    static func selectedBytes(of certificate: Certificate, selector: UInt8) -> [UInt8]? {
        switch selector {
        case 0:
            var serializer = DER.Serializer()
            do {
                try serializer.serialize(certificate)
            } catch {
                return nil
            }
            return serializer.serializedBytes
        case 1:
            return subjectPublicKeyInfo(tbsCertificate: certificate.tbsCertificateBytes)
        default:
            return nil
        }
    }

    /// The SubjectPublicKeyInfo element of a DER TBSCertificate (RFC 5280 §4.1):
    /// `[0] version OPTIONAL, serialNumber, signature, issuer, validity, subject,
    /// subjectPublicKeyInfo, ...`.
    static func subjectPublicKeyInfo(tbsCertificate bytes: ArraySlice<UInt8>) -> [UInt8]? {
        guard let node = try? DER.parse(bytes), case .constructed(let children) = node.content else { return nil }
        var elements = Array(children)
        if let first = elements.first, first.identifier.tagClass == .contextSpecific, first.identifier.tagNumber == 0 {
            elements.removeFirst()
        }
        // serialNumber, signature, issuer, validity, subject, then the SPKI.
        guard elements.count > 5 else { return nil }
        let spki = elements[5]
        guard spki.identifier == .sequence else { return nil }
        return Array(spki.encodedBytes)
    }

    /// Applies a matching type (RFC 6698 §2.1.3).
    static func digest(_ bytes: [UInt8], matchingType: UInt8) -> [UInt8]? {
        switch matchingType {
        case 0: bytes
        case 1: Array(SHA256.hash(data: bytes))
        case 2: Array(SHA512.hash(data: bytes))
        default: nil
        }
    }

    /// Compares two byte strings without stopping at the first difference. The data is not
    /// secret, but this costs nothing and keeps timing out of the question.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for index in a.indices { difference |= a[index] ^ b[index] }
        return difference == 0
    }
}

// MARK: - DANE-TA path

/// Validation of a chain against a trust anchor named by DANE-TA(2) records.
enum DANETrustAnchorPath {
    enum Outcome {
        /// The path holds until the date (the earliest expiry below the trust anchor).
        case valid(until: Date)
        case invalid(String)
    }

    /// Checks that a certificate of `chain` other than the leaf matches one of
    /// `associations`, that the leaf chains to it, and that the leaf names `domain` or
    /// `targetHost`. Returns the earliest expiry of the path below the trust anchor.
    static func validate(
        chain: [Certificate], associations: [TLSAAssociation], domain: String, targetHost: String, at time: Date
    ) async -> Outcome {
        guard let leaf = chain.first else { return .invalid("no certificate") }
        let anchors = chain.dropFirst().filter { candidate in associations.contains { $0.matches(candidate) } }
        guard !anchors.isEmpty else {
            return .invalid("no certificate in the presented chain matches a DANE-TA record (the server must send its trust anchor, RFC 7671 §5.2.2)")
        }
        // RFC 7673 §4.2 / RFC 7671 §5.2: TA usages keep the name check. With a secure SRV
        // answer the target host is a valid reference identifier as well as the domain.
        let identity: CertificateIdentity
        do {
            identity = try CertificateIdentity(certificate: leaf)
        } catch {
            return .invalid("unreadable certificate: \(error)")
        }
        let namesDomain = identity.matches(domain: domain, service: .xmppServer) != nil
        let namesTarget = CertificateIdentity(dnsIDs: identity.dnsIDs).matches(domain: targetHost, service: .xmppServer) == .dnsID
        guard namesDomain || namesTarget else {
            return .invalid("DANE-TA: the certificate names neither \(domain) nor \(targetHost)")
        }
        var lastFailure = "DANE-TA: the leaf does not chain to the matching trust anchor"
        for anchor in anchors {
            var verifier = Verifier(rootCertificates: CertificateStore([anchor])) {
                RFC5280Policy.withValidityCheckDisabled()
                BelowTrustAnchorExpiryPolicy(validationTime: time)
                XMPPPeerKeyUsagePolicy()
                // The names were checked above (CertificateIdentity). A subjectAltName is
                // critical whenever the subject is empty (RFC 5280 §4.2.1.6); without this
                // the verifier would refuse such a leaf as "unhandled critical extension".
                AcknowledgeCriticalExtensionsPolicy(verifyingCriticalExtensions: [.X509ExtensionID.subjectAlternativeName])
            }
            let intermediates = chain.dropFirst().filter { $0 != anchor }
            switch await verifier.validate(leaf: leaf, intermediates: CertificateStore(intermediates)) {
            case .validCertificate(let path):
                let belowAnchor = Array(path).dropLast()
                return .valid(until: belowAnchor.map { $0.notValidAfter }.min() ?? leaf.notValidAfter)
            case .couldNotValidate(let failures):
                if let failure = failures.first {
                    lastFailure = "DANE-TA: \(failure.policyFailureReason)"
                }
            }
        }
        return .invalid(lastFailure)
    }
}

/// The validity-period check of RFC 5280 §6.1.3 (a)(2) for every certificate of the path
/// except the trust anchor at its end: a trust anchor is a key and a name, and its own dates
/// are not part of path validation (RFC 5280 §6.1.1 (d)).
struct BelowTrustAnchorExpiryPolicy: VerifierPolicy {
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = []
    let validationTime: Date

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        let time = validationTime
        for certificate in chain.dropLast() {
            if time < certificate.notValidBefore {
                let subject = certificate.subject.description
                return .failsToMeetPolicy(reason: "certificate \(subject) is not yet valid")
            }
            if time > certificate.notValidAfter {
                let subject = certificate.subject.description
                return .failsToMeetPolicy(reason: "certificate \(subject) has expired")
            }
        }
        return .meetsPolicy
    }
}
