import Crypto
import Foundation
import SwiftASN1
import Synchronization
@_spi(FixedExpiryValidationTime) import X509

// MARK: - Public API

/// The revocation state of a peer's certificate chain, as OCSP reports it (RFC 6960).
public enum RevocationStatus: Sendable, Hashable {
    /// Every certificate of the chain that names an OCSP responder was reported good in a
    /// verified response. Check again at `nextCheck`.
    case good(nextCheck: Date)
    /// A verified response reports a certificate of the chain revoked. RFC 6120 §13.7.2.3:
    /// close the stream (with `<reset/>` where the link supports it, digest §1.3 item 23).
    case revoked(reason: String)
    /// No verified answer: the responder is unreachable, answered "unknown", or its answer
    /// did not verify; or no certificate names a responder. With soft-fail (the default)
    /// this is not a reason to drop the peer. Ask again at `nextCheck`.
    case unknown(reason: String, nextCheck: Date)

    /// When to ask again; nil once revoked.
    public var nextCheck: Date? {
        switch self {
        case .good(let next), .unknown(_, let next): next
        case .revoked: nil
        }
    }
}

/// Sends an OCSP request and returns the responder's bytes. The `OCSPRequester` of
/// swift-certificates, plus a way to see the bytes: ``OCSPChecker`` needs the response
/// itself (for `nextUpdate` and the per-certificate status), which the library's opaque
/// query result does not expose.
///
/// Conformers implement ``fetch(request:uri:)``; `query(request:uri:)` comes for free and
/// reports every thrown error as a non-terminal failure (soft), so the type can also be
/// handed to an `OCSPVerifierPolicy` directly.
public protocol OCSPFetching: OCSPRequester {
    /// POSTs the DER-encoded `request` to the responder at `uri` (RFC 6960 App. A.1) and
    /// returns the DER-encoded response. Throws for transport failures, non-200 answers,
    /// oversized bodies and timeouts.
    func fetch(request: [UInt8], uri: String) async throws -> [UInt8]
}

extension OCSPFetching {
    public func query(request: [UInt8], uri: String) async -> OCSPRequesterQueryResult {
        do {
            return .response(try await fetch(request: request, uri: uri))
        } catch {
            return .nonTerminalError(error)
        }
    }
}

/// Checks a peer's certificate chain with OCSP (RFC 6960), for RFC 6120 §13.7.2.3: a
/// long-lived stream re-checks its peer's certificates at the responder's `nextUpdate`, or
/// every 24 hours when there is none, and is closed when one is revoked.
///
/// The leaf and every intermediate that carries an OCSP URL in its authorityInfoAccess
/// extension are checked against their issuer, the next certificate of the chain. The
/// requests, and the verification of the answers (the responder is the issuer or a
/// certificate the issuer delegated with id-kp-OCSPSigning, RFC 6960 §4.2.2.2; signature,
/// nonce, `thisUpdate`/`nextUpdate` window, certificate ID), are swift-certificates'
/// `OCSPVerifierPolicy`. This type adds what the policy's yes/no cannot say:
/// - **which** answer: good, revoked or unknown. The chain is first checked in the policy's
///   hard mode, which passes only when every answer is a verified "good" (or a responder
///   could not be reached, which the transport log shows). When it fails and a response
///   says "revoked", the check is repeated in soft mode, which fails *only* on a verified
///   revocation; so a forged or stale "revoked" cannot end a stream, and a revocation that
///   verifies always does. Revocations cost a second round trip; good answers one.
/// - **when** to ask again: the earliest `nextUpdate` of the answers, clamped between
///   `minimumInterval` and `maximumInterval`; `defaultInterval` (24 h, RFC 6120 §13.7.2.3)
///   when no answer has one; `retryInterval` after a failure.
///
/// Limits, from the library: an answer without `nextUpdate` does not verify (RFC 5019
/// §4 profile), so it is `.unknown` (retried after `defaultInterval`); the chain's last
/// certificate (the root) must not name a responder; SHA-1 certificate IDs. No CRLs.
///
/// Failure mode: `.soft` (the default) reports anything short of a verified answer as
/// `.unknown`, so an unreachable responder never drops a peer; `.hard` reports it as
/// `.revoked`. The chain itself is not judged here (expiry, names, path policy): that is
/// ``PeerCertificateValidator``'s job, done before.
public struct OCSPChecker: Sendable {
    public enum FailureMode: Sendable, Hashable {
        /// No verified answer ⇒ `.unknown`: the peer stays (the common choice; an attacker
        /// who can block OCSP can also block the peer).
        case soft
        /// No verified "good" ⇒ `.revoked`.
        case hard
    }

    public let failureMode: FailureMode
    /// Used when no answer carries `nextUpdate` (RFC 6120 §13.7.2.3: every 24 hours), and
    /// when no certificate names a responder.
    public let defaultInterval: TimeInterval
    /// The soonest a check is repeated, whatever a responder says.
    public let minimumInterval: TimeInterval
    /// The latest a check is repeated, whatever a responder says.
    public let maximumInterval: TimeInterval
    /// When to try again after a failure (unreachable responder, unverifiable answer).
    public let retryInterval: TimeInterval
    private let fetcher: any OCSPFetching

    /// - Parameters:
    ///   - requester: the transport, e.g. Federation's `OCSPHTTPRequester`.
    ///   - failureMode: what a missing or unverifiable answer means; soft by default.
    ///   - defaultInterval: re-check interval without `nextUpdate` (24 h).
    ///   - minimumInterval: lower bound of every re-check interval (5 min).
    ///   - maximumInterval: upper bound of every re-check interval (7 days).
    ///   - retryInterval: re-check interval after a failure (1 h).
    public init(
        requester: some OCSPFetching,
        failureMode: FailureMode = .soft,
        defaultInterval: Duration = .seconds(86_400),
        minimumInterval: Duration = .seconds(300),
        maximumInterval: Duration = .seconds(7 * 86_400),
        retryInterval: Duration = .seconds(3600)
    ) {
        self.fetcher = requester
        self.failureMode = failureMode
        self.minimumInterval = Self.seconds(minimumInterval)
        self.maximumInterval = max(Self.seconds(maximumInterval), self.minimumInterval)
        self.defaultInterval = Self.seconds(defaultInterval)
        self.retryInterval = Self.seconds(retryInterval)
    }

    /// Checks `chain` (leaf first, ending with the issuer of the last intermediate or the
    /// root, as ``ValidatedPeerCertificate/chain`` holds it) at `time`.
    public func check(chain: [Certificate], at time: Date = Date()) async -> RevocationStatus {
        guard chain.count >= 2, let root = chain.last else {
            return failed("the chain has no issuer to check the certificate against", at: time)
        }
        var subjects: [OCSPSubject] = []
        for index in chain.indices.dropLast() {
            switch Self.responderURL(of: chain[index]) {
            case .unreadable(let reason):
                return failed(reason, at: time)
            case .none:
                continue
            case .url:
                subjects.append(OCSPSubject(certificate: chain[index], issuer: chain[index + 1]))
            }
        }
        guard !subjects.isEmpty else {
            return .unknown(reason: "no certificate of the chain names an OCSP responder", nextCheck: clamp(time + defaultInterval, at: time))
        }
        if case .url = Self.responderURL(of: root) {
            return failed("the chain's last certificate names an OCSP responder; it must be the root", at: time)
        }

        let strict = await run(.hard, chain: chain, at: time)
        let answers = subjects.map { OCSPAnswer.find(for: $0, in: strict.exchanges) }
        if strict.passed {
            if let failure = strict.exchanges.lazy.compactMap(\.failure).first {
                return failed("OCSP responder unreachable: \(failure)", at: time)
            }
            var nextUpdates: [Date] = []
            for (subject, answer) in zip(subjects, answers) {
                guard let answer, answer.status == .good else {
                    return failed("no OCSP answer for \(subject.name)", at: time)
                }
                if let next = answer.nextUpdate { nextUpdates.append(next) }
            }
            return .good(nextCheck: clamp(nextUpdates.min() ?? time + defaultInterval, at: time))
        }

        let strictReason = strict.reason ?? "the chain could not be checked"
        if answers.contains(where: { $0?.isRevoked == true }) {
            // Confirm in soft mode, which fails only when a revocation verifies.
            let confirm = await run(.soft, chain: chain, at: time)
            if !confirm.passed {
                for subject in subjects {
                    if let answer = OCSPAnswer.find(for: subject, in: confirm.exchanges),
                       case .revoked(let revokedAt, let reasonCode) = answer.status {
                        return .revoked(reason: Self.describeRevocation(of: subject, at: revokedAt, reasonCode: reasonCode))
                    }
                }
            }
        }
        if answers.contains(where: { $0 != nil && $0?.nextUpdate == nil }) {
            // The library rejects answers without nextUpdate; RFC 6120 §13.7.2.3 says to
            // check such a certificate daily.
            return failed("OCSP answer without nextUpdate cannot be verified: \(strictReason)", at: time, retry: defaultInterval)
        }
        return failed(strictReason, at: time)
    }

    // MARK: Internals

    private func failed(_ reason: String, at time: Date, retry: TimeInterval? = nil) -> RevocationStatus {
        switch failureMode {
        case .soft: .unknown(reason: reason, nextCheck: clamp(time + (retry ?? retryInterval), at: time))
        case .hard: .revoked(reason: "hard-fail OCSP: \(reason)")
        }
    }

    private func clamp(_ date: Date, at time: Date) -> Date {
        min(max(date, time + minimumInterval), time + maximumInterval)
    }

    private struct Run {
        var passed: Bool
        var reason: String?
        var exchanges: [OCSPExchange]
    }

    /// One pass of swift-certificates' verifier with only the OCSP policy (plus a policy
    /// that acknowledges the chain's critical extensions, which are not this check's
    /// business: without it the verifier refuses to build the chain at all).
    private func run(_ mode: OCSPFailureMode, chain: [Certificate], at time: Date) async -> Run {
        guard let leaf = chain.first, let root = chain.last else { return Run(passed: false, reason: "empty chain", exchanges: []) }
        let recorder = OCSPRecordingRequester(fetcher)
        let critical = Set(chain.flatMap { $0.extensions.filter(\.critical).map(\.oid) })
        var verifier = Verifier(rootCertificates: CertificateStore([root])) {
            OCSPVerifierPolicy(failureMode: mode, requester: recorder, fixedExpiryValidationTime: time)
            AcknowledgeCriticalExtensionsPolicy(verifyingCriticalExtensions: Array(critical))
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(chain.dropFirst().dropLast()))
        switch result {
        case .validCertificate:
            return Run(passed: true, reason: nil, exchanges: recorder.exchanges)
        case .couldNotValidate(let failures):
            let reason = failures.first.map { "\($0.policyFailureReason)" } ?? "the chain's signatures do not link the certificates to the root"
            return Run(passed: false, reason: reason, exchanges: recorder.exchanges)
        }
    }

    /// The OCSP responder URL of a certificate's AIA extension (RFC 5280 §4.2.2.1), nil
    /// when it has none.
    static func responderURL(of certificate: Certificate) -> ResponderLookup {
        let access: AuthorityInformationAccess?
        do {
            access = try certificate.extensions.authorityInformationAccess
        } catch {
            return .unreadable("unreadable authorityInfoAccess extension in \(certificate.subject): \(error)")
        }
        guard let access else { return .none }
        for description in access where description.method == .ocspServer {
            if case .uniformResourceIdentifier(let uri) = description.location { return .url(uri) }
        }
        return .none
    }

    enum ResponderLookup {
        case none
        case url(String)
        case unreadable(String)
    }

    private static func describeRevocation(of subject: OCSPSubject, at revokedAt: Date?, reasonCode: Int?) -> String {
        var text = "\(subject.name) is revoked (OCSP, RFC 6960)"
        if let revokedAt { text += " since \(revokedAt)" }
        if let reasonCode { text += ", reason \(CRLReasonName.name(reasonCode))" }
        return text
    }

    private static func seconds(_ duration: Duration) -> TimeInterval {
        let components = duration.components
        return max(0, TimeInterval(components.seconds) + TimeInterval(components.attoseconds) / 1e18)
    }
}

// MARK: - Transport log

/// One request and what came back.
struct OCSPExchange: Sendable {
    var uri: String
    var response: [UInt8]?
    var failure: String?
}

/// Passes requests to the real transport and keeps what came back, so that the answers the
/// policy verified can be read afterwards (status, `nextUpdate`). One per verifier run.
final class OCSPRecordingRequester: OCSPRequester {
    private let fetcher: any OCSPFetching
    private let log = Mutex<[OCSPExchange]>([])

    init(_ fetcher: any OCSPFetching) {
        self.fetcher = fetcher
    }

    var exchanges: [OCSPExchange] { log.withLock { $0 } }

    func query(request: [UInt8], uri: String) async -> OCSPRequesterQueryResult {
        do {
            let response = try await fetcher.fetch(request: request, uri: uri)
            log.withLock { $0.append(OCSPExchange(uri: uri, response: response, failure: nil)) }
            return .response(response)
        } catch {
            log.withLock { $0.append(OCSPExchange(uri: uri, response: nil, failure: "\(uri): \(error)")) }
            // Non-terminal: the policy lets the certificate pass, and the log tells this
            // type that the answer is missing.
            return .nonTerminalError(error)
        }
    }
}

/// Declares the chain's critical extensions handled, for an OCSP-only verification: path
/// validation proper (constraints, key usage, names) is done elsewhere.
struct AcknowledgeCriticalExtensionsPolicy: VerifierPolicy {
    let verifyingCriticalExtensions: [ASN1ObjectIdentifier]

    func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        .meetsPolicy
    }
}

// MARK: - Reading answers

/// A certificate whose status is asked, and its issuer.
struct OCSPSubject {
    var certificate: Certificate
    var issuer: Certificate

    var name: String { "certificate \(certificate.subject) (serial \(certificate.serialNumber))" }
}

/// What one SingleResponse (RFC 6960 §4.2.1) says about one certificate. Read only from
/// answers the library has already judged; this reader just extracts fields.
struct OCSPAnswer: Sendable, Equatable {
    enum Status: Sendable, Equatable {
        case good
        case revoked(at: Date?, reasonCode: Int?)
        case unknown
    }

    var status: Status
    var nextUpdate: Date?

    var isRevoked: Bool {
        if case .revoked = status { return true }
        return false
    }

    /// The latest answer about `subject` among `exchanges`.
    static func find(for subject: OCSPSubject, in exchanges: [OCSPExchange]) -> OCSPAnswer? {
        var found: OCSPAnswer?
        for exchange in exchanges {
            guard let bytes = exchange.response else { continue }
            for single in (try? OCSPResponseReader.singleResponses(bytes)) ?? [] where single.identifies(subject) {
                found = single.answer
            }
        }
        return found
    }
}

/// A minimal, tolerant reader of the fields of an OCSP response (RFC 6960 §4.2.1):
///
/// ```
/// OCSPResponse ::= SEQUENCE { responseStatus ENUMERATED, responseBytes [0] EXPLICIT ResponseBytes OPTIONAL }
/// ResponseBytes ::= SEQUENCE { responseType OBJECT IDENTIFIER, response OCTET STRING }
/// BasicOCSPResponse ::= SEQUENCE { tbsResponseData ResponseData, signatureAlgorithm, signature, certs [0] OPTIONAL }
/// ResponseData ::= SEQUENCE { version [0] DEFAULT v1, responderID, producedAt, responses SEQUENCE OF SingleResponse, ... }
/// SingleResponse ::= SEQUENCE { certID CertID, certStatus CertStatus, thisUpdate, nextUpdate [0] EXPLICIT OPTIONAL, ... }
/// CertID ::= SEQUENCE { hashAlgorithm, issuerNameHash OCTET STRING, issuerKeyHash OCTET STRING, serialNumber INTEGER }
/// CertStatus ::= CHOICE { good [0] IMPLICIT NULL, revoked [1] IMPLICIT RevokedInfo, unknown [2] IMPLICIT NULL }
/// RevokedInfo ::= SEQUENCE { revocationTime GeneralizedTime, revocationReason [0] EXPLICIT CRLReason OPTIONAL }
/// ```
/// Anything unexpected throws; the caller then treats the answer as absent.
enum OCSPResponseReader {
    struct Single {
        var hashAlgorithm: ASN1ObjectIdentifier
        var issuerKeyHash: [UInt8]
        var serial: Certificate.SerialNumber
        var answer: OCSPAnswer

        func identifies(_ subject: OCSPSubject) -> Bool {
            guard serial == subject.certificate.serialNumber else { return false }
            let key = subject.issuer.publicKey.subjectPublicKeyInfoBytes
            let expected: [UInt8]
            switch hashAlgorithm {
            case OCSPResponseReader.sha1: expected = Array(Insecure.SHA1.hash(data: key))
            case OCSPResponseReader.sha256: expected = Array(SHA256.hash(data: key))
            default: return false
            }
            return expected == issuerKeyHash
        }
    }

    struct Malformed: Error, CustomStringConvertible {
        var description: String
    }

    static let sha1: ASN1ObjectIdentifier = [1, 3, 14, 3, 2, 26]
    static let sha256: ASN1ObjectIdentifier = [2, 16, 840, 1, 101, 3, 4, 2, 1]
    static let basicResponse: ASN1ObjectIdentifier = [1, 3, 6, 1, 5, 5, 7, 48, 1, 1]

    static func singleResponses(_ bytes: [UInt8]) throws -> [Single] {
        let response = try children(of: DER.parse(bytes))
        guard response.count >= 1, response[0].identifier == .enumerated else { throw Malformed(description: "no responseStatus") }
        // responseStatus 0 is "successful"; anything else carries no responses.
        guard case .primitive(let status) = response[0].content, status.elementsEqual([0]) else { return [] }
        guard response.count >= 2, response[1].identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) else {
            throw Malformed(description: "no responseBytes")
        }
        let responseBytes = try children(of: only(children(of: response[1])))
        guard responseBytes.count == 2 else { throw Malformed(description: "bad ResponseBytes") }
        guard try ASN1ObjectIdentifier(derEncoded: responseBytes[0]) == basicResponse else {
            throw Malformed(description: "not a basic OCSP response")
        }
        let basicDER = try ASN1OctetString(derEncoded: responseBytes[1])
        let basic = try children(of: DER.parse(basicDER.bytes))
        guard let tbs = basic.first else { throw Malformed(description: "empty BasicOCSPResponse") }
        var data = try children(of: tbs)
        if let first = data.first, first.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) {
            data.removeFirst()
        }
        // responderID, producedAt, responses.
        guard data.count >= 3 else { throw Malformed(description: "short ResponseData") }
        return try children(of: data[2]).map(single)
    }

    private static func single(_ node: ASN1Node) throws -> Single {
        let fields = try children(of: node)
        guard fields.count >= 3 else { throw Malformed(description: "short SingleResponse") }
        let certID = try children(of: fields[0])
        guard certID.count == 4 else { throw Malformed(description: "bad CertID") }
        let algorithm = try children(of: certID[0])
        guard let algorithmOID = algorithm.first else { throw Malformed(description: "bad hash algorithm") }
        let oid = try ASN1ObjectIdentifier(derEncoded: algorithmOID)
        let keyHash = try ASN1OctetString(derEncoded: certID[2])
        guard certID[3].identifier == .integer, case .primitive(let serialBytes) = certID[3].content else {
            throw Malformed(description: "bad serial number")
        }

        let status: OCSPAnswer.Status
        switch fields[1].identifier {
        case ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific):
            status = .good
        case ASN1Identifier(tagWithNumber: 1, tagClass: .contextSpecific):
            let info = try children(of: fields[1])
            let revokedAt = try info.first.map { try date(GeneralizedTime(derEncoded: $0)) }
            var reasonCode: Int?
            if info.count >= 2, info[1].identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific),
               let reasonNode = try children(of: info[1]).first,
               case .primitive(let reasonBytes) = reasonNode.content, reasonBytes.count == 1, let byte = reasonBytes.first {
                reasonCode = Int(byte)
            }
            status = .revoked(at: revokedAt, reasonCode: reasonCode)
        case ASN1Identifier(tagWithNumber: 2, tagClass: .contextSpecific):
            status = .unknown
        default:
            throw Malformed(description: "bad CertStatus")
        }

        var nextUpdate: Date?
        for field in fields.dropFirst(3) where field.identifier == ASN1Identifier(tagWithNumber: 0, tagClass: .contextSpecific) {
            nextUpdate = try date(GeneralizedTime(derEncoded: only(children(of: field))))
        }
        return Single(
            hashAlgorithm: oid,
            issuerKeyHash: Array(keyHash.bytes),
            serial: Certificate.SerialNumber(bytes: serialBytes),
            answer: OCSPAnswer(status: status, nextUpdate: nextUpdate)
        )
    }

    private static func children(of node: ASN1Node) throws -> [ASN1Node] {
        guard case .constructed(let nodes) = node.content else { throw Malformed(description: "expected a constructed element") }
        return Array(nodes)
    }

    private static func only(_ nodes: [ASN1Node]) throws -> ASN1Node {
        guard nodes.count == 1, let node = nodes.first else { throw Malformed(description: "expected one element") }
        return node
    }

    /// GeneralizedTime is always UTC in DER (RFC 5280 §4.1.2.5.2).
    static func date(_ time: GeneralizedTime) throws -> Date {
        var components = DateComponents()
        components.calendar = Calendar(identifier: .gregorian)
        components.timeZone = TimeZone(identifier: "UTC")
        components.year = time.year
        components.month = time.month
        components.day = time.day
        components.hour = time.hours
        components.minute = time.minutes
        components.second = time.seconds
        guard let date = components.date else { throw Malformed(description: "bad time") }
        return date + time.fractionalSeconds
    }
}

/// CRLReason names (RFC 5280 §5.3.1).
enum CRLReasonName {
    static func name(_ code: Int) -> String {
        switch code {
        case 0: "unspecified"
        case 1: "keyCompromise"
        case 2: "cACompromise"
        case 3: "affiliationChanged"
        case 4: "superseded"
        case 5: "cessationOfOperation"
        case 6: "certificateHold"
        case 8: "removeFromCRL"
        case 9: "privilegeWithdrawn"
        case 10: "aACompromise"
        default: "code \(code)"
        }
    }
}
