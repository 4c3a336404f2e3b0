import Crypto
import XMPPCore

/// XEP-0185 dialback keys: `hex(HMAC-SHA256(hex(SHA-256(secret)), receiving SP originating SP streamID))`.
///
/// The HMAC key is the 64-character hexadecimal text of the secret's SHA-256, used as ASCII:
/// only that reading reproduces the examples of XEP-0185 §3 and XEP-0220. Keys are stateless,
/// so any process that knows the secret can answer `db:verify` for them.
public struct DialbackKeyGenerator: Sendable {
    private let hmacKey: SymmetricKey

    public init(secret: String) {
        let digest = SHA256.hash(data: Array(secret.utf8))
        hmacKey = SymmetricKey(data: Array(Self.hex(digest).utf8))
    }

    /// The key for a stream: `receiving` is the Target Domain (the `to` of `db:result`, the
    /// `from` of `db:verify`), `originating` the Sender Domain, and `streamID` the id of the
    /// Receiving Server's stream.
    public func key(receiving: String, originating: String, streamID: String) -> String {
        let message = Array("\(receiving) \(originating) \(streamID)".utf8)
        return Self.hex(HMAC<SHA256>.authenticationCode(for: message, using: hmacKey))
    }

    /// Checks a presented key in constant time.
    public func verify(_ presented: String, receiving: String, originating: String, streamID: String) -> Bool {
        let expected = Array(key(receiving: receiving, originating: originating, streamID: streamID).utf8)
        let given = Array(presented.trimmingXMLWhitespace.lowercased().utf8)
        guard given.count == expected.count else { return false }
        var difference: UInt8 = 0
        for index in expected.indices { difference |= expected[index] ^ given[index] }
        return difference == 0
    }

    static func hex<D: Sequence<UInt8>>(_ bytes: D) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: text, as: UTF8.self)
    }
}

/// A `<db:result/>` or `<db:verify/>` element (XEP-0220 §2).
public struct DialbackElement: Sendable, Hashable {
    public enum Kind: String, Sendable, Hashable {
        case result, verify
    }

    /// `type` on an answer: `valid`, `invalid` or `error` (§2.2, §2.5). Nil on a request.
    public enum Outcome: String, Sendable, Hashable {
        case valid, invalid, error
    }

    public var kind: Kind
    public var from: String
    public var to: String
    /// The stream id, on `db:verify` only.
    public var id: String?
    /// The key, on requests.
    public var key: String?
    public var outcome: Outcome?
    /// On `type='error'`: the stanza error condition (§2.5).
    public var error: StanzaError?

    public init(kind: Kind, from: String, to: String, id: String? = nil, key: String? = nil, outcome: Outcome? = nil, error: StanzaError? = nil) {
        self.kind = kind
        self.from = from
        self.to = to
        self.id = id
        self.key = key
        self.outcome = outcome
        self.error = error
    }

    /// Reads a dialback element; nil if it is not one or lacks its addresses.
    public init?(_ element: XMLElement) {
        guard element.namespace == XMLNamespace.dialback, let kind = Kind(rawValue: element.name),
              let from = element.attribute("from"), let to = element.attribute("to") else { return nil }
        self.kind = kind
        self.from = from
        self.to = to
        id = element.attribute("id")
        let text = element.text.trimmingXMLWhitespace
        key = text.isEmpty ? nil : text
        outcome = element.attribute("type").flatMap(Outcome.init(rawValue:))
        if outcome == .error, let child = element.firstChild(name: "error", namespace: XMLNamespace.dialback) ?? element.firstChild(name: "error", namespace: XMLNamespace.server) {
            // Deployed servers put the <error/> in the dialback or the server namespace.
            error = StanzaError(element: child.withNamespace(XMLNamespace.server))
        } else {
            error = nil
        }
        if element.attribute("type") != nil && outcome == nil { return nil }
    }

    /// The element, in the dialback namespace. An error carries its `<error/>` child with
    /// the stanza-error condition (XEP-0220 §2.5).
    public var element: XMLElement {
        var attributes = [XMLAttribute("from", from), XMLAttribute("to", to)]
        if let id { attributes.append(XMLAttribute("id", id)) }
        if let outcome { attributes.append(XMLAttribute("type", outcome.rawValue)) }
        var children: [XMLNode] = []
        if let key { children.append(.text(key)) }
        if let error { children.append(.element(error.element(namespace: XMLNamespace.dialback))) }
        return XMLElement(name: kind.rawValue, namespace: XMLNamespace.dialback, attributes: attributes, children: children)
    }

    /// The answer to this request with the addresses swapped (§2.2).
    public func answer(_ outcome: Outcome, error: StanzaError? = nil) -> DialbackElement {
        DialbackElement(kind: kind, from: to, to: from, id: id, key: nil, outcome: outcome, error: outcome == .error ? error : nil)
    }
}
