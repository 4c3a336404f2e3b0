import Crypto
import Foundation

// PKIX over Secure HTTP (POSH), RFC 7711: the documents.
//
// A domain that lets another party run its XMPP service publishes, over HTTPS at
// `https://<domain>/.well-known/posh/<service>.json`, either the fingerprints of the
// certificates that service presents (§3.1) or a reference to a document the hosting
// provider keeps up to date (§3.2). This file parses and writes both forms; `POSHProof`
// fetches and matches them.

/// Why a POSH document was not accepted.
public struct POSHError: Error, Sendable, Hashable, CustomStringConvertible {
    public let reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { reason }
}

/// A hash function a POSH fingerprint may use, by its name in the IANA "Hash Function
/// Textual Names" registry (RFC 7711 §3.1).
public enum POSHHashAlgorithm: String, Sendable, Hashable, CaseIterable {
    case sha256 = "sha-256"
    case sha384 = "sha-384"
    case sha512 = "sha-512"

    /// The length of a digest, in bytes; a fingerprint of another length is malformed.
    public var digestLength: Int {
        switch self {
        case .sha256: 32
        case .sha384: 48
        case .sha512: 64
        }
    }

    /// The digest of `bytes`.
    public func digest(_ bytes: [UInt8]) -> [UInt8] {
        switch self {
        case .sha256: Array(SHA256.hash(data: bytes))
        case .sha384: Array(SHA384.hash(data: bytes))
        case .sha512: Array(SHA512.hash(data: bytes))
        }
    }
}

/// One certificate descriptor of a fingerprints document: the same certificate hashed with
/// one or more functions (RFC 7711 §3.1).
///
/// The hash is over the DER encoding of the **whole certificate**, not its public key, so
/// every renewal changes it (RFC 7711 §7).
public struct POSHFingerprint: Sendable, Hashable {
    /// Hash name (lower case, as in the IANA registry) → digest. Names this implementation
    /// does not know are kept, so a document round-trips, but never match.
    public var digests: [String: [UInt8]]

    public init(digests: [String: [UInt8]]) {
        self.digests = digests
    }

    /// The descriptor of a certificate, with the given hashes of its DER.
    public init(certificateDER: [UInt8], algorithms: [POSHHashAlgorithm] = [.sha256, .sha512]) {
        var digests: [String: [UInt8]] = [:]
        for algorithm in algorithms {
            digests[algorithm.rawValue] = algorithm.digest(certificateDER)
        }
        self.digests = digests
    }

    /// The hashes listed here that this implementation can compute.
    public var supportedAlgorithms: [POSHHashAlgorithm] {
        POSHHashAlgorithm.allCases.filter { digests[$0.rawValue] != nil }
    }

    /// Whether the certificate with this DER is the one described: true when a supported
    /// digest matches, false when supported digests exist and none matches, nil when none of
    /// the listed hashes is supported (the descriptor can say nothing).
    ///
    /// Every supported digest listed must match: a descriptor whose SHA-256 matches but whose
    /// SHA-512 does not is self-contradictory, and trusting the weaker half would let a
    /// collision in one function stand in for the other.
    public func matches(certificateDER: [UInt8]) -> Bool? {
        let supported = supportedAlgorithms
        guard !supported.isEmpty else { return nil }
        for algorithm in supported {
            guard let listed = digests[algorithm.rawValue], listed == algorithm.digest(certificateDER) else { return false }
        }
        return true
    }
}

/// A POSH document: either fingerprints (RFC 7711 §3.1) or a reference to another document
/// (§3.2), each with an `expires` lifetime in seconds.
///
/// Parsing is strict: anything but the two shapes the RFC defines is an error, so a typo in
/// a tenant's file is reported rather than half understood.
public struct POSHDocument: Sendable, Hashable {
    public enum Content: Sendable, Hashable {
        /// Certificate descriptors, most relevant first (§3.1). Several are listed during a
        /// rollover; matching any one is enough.
        case fingerprints([POSHFingerprint])
        /// The HTTPS URL of a fingerprints document, usually the hosting provider's (§3.2).
        case reference(url: String)
    }

    public var content: Content
    /// Seconds the material may be cached (§3.1, §6). Zero means it is invalid: the publisher
    /// withdrew it.
    public var expires: Int

    public init(content: Content, expires: Int) {
        self.content = content
        self.expires = expires
    }

    /// True when `expires` is 0: the material must not be used (RFC 7711 §3.1, §3.2).
    public var isInvalidated: Bool { expires == 0 }

    /// The referenced URL, for a reference document.
    public var referenceURL: String? {
        if case .reference(let url) = content { return url }
        return nil
    }

    /// The descriptors, for a fingerprints document; empty for a reference.
    public var fingerprints: [POSHFingerprint] {
        if case .fingerprints(let list) = content { return list }
        return []
    }

    // MARK: Parsing

    /// Parses a document from its JSON text.
    ///
    /// Accepted: an object with `expires` (a non-negative integer) and exactly one of
    /// `fingerprints` (a non-empty array of non-empty objects mapping hash names to base64
    /// digests) or `url` (an `https:` URL). Everything else is an error, including unknown
    /// keys, a fingerprints document that also has `url` (§3.1 forbids it), digests of the
    /// wrong length for their hash, and non-HTTPS references (§3.2).
    public init(parsing bytes: some Collection<UInt8>) throws(POSHError) {
        let value: JSONValue
        do {
            value = try JSONDecoder().decode(JSONValue.self, from: Data(bytes))
        } catch {
            throw POSHError("not JSON: \(error)")
        }
        guard case .object(let object) = value else {
            throw POSHError("the document must be a JSON object")
        }
        for key in object.keys where !["fingerprints", "expires", "url"].contains(key) {
            throw POSHError("unknown key '\(key)'")
        }
        guard let expiresValue = object["expires"] else {
            throw POSHError("'expires' is missing")
        }
        guard case .integer(let expires) = expiresValue, expires >= 0 else {
            throw POSHError("'expires' must be a non-negative integer number of seconds")
        }
        switch (object["fingerprints"], object["url"]) {
        case (.some, .some):
            throw POSHError("a fingerprints document must not contain 'url' (RFC 7711 §3.1)")
        case (.some(let list), nil):
            self.init(content: .fingerprints(try Self.parseFingerprints(list)), expires: expires)
        case (nil, .some(let url)):
            guard case .string(let text) = url else { throw POSHError("'url' must be a string") }
            guard Self.isHTTPSURL(text) else {
                throw POSHError("'url' must be an https: URL with a host (RFC 7711 §3.2)")
            }
            self.init(content: .reference(url: text), expires: expires)
        case (nil, nil):
            throw POSHError("the document has neither 'fingerprints' nor 'url'")
        }
    }

    private static func parseFingerprints(_ value: JSONValue) throws(POSHError) -> [POSHFingerprint] {
        guard case .array(let items) = value else { throw POSHError("'fingerprints' must be an array") }
        guard !items.isEmpty else { throw POSHError("'fingerprints' must list at least one certificate") }
        var descriptors: [POSHFingerprint] = []
        for (index, item) in items.enumerated() {
            guard case .object(let members) = item, !members.isEmpty else {
                throw POSHError("fingerprints[\(index)] must be a non-empty object of hash names to base64 digests")
            }
            var digests: [String: [UInt8]] = [:]
            for (name, digestValue) in members {
                let hashName = name.lowercased()
                guard case .string(let text) = digestValue, let digest = Data(base64Encoded: text), !digest.isEmpty else {
                    throw POSHError("fingerprints[\(index)].\(name) must be a base64 digest")
                }
                if let algorithm = POSHHashAlgorithm(rawValue: hashName), digest.count != algorithm.digestLength {
                    throw POSHError("fingerprints[\(index)].\(name) is \(digest.count) bytes, not \(algorithm.digestLength)")
                }
                guard digests[hashName] == nil else {
                    throw POSHError("fingerprints[\(index)] lists \(hashName) twice")
                }
                digests[hashName] = Array(digest)
            }
            descriptors.append(POSHFingerprint(digests: digests))
        }
        return descriptors
    }

    /// True for an absolute `https:` URL with a host: the only kind POSH may follow
    /// (RFC 7711 §3, §3.2, §10).
    public static func isHTTPSURL(_ text: String) -> Bool {
        guard let components = URLComponents(string: text),
              components.scheme?.lowercased() == "https",
              let host = components.host, !host.isEmpty else { return false }
        return true
    }

    // MARK: Writing

    /// The document as JSON text (keys sorted, indented, slashes unescaped), ending in a
    /// newline.
    public var jsonText: String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes]
        let wire: WireDocument
        switch content {
        case .fingerprints(let list):
            wire = WireDocument(fingerprints: list.map { $0.digests.mapValues { Data($0).base64EncodedString() } }, url: nil, expires: max(0, expires))
        case .reference(let url):
            wire = WireDocument(fingerprints: nil, url: url, expires: max(0, expires))
        }
        // Encoding strings, integers and dictionaries of strings cannot fail.
        let data = (try? encoder.encode(wire)) ?? Data()
        return (String(data: data, encoding: .utf8) ?? "") + "\n"
    }

    private struct WireDocument: Encodable {
        var fingerprints: [[String: String]]?
        var url: String?
        var expires: Int

        enum CodingKeys: String, CodingKey { case fingerprints, url, expires }

        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encodeIfPresent(fingerprints, forKey: .fingerprints)
            try container.encodeIfPresent(url, forKey: .url)
            try container.encode(expires, forKey: .expires)
        }
    }
}

/// Writes the documents a domain, or its hosting provider, publishes.
public enum POSHPublisher {
    /// The path a POSH document for `service` lives at (RFC 7711 §3; RFC 7712 §5.2 names the
    /// services `xmpp-server` and `xmpp-client`).
    public static func wellKnownPath(service: String = "xmpp-server") -> String {
        "/.well-known/posh/\(service).json"
    }

    /// The URL of `domain`'s POSH document for `service`, with the domain in A-label form;
    /// nil when `domain` is not a domain name.
    public static func documentURL(domain: String, service: String = "xmpp-server") -> String? {
        guard let prepared = try? PreparedDomain(domain) else { return nil }
        return "https://\(prepared.ascii)\(wellKnownPath(service: service))"
    }

    /// A fingerprints document (RFC 7711 §3.1) listing each certificate with both its
    /// SHA-256 and SHA-512 fingerprint, in the order given (most relevant first).
    public static func fingerprintsDocument(certificateDER: [[UInt8]], expires: Int) -> String {
        POSHDocument(content: .fingerprints(certificateDER.map { POSHFingerprint(certificateDER: $0) }), expires: expires).jsonText
    }

    /// A reference document (RFC 7711 §3.2) pointing at `url`, normally the hosting
    /// provider's own document, so that certificate renewals need no change by the tenant.
    public static func referenceDocument(url: String, expires: Int) -> String {
        POSHDocument(content: .reference(url: url), expires: expires).jsonText
    }
}

// MARK: - JSON

/// A JSON value, decoded without Foundation's loose bridging so that `true` is never a
/// number nor `1` a boolean.
enum JSONValue: Decodable, Sendable, Hashable {
    case null
    case bool(Bool)
    case integer(Int)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Int.self) {
            self = .integer(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else if let value = try? container.decode([String: JSONValue].self) {
            self = .object(value)
        } else {
            throw DecodingError.dataCorruptedError(in: container, debugDescription: "not a JSON value")
        }
    }
}
