import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// XEP-0054 vcard-temp: each account's vCard, which anyone may read at its bare JID and only
/// the account may change. Kept in the account store `vcard`, under one key.
///
/// XEP-0153: the photo's hash goes into every available presence the account's clients send
/// (`onClientStanza`, from an in-memory hash per account, ``VCardPhotoHashes``), and a
/// changed photo is re-broadcast. With PEP (`avatars`), XEP-0398: a vCard photo is published
/// as the XEP-0084 avatar, and the PEP avatar becomes the vCard photo (`Avatars.swift`).
struct VCardModule: BraidModule {
    static let namespace = "vcard-temp"
    static let store = "vcard"
    static let key = "vCard"
    /// Largest vCard kept, serialized, its base64 photo included: an avatar of ~190 KiB.
    static let maximumBytes = 256 * 1024

    /// The PEP service the avatar conversion publishes through (XEP-0398); nil: none.
    let avatars: PEPService?
    /// Each account's photo hash, shared with the conversion from PEP.
    let hashes: VCardPhotoHashes

    init(avatars: PEPService? = nil) {
        self.avatars = avatars
        hashes = avatars?.photoHashes ?? VCardPhotoHashes()
    }

    var name: String { "vcard" }

    func register(in builder: inout ModuleBuilder) {
        // §8: servers that store vCards say so in their own disco#info.
        builder.serverFeature(Self.namespace)
        // XEP-0398 §2: on the account, so a client can warn that a PEP avatar becomes public.
        if avatars != nil { builder.accountFeature(Avatars.conversionFeature) }
        builder.onAccountIQ(Self.namespace, handle)
        let hashes = self.hashes
        builder.onClientStanza { client in
            await Self.stampPhoto(client, hashes: hashes)
        }
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
                try await Self.set(request.payload, account: request.target, router: request.router, hashes: hashes, avatars: avatars)
                return .result(nil)
            case .result, .error, nil:
                return .error(StanzaError(.badRequest))
            }
        } catch {
            return .error(error)
        }
    }

    // MARK: XEP-0153 in presence

    /// XEP-0398 §4: every available presence (undirected and directed, MUC joins included)
    /// advertises the vCard photo's hash, unless the client put a photo element there itself
    /// (empty or not: left as it is); an `<x/>` without one is filled in. An account without
    /// a photo advertises an empty one, "no avatar" (XEP-0153 §4.1 rule 3), so that removing a
    /// photo reaches contacts too.
    private static func stampPhoto(_ client: ClientStanza, hashes: VCardPhotoHashes) async -> StanzaDisposition {
        let stanza = client.stanza
        guard stanza.kind == .presence, stanza.typeAttribute == nil, Avatars.advertisedPhoto(in: stanza.element) == nil,
              let hash = await hashes.hash(of: client.session.jid.bare, router: client.router),
              let stamped = Stanza(Avatars.stamping(stanza.element, hash: hash)) else { return .pass }
        return .replace(stamped)
    }

    // MARK: Storage

    /// The stored vCard. None stored, and no such account, both answer `item-not-found`:
    /// the error §3.1 prefers for one's own vCard and §3.3 requires for another's, and the
    /// same answer either way, so reading vCards cannot tell which accounts exist.
    static func vCard(of account: JID, server: ServerContext) async throws(StanzaError) -> XMLElement {
        guard let vCard = try await stored(of: account, server: server) else { throw StanzaError(.itemNotFound) }
        return vCard
    }

    /// The stored vCard, nil when there is none (or it no longer parses, which is logged).
    static func stored(of account: JID, server: ServerContext) async throws(StanzaError) -> XMLElement? {
        let stored: StoredEntry?
        do {
            stored = try await server.storage.storeEntry(store, of: account, key: key)
        } catch {
            server.logger.error("vCard read failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
        guard let stored else { return nil }
        do {
            return try XMLFragment.parse(stored.value)
        } catch {
            server.logger.error("unreadable vCard ignored", metadata: ["account": "\(account)"])
            return nil
        }
    }

    /// Stores a new vCard in place of the old one; an empty one removes it, so that the
    /// account reads as one without a vCard. Only the store: the photo's followers are
    /// ``set(_:account:router:hashes:avatars:)``'s and ``replacePhoto(with:account:router:hashes:)``'s.
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

    /// The account sets its vCard (§3.2). Reading the old photo, storing, the new hash in
    /// presence and the conversion to PEP (XEP-0398 §3.2) are one step for the account, so
    /// two writes, or a write and a PEP avatar publish, never interleave.
    static func set(_ vCard: XMLElement, account: JID, router: Router, hashes: VCardPhotoHashes, avatars: PEPService?) async throws(StanzaError) {
        let server = router.server
        let outcome: Result<Void, StanzaError>
        do {
            outcome = try await server.accounts.run(account) { () async -> Result<Void, StanzaError> in
                do throws(StanzaError) {
                    let before = try await stored(of: account, server: server)
                    try await publish(vCard, account: account, server: server)
                    let old = before.flatMap(Avatars.photo(in:))
                    let new = Avatars.photo(in: vCard)
                    await photoChanged(account: account, from: old?.hash ?? "", to: new?.hash ?? "", router: router, hashes: hashes)
                    if old?.hash != new?.hash, let avatars {
                        await avatars.vCardPhotoChanged(to: new, owner: account, router: router)
                    }
                    return .success(())
                } catch {
                    return .failure(error)
                }
            }
        } catch {
            server.logger.error("vCard write failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
        try outcome.get()
    }

    /// XEP-0398 §3.1: the vCard's PHOTO becomes `photo` (nil: removed), every other field
    /// kept. The conversion's own write: it does not convert back to PEP. Runs under the
    /// account's serializer (the caller's).
    static func replacePhoto(with photo: Avatars.Photo?, account: JID, router: Router, hashes: VCardPhotoHashes) async throws(StanzaError) {
        let server = router.server
        let before = try await stored(of: account, server: server)
        let old = before.flatMap(Avatars.photo(in:))
        // Already so (a client that publishes both ways): no write, no presence.
        if old?.hash == photo?.hash && old?.type == photo?.type { return }
        if before == nil && photo == nil { return }
        try await publish(Avatars.vCard(before, setting: photo), account: account, server: server)
        await photoChanged(account: account, from: old?.hash ?? "", to: photo?.hash ?? "", router: router, hashes: hashes)
    }

    /// A written vCard's photo: the hash presence advertises from now on, and the available
    /// resources' presence again when it changed (XEP-0153 §3.2).
    private static func photoChanged(account: JID, from old: String, to new: String, router: Router, hashes: VCardPhotoHashes) async {
        hashes.changed(new, for: account)
        guard old != new else { return }
        await Avatars.rebroadcast(account: account, from: old, to: new, router: router)
    }
}

/// Each account's vCard photo hash as its presence advertises it ("" for no photo): read
/// from the vCard store once, on the account's first presence, then kept in step by every
/// vCard write (the vCard IQ and the conversion from PEP), so a presence costs no storage
/// read. Bounded: past `limit` accounts the longest-known are forgotten and read again on
/// their next presence.
final class VCardPhotoHashes: Sendable {
    private struct State {
        var hashes: [JID: String] = [:]
        /// Accounts in the order they were added, from `head` on: the eviction order.
        var order: [JID] = []
        var head = 0
    }

    private let state = Mutex(State())
    let limit: Int

    init(limit: Int = 100_000) {
        self.limit = max(1, limit)
    }

    var count: Int { state.withLock { $0.hashes.count } }

    /// The hash in memory, nil when the account's vCard has not been read (or was forgotten).
    func cached(_ account: JID) -> String? {
        state.withLock { $0.hashes[account] }
    }

    /// The advertised hash of `account`: from memory, else from its stored vCard. Nil when
    /// the store cannot be read (the presence goes out as the client sent it).
    func hash(of account: JID, router: Router) async -> String? {
        if let known = cached(account) { return known }
        let vCard: XMLElement?
        do {
            vCard = try await VCardModule.stored(of: account, server: router.server)
        } catch {
            return nil
        }
        let loaded = vCard.flatMap(Avatars.photo(in:))?.hash ?? ""
        // A vCard write that finished while this read was under way knows better.
        return state.withLock { state in
            if let written = state.hashes[account] { return written }
            Self.insert(loaded, for: account, into: &state, limit: limit)
            return loaded
        }
    }

    /// The hash of a vCard just written.
    func changed(_ hash: String, for account: JID) {
        state.withLock { state in
            if state.hashes[account] != nil {
                state.hashes[account] = hash
            } else {
                Self.insert(hash, for: account, into: &state, limit: limit)
            }
        }
    }

    private static func insert(_ hash: String, for account: JID, into state: inout State, limit: Int) {
        state.hashes[account] = hash
        state.order.append(account)
        while state.hashes.count > limit, state.head < state.order.count {
            state.hashes[state.order[state.head]] = nil
            state.head += 1
        }
        // The evicted prefix is dropped now and then, not on every eviction.
        if state.head > 1024, state.head * 2 > state.order.count {
            state.order.removeFirst(state.head)
            state.head = 0
        }
    }
}
