import Foundation
import Trust

/// A (local domain, remote domain) pair, the unit dialback authorises (XEP-0220 §1.2).
public struct DomainPair: Sendable, Hashable, CustomStringConvertible {
    /// One of our hosted domains.
    public var local: String
    /// The peer's domain.
    public var remote: String

    public init(local: String, remote: String) {
        self.local = local
        self.remote = remote
    }

    public var description: String { "\(local)⇄\(remote)" }
}

/// Which way stanzas may flow for a pair on a link.
public enum PairDirection: String, Sendable, Hashable, Codable {
    /// We may send local → remote.
    case outbound
    /// We accept remote → local.
    case inbound
}

/// Proof that a pair may use a link: how the remote domain was proven, when, and until when.
///
/// Only the federation layer creates these, at the one place where a proof succeeds; the
/// per-stanza check is a lookup in the link's table of them.
public struct PairAuthorization: Sendable, Hashable {
    public var pair: DomainPair
    public var direction: PairDirection
    public var method: ProofMethod
    public var authorizedAt: Date
    /// When the proof lapses (certificate expiry, DNS TTL, POSH `expires`); nil for the life
    /// of the link (dialback).
    public var expires: Date?

    public func isValid(at time: Date) -> Bool {
        expires.map { time < $0 } ?? true
    }
}
