import Crypto
import Foundation
import Storage

/// The provisioning API's bearer tokens: `braid_ID.SECRET` (base64url parts, which may
/// hold `_` and `-` but never `.`), of which storage keeps the id and
/// the SHA-256 of the whole token. The id is public (listing, removal, the audit log); the
/// secret is shown once, when the token is made.
public enum ProvisioningTokens {
    /// A new token for `domains` (nil: provider-wide): the token to hand over, and what to
    /// store.
    public static func mint(domains: [String]?, label: String, now: Date = Date(), lifetime: TimeInterval? = nil) -> (token: String, stored: StoredAPIToken) {
        let id = base64URL(random(9))
        let token = "braid_\(id).\(base64URL(random(32)))"
        return (token, StoredAPIToken(id: id, hash: hash(token), domains: domains, label: label, createdAt: Int64(now.timeIntervalSince1970),
                                      expiresAt: lifetime.map { Int64((now + $0).timeIntervalSince1970) }))
    }

    /// SHA-256 of the token, hex.
    public static func hash(_ token: String) -> String {
        SHA256.hash(data: Array(token.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// The id inside a well-formed token; nil for anything else.
    public static func id(of token: String) -> String? {
        guard token.hasPrefix("braid_") else { return nil }
        let parts = token.dropFirst(6).split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].utf8.count == 12, parts[1].utf8.count == 43 else { return nil }
        return String(parts[0])
    }

    /// The stored token `presented` is, if any: looked up by its id, then its hash compared
    /// in constant time, so response timing does not tell how much of a guess was right.
    public static func match(_ presented: String, in tokens: [StoredAPIToken]) -> StoredAPIToken? {
        guard let id = id(of: presented), let stored = tokens.first(where: { $0.id == id }) else { return nil }
        let given = Array(hash(presented).utf8)
        let expected = Array(stored.hash.utf8)
        guard given.count == expected.count else { return nil }
        var difference: UInt8 = 0
        for index in given.indices { difference |= given[index] ^ expected[index] }
        return difference == 0 ? stored : nil
    }

    private static func random(_ count: Int) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<count).map { _ in UInt8.random(in: 0...255, using: &generator) }
    }

    private static func base64URL(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString()
            .replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }
}
