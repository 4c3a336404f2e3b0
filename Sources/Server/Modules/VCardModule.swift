import Storage
import XMPPCore
import XMPPStream

/// XEP-0054 vcard-temp: each account's vCard, which anyone may read at its bare JID and only
/// the account may change. Kept in the account store `vcard`, under one key.
///
/// XEP-0153 (the photo's hash in the account's presence, added by the server when the client
/// leaves it out) is not here: a module cannot change what a client sends
/// (`onClientStanza` only passes or takes a stanza), and the module API stays as it is.
struct VCardModule: BraidModule {
    static let namespace = "vcard-temp"
    static let store = "vcard"
    static let key = "vCard"
    /// Largest vCard kept, serialized, its base64 photo included: an avatar of ~190 KiB.
    static let maximumBytes = 256 * 1024

    var name: String { "vcard" }

    func register(in builder: inout ModuleBuilder) {
        // §8: servers that store vCards say so in their own disco#info.
        builder.serverFeature(Self.namespace)
        builder.onAccountIQ(Self.namespace, handle)
    }

    private func handle(_ request: IQRequest) async -> IQResponse {
        guard request.payload.name == "vCard" else { return .error(StanzaError(.badRequest)) }
        let server = request.router.server
        do throws(StanzaError) {
            switch request.iq.type {
            case .get:
                return .result(try await Self.vCard(of: request.target, server: server))
            case .set:
                // §3.2: only the account publishes its vCard. Forbidden for anyone else,
                // whether or not the addressed account exists.
                guard request.requester.bare == request.target else { throw StanzaError(.forbidden) }
                try await Self.publish(request.payload, account: request.target, server: server)
                return .result(nil)
            case .result, .error, nil:
                return .error(StanzaError(.badRequest))
            }
        } catch {
            return .error(error)
        }
    }

    /// The stored vCard. None stored, and no such account, both answer `item-not-found`:
    /// the error §3.1 prefers for one's own vCard and §3.3 requires for another's, and the
    /// same answer either way, so reading vCards cannot tell which accounts exist.
    static func vCard(of account: JID, server: ServerContext) async throws(StanzaError) -> XMLElement {
        let stored: StoredEntry?
        do {
            stored = try await server.storage.storeEntry(store, of: account, key: key)
        } catch {
            server.logger.error("vCard read failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
        guard let stored else { throw StanzaError(.itemNotFound) }
        do {
            return try XMLFragment.parse(stored.value)
        } catch {
            server.logger.error("unreadable vCard ignored", metadata: ["account": "\(account)"])
            throw StanzaError(.itemNotFound)
        }
    }

    /// Stores a new vCard in place of the old one; an empty one removes it, so that the
    /// account reads as one without a vCard.
    static func publish(_ vCard: XMLElement, account: JID, server: ServerContext) async throws(StanzaError) {
        let value = vCard.attributes.isEmpty && vCard.isEmpty ? nil : XMLFragment.serialize(vCard)
        if let value, value.utf8.count > maximumBytes {
            throw StanzaError(.notAcceptable, text: "a vCard may have at most \(maximumBytes) bytes; use a smaller photo")
        }
        do {
            if let value {
                try await server.storage.putStoreEntry(store, of: account, key: key, value: value, keepLast: nil)
            } else {
                try await server.storage.removeStoreEntry(store, of: account, key: key)
            }
        } catch {
            server.logger.error("vCard write failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
    }
}
