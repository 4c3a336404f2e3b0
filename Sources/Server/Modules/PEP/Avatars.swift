import Crypto
import Foundation
import Storage
import XMPPCore
import XMPPStream

/// Avatars every client sees, whichever way it publishes them: XEP-0084's two PEP nodes
/// (`urn:xmpp:avatar:data`, `urn:xmpp:avatar:metadata`) and XEP-0054's vCard PHOTO, whose hash
/// XEP-0153 puts in presence, kept in step by the server (XEP-0398).
///
/// Conversions write with the stores' own writers (``VCardModule/replacePhoto(with:account:router:hashes:)``,
/// ``PEPService/publishConverted(_:id:node:owner:router:)``), never through the entry points
/// that start a conversion (the vCard IQ, the PEP publish), so one never triggers the other
/// back. Both run under the account's serializer, as the change that caused them.
enum Avatars {
    static let dataNode = "urn:xmpp:avatar:data"
    static let metadataNode = "urn:xmpp:avatar:metadata"
    /// XEP-0153's element in presence.
    static let update = "vcard-temp:x:update"
    /// XEP-0398 §2: the account says the server converts.
    static let conversionFeature = "urn:xmpp:pep-vcard-conversion:0"

    /// An image, with what both protocols say about it.
    struct Photo: Sendable, Equatable {
        var bytes: [UInt8]
        /// The MIME type (vCard TYPE, XEP-0084 info `type`).
        var type: String
        /// SHA-1 of the bytes in lowercase hex: the XEP-0153 hash and the XEP-0084 item id.
        var hash: String

        init(bytes: [UInt8], type: String) {
            self.bytes = bytes
            self.type = type
            hash = Avatars.sha1Hex(bytes)
        }
    }

    static func sha1Hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var hex: [UInt8] = []
        hex.reserveCapacity(40)
        for byte in Insecure.SHA1.hash(data: bytes) {
            hex.append(digits[Int(byte >> 4)])
            hex.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: hex, as: UTF8.self)
    }

    /// Base64 as vCards carry it: XEP-0054 clients wrap BINVAL in lines (RFC 2425 folding) and
    /// some leave the padding out, so whitespace is dropped and padding restored before the
    /// strict decoder reads it. Nil for anything else that is not Base64.
    static func decodeBase64(_ text: String) -> [UInt8]? {
        var compact = String(text.unicodeScalars.filter { !($0 == " " || $0 == "\t" || $0 == "\r" || $0 == "\n") })
        switch compact.utf8.count % 4 {
        case 0: break
        case 2: compact += "=="
        case 3: compact += "="
        default: return nil
        }
        return Base64.decode(compact)
    }

    /// The photo a vCard carries inline (XEP-0153 §3.1: BINVAL; an EXTVAL link is no avatar
    /// the server can hash or convert).
    static func photo(in vCard: XMLElement) -> Photo? {
        let namespace = VCardModule.namespace
        guard let photo = vCard.firstChild(name: "PHOTO", namespace: namespace),
              let binval = photo.firstChild(name: "BINVAL", namespace: namespace),
              let bytes = decodeBase64(binval.text), !bytes.isEmpty else { return nil }
        let type = photo.firstChild(name: "TYPE", namespace: namespace)?.text.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
        return Photo(bytes: bytes, type: type.isEmpty ? sniffedType(bytes) : type)
    }

    /// A type for a PHOTO without TYPE (XEP-0153 requires one; old clients leave it out):
    /// by the file's signature, PNG otherwise (the type XEP-0084 §4.2 requires clients to
    /// support).
    static func sniffedType(_ bytes: [UInt8]) -> String {
        if bytes.starts(with: [0xFF, 0xD8, 0xFF]) { return "image/jpeg" }
        if bytes.starts(with: Array("GIF8".utf8)) { return "image/gif" }
        if bytes.count >= 12, bytes.starts(with: Array("RIFF".utf8)), Array(bytes[8..<12]) == Array("WEBP".utf8) { return "image/webp" }
        return "image/png"
    }

    /// `vCard` (or a new one) with its PHOTO replaced by `photo`, or removed for nil; every
    /// other field stays as it was (XEP-0398 §3.1 changes the photo only).
    static func vCard(_ vCard: XMLElement?, setting photo: Photo?) -> XMLElement {
        let namespace = VCardModule.namespace
        let base = vCard ?? XMLElement(name: "vCard", namespace: namespace)
        let isPhoto: (XMLElement) -> Bool = { $0.name == "PHOTO" && $0.namespace == namespace }
        guard let photo else { return base.removingChildren(where: isPhoto) }
        let element = XMLElement(name: "PHOTO", namespace: namespace, children: [
            .element(XMLElement(name: "TYPE", namespace: namespace, text: photo.type)),
            .element(XMLElement(name: "BINVAL", namespace: namespace, text: Base64.encode(photo.bytes))),
        ])
        // In the old PHOTO's place, so a client that diffs its vCard sees one field change.
        var replaced = false
        var children: [XMLNode] = []
        for node in base.children {
            if case .element(let child) = node, isPhoto(child) {
                if !replaced { children.append(.element(element)) }
                replaced = true
            } else {
                children.append(node)
            }
        }
        if !replaced { children.append(.element(element)) }
        return base.replacingChildren(children)
    }

    /// XEP-0084 §4.1: the data item's payload.
    static func dataPayload(_ photo: Photo) -> XMLElement {
        XMLElement(name: "data", namespace: dataNode, text: Base64.encode(photo.bytes))
    }

    /// XEP-0084 §4.2: one `<info/>` for the image (XEP-0398 §3.2: its type from the vCard).
    /// No width or height: the server does not decode images.
    static func metadataPayload(_ photo: Photo) -> XMLElement {
        XMLElement(name: "metadata", namespace: metadataNode, children: [
            .element(XMLElement(name: "info", namespace: metadataNode, attributes: [
                XMLAttribute("id", photo.hash), XMLAttribute("bytes", "\(photo.bytes.count)"), XMLAttribute("type", photo.type),
            ])),
        ])
    }

    // MARK: Presence (XEP-0153 §4, XEP-0398 §4)

    /// The hash an available presence advertises: the text of its `<x><photo/></x>` ("" for
    /// an empty photo, "no avatar"), nil when it has no photo element.
    static func advertisedPhoto(in presence: XMLElement) -> String? {
        presence.firstChild(name: "x", namespace: update)?.firstChild(name: "photo", namespace: update)
            .map { $0.text.trimmingCharacters(in: .whitespacesAndNewlines) }
    }

    /// `presence` advertising `hash` ("" for none): any `<x/>` of XEP-0153's is replaced.
    static func stamping(_ presence: XMLElement, hash: String) -> XMLElement {
        presence.removingChildren { $0.name == "x" && $0.namespace == update }
            .appending(XMLElement(name: "x", namespace: update, children: [.element(XMLElement(name: "photo", namespace: update, text: hash))]))
    }

    /// XEP-0153 §3.2 has the client send presence again when its photo changes; one that
    /// published through PEP, or whose vCard another client changed, does not know it did. So
    /// the server sends, for each available resource whose presence advertises `old`, that
    /// presence with `new`, to the contacts its broadcast reaches and to the account's own
    /// resources, as RFC 6121 §4.4.2 broadcasts a presence update.
    ///
    /// Not through `PresenceService`'s broadcast: that one stores what it is given, and a
    /// resource that went unavailable in the meantime would come back. Here the check and the
    /// change are one step in the session registry. Resources whose presence says something
    /// else (a client's own hash) are left as the client put them (XEP-0398 §4), and
    /// directed presence (rooms) is not re-sent (XEP-0398 §5 leaves that to clients).
    static func rebroadcast(account: JID, from old: String, to new: String, router: Router) async {
        let sessions = router.server.sessions
        var changed: [(from: JID, presence: XMLElement)] = []
        for entry in sessions.entries(of: account) where entry.isAvailable {
            let updated = sessions.update(entry.session) { entry -> XMLElement? in
                guard let presence = entry.presence, advertisedPhoto(in: presence) == old else { return nil }
                let next = stamping(presence, hash: new)
                entry.presence = next
                return next
            } ?? nil
            if let updated { changed.append((entry.session.jid, updated)) }
        }
        guard !changed.isEmpty else { return }
        let subscribers = await router.roster.contacts(of: account) { $0.subscription == .from || $0.subscription == .both }
        let resources = sessions.entries(of: account).filter(\.isAvailable)
        for (from, presence) in changed {
            for contact in subscribers where contact != account {
                if let stanza = Stanza(presence.setting(attribute: "to", to: contact.description).setting(attribute: "from", to: from.description)) {
                    await router.route(stanza)
                }
            }
            for entry in resources {
                entry.session.deliver(presence.setting(attribute: "to", to: entry.session.jid.description).setting(attribute: "from", to: from.description))
            }
        }
    }
}

extension PEPService {
    /// XEP-0398 §3.1: the metadata node changed (a publish, a retraction, a purge or the node
    /// deleted): the vCard's PHOTO becomes the image its newest item points to, or goes when
    /// there is none (an empty `<metadata/>`, XEP-0084 §4.5, or no item left). A failure is
    /// logged; the PEP change stands. Runs under the owner's serializer (the caller's).
    func avatarMetadataChanged(owner: JID, router: Router) async {
        let storage = router.server.storage
        do {
            let newest = try await storage.storeEntries(Self.store(Avatars.metadataNode), of: owner).last
            var photo: Avatars.Photo?
            if let newest {
                // Something other than XEP-0084 metadata is no avatar to convert: the vCard stays.
                guard let metadata = try? XMLFragment.parse(newest.value), metadata.name == "metadata",
                      metadata.namespace == Avatars.metadataNode else { return }
                let infos = metadata.children(name: "info", namespace: Avatars.metadataNode)
                if !infos.isEmpty {
                    photo = try await avatarImage(infos, owner: owner, router: router)
                    // Nothing usable (only external URLs, data not published, a wrong hash):
                    // the vCard keeps what it has rather than lose a photo.
                    guard photo != nil else { return }
                }
            }
            try await VCardModule.replacePhoto(with: photo, account: owner, router: router, hashes: photoHashes)
        } catch {
            router.logger.error("avatar not carried to the vCard", metadata: ["account": "\(owner)", "error": "\(error)"])
        }
    }

    /// The image one of `infos` names in the data node: §3.1 says to take the info that does
    /// not point to an external URL, and to check the SHA-1 against the id.
    private func avatarImage(_ infos: [XMLElement], owner: JID, router: Router) async throws -> Avatars.Photo? {
        for info in infos where info.attribute("url") == nil {
            guard let id = info.attribute("id"),
                  let entry = try await router.server.storage.storeEntry(Self.store(Avatars.dataNode), of: owner, key: id),
                  let data = try? XMLFragment.parse(entry.value), data.name == "data", data.namespace == Avatars.dataNode,
                  let bytes = Avatars.decodeBase64(data.text), !bytes.isEmpty else { continue }
            let type = info.attribute("type").flatMap { $0.isEmpty ? nil : $0 } ?? Avatars.sniffedType(bytes)
            let photo = Avatars.Photo(bytes: bytes, type: type)
            guard photo.hash == id.lowercased() else {
                router.logger.debug("avatar data does not match its id", metadata: ["account": "\(owner)", "id": "\(id)"])
                continue
            }
            return photo
        }
        return nil
    }

    /// XEP-0398 §3.2: the vCard's photo changed: the data item (id = SHA-1), then the
    /// metadata item pointing to it, each notified as a publish is. A photo removed from the
    /// vCard disables the PEP avatar (XEP-0084 §4.5, an empty `<metadata/>`). Nothing is
    /// published when the metadata already says so (a client that sets both, vCard last).
    /// A failure is logged; the vCard stands. Runs under the owner's serializer.
    func vCardPhotoChanged(to photo: Avatars.Photo?, owner: JID, router: Router) async {
        let storage = router.server.storage
        do {
            let current = try await storage.storeEntries(Self.store(Avatars.metadataNode), of: owner).last.flatMap { try? XMLFragment.parse($0.value) }
            let advertised = current?.children(name: "info", namespace: Avatars.metadataNode).compactMap { $0.attribute("id") } ?? []
            if let photo {
                if advertised.contains(photo.hash) { return }
                guard try await publishConverted(Avatars.dataPayload(photo), id: photo.hash, node: Avatars.dataNode, owner: owner, router: router) else { return }
                try await publishConverted(Avatars.metadataPayload(photo), id: photo.hash, node: Avatars.metadataNode, owner: owner, router: router)
            } else {
                guard !advertised.isEmpty else { return }
                try await publishConverted(XMLElement(name: "metadata", namespace: Avatars.metadataNode), id: "current", node: Avatars.metadataNode,
                                           owner: owner, router: router)
            }
        } catch {
            router.logger.error("vCard photo not carried to PEP", metadata: ["account": "\(owner)", "error": "\(error)"])
        }
    }

    /// Publishes one item on the owner's behalf, with notifications, as a client's publish
    /// would be, creating the node when needed. A node the conversion creates is `open`:
    /// the image is already public in the vCard, which anyone may read (XEP-0054 §3.3,
    /// XEP-0398 §6), so a narrower model would hide from PEP clients what vCard clients see.
    /// A node that exists keeps the configuration its owner gave it. False when the item
    /// was not published (too big, too many nodes).
    @discardableResult
    func publishConverted(_ payload: XMLElement, id: String, node: String, owner: JID, router: Router) async throws -> Bool {
        let storage = router.server.storage
        let serialized = XMLFragment.serialize(payload)
        guard serialized.utf8.count <= settings.maxItemBytes else {
            router.logger.info("converted avatar too big for PEP", metadata: ["account": "\(owner)", "node": "\(node)"])
            return false
        }
        let configuration: PEPNodeConfiguration
        if let existing = try await self.configuration(of: node, owner: owner, storage: storage) {
            configuration = existing
        } else {
            guard try await storage.storeEntries("pep", of: owner).count < settings.maxNodesPerAccount else {
                router.logger.info("no room for the converted avatar's PEP node", metadata: ["account": "\(owner)", "node": "\(node)"])
                return false
            }
            var created = PEPNodeConfiguration()
            created.accessModel = .open
            try await save(created, node: node, owner: owner, storage: storage)
            configuration = created
        }
        try await storage.putStoreEntry(Self.store(node), of: owner, key: id, value: serialized, keepLast: configuration.keptItems(limit: settings.maxItemsPerNode))
        let item = Item(id: id, payload: payload)
        await notify(owner: owner, node: node, configuration: configuration, router: router) {
            XMLElement(name: "items", namespace: PubSubNamespace.event, attributes: [XMLAttribute("node", node)],
                       children: [.element(self.itemElement(item, namespace: PubSubNamespace.event, withPayload: configuration.deliverPayloads))])
        }
        return true
    }
}
