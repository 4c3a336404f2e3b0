/// An XMPP address, `[localpart@]domainpart[/resourcepart]` (RFC 7622).
///
/// A `JID` only exists in canonical form: the localpart prepared with PRECIS
/// UsernameCaseMapped, the domainpart as lower-case U-labels without a trailing dot, and the
/// resourcepart prepared with PRECIS OpaqueString. So `==` and hashing compare canonical
/// forms, as RFC 7622 §3.2.3 and §3.3.3 require, and a JID can be used as a routing key as is.
public struct JID: Sendable, Hashable {
    public let localpart: String?
    public let domainpart: String
    public let resourcepart: String?

    /// RFC 7622 §3.2–§3.4: each part is 1 to 1023 octets after preparation.
    public static let maximumPartLength = 1023

    /// Parses and prepares a JID string.
    public init(_ string: some StringProtocol) throws(JIDError) {
        let string = Substring(string)
        // RFC 7622 §3.1: split before any mapping, because mapping can create separators.
        // The resourcepart runs from the first '/', and the localpart up to the first '@'
        // before it.
        var rest = string[...]
        var resource: Substring?
        if let slash = rest.utf8.firstIndex(of: UInt8(ascii: "/")) {
            resource = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
        }
        var local: Substring?
        if let at = rest.utf8.firstIndex(of: UInt8(ascii: "@")) {
            local = rest[..<at]
            rest = rest[rest.index(after: at)...]
        }
        try self.init(localpart: local, domainpart: rest, resourcepart: resource)
    }

    /// Builds a JID from separate parts, preparing each.
    public init(localpart: (some StringProtocol)?, domainpart: some StringProtocol, resourcepart: (some StringProtocol)?) throws(JIDError) {
        self.domainpart = try JID.prepareDomainpart(Substring(domainpart))
        self.localpart = try localpart.map { (part) throws(JIDError) in try JID.prepareLocalpart(Substring(part)) }
        self.resourcepart = try resourcepart.map { (part) throws(JIDError) in try JID.prepareResourcepart(Substring(part)) }
    }

    /// A domain JID such as `example.com`.
    public init(domain: some StringProtocol) throws(JIDError) {
        self.domainpart = try JID.prepareDomainpart(Substring(domain))
        self.localpart = nil
        self.resourcepart = nil
    }

    /// Assembles a JID from parts that are already canonical. Only for values this module
    /// produced, such as the parts of another `JID`.
    @usableFromInline
    init(canonicalLocalpart: String?, domainpart: String, resourcepart: String?) {
        self.localpart = canonicalLocalpart
        self.domainpart = domainpart
        self.resourcepart = resourcepart
    }

    // MARK: Derived addresses

    /// The JID without its resourcepart.
    @inlinable
    public var bare: JID { JID(canonicalLocalpart: localpart, domainpart: domainpart, resourcepart: nil) }

    /// The domain alone.
    @inlinable
    public var domain: JID { JID(canonicalLocalpart: nil, domainpart: domainpart, resourcepart: nil) }

    public var isBare: Bool { resourcepart == nil }
    public var isDomain: Bool { localpart == nil && resourcepart == nil }
    public var isFull: Bool { localpart != nil && resourcepart != nil }

    /// A copy with another resourcepart, prepared.
    public func with(resource: some StringProtocol) throws(JIDError) -> JID {
        JID(canonicalLocalpart: localpart, domainpart: domainpart, resourcepart: try JID.prepareResourcepart(Substring(resource)))
    }

    /// The domainpart in A-label (ASCII) form, for DNS look-ups and certificate matching
    /// (RFC 6125 §6.4.2, RFC 7673 §8). IP literals are returned as they are.
    public var asciiDomain: String {
        // The domainpart was validated when this JID was made, so conversion cannot fail;
        // fall back to the stored form rather than trap if it ever did.
        (try? IDNA.toASCII(domainpart)) ?? domainpart
    }

    // MARK: Preparation

    static func prepareDomainpart(_ input: Substring) throws(JIDError) -> String {
        var input = input
        // RFC 7622 §3.2: strip one trailing dot before any other processing.
        if input.utf8.last == UInt8(ascii: ".") { input = input.dropLast() }
        guard !input.isEmpty else { throw JIDError(.domainpart, .empty) }
        let prepared: String
        if let fast = asciiHostnameFastPath(input) {
            prepared = fast
        } else if input.utf8.first == UInt8(ascii: "[") {
            prepared = try IPLiteral.canonicalIPv6(input)
        } else {
            prepared = try IDNA.toUnicode(input)
        }
        guard prepared.utf8.count <= maximumPartLength else { throw JIDError(.domainpart, .tooLong) }
        return prepared
    }

    static func prepareLocalpart(_ input: Substring) throws(JIDError) -> String {
        guard !input.isEmpty else { throw JIDError(.localpart, .empty) }
        let prepared: String
        if let fast = asciiLocalpartFastPath(input) {
            prepared = fast
        } else {
            prepared = try PRECIS.usernameCaseMapped(input)
            // RFC 7622 §3.3.1: these are forbidden in a localpart even though the
            // PRECIS profile allows them. Check after preparation, since mapping can produce them.
            for byte in prepared.utf8 where JID.isForbiddenInLocalpart(byte) {
                throw JIDError(.localpart, .disallowedCharacter(Unicode.Scalar(byte)))
            }
        }
        guard !prepared.isEmpty else { throw JIDError(.localpart, .empty) }
        guard prepared.utf8.count <= maximumPartLength else { throw JIDError(.localpart, .tooLong) }
        return prepared
    }

    static func prepareResourcepart(_ input: Substring) throws(JIDError) -> String {
        guard !input.isEmpty else { throw JIDError(.resourcepart, .empty) }
        let prepared: String
        if input.utf8.allSatisfy({ $0 >= 0x20 && $0 <= 0x7E }) {
            // Printable ASCII is unchanged by OpaqueString: no width, case or normalisation
            // mapping applies, and every such character is valid in the FreeformClass.
            prepared = String(input)
        } else {
            prepared = try PRECIS.opaqueString(input)
        }
        guard !prepared.isEmpty else { throw JIDError(.resourcepart, .empty) }
        guard prepared.utf8.count <= maximumPartLength else { throw JIDError(.resourcepart, .tooLong) }
        return prepared
    }

    @inlinable
    static func isForbiddenInLocalpart(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "\""), UInt8(ascii: "&"), UInt8(ascii: "'"), UInt8(ascii: "/"),
             UInt8(ascii: ":"), UInt8(ascii: "<"), UInt8(ascii: ">"), UInt8(ascii: "@"):
            true
        default:
            false
        }
    }

    /// Prepares an ASCII localpart without the PRECIS machinery.
    ///
    /// For printable ASCII (U+0021–U+007E) UsernameCaseMapped reduces to lower-casing: these
    /// code points are all PVALID (the ASCII7 category), have no width or NFC mapping, and
    /// no directionality rule applies. Space and controls go to the slow path, which rejects them.
    static func asciiLocalpartFastPath(_ input: Substring) -> String? {
        var needsLowercasing = false
        for byte in input.utf8 {
            guard byte >= 0x21 && byte <= 0x7E else { return nil }
            if isForbiddenInLocalpart(byte) { return nil }
            if byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") { needsLowercasing = true }
        }
        if !needsLowercasing { return String(input) }
        return String(decoding: input.utf8.map { ($0 >= 65 && $0 <= 90) ? $0 + 32 : $0 }, as: UTF8.self)
    }

    /// Prepares an all-ASCII LDH host name or IPv4 literal without IDNA processing.
    ///
    /// Returns nil when the slow path is needed: non-ASCII input, A-labels (which must be
    /// converted to U-labels, RFC 7622 §3.2), IPv6 literals, or anything invalid, so that the
    /// slow path produces the precise error.
    static func asciiHostnameFastPath(_ input: Substring) -> String? {
        // DNS limits the whole name to 253 octets; longer names take the slow path, which
        // reports the precise error.
        guard input.utf8.count <= 253 else { return nil }
        var needsLowercasing = false
        var labelLength = 0
        var labelStart = true
        var previous: UInt8 = 0
        var labelPrefix: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
        for byte in input.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                break
            case UInt8(ascii: "A")...UInt8(ascii: "Z"):
                needsLowercasing = true
            case UInt8(ascii: "-"):
                if labelStart { return nil }
            case UInt8(ascii: "."):
                if labelStart || previous == UInt8(ascii: "-") { return nil }
                labelLength = 0
                labelStart = true
                previous = byte
                continue
            default:
                return nil
            }
            let lower = (byte >= 65 && byte <= 90) ? byte + 32 : byte
            switch labelLength {
            case 0: labelPrefix.0 = lower
            case 1: labelPrefix.1 = lower
            case 2: labelPrefix.2 = lower
            case 3:
                labelPrefix.3 = lower
                // "??--" labels are reserved (RFC 5891 §4.2.3.1); "xn--" are A-labels that
                // must become U-labels. Either way the slow path decides.
                if labelPrefix.2 == UInt8(ascii: "-") && labelPrefix.3 == UInt8(ascii: "-") { return nil }
            default: break
            }
            labelLength += 1
            if labelLength > 63 { return nil }
            labelStart = false
            previous = byte
        }
        if labelStart || previous == UInt8(ascii: "-") { return nil }
        if !needsLowercasing { return String(input) }
        return String(decoding: input.utf8.map { ($0 >= 65 && $0 <= 90) ? $0 + 32 : $0 }, as: UTF8.self)
    }
}

extension JID: CustomStringConvertible {
    /// The JID in its canonical string form.
    public var description: String {
        var result = ""
        if let localpart {
            result += localpart
            result += "@"
        }
        result += domainpart
        if let resourcepart {
            result += "/"
            result += resourcepart
        }
        return result
    }
}

extension JID: Comparable {
    public static func < (lhs: JID, rhs: JID) -> Bool {
        (lhs.domainpart, lhs.localpart ?? "", lhs.resourcepart ?? "") < (rhs.domainpart, rhs.localpart ?? "", rhs.resourcepart ?? "")
    }
}

/// Why a string is not a valid JID. It maps to the `jid-malformed` stanza error (RFC 7622 §4).
public struct JIDError: Error, Sendable, Hashable {
    public enum Part: String, Sendable, Hashable {
        case localpart, domainpart, resourcepart
    }

    public enum Reason: Sendable, Hashable {
        /// The part is present but empty, such as `@example.com` or `example.com/`.
        case empty
        /// The part is longer than 1023 octets after preparation, or a DNS label or name is
        /// over its DNS limit.
        case tooLong
        /// A code point the part's profile disallows.
        case disallowedCharacter(Unicode.Scalar)
        /// A code point whose contextual rule (CONTEXTJ or CONTEXTO) is not satisfied.
        case contextRuleFailed(Unicode.Scalar)
        /// The Bidi Rule (RFC 5893) is not satisfied.
        case bidiRuleFailed
        /// A domain label breaks a structural rule: hyphens, a leading combining mark, an
        /// empty label, a malformed A-label, or a label that changes under normalisation.
        case invalidLabel(String)
        /// A bracketed IP literal that is not a valid IPv6 address.
        case invalidIPLiteral
    }

    public var part: Part
    public var reason: Reason

    public init(_ part: Part, _ reason: Reason) {
        self.part = part
        self.reason = reason
    }
}

extension JIDError: StanzaErrorConvertible {
    public var stanzaError: StanzaError { StanzaError(.jidMalformed) }
}

extension JIDError: CustomStringConvertible {
    public var description: String {
        switch reason {
        case .empty: "empty \(part.rawValue)"
        case .tooLong: "\(part.rawValue) too long"
        case .disallowedCharacter(let scalar): "\(part.rawValue) contains disallowed U+\(String(scalar.value, radix: 16, uppercase: true))"
        case .contextRuleFailed(let scalar): "\(part.rawValue): context rule failed for U+\(String(scalar.value, radix: 16, uppercase: true))"
        case .bidiRuleFailed: "\(part.rawValue) breaks the Bidi Rule"
        case .invalidLabel(let why): "\(part.rawValue): \(why)"
        case .invalidIPLiteral: "\(part.rawValue): invalid IP literal"
        }
    }
}
