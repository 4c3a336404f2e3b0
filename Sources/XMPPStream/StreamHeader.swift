import XMPPCore

/// The attributes of a `<stream:stream>` header (RFC 6120 §4.7).
public struct StreamHeader: Sendable, Hashable {
    public var to: String?
    public var from: String?
    public var id: String?
    public var version: String?
    public var language: String?
    /// The default namespace declared on the header: the stream's content namespace.
    public var contentNamespace: String
    /// Prefixed namespace declarations on the header, such as `db` for dialback (XEP-0220).
    public var prefixes: [String: String]

    public init(
        to: String? = nil, from: String? = nil, id: String? = nil, version: String? = "1.0",
        language: String? = "en", contentNamespace: String, prefixes: [String: String] = [:]
    ) {
        self.to = to
        self.from = from
        self.id = id
        self.version = version
        self.language = language
        self.contentNamespace = contentNamespace
        self.prefixes = prefixes
    }

    /// The major and minor version numbers, or nil when `version` is absent (a pre-RFC 3920
    /// peer, RFC 6120 §4.7.5) or not two integers.
    public var versionNumbers: (major: Int, minor: Int)? {
        guard let version else { return nil }
        let parts = version.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, let major = Int(parts[0]), let minor = Int(parts[1]), major >= 0, minor >= 0 else { return nil }
        return (major, minor)
    }

    /// True when the peer declared the dialback namespace, announcing XEP-0220 support.
    public var declaresDialback: Bool { prefixes.values.contains(XMLNamespace.dialback) }
}

/// What the stream parser delivers, in document order.
public enum StreamEvent: Sendable, Hashable {
    /// The opening `<stream:stream>` tag.
    case streamStart(StreamHeader)
    /// A complete first-level element: a stanza or a negotiation element.
    case element(XMLElement)
    /// The closing `</stream:stream>` tag.
    case streamEnd
}

/// Limits the parser enforces while input arrives, so memory stays bounded.
public struct XMLStreamLimits: Sendable, Hashable {
    /// The largest first-level element, in bytes of input (RFC 6120 §13.12). Counted from the
    /// end of the previous element, so a stanza that never ends is caught as it grows.
    public var maximumStanzaBytes: Int
    /// The deepest nesting allowed inside a stanza (the stanza itself is depth 1).
    public var maximumDepth: Int
    /// The most attributes on one element.
    public var maximumAttributesPerElement: Int
    /// The longest attribute value, in bytes.
    public var maximumAttributeValueBytes: Int

    /// RFC 6120 §13.12 requires accepting stanzas of at least 10,000 bytes.
    public static let minimumStanzaBytes = 10_000

    public init(maximumStanzaBytes: Int, maximumDepth: Int = 48, maximumAttributesPerElement: Int = 64, maximumAttributeValueBytes: Int = 16 * 1024) {
        self.maximumStanzaBytes = max(maximumStanzaBytes, Self.minimumStanzaBytes)
        self.maximumDepth = max(maximumDepth, 4)
        self.maximumAttributesPerElement = max(maximumAttributesPerElement, 8)
        self.maximumAttributeValueBytes = max(maximumAttributeValueBytes, 3 * JID.maximumPartLength + 2)
    }

    /// Defaults for client streams: 256 KiB stanzas.
    public static let client = XMLStreamLimits(maximumStanzaBytes: 256 * 1024)
    /// Defaults for server streams: 512 KiB stanzas.
    public static let server = XMLStreamLimits(maximumStanzaBytes: 512 * 1024)
}

/// A typed parse failure that names the stream error it deserves (RFC 6120 §4.9.3, §11).
public struct XMLStreamError: Error, Sendable, Hashable, StreamErrorConvertible {
    public var condition: StreamError.Condition
    /// What went wrong, for the log. Not sent to the peer.
    public var detail: String

    public init(_ condition: StreamError.Condition, _ detail: String) {
        self.condition = condition
        self.detail = detail
    }

    public var streamError: StreamError { StreamError(condition) }

    /// Equality compares the condition only, so tests can match on it.
    public static func == (lhs: XMLStreamError, rhs: XMLStreamError) -> Bool {
        lhs.condition == rhs.condition
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(condition)
    }
}

extension XMLStreamError: CustomStringConvertible {
    public var description: String { "\(condition.rawValue): \(detail)" }
}
