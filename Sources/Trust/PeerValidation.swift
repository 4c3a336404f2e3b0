import Foundation
import SwiftASN1
import X509
import XMPPCore

/// The certificate authorities an s2s peer's certificate may chain to.
///
/// RFC 6120 §13.6: per-peer trust anchors can be configured, and for such a peer the general
/// store is not used at all.
public struct PeerTrustAnchors: Sendable {
    /// Roots for every peer no rule covers: the system store plus configured extras.
    public var defaultRoots: [Certificate]
    /// Trust pins: peers (by domain, domain pattern or server host) whose certificates must
    /// chain to the rule's roots only, and which other proofs they may still use.
    public var rules: [PeerTrustRule]

    /// - Parameters:
    ///   - peerRoots: peers (by canonical domain) that chain only to these roots and have no
    ///     other way in (shorthand for one exact rule each, with no other proofs allowed).
    public init(defaultRoots: [Certificate], peerRoots: [String: [Certificate]] = [:], rules: [PeerTrustRule] = []) {
        self.defaultRoots = defaultRoots
        self.rules = peerRoots.sorted { $0.key < $1.key }.map { domain, roots in
            PeerTrustRule(name: "peers.\(domain)", domains: [domain], roots: roots)
        } + rules
    }

    /// Whether some rule matches by server host, so that finding the rule for a domain may
    /// need its DNS location.
    public var hasHostRules: Bool { rules.contains { !$0.targetHosts.isEmpty } }

    /// The rule covering `domain`, reached through `targetHosts` (the host we connected to,
    /// and the hosts its SRV records name): a rule naming the domain itself wins, then the
    /// longest matching pattern, then the first rule naming one of the hosts.
    public func rule(for domain: String, targetHosts: [String] = []) -> PeerTrustRule? {
        let canonical = (try? JID(domain: domain).domainpart) ?? domain.lowercased()
        if let exact = rules.first(where: { $0.domains.contains(canonical) }) { return exact }
        let bySuffix = rules.compactMap { rule -> (PeerTrustRule, Int)? in
            let lengths = rule.domainSuffixes.filter { canonical.hasSuffix($0) && canonical.count > $0.count }.map(\.count)
            return lengths.max().map { (rule, $0) }
        }
        if let longest = bySuffix.max(by: { $0.1 < $1.1 }) { return longest.0 }
        let hosts = Set(targetHosts.map { PeerTrustRule.canonicalHost($0) })
        guard !hosts.isEmpty else { return nil }
        return rules.first { rule in rule.targetHosts.contains { hosts.contains($0) } }
    }

    /// The roots for `domain` (see ``rule(for:targetHosts:)``).
    public func roots(for domain: String, targetHosts: [String] = []) -> [Certificate] {
        rule(for: domain, targetHosts: targetHosts)?.roots ?? defaultRoots
    }

    /// The same anchors with every peer pinned to `roots` (a rule's roots, once the rule has
    /// been found).
    public func pinned(to roots: [Certificate]) -> PeerTrustAnchors {
        PeerTrustAnchors(defaultRoots: roots)
    }

    /// The system's trusted CAs (Debian: /etc/ssl/certs/ca-certificates.crt). Unreadable
    /// entries are skipped; a missing bundle gives none.
    public static func systemRoots(bundle: String = "/etc/ssl/certs/ca-certificates.crt") -> [Certificate] {
        guard let text = try? String(contentsOfFile: bundle, encoding: .utf8) else { return [] }
        return certificates(inPEM: text)
    }

    /// Every certificate in a PEM file.
    public static func load(pemFile path: String) throws(TrustError) -> [Certificate] {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw TrustError(.fileSystem, "cannot read \(path): \(error)")
        }
        let found = certificates(inPEM: text)
        guard !found.isEmpty else { throw TrustError(.invalidCertificate, "no certificate in \(path)") }
        return found
    }

    static func certificates(inPEM text: String) -> [Certificate] {
        guard let documents = try? PEMDocument.parseMultiple(pemString: text) else { return [] }
        return documents.compactMap { document in
            guard document.discriminator == "CERTIFICATE" else { return nil }
            return try? Certificate(derEncoded: document.derBytes)
        }
    }
}

/// A trust pin (RFC 6120 §13.7.2.1 leaves the choice of trust anchors to the deployment):
/// the peers it covers must present a certificate chaining to `roots`, and every other way of
/// proving their domains (DANE, POSH, dialback) is refused unless listed in `allowedProofs`.
/// A provider with many customer domains is covered by one rule, by domain pattern or by the
/// host names of its servers, rather than one entry per domain.
public struct PeerTrustRule: Sendable {
    /// Where the rule comes from, for logs (`peers.DOMAIN`, `provider_trust[0]`).
    public var name: String
    /// Canonical domains covered.
    public var domains: [String]
    /// From patterns `*.SUFFIX`: every domain ending in `.SUFFIX`, at any depth (not SUFFIX
    /// itself; list it in `domains`).
    public var domainSuffixes: [String]
    /// Server host names (SRV targets, or the host a static peer entry connects to): a
    /// domain is covered when we connected to one of them, or its SRV records name one. This
    /// follows DNS: an attacker who can forge the domain's SRV answer can steer around it,
    /// which DNSSEC prevents. Domain patterns do not depend on DNS.
    public var targetHosts: [String]
    public var roots: [Certificate]
    /// Proof methods accepted besides PKIX to `roots`.
    public var allowedProofs: Set<ProofMethod>

    public init(name: String, domains: [String] = [], patterns: [String] = [], targetHosts: [String] = [],
                roots: [Certificate], allowedProofs: Set<ProofMethod> = []) {
        self.name = name
        var exact: [String] = []
        var suffixes: [String] = []
        for entry in domains + patterns {
            if entry.hasPrefix("*.") {
                suffixes.append("." + ((try? JID(domain: String(entry.dropFirst(2))).domainpart) ?? String(entry.dropFirst(2)).lowercased()))
            } else {
                exact.append((try? JID(domain: entry).domainpart) ?? entry.lowercased())
            }
        }
        self.domains = exact
        self.domainSuffixes = suffixes
        self.targetHosts = targetHosts.map(Self.canonicalHost)
        self.roots = roots
        self.allowedProofs = allowedProofs
    }

    /// Whether a proof by `method` may authenticate a peer this rule covers. PKIX always may
    /// (to the rule's roots only).
    public func permits(_ method: ProofMethod) -> Bool {
        method == .pkix || allowedProofs.contains(method)
    }

    static func canonicalHost(_ host: String) -> String {
        var host = host.lowercased()
        if host.hasSuffix(".") { host.removeLast() }
        return host
    }
}

/// A peer certificate that chains to a trusted root and names the domain asked about.
public struct ValidatedPeerCertificate: Sendable, Hashable {
    /// The chain as verified, leaf first, ending in the root.
    public var chain: [Certificate]
    /// How the domain matched (RFC 6125 / RFC 6120 §13.7.1).
    public var match: CertificateIdentity.Match
    /// The earliest expiry in the chain: the proof lapses then (RFC 6120 §13.7.2.3).
    public var expires: Date

    public var leaf: Certificate? { chain.first }
}

/// Why a peer certificate does not prove a domain.
public enum PeerCertificateFailure: Error, Sendable, Hashable, CustomStringConvertible {
    case noCertificate
    case untrusted(String)
    case nameMismatch(String)

    public var description: String {
        switch self {
        case .noCertificate: "the peer presented no certificate"
        case .untrusted(let reason): "certificate not trusted: \(reason)"
        case .nameMismatch(let domain): "certificate does not name \(domain)"
        }
    }
}

/// PKIX validation of an s2s peer (RFC 6120 §13.7.2, RFC 6125, XEP-0178).
///
/// The chain is built and checked with swift-certificates (RFC 5280 path validation and
/// expiry); the name is checked separately against the reference identifiers for an XMPP
/// server: SRV-ID `_xmpp-server.DOMAIN`, DNS-ID `DOMAIN` and XmppAddr `DOMAIN`.
///
/// Extended key usage: a server-auth-only certificate is accepted from a peer acting as a
/// client, because public CAs no longer issue clientAuth (2026) and the certificate names a
/// server domain either way (XEP-0178 trap in the digest).
public struct PeerCertificateValidator: Sendable {
    public var anchors: PeerTrustAnchors
    /// A chain that expires sooner than this after the validation time is not relied on: a
    /// link authenticated in a certificate's last moments would be reset at once, taking the
    /// stanzas sent on it along (the peer falls back to dialback instead).
    public var minimumRemainingLifetime: TimeInterval

    public init(anchors: PeerTrustAnchors, minimumRemainingLifetime: TimeInterval = 0) {
        self.anchors = anchors
        self.minimumRemainingLifetime = minimumRemainingLifetime
    }

    /// This validator with every peer pinned to `rule`'s roots.
    public func pinned(to rule: PeerTrustRule) -> PeerCertificateValidator {
        PeerCertificateValidator(anchors: anchors.pinned(to: rule.roots), minimumRemainingLifetime: minimumRemainingLifetime)
    }

    /// Validates `chain` (leaf first, as presented) for `domain` at `time`.
    public func validate(chain: [Certificate], for domain: String, at time: Date = Date(), targetHosts: [String] = []) async -> Result<ValidatedPeerCertificate, PeerCertificateFailure> {
        guard let leaf = chain.first else { return .failure(.noCertificate) }
        let identity: CertificateIdentity
        do {
            identity = try CertificateIdentity(certificate: leaf)
        } catch {
            return .failure(.untrusted("unreadable certificate: \(error)"))
        }
        guard let match = identity.matches(domain: domain, service: .xmppServer) else {
            return .failure(.nameMismatch(domain))
        }
        var verifier = Verifier(rootCertificates: CertificateStore(anchors.roots(for: domain, targetHosts: targetHosts))) {
            RFC5280Policy(validationTime: time)
            XMPPPeerKeyUsagePolicy()
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(chain.dropFirst()))
        switch result {
        case .validCertificate(let validated):
            let verified = Array(validated)
            let expires = verified.map(\.notValidAfter).min() ?? leaf.notValidAfter
            let remaining = expires.timeIntervalSince(time)
            guard remaining >= minimumRemainingLifetime else {
                return .failure(.untrusted("the certificate chain expires in \(max(0, Int(remaining))) s, too soon to rely on"))
            }
            return .success(ValidatedPeerCertificate(chain: verified, match: match, expires: expires))
        case .couldNotValidate(let failures):
            let reason = failures.first.map { "\($0.policyFailureReason)" } ?? "no path to a trusted root"
            return .failure(.untrusted(reason))
        }
    }
}

extension PeerCertificateValidator {
    /// The validated path from `chain`'s leaf to a trusted root, without any name check:
    /// what revocation checks need (each certificate with its issuer). Nil when no path
    /// validates at `time`.
    public func trustedPath(of chain: [Certificate], for domain: String, at time: Date = Date(), targetHosts: [String] = []) async -> [Certificate]? {
        guard let leaf = chain.first else { return nil }
        var verifier = Verifier(rootCertificates: CertificateStore(anchors.roots(for: domain, targetHosts: targetHosts))) {
            RFC5280Policy(validationTime: time)
            XMPPPeerKeyUsagePolicy()
        }
        if case .validCertificate(let validated) = await verifier.validate(leaf: leaf, intermediates: CertificateStore(chain.dropFirst())) {
            return Array(validated)
        }
        return nil
    }
}

/// Accepts a leaf whose extended key usage allows server or client authentication, or that
/// has none; refuses one restricted to other purposes (code signing, e-mail, ...).
struct XMPPPeerKeyUsagePolicy: VerifierPolicy {
    /// The extended key usage is judged here; the subject alternative names (critical when
    /// the subject is empty, RFC 5280 §4.2.1.6) are matched by ``CertificateIdentity``.
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = [.X509ExtensionID.extendedKeyUsage, .X509ExtensionID.subjectAlternativeName]

    mutating func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        let leaf = chain.leaf
        let usage: ExtendedKeyUsage?
        do {
            usage = try leaf.extensions.extendedKeyUsage
        } catch {
            return .failsToMeetPolicy(reason: "unreadable extended key usage")
        }
        guard let usage else { return .meetsPolicy }
        if usage.contains(.serverAuth) || usage.contains(.clientAuth) || usage.contains(.any) {
            return .meetsPolicy
        }
        return .failsToMeetPolicy(reason: "extended key usage allows neither server nor client authentication")
    }
}

// MARK: - Proofs

/// How a domain was proven on a link (RFC 7712 §7 prooftypes, plus dialback).
public enum ProofMethod: String, Sendable, Hashable, CaseIterable, Codable {
    /// A certificate chaining to a trusted root and naming the domain (RFC 6125).
    case pkix
    /// A certificate matched by a DNSSEC-secure TLSA record (RFC 7673).
    case dane
    /// A certificate whose fingerprint the domain publishes over HTTPS (RFC 7711).
    case posh
    /// A dialback key confirmed by the domain's authoritative server (XEP-0220).
    case dialback
    /// Nothing on the connection proved the peer: we reached it through the domain's DNS
    /// records (SRV, A/AAAA), which is all the initiator of a dialback-authenticated stream
    /// relies on. Said as it is, not labelled dialback when no dialback happened.
    case dns

    /// Whether this method proves the peer's identity on the connection itself (a
    /// certificate: PKIX, DANE or POSH), as adding a target to a link requires (RFC 7712
    /// §4.4.2).
    public var isCertificateProof: Bool {
        switch self {
        case .pkix, .dane, .posh: true
        case .dialback, .dns: false
        }
    }
}

/// A host and port a connection was made to.
public struct ServerTarget: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String { "\(host):\(port)" }
}

/// What a link knows about its peer when a domain must be proven.
public struct PeerEvidence: Sendable {
    /// The certificate chain the peer presented on this connection, leaf first.
    public var certificateChain: [Certificate]
    /// When the proof is being decided.
    public var time: Date
    /// Where we connected, when we opened the connection (the peer is the TLS server);
    /// nil when the peer connected to us (its certificate is a TLS client certificate).
    public var connectedTarget: ServerTarget?

    public init(certificateChain: [Certificate], time: Date = Date(), connectedTarget: ServerTarget? = nil) {
        self.certificateChain = certificateChain
        self.time = time
        self.connectedTarget = connectedTarget
    }
}

/// The outcome of one proof attempt.
public enum ProofOutcome: Sendable, Hashable {
    /// The peer is proven for the domain until `expires` (nil: for the life of the link).
    case proven(ProofMethod, expires: Date?)
    /// This method cannot say (no certificate, no record, ...); another may.
    case notApplicable(String)
    /// This method positively failed (a mismatch, a bogus answer): do not accept the domain.
    case refuted(String)
}

/// One way of proving that the peer on a link speaks for a domain. Each prooftype is a small
/// type behind this protocol; the federation layer tries them strongest first.
public protocol DomainProof: Sendable {
    var method: ProofMethod { get }
    func prove(_ domain: String, evidence: PeerEvidence) async -> ProofOutcome
}

/// PKIX: the certificate on this connection chains to a trusted root and names the domain.
public struct PKIXProof: DomainProof {
    public let validator: PeerCertificateValidator

    public init(validator: PeerCertificateValidator) {
        self.validator = validator
    }

    public var method: ProofMethod { .pkix }

    public func prove(_ domain: String, evidence: PeerEvidence) async -> ProofOutcome {
        guard !evidence.certificateChain.isEmpty else { return .notApplicable("no certificate") }
        switch await validator.validate(chain: evidence.certificateChain, for: domain, at: evidence.time) {
        case .success(let validated):
            return .proven(.pkix, expires: validated.expires)
        case .failure(let failure):
            return .notApplicable(failure.description)
        }
    }
}
