import Trust

/// Where a new (local, remote) pair goes: onto one of the open links, or onto a connection
/// of its own. Pure: the manager gathers the facts about each link (some of them, the
/// proofs, only for links that pass every other test) and acts on the answer.
///
/// The rules (digest §14, the fallback matrix):
/// - A pair joins a link only with a `db:result`, so the link must take one: ours, or the
///   peer's when bidirectional (XEP-0288 §2.2), with a stream id to bind the key to, and a
///   peer that speaks dialback there. On a link we opened that means the peer advertised
///   `urn:xmpp:features:dialback` after TLS; a peer that authenticated us by SASL EXTERNAL
///   and offers no dialback never answers (ejabberd without `mod_s2s_dialback`). On the
///   peer's link, its header must have declared the dialback namespace.
/// - Sender multiplexing (XEP-0220 §2.6.1): the remote domain already flows on the link.
/// - Target multiplexing (§2.6.2 with RFC 7712 §4.4.2): the peer handles dialback errors
///   (a refusal cannot cost the link), the link reaches one of the domain's servers, and the
///   peer is proven for the domain on this connection (certificate, DANE or POSH).
/// - A link that refused this local domain before (for lack of proof, say) is not asked
///   again: the refusal is an answer about that link, not about the pair, which gets a
///   connection of its own, presenting its own certificate.
/// - Otherwise: a new connection.
public struct PairPlacement: Sendable {
    /// What is known about one open link, from the point of view of one pair.
    public struct Candidate: Sendable, Hashable {
        public var id: String
        /// We opened it (else the peer did).
        public var outgoing: Bool
        public var bidirectional: Bool
        /// Negotiated, some pair valid, not closing, with a stream id for dialback keys.
        public var usable: Bool
        /// The peer takes `db:result` on it (see the rules above).
        public var peerSpeaksDialback: Bool
        /// Not ruled out by what the peer's server did before (it closed its own link on our
        /// request, digest §14).
        public var mayRequest: Bool
        public var handlesDialbackErrors: Bool
        /// The remote domain already flows on the link: outbound, or inbound on a
        /// bidirectional link.
        public var carriesRemote: Bool
        /// The link is connected to one of the remote domain's servers (always true for the
        /// peer's links: its proof alone identifies it).
        public var reachesRemote: Bool
        /// The peer refused this local domain on this link earlier.
        public var refusedLocal: Bool
        /// The peer is proven for the remote domain on this connection: nil when not (yet)
        /// known, or not proven.
        public var remoteProof: ProofMethod?
        public var pairCount: Int

        public init(id: String, outgoing: Bool, bidirectional: Bool, usable: Bool, peerSpeaksDialback: Bool, mayRequest: Bool,
                    handlesDialbackErrors: Bool, carriesRemote: Bool, reachesRemote: Bool, refusedLocal: Bool,
                    remoteProof: ProofMethod?, pairCount: Int) {
            self.id = id
            self.outgoing = outgoing
            self.bidirectional = bidirectional
            self.usable = usable
            self.peerSpeaksDialback = peerSpeaksDialback
            self.mayRequest = mayRequest
            self.handlesDialbackErrors = handlesDialbackErrors
            self.carriesRemote = carriesRemote
            self.reachesRemote = reachesRemote
            self.refusedLocal = refusedLocal
            self.remoteProof = remoteProof
            self.pairCount = pairCount
        }
    }

    /// Why a link cannot take the pair: logged at debug level, and what the tests check.
    public enum Exclusion: String, Sendable, Hashable {
        case notUsable = "not established or closing"
        case oneWay = "the peer's link is not bidirectional"
        case noDialback = "the peer does not speak dialback on it"
        case peerRefusesRequests = "the peer's server closes its links on our requests"
        case refusedLocal = "the peer refused the local domain on it"
        case noDialbackErrors = "a new target needs dialback errors"
        case otherServer = "it is connected to a server the domain does not use"
        case remoteUnproven = "the peer is not proven for the remote domain on it"
    }

    public enum Via: String, Sendable, Hashable {
        /// XEP-0220 §2.6.1 (and XEP-0288 §2.2 on the peer's links).
        case senderMultiplexing
        /// XEP-0220 §2.6.2 with the RFC 7712 §4.4.2 proof.
        case targetMultiplexing
    }

    public enum Decision: Sendable, Hashable {
        case join(id: String, via: Via)
        case newConnection
    }

    /// Whether `candidate` may take the pair without a proof of the remote domain on it
    /// (sender multiplexing), may take it only with one, or not at all.
    public static func exclusion(of candidate: Candidate) -> Exclusion? {
        if !candidate.usable { return .notUsable }
        if !candidate.outgoing && !candidate.bidirectional { return .oneWay }
        if !candidate.peerSpeaksDialback { return .noDialback }
        if !candidate.mayRequest { return .peerRefusesRequests }
        if candidate.refusedLocal { return .refusedLocal }
        if candidate.carriesRemote { return nil }
        if !candidate.handlesDialbackErrors { return .noDialbackErrors }
        if !candidate.reachesRemote { return .otherServer }
        if !(candidate.remoteProof?.isCertificateProof ?? false) { return .remoteUnproven }
        return nil
    }

    /// Whether it is worth proving the remote domain on `candidate` (every other test
    /// passes and the remote domain does not flow there yet).
    public static func needsRemoteProof(_ candidate: Candidate) -> Bool {
        var assumingProof = candidate
        assumingProof.remoteProof = .pkix
        return !candidate.carriesRemote && exclusion(of: assumingProof) == nil
    }

    /// The link to join, preferring links that already carry the remote domain, then our
    /// own links (the peer's may turn out to refuse requests), then the busiest (fewer
    /// links in the end); else a new connection.
    public static func decide(_ candidates: [Candidate]) -> Decision {
        let eligible = candidates.filter { exclusion(of: $0) == nil }
        let best = eligible.min { a, b in
            (a.carriesRemote ? 0 : 1, a.outgoing ? 0 : 1, -a.pairCount, a.id) < (b.carriesRemote ? 0 : 1, b.outgoing ? 0 : 1, -b.pairCount, b.id)
        }
        guard let best else { return .newConnection }
        return .join(id: best.id, via: best.carriesRemote ? .senderMultiplexing : .targetMultiplexing)
    }
}
