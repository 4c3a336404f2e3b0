import Crypto
import Foundation
import Synchronization
import XMPPCore

/// XEP-0115 entity capabilities: what a client's `<c ver=…/>` says it supports, learned with
/// one `disco#info` query per unknown `ver`, checked against the hash, and kept per hash
/// (shared by every account and domain, bounded) so 10,000 clients of one kind cost one entry.
final class EntityCaps: Sendable {
    static let namespace = "http://jabber.org/protocol/caps"

    /// What `<c/>` in a presence names.
    struct Claim: Sendable, Hashable {
        var node: String
        var ver: String
        var hash: String

        init?(_ presence: XMLElement) {
            guard let c = presence.firstChild(name: "c", namespace: EntityCaps.namespace),
                  let node = c.attribute("node"), let ver = c.attribute("ver"), let hash = c.attribute("hash") else { return nil }
            self.node = node
            self.ver = ver
            self.hash = hash.lowercased()
        }
    }

    private struct State {
        var features: [String: Set<String>] = [:]
        /// Insertion order, for eviction beyond the limit.
        var order: [String] = []
        var pending: [String: [CheckedContinuation<Set<String>?, Never>]] = [:]
    }

    private let state = Mutex(State())
    let limit: Int

    init(limit: Int = 10_000) {
        self.limit = limit
    }

    var count: Int { state.withLock { $0.features.count } }

    /// The features of a verified `ver`, if known.
    func features(ver: String) -> Set<String>? {
        state.withLock { $0.features[ver] }
    }

    /// The features `claim` stands for: from the cache, or by asking `entity` (through
    /// `ask`, which sends the `disco#info` query and returns the answer). One query per
    /// `ver` at a time; an answer whose hash does not match is not believed (XEP-0115 §5.4)
    /// and gives nil.
    func resolve(_ claim: Claim, entity: JID, ask: @Sendable (JID, String) async -> XMLElement?) async -> Set<String>? {
        guard claim.hash == "sha-1" else { return nil }
        enum Step { case known(Set<String>), wait, query }
        let step: Step = state.withLock { state in
            if let known = state.features[claim.ver] { return .known(known) }
            if state.pending[claim.ver] != nil { return .wait }
            state.pending[claim.ver] = []
            return .query
        }
        switch step {
        case .known(let features):
            return features
        case .wait:
            return await withCheckedContinuation { continuation in
                let resumeNow: Set<String>?? = state.withLock { state in
                    if let known = state.features[claim.ver] { return .some(known) }
                    guard state.pending[claim.ver] != nil else { return .some(nil) }
                    state.pending[claim.ver, default: []].append(continuation)
                    return .none
                }
                if let resumeNow { continuation.resume(returning: resumeNow) }
            }
        case .query:
            let answer = await ask(entity, "\(claim.node)#\(claim.ver)")
            let verified = answer.flatMap { info in Self.verificationString(info).map { (info, $0) } }
                .flatMap { info, string -> Set<String>? in
                    Self.sha1Base64(string) == claim.ver ? Set(Self.featureList(info)) : nil
                }
            let waiting = state.withLock { state -> [CheckedContinuation<Set<String>?, Never>] in
                let waiting = state.pending.removeValue(forKey: claim.ver) ?? []
                if let verified {
                    state.features[claim.ver] = verified
                    state.order.append(claim.ver)
                    while state.order.count > limit {
                        state.features.removeValue(forKey: state.order.removeFirst())
                    }
                }
                return waiting
            }
            for continuation in waiting { continuation.resume(returning: verified) }
            return verified
        }
    }

    static func featureList(_ info: XMLElement) -> [String] {
        info.children(name: "feature", namespace: "http://jabber.org/protocol/disco#info").compactMap { $0.attribute("var") }
    }

    /// XEP-0115 §5.1: the string hashed into `ver`: identities (category/type/lang/name,
    /// sorted), features (sorted), then extended forms (by FORM_TYPE; fields by var, values
    /// sorted), each followed by "<". Nil when the answer is malformed in a way §5.4 says
    /// must not be cached (duplicate identities or features, forms without FORM_TYPE).
    static func verificationString(_ info: XMLElement) -> String? {
        let discoInfo = "http://jabber.org/protocol/disco#info"
        let identities = info.children(name: "identity", namespace: discoInfo).map { identity in
            [identity.attribute("category") ?? "", identity.attribute("type") ?? "",
             identity.language ?? "",
             identity.attribute("name") ?? ""].joined(separator: "/")
        }
        let features = featureList(info)
        guard Set(identities).count == identities.count, Set(features).count == features.count else { return nil }
        var string = identities.sorted(by: octets).map { $0 + "<" }.joined() + features.sorted(by: octets).map { $0 + "<" }.joined()
        var forms: [(type: String, text: String)] = []
        for form in info.children(name: "x", namespace: PubSubNamespace.dataForms) {
            var formType: String?
            var fields: [(String, [String])] = []
            for field in form.children(name: "field", namespace: PubSubNamespace.dataForms) {
                guard let name = field.attribute("var") else { continue }
                let values = field.children(name: "value", namespace: PubSubNamespace.dataForms).map(\.text)
                if name == "FORM_TYPE" {
                    guard formType == nil, field.attribute("type") == "hidden" || field.attribute("type") == nil, let first = values.first else { return nil }
                    formType = first
                } else {
                    fields.append((name, values))
                }
            }
            guard let formType else { continue }
            let text = formType + "<" + fields.sorted { octets($0.0, $1.0) }.map { name, values in
                name + "<" + values.sorted(by: octets).map { $0 + "<" }.joined()
            }.joined()
            forms.append((formType, text))
        }
        guard Set(forms.map(\.type)).count == forms.count else { return nil }
        string += forms.sorted { octets($0.type, $1.type) }.map(\.text).joined()
        return string
    }

    /// "i;octet" ordering (RFC 4790), as §5.1 requires: by UTF-8 bytes.
    private static func octets(_ a: String, _ b: String) -> Bool {
        a.utf8.lexicographicallyPrecedes(b.utf8)
    }

    static func sha1Base64(_ string: String) -> String {
        Data(Insecure.SHA1.hash(data: Data(string.utf8))).base64EncodedString()
    }
}
