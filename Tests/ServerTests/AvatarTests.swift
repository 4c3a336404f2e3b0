import Foundation
import Testing
import XMPPCore
@testable import Server

/// Avatars every client sees (issue 13): the vCard photo's hash in presence (XEP-0153) and the
/// server's conversion between vCard and PEP avatars (XEP-0398), through real client streams.
/// PEPTests' helpers (capabilities, publish and items payloads) are reused, not copied.
@Suite("Avatars: XEP-0153 hashes in presence, XEP-0398 conversion between vCard and PEP")
struct AvatarTests {
    static let vcardNS = VCardModule.namespace
    static let update = "vcard-temp:x:update"
    static let dataNode = "urn:xmpp:avatar:data"
    static let metadataNode = "urn:xmpp:avatar:metadata"

    /// Two small PNG-signed images and their SHA-1s, computed outside Braid (Python's
    /// hashlib), so a wrong hash in the server cannot agree with itself here.
    static let image: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A] + (0..<600).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
    static let imageHash = "78c40500100d78c8628352e6d526f0d9db75fb61"
    static let otherImage: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A] + (0..<600).map { UInt8(truncatingIfNeeded: $0 * 7 + 5) }
    static let otherHash = "21abb02350a438089a23e7dbd0e31fa84f5a5d83"

    /// A vCard with a name and, optionally, a photo; `folded` wraps BINVAL in 76-column lines,
    /// as many XEP-0054 clients write it.
    static func vCard(name: String, photo: [UInt8]?, folded: Bool = false) -> XMLElement {
        var children: [XMLNode] = [
            .element(XMLElement(name: "FN", namespace: vcardNS, text: name)),
            .element(XMLElement(name: "NICKNAME", namespace: vcardNS, text: name.lowercased())),
        ]
        if let photo {
            var binval = Base64.encode(photo)
            if folded {
                var lines: [Substring] = []
                var rest = Substring(binval)
                while !rest.isEmpty {
                    lines.append(rest.prefix(76))
                    rest = rest.dropFirst(76)
                }
                binval = "\n" + lines.joined(separator: "\n") + "\n"
            }
            children.insert(.element(XMLElement(name: "PHOTO", namespace: vcardNS, children: [
                .element(XMLElement(name: "TYPE", namespace: vcardNS, text: "image/png")),
                .element(XMLElement(name: "BINVAL", namespace: vcardNS, text: binval)),
            ])), at: 1)
        }
        return XMLElement(name: "vCard", namespace: vcardNS, children: children)
    }

    /// An available presence with a status to recognise it by, and a client's own XEP-0153
    /// element when asked: `photo` "" is an empty photo, `bareUpdate` an `<x/>` without one.
    static func presence(status: String, photo: String? = nil, bareUpdate: Bool = false, to: String? = nil) -> XMLElement {
        var children: [XMLNode] = [.element(XMLElement(name: "status", namespace: XMLNamespace.client, text: status))]
        if let photo {
            children.append(.element(XMLElement(name: "x", namespace: update, children: [.element(XMLElement(name: "photo", namespace: update, text: photo))])))
        } else if bareUpdate {
            children.append(.element(XMLElement(name: "x", namespace: update)))
        }
        return XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: to.map { [XMLAttribute("to", $0)] } ?? [], children: children)
    }

    static func isPresence(_ element: XMLElement, from: JID, status: String) -> Bool {
        element.name == "presence" && element.attribute("type") == nil && element.attribute("from") == from.description
            && element.firstChild(name: "status", namespace: XMLNamespace.client)?.text == status
    }

    /// The hash a presence advertises ("" for an empty photo), nil without a photo element.
    static func photo(_ presence: XMLElement) -> String? {
        presence.firstChild(name: "x", namespace: update)?.firstChild(name: "photo", namespace: update)?.text
    }

    static func vCardPhoto(_ reply: XMLElement) -> (type: String?, bytes: [UInt8]?)? {
        guard let photo = reply.firstChild(name: "vCard", namespace: vcardNS)?.firstChild(name: "PHOTO", namespace: vcardNS) else { return nil }
        let binval = photo.firstChild(name: "BINVAL", namespace: vcardNS)?.text.filter { !$0.isWhitespace }
        return (photo.firstChild(name: "TYPE", namespace: vcardNS)?.text, binval.flatMap { Base64.decode($0) })
    }

    static func metadata(id: String, bytes: Int) -> XMLElement {
        XMLElement(name: "metadata", namespace: metadataNode, children: [
            .element(XMLElement(name: "info", namespace: metadataNode, attributes: [
                XMLAttribute("id", id), XMLAttribute("bytes", "\(bytes)"), XMLAttribute("type", "image/png"),
            ])),
        ])
    }

    /// The first item of a pubsub `items` result or of an event.
    static func firstItem(_ element: XMLElement, namespace: String) -> XMLElement? {
        let parent = namespace == PubSubNamespace.event ? PEPTests.event(element) : element.firstChild(name: "pubsub", namespace: PubSubNamespace.pubsub)
        return parent?.firstChild(name: "items", namespace: namespace)?.firstChild(name: "item", namespace: namespace)
    }

    @Test("Without sockets: a folded or unpadded BINVAL decodes and hashes, the PHOTO is replaced in place with the rest kept, presence gets one x-update, the hash cache forgets the oldest past its limit")
    func pieces() throws {
        let folded = Self.vCard(name: "Alice", photo: Self.image, folded: true)
        let photo = Avatars.photo(in: folded)
        #expect(photo?.bytes == Self.image)
        #expect(photo?.hash == Self.imageHash)
        #expect(photo?.type == "image/png")
        #expect(Avatars.decodeBase64("AQIDBA") == [1, 2, 3, 4], "padding left out")
        #expect(Avatars.decodeBase64("AQID\r\nBA==") == [1, 2, 3, 4])
        #expect(Avatars.decodeBase64("not base64!") == nil)
        #expect(Avatars.sniffedType([0xFF, 0xD8, 0xFF, 0xE0]) == "image/jpeg")

        let replaced = Avatars.vCard(folded, setting: Avatars.Photo(bytes: Self.otherImage, type: "image/png"))
        #expect(replaced.elements.map(\.name) == ["FN", "PHOTO", "NICKNAME"])
        #expect(Avatars.photo(in: replaced)?.hash == Self.otherHash)
        #expect(Avatars.vCard(replaced, setting: nil).elements.map(\.name) == ["FN", "NICKNAME"])

        let stamped = Avatars.stamping(Self.presence(status: "s", bareUpdate: true), hash: Self.imageHash)
        #expect(stamped.children(name: "x", namespace: Self.update).count == 1)
        #expect(Avatars.advertisedPhoto(in: stamped) == Self.imageHash)

        let hashes = VCardPhotoHashes(limit: 2)
        let (a, b, c) = (try JID("a@a.example"), try JID("b@a.example"), try JID("c@a.example"))
        hashes.changed("1", for: a)
        hashes.changed("2", for: b)
        hashes.changed("3", for: a)
        hashes.changed("4", for: c)
        #expect(hashes.cached(a) == nil, "the longest-known goes first, even when written since")
        #expect(hashes.cached(b) == "2")
        #expect(hashes.cached(c) == "4")
        #expect(hashes.count == 2)
    }

    @Test("XEP-0153: the vCard photo's hash is added to available presence (undirected and directed) and re-sent when it changes; a client's own photo element is left alone")
    func hashInPresence() async throws {
        try await withServer { server in
            try await PEPTests().befriend(server, "alice@a.example", "bob@b.example")
            let (bob, _) = try await server.loggedIn("bob@b.example")
            try await bob.sendPresence()
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            try await alice.send(Self.presence(status: "first"))
            // No vCard yet: an empty photo, "no avatar" (XEP-0153 §4.1).
            let first = try await bob.waitFor { Self.isPresence($0, from: aliceJID, status: "first") }
            #expect(Self.photo(first) == "")

            #expect(try await alice.iq(.set, payload: Self.vCard(name: "Alice", photo: Self.image)).attribute("type") == "result")
            // §3.2: the contact learns the new hash without the client sending presence again,
            // and so do her own resources.
            let resent = try await bob.waitFor { Self.isPresence($0, from: aliceJID, status: "first") && Self.photo($0) != "" }
            #expect(Self.photo(resent) == Self.imageHash)
            let echo = try await alice.waitFor { Self.isPresence($0, from: aliceJID, status: "first") && Self.photo($0) != "" }
            #expect(Self.photo(echo) == Self.imageHash)

            // Her next presence carries it: the hash in memory followed the vCard.
            try await alice.send(Self.presence(status: "second"))
            #expect(Self.photo(try await bob.waitFor { Self.isPresence($0, from: aliceJID, status: "second") }) == Self.imageHash)

            // XEP-0398 §4: a photo element the client put there stays as it is, a hash or empty.
            let own = "0123456789abcdef0123456789abcdef01234567"
            try await alice.send(Self.presence(status: "own", photo: own))
            #expect(Self.photo(try await bob.waitFor { Self.isPresence($0, from: aliceJID, status: "own") }) == own)
            try await alice.send(Self.presence(status: "none", photo: ""))
            #expect(Self.photo(try await bob.waitFor { Self.isPresence($0, from: aliceJID, status: "none") }) == "")
            // An <x/> without a photo (a client not ready to say) is filled in.
            try await alice.send(Self.presence(status: "not ready", bareUpdate: true))
            let filled = try await bob.waitFor { Self.isPresence($0, from: aliceJID, status: "not ready") }
            #expect(Self.photo(filled) == Self.imageHash)
            #expect(filled.children(name: "x", namespace: Self.update).count == 1)

            // Directed presence too (XEP-0398 §4, for MUC joins): to carol, who is no contact.
            let (carol, carolJID) = try await server.loggedIn("carol@a.example")
            try await carol.sendPresence()
            try await alice.send(Self.presence(status: "directed", to: carolJID.description))
            #expect(Self.photo(try await carol.waitFor { Self.isPresence($0, from: aliceJID, status: "directed") }) == Self.imageHash)
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }

    @Test("XEP-0398 §3.1: a PEP avatar becomes the vCard's PHOTO (other fields kept), which another user reads; presence follows; a wrong hash is not believed; an empty metadata removes the PHOTO")
    func pepAvatarToVCard() async throws {
        try await withServer { server in
            let (alice, aliceJID) = try await server.loggedIn("alice@a.example")
            // §2: the account says it converts.
            let info = try await alice.iq(.get, to: "alice@a.example", payload: XMLElement(name: "query", namespace: DiscoModule.info))
            let features = info.firstChild(name: "query", namespace: DiscoModule.info)?.children(name: "feature", namespace: DiscoModule.info).compactMap { $0.attribute("var") } ?? []
            #expect(features.contains("urn:xmpp:pep-vcard-conversion:0"))

            #expect(try await alice.iq(.set, payload: Self.vCard(name: "Alice Liddell", photo: nil)).attribute("type") == "result")
            try await alice.send(Self.presence(status: "here"))
            _ = try await alice.waitFor { Self.isPresence($0, from: aliceJID, status: "here") }

            // XEP-0084 §4.1: data, then metadata.
            let data = XMLElement(name: "data", namespace: Self.dataNode, text: Base64.encode(Self.image))
            #expect(try await alice.iq(.set, payload: PEPTests.publish(node: Self.dataNode, id: Self.imageHash, payload: data)).attribute("type") == "result")
            let published = try await alice.iq(.set, payload: PEPTests.publish(node: Self.metadataNode, id: Self.imageHash,
                                                                                 payload: Self.metadata(id: Self.imageHash, bytes: Self.image.count)))
            #expect(published.attribute("type") == "result")
            // The presence she sent is re-sent with the new hash.
            let resent = try await alice.waitFor { Self.isPresence($0, from: aliceJID, status: "here") && Self.photo($0) != "" }
            #expect(Self.photo(resent) == Self.imageHash)

            let (bob, _) = try await server.loggedIn("bob@b.example")
            let card = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(card.firstChild(name: "vCard", namespace: Self.vcardNS)?.firstChild(name: "FN", namespace: Self.vcardNS)?.text == "Alice Liddell")
            #expect(card.firstChild(name: "vCard", namespace: Self.vcardNS)?.firstChild(name: "NICKNAME", namespace: Self.vcardNS)?.text == "alice liddell")
            let photo = Self.vCardPhoto(card)
            #expect(photo?.type == "image/png")
            #expect(photo?.bytes == Self.image)

            // §3.1: the image must hash to the id; an image under another id is not taken.
            let wrongID = String(repeating: "0", count: 40)
            let mislabelled = XMLElement(name: "data", namespace: Self.dataNode, text: Base64.encode(Self.otherImage))
            #expect(try await alice.iq(.set, payload: PEPTests.publish(node: Self.dataNode, id: wrongID, payload: mislabelled)).attribute("type") == "result")
            #expect(try await alice.iq(.set, payload: PEPTests.publish(node: Self.metadataNode, id: wrongID,
                                                                         payload: Self.metadata(id: wrongID, bytes: Self.otherImage.count))).attribute("type") == "result")
            let kept = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(Self.vCardPhoto(kept)?.bytes == Self.image)

            // XEP-0084 §4.5: an empty metadata item disables the avatar; the PHOTO goes, the
            // rest stays, and presence says "no avatar".
            let disabled = try await alice.iq(.set, payload: PEPTests.publish(node: Self.metadataNode, id: "current", payload: XMLElement(name: "metadata", namespace: Self.metadataNode)))
            #expect(disabled.attribute("type") == "result")
            let cleared = try await alice.waitFor { Self.isPresence($0, from: aliceJID, status: "here") && Self.photo($0) == "" }
            #expect(Self.photo(cleared) == "")
            let without = try await bob.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(without.attribute("type") == "result")
            #expect(Self.vCardPhoto(without) == nil)
            #expect(without.firstChild(name: "vCard", namespace: Self.vcardNS)?.firstChild(name: "FN", namespace: Self.vcardNS)?.text == "Alice Liddell")
            await alice.close()
            await bob.close()
        }
    }

    @Test("XEP-0398 §3.2: a vCard PHOTO is published as the PEP avatar, data then metadata with the SHA-1 as ids, notified to a contact with +notify; the nodes are open; the vCard stays as set")
    func vCardPhotoToPEP() async throws {
        try await withServer { server in
            let helpers = PEPTests()
            try await helpers.befriend(server, "alice@a.example", "bob@b.example")
            let (alice, _) = try await server.loggedIn("alice@a.example")
            try await alice.sendPresence()
            let bobCaps = PEPTests.Capabilities(name: "bob's avatar client", notify: [Self.dataNode, Self.metadataNode])
            let (bob, bobJID) = try await server.loggedIn("bob@b.example")
            try await helpers.available(bob, bobCaps)
            try await helpers.answerCapsQuery(bob, bobCaps)
            // bob's presence has reached alice: her PEP service knows what he wants.
            _ = try await alice.waitFor { $0.name == "presence" && $0.attribute("from") == bobJID.description }

            let card = Self.vCard(name: "Alice", photo: Self.image, folded: true)
            #expect(try await alice.iq(.set, payload: card).attribute("type") == "result")
            // Data first, then the metadata that points to it.
            let dataEvent = try await bob.waitFor { PEPTests.event($0) != nil }
            #expect(dataEvent.attribute("from") == "alice@a.example")
            #expect(PEPTests.event(dataEvent)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.dataNode)
            #expect(Self.firstItem(dataEvent, namespace: PubSubNamespace.event)?.attribute("id") == Self.imageHash)
            let metadataEvent = try await bob.waitFor { PEPTests.event($0) != nil }
            #expect(PEPTests.event(metadataEvent)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.metadataNode)
            let item = Self.firstItem(metadataEvent, namespace: PubSubNamespace.event)
            #expect(item?.attribute("id") == Self.imageHash)
            let info = item?.firstChild(name: "metadata", namespace: Self.metadataNode)?.children(name: "info", namespace: Self.metadataNode)
            #expect(info?.count == 1)
            #expect(info?.first?.attribute("id") == Self.imageHash)
            #expect(info?.first?.attribute("bytes") == "\(Self.image.count)")
            #expect(info?.first?.attribute("type") == "image/png")

            // The nodes are open, as the vCard is: carol, no contact, reads both.
            let (carol, _) = try await server.loggedIn("carol@a.example")
            let dataItems = try await carol.iq(.get, to: "alice@a.example", payload: PEPTests.items(node: Self.dataNode))
            let dataItem = Self.firstItem(dataItems, namespace: PubSubNamespace.pubsub)
            #expect(dataItem?.attribute("id") == Self.imageHash)
            #expect(dataItem?.firstChild(name: "data", namespace: Self.dataNode).flatMap { Base64.decode($0.text) } == Self.image)
            let metadataItems = try await carol.iq(.get, to: "alice@a.example", payload: PEPTests.items(node: Self.metadataNode))
            #expect(Self.firstItem(metadataItems, namespace: PubSubNamespace.pubsub)?.attribute("id") == Self.imageHash)

            // The conversion did not come back to the vCard: it is as alice set it, folded.
            let stored = try await carol.iq(.get, to: "alice@a.example", payload: XMLElement(name: "vCard", namespace: Self.vcardNS))
            #expect(stored.firstChild(name: "vCard", namespace: Self.vcardNS) == card)

            // A new photo: a new avatar. Then no photo: the avatar is disabled (XEP-0084 §4.5).
            #expect(try await alice.iq(.set, payload: Self.vCard(name: "Alice", photo: Self.otherImage)).attribute("type") == "result")
            let replaced = try await bob.waitFor { element in
                PEPTests.event(element)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.metadataNode
            }
            #expect(Self.firstItem(replaced, namespace: PubSubNamespace.event)?.attribute("id") == Self.otherHash)
            #expect(try await alice.iq(.set, payload: Self.vCard(name: "Alice", photo: nil)).attribute("type") == "result")
            let emptied = try await bob.waitFor { element in
                PEPTests.event(element)?.firstChild(name: "items", namespace: PubSubNamespace.event)?.attribute("node") == Self.metadataNode
            }
            let emptyMetadata = Self.firstItem(emptied, namespace: PubSubNamespace.event)?.firstChild(name: "metadata", namespace: Self.metadataNode)
            #expect(emptyMetadata != nil)
            #expect(emptyMetadata?.children(name: "info", namespace: Self.metadataNode).isEmpty == true)
            await alice.close()
            await bob.close()
            await carol.close()
        }
    }
}
