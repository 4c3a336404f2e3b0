import SwiftASN1
import X509
import XMPPCore

/// The identifiers an XMPP peer's certificate presents, and the matching of reference domains
/// against them (RFC 6125 / RFC 9525 as profiled by RFC 6120 §13.7).
///
/// Three identifier types are read from the subjectAltName extension:
/// - **DNS-ID** (`dNSName`): valid for any service (RFC 9525 §3).
/// - **SRV-ID** (`otherName` `id-on-dnsSRV`, 1.3.6.1.5.5.7.8.7, RFC 4985): `_xmpp-server.example.com`
///   is valid for s2s only, `_xmpp-client.example.com` for c2s only (RFC 6120 §13.7.1.2).
/// - **XmppAddr** (`otherName` `id-on-xmppAddr`, 1.3.6.1.5.5.7.8.5): the JID of the entity,
///   accepted for backward compatibility (RFC 6120 §13.7.1.4). RFC 6120 lets configuration
///   spell this OID three ways (`id-on-xmppAddr`, dotted, `{ id-on 5 }`); in a certificate it is
///   always the same encoded OID, which is what is checked here.
///
/// **No CN-ID.** The subject common name is never used for matching, even when the
/// certificate has no subjectAltName at all. RFC 6125 §6.4.4 allowed a CN fallback as a last
/// resort; RFC 9525 §2 and App. A removed it, and a certificate that depends on it today was
/// not issued by any public CA for years. The common names are kept in ``commonNames`` only so
/// that logs can say why such a certificate matched nothing.
///
/// Values are recorded as presented (DNS-IDs and SRV-IDs lower-cased, trailing dot removed);
/// invalid ones stay in the lists for diagnostics but never match.
public struct CertificateIdentity: Sendable, Hashable {
    /// The XMPP service a reference identifier is built for.
    public enum Service: Sendable, Hashable, CaseIterable {
        /// Server-to-server, SRV service `_xmpp-server`.
        case xmppServer
        /// Client-to-server, SRV service `_xmpp-client`.
        case xmppClient

        /// The SRV service name without the leading underscore, lower case.
        public var srvServiceName: String {
            switch self {
            case .xmppServer: "xmpp-server"
            case .xmppClient: "xmpp-client"
            }
        }
    }

    /// Which kind of presented identifier matched a reference domain.
    public enum Match: Sendable, Hashable {
        /// A DNS-ID, exactly or through a wildcard.
        case dnsID
        /// An SRV-ID for the requested service.
        case srvID
        /// An XmppAddr naming the bare domain.
        case xmppAddr
    }

    /// A presented SRV-ID, split into its parts.
    public struct SRVID: Sendable, Hashable, CustomStringConvertible {
        /// The service without the leading underscore, lower case (`xmpp-server`).
        public let service: String
        /// The name, lower case, as presented (A-label form for IDNs, RFC 4985 §2).
        public let domain: String

        public init(service: String, domain: String) {
            self.service = service
            self.domain = domain
        }

        /// Splits `_service.name`; nil when the value has no `_service.` prefix.
        public init?(presented: String) {
            let value = DomainName.asciiLowercased(CertificateIdentity.trimmingTrailingDot(presented))
            guard value.utf8.first == UInt8(ascii: "_"), let dot = value.firstIndex(of: ".") else { return nil }
            let service = value[value.index(after: value.startIndex)..<dot]
            let domain = value[value.index(after: dot)...]
            guard !service.isEmpty, !domain.isEmpty else { return nil }
            self.service = String(service)
            self.domain = String(domain)
        }

        public var description: String { "_\(service).\(domain)" }
    }

    /// The dNSName values, lower case, trailing dot removed, including wildcards and any
    /// invalid values (which never match).
    public let dnsIDs: [String]
    /// The SRVName values that had the `_service.name` shape, for any service.
    public let srvIDs: [SRVID]
    /// The XmppAddr values, as presented.
    public let xmppAddrs: [String]
    /// The subject's common names. **Never used for matching** (RFC 9525 §2); for logs only.
    public let commonNames: [String]

    /// Builds an identity from its parts, for identities that did not come from a certificate
    /// (tests, configuration).
    public init(dnsIDs: [String] = [], srvIDs: [SRVID] = [], xmppAddrs: [String] = [], commonNames: [String] = []) {
        self.dnsIDs = dnsIDs.map { DomainName.asciiLowercased(Self.trimmingTrailingDot($0)) }
        self.srvIDs = srvIDs
        self.xmppAddrs = xmppAddrs
        self.commonNames = commonNames
    }

    /// Reads the identifiers of a certificate.
    ///
    /// - Throws: when the subjectAltName extension is present but malformed. A malformed
    ///   XmppAddr or SRVName value inside a well-formed extension is skipped instead, as is any
    ///   other name type (URI-ID, IP-ID, e-mail), since XMPP does not use them.
    public init(certificate: Certificate) throws {
        var dnsIDs: [String] = []
        var srvIDs: [SRVID] = []
        var xmppAddrs: [String] = []
        for name in try certificate.extensions.subjectAlternativeNames ?? SubjectAlternativeNames() {
            switch name {
            case .dnsName(let value):
                dnsIDs.append(value)
            case .otherName(let other) where other.typeID == XMPPObjectIdentifier.dnsSRV:
                // RFC 4985 §2: SRVName ::= IA5String.
                if let value = other.value, let string = try? ASN1IA5String(asn1Any: value),
                   let srvID = SRVID(presented: String(string)) {
                    srvIDs.append(srvID)
                }
            case .otherName(let other) where other.typeID == XMPPObjectIdentifier.xmppAddr:
                // RFC 6120 §13.7.1.4: XmppAddr ::= UTF8String. Invalid UTF-8 is skipped rather
                // than repaired, so that a replacement character can never create a match.
                if let value = other.value, let string = try? ASN1UTF8String(asn1Any: value),
                   let text = String(validating: string.bytes, as: UTF8.self) {
                    xmppAddrs.append(text)
                }
            default:
                continue
            }
        }
        var commonNames: [String] = []
        for relativeName in certificate.subject {
            for attribute in relativeName where attribute.type == .RDNAttributeType.commonName {
                if let text = String(attribute.value) { commonNames.append(text) }
            }
        }
        self.init(dnsIDs: dnsIDs, srvIDs: srvIDs, xmppAddrs: xmppAddrs, commonNames: commonNames)
    }

    /// Reads the identifiers of a DER-encoded certificate.
    public init(derEncoded bytes: [UInt8]) throws {
        try self.init(certificate: Certificate(derEncoded: bytes))
    }

    // MARK: Matching

    /// Checks whether the certificate is valid for `domain` as the given service.
    ///
    /// The reference identifiers are built from `domain` alone, never from the certificate
    /// (RFC 9525 §6.1.1): the SRV-ID `_<service>.<domain>`, the DNS-ID `<domain>` and the
    /// XmppAddr `<domain>` (RFC 6120 §13.7.2.1). DNS-IDs and SRV-IDs are compared in A-label
    /// form, ignoring ASCII case (RFC 9525 §6.3); XmppAddr is compared as a canonical JID
    /// domainpart in U-label form (RFC 7622 §3.2).
    ///
    /// Wildcards (RFC 9525 §6.3, RFC 6120 §13.7.1.2.1) are honoured only in DNS-IDs, only as
    /// the complete left-most label, matching exactly one label, and only when at least two
    /// labels follow (`*.example.com`, not `*.com`). Any other presented wildcard
    /// (`f*.example.com`, `*.*.example.com`, `xn--*.example.com`, `*` in an SRV-ID or XmppAddr)
    /// is invalid and ignored. The `*` may stand for an A-label, as RFC 9525 puts no limit on
    /// the label it replaces.
    ///
    /// - Parameters:
    ///   - domain: the source domain, in U-label or A-label form, any case. An IP literal or an
    ///     invalid domain matches nothing.
    ///   - service: the service the peer is supposed to provide.
    /// - Returns: which identifier type matched, preferring SRV-ID (the most specific), then
    ///   DNS-ID, then XmppAddr; nil when none did.
    public func matches(domain: String, service: Service) -> Match? {
        guard let reference = try? PreparedDomain(domain) else { return nil }
        return matches(reference, service: service)
    }

    func matches(_ reference: PreparedDomain, service: Service) -> Match? {
        if srvIDs.contains(where: { $0.service == service.srvServiceName && $0.domain == reference.ascii }) {
            return .srvID
        }
        if dnsIDs.contains(where: { Self.dnsID($0, matches: reference.ascii) }) {
            return .dnsID
        }
        if xmppAddrs.contains(where: { Self.xmppAddrDomain($0) == reference.unicode }) {
            return .xmppAddr
        }
        return nil
    }

    /// Every domain the certificate names exactly, in canonical U-label form.
    ///
    /// A domain is listed when ``matches(domain:service:)`` succeeds for it for at least one
    /// XMPP service without a wildcard: non-wildcard DNS-IDs, the names of `_xmpp-server` and
    /// `_xmpp-client` SRV-IDs, and XmppAddrs that are bare domains. Wildcard DNS-IDs are left
    /// out because the names they cover cannot be listed. Use ``domains(for:)`` when only one
    /// service counts (an `_xmpp-client` SRV-ID does not vouch for a server).
    public var allDomains: Set<String> {
        domains(for: .xmppServer).union(domains(for: .xmppClient))
    }

    /// The domains the certificate names exactly for one service, in canonical U-label form.
    public func domains(for service: Service) -> Set<String> {
        var result = Set<String>()
        for dnsID in dnsIDs where !dnsID.contains("*") && Self.isValidASCIIName(dnsID) {
            if let domain = try? PreparedDomain(dnsID), domain.ascii == dnsID { result.insert(domain.unicode) }
        }
        for srvID in srvIDs where srvID.service == service.srvServiceName && Self.isValidASCIIName(srvID.domain) {
            if let domain = try? PreparedDomain(srvID.domain), domain.ascii == srvID.domain { result.insert(domain.unicode) }
        }
        for address in xmppAddrs {
            if let domain = Self.xmppAddrDomain(address) { result.insert(domain) }
        }
        return result
    }

    // MARK: Rules

    /// Matches one presented DNS-ID against a reference name in lower-case A-label form.
    static func dnsID(_ presented: String, matches reference: String) -> Bool {
        guard DomainName.isASCII(presented), !DomainName.isIPLiteral(reference) else { return false }
        guard presented.contains("*") else {
            // A presented name must itself be a well-formed A-label name to count;
            // anything else (a U-label in an IA5String, an empty label) is invalid.
            return presented == reference && isValidASCIIName(presented)
        }
        let presentedLabels = presented.split(separator: ".", omittingEmptySubsequences: false)
        let referenceLabels = reference.split(separator: ".", omittingEmptySubsequences: false)
        // RFC 9525 §6.3: exactly one '*', forming the whole left-most label.
        guard presentedLabels.first == "*",
              presented.utf8.count(where: { $0 == UInt8(ascii: "*") }) == 1,
              // No wildcard over a public suffix alone: at least two labels after it.
              presentedLabels.count >= 3,
              isValidASCIIName(presentedLabels.dropFirst().joined(separator: ".")),
              // Exactly one label: `*.example.com` matches neither `example.com` nor
              // `a.b.example.com` (RFC 6125 §6.4.3).
              referenceLabels.count == presentedLabels.count,
              let first = referenceLabels.first, !first.isEmpty
        else { return false }
        return presentedLabels.dropFirst().elementsEqual(referenceLabels.dropFirst())
    }

    /// The canonical domainpart of an XmppAddr naming a bare domain; nil for any other JID
    /// (a user or a resource does not vouch for a domain), a wildcard, or an invalid value.
    static func xmppAddrDomain(_ presented: String) -> String? {
        // RFC 6120 §13.7.1.2.1 allows wildcards in DNS names only.
        guard !presented.contains("*"), let jid = try? JID(presented), jid.isDomain,
              !DomainName.isIPLiteral(jid.domainpart) else { return nil }
        return jid.domainpart
    }

    /// Whether `name` is a lower-case LDH name of non-empty labels of at most 63 octets.
    static func isValidASCIIName(_ name: String) -> Bool {
        guard !name.isEmpty, name.utf8.count <= 253 else { return false }
        for label in name.utf8.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false) {
            guard !label.isEmpty, label.count <= 63,
                  label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-"),
                  label.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == UInt8(ascii: "-") })
            else { return false }
        }
        return true
    }

    static func trimmingTrailingDot(_ value: String) -> String {
        value.utf8.last == UInt8(ascii: ".") ? String(value.dropLast()) : value
    }
}
