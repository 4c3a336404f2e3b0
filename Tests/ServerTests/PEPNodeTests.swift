import Foundation
import Storage
import Testing
import XMPPCore
@testable import Server

/// PEP's rules without sockets: who may read a node, what forms do to a configuration,
/// publish-options as preconditions, and the entity-capabilities hash.
@Suite("PEP rules and entity capabilities, socket-free")
struct PEPNodeTests {
    static let owner = try! JID("alice@example.com")

    static func item(_ subscription: Subscription, groups: [String] = []) -> RosterItem {
        RosterItem(jid: try! JID("bob@example.org"), subscription: subscription, groups: groups)
    }

    static func form(_ fields: [(String, [String])], formType: String = PubSubNamespace.publishOptions) -> XMLElement {
        XMLElement(name: "x", namespace: PubSubNamespace.dataForms, attributes: [XMLAttribute("type", "submit")],
                   children: ([("FORM_TYPE", [formType])] + fields).map { name, values in
                       .element(XMLElement(name: "field", namespace: PubSubNamespace.dataForms, attributes: [XMLAttribute("var", name)],
                                           children: values.map { .element(XMLElement(name: "value", namespace: PubSubNamespace.dataForms, text: $0)) }))
                   })
    }

    struct AccessCase: Sendable, CustomTestStringConvertible {
        var model: PEPAccessModel
        var rosterItem: RosterItem?
        var groupsAllowed: [String] = []
        var members: [String] = []
        var requester = "bob@example.org/phone"
        var expected: PEPAccess.Decision
        var testDescription: String { "\(model.rawValue), \(rosterItem.map { "\($0.subscription)" } ?? "no roster item") → \(expected)" }
    }

    @Test("XEP-0060 §6.5, XEP-0163 §4: access by model and the owner's roster", arguments: [
        AccessCase(model: .open, rosterItem: nil, expected: .allowed),
        AccessCase(model: .presence, rosterItem: item(.from), expected: .allowed),
        AccessCase(model: .presence, rosterItem: item(.both), expected: .allowed),
        AccessCase(model: .presence, rosterItem: item(.to), expected: .presenceSubscriptionRequired),
        AccessCase(model: .presence, rosterItem: item(.none), expected: .presenceSubscriptionRequired),
        AccessCase(model: .presence, rosterItem: nil, expected: .presenceSubscriptionRequired),
        AccessCase(model: .presence, rosterItem: nil, requester: "alice@example.com/laptop", expected: .allowed),
        AccessCase(model: .roster, rosterItem: item(.none, groups: ["Family"]), groupsAllowed: ["Family"], expected: .allowed),
        AccessCase(model: .roster, rosterItem: item(.both, groups: ["Work"]), groupsAllowed: ["Family"], expected: .notInRosterGroup),
        AccessCase(model: .whitelist, rosterItem: item(.both), members: ["bob@example.org"], expected: .allowed),
        AccessCase(model: .whitelist, rosterItem: item(.both), members: [], expected: .closedNode),
        AccessCase(model: .whitelist, rosterItem: nil, requester: "alice@example.com/x", expected: .allowed),
    ])
    func access(_ test: AccessCase) throws {
        var configuration = PEPNodeConfiguration()
        configuration.accessModel = test.model
        configuration.rosterGroupsAllowed = test.groupsAllowed
        configuration.members = test.members
        #expect(PEPAccess.decide(configuration, owner: Self.owner, requester: try JID(test.requester), rosterItem: test.rosterItem) == test.expected)
    }

    @Test("A refusal tells a stranger nothing (item-not-found) and a contact the XEP's condition")
    func refusalErrors() {
        let (stranger, strangerCondition) = PEPAccess.error(.presenceSubscriptionRequired, rosterItem: nil)
        #expect(stranger.condition == .itemNotFound && strangerCondition == nil)
        let (contact, condition) = PEPAccess.error(.presenceSubscriptionRequired, rosterItem: Self.item(.to))
        #expect(contact.condition == .notAuthorized && condition?.name == "presence-subscription-required")
        #expect(PEPAccess.error(.closedNode, rosterItem: Self.item(.both)).0.condition == .notAllowed)
    }

    @Test("Forms configure a node; values it cannot take are refused; publish-options are preconditions (XEP-0223)")
    func formsAndPreconditions() throws {
        let open = try PEPNodeConfiguration().applying(Self.form([("pubsub#access_model", ["open"]), ("pubsub#max_items", ["max"])]), limit: 100)
        #expect(open.accessModel == .open && open.maxItems == nil && open.keptItems(limit: 100) == 100)
        #expect(open.unmetPrecondition(Self.form([("pubsub#access_model", ["open"])]), limit: 100) == nil)
        #expect(open.unmetPrecondition(Self.form([("pubsub#access_model", ["presence"])]), limit: 100) == "pubsub#access_model")
        #expect(open.unmetPrecondition(Self.form([("pubsub#max_items", ["5"])]), limit: 100) == "pubsub#max_items")
        #expect(open.unmetPrecondition(Self.form([("pubsub#unknown_option", ["1"])]), limit: 100) == "pubsub#unknown_option")
        #expect(throws: PEPNodeConfiguration.FormProblem.self) { try PEPNodeConfiguration().applying(Self.form([("pubsub#access_model", ["authorize"])]), limit: 100) }
        #expect(throws: PEPNodeConfiguration.FormProblem.self) { try PEPNodeConfiguration().applying(Self.form([("pubsub#max_items", ["1000"])]), limit: 100) }
        #expect(throws: PEPNodeConfiguration.FormProblem.self) { try PEPNodeConfiguration().applying(Self.form([("pubsub#persist_items", ["maybe"])]), limit: 100) }
        var transient = PEPNodeConfiguration()
        transient.persistItems = false
        transient.maxItems = 50
        #expect(transient.keptItems(limit: 100) == 1, "a node without persistence still keeps its last item")
        // The configuration form shows what it holds, and reads back the same.
        let shown = open.form(type: "submit", limit: 100)
        #expect(try PEPNodeConfiguration().applying(shown, limit: 100) == open)
        // Stored before a field existed: its default.
        let old = try JSONDecoder().decode(PEPNodeConfiguration.self, from: Data(#"{"accessModel":"open"}"#.utf8))
        #expect(old.accessModel == .open && old.notifyRetract && old.sendLastPublishedItem == "on_sub_and_presence")
    }

    static func discoInfo(identities: [(String, String, String)], features: [String], forms: [XMLElement] = []) -> XMLElement {
        var children: [XMLNode] = identities.map { category, type, name in
            .element(XMLElement(name: "identity", namespace: DiscoModule.info, attributes: [XMLAttribute("category", category), XMLAttribute("type", type), XMLAttribute("name", name)]))
        }
        children += features.map { .element(XMLElement(name: "feature", namespace: DiscoModule.info, attributes: [XMLAttribute("var", $0)])) }
        children += forms.map { .element($0) }
        return XMLElement(name: "query", namespace: DiscoModule.info, children: children)
    }

    @Test("XEP-0115 §5.2 and §5.3: the verification string and hash of the XEP's examples")
    func capsHash() {
        let simple = Self.discoInfo(identities: [("client", "pc", "Exodus 0.9.1")], features: [
            "http://jabber.org/protocol/muc", "http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items", "http://jabber.org/protocol/caps",
        ])
        #expect(EntityCaps.verificationString(simple) == "client/pc//Exodus 0.9.1<http://jabber.org/protocol/caps<http://jabber.org/protocol/disco#info<http://jabber.org/protocol/disco#items<http://jabber.org/protocol/muc<")
        #expect(EntityCaps.verificationString(simple).map(EntityCaps.sha1Base64) == "QgayPKawpkPSDYmwT/WM94uAlu0=")

        func field(_ name: String, _ values: [String], type: String? = nil) -> XMLNode {
            var attributes = [XMLAttribute("var", name)]
            if let type { attributes.append(XMLAttribute("type", type)) }
            return .element(XMLElement(name: "field", namespace: PubSubNamespace.dataForms, attributes: attributes,
                                       children: values.map { .element(XMLElement(name: "value", namespace: PubSubNamespace.dataForms, text: $0)) }))
        }
        let form = XMLElement(name: "x", namespace: PubSubNamespace.dataForms, attributes: [XMLAttribute("type", "result")], children: [
            field("FORM_TYPE", ["urn:xmpp:dataforms:softwareinfo"], type: "hidden"),
            field("ip_version", ["ipv4", "ipv6"]), field("os", ["Mac"]), field("os_version", ["10.5.1"]),
            field("software", ["Psi"]), field("software_version", ["0.11"]),
        ])
        var complex = Self.discoInfo(identities: [], features: ["http://jabber.org/protocol/caps", "http://jabber.org/protocol/disco#info",
                                                                "http://jabber.org/protocol/disco#items", "http://jabber.org/protocol/muc"], forms: [form])
        // Two identities differing by xml:lang.
        let identities: [XMLNode] = [("en", "Psi 0.11"), ("el", "Ψ 0.11")].map { lang, name in
            .element(XMLElement(name: "identity", namespace: DiscoModule.info, attributes: [
                XMLAttribute("category", "client"), XMLAttribute("type", "pc"), XMLAttribute("name", name),
                XMLAttribute("lang", lang, namespace: XMLNamespace.xml),
            ]))
        }
        complex = XMLElement(name: complex.name, namespace: complex.namespace, children: identities + complex.children)
        #expect(EntityCaps.verificationString(complex).map(EntityCaps.sha1Base64) == "q07IKJEyjvHSyhy//CH0CxmKi8w=")

        // §5.4: duplicate features are not hashed (nor cached).
        let duplicated = Self.discoInfo(identities: [("client", "pc", "x")], features: ["a", "a"])
        #expect(EntityCaps.verificationString(duplicated) == nil)
    }

    @Test("Capabilities: one query per unknown ver, shared by concurrent askers; a wrong hash is not believed; the cache is bounded")
    func capsResolution() async throws {
        let caps = EntityCaps(limit: 2)
        let info = Self.discoInfo(identities: [("client", "pc", "Test")], features: ["urn:xmpp:a", "urn:xmpp:a+notify"])
        let ver = try #require(EntityCaps.verificationString(info).map(EntityCaps.sha1Base64))
        let asked = Seen()
        let claim = try #require(EntityCaps.Claim(XMLElement(name: "presence", namespace: XMLNamespace.client, children: [
            .element(XMLElement(name: "c", namespace: EntityCaps.namespace, attributes: [XMLAttribute("node", "urn:test"), XMLAttribute("ver", ver), XMLAttribute("hash", "sha-1")])),
        ])))
        let entity = try JID("bob@example.org/phone")
        let results = await withTaskGroup(of: Set<String>?.self) { group in
            for _ in 0..<5 {
                group.addTask {
                    await caps.resolve(claim, entity: entity) { _, node in
                        asked.append(node)
                        try? await Task.sleep(for: .milliseconds(50))
                        return info
                    }
                }
            }
            return await group.reduce(into: []) { $0.append($1) }
        }
        #expect(asked.all == ["urn:test#\(ver)"])
        #expect(results.allSatisfy { $0 == ["urn:xmpp:a", "urn:xmpp:a+notify"] })
        // A lie: the answer does not hash to the claimed ver.
        var lying = claim
        lying.ver = "AAAAAAAAAAAAAAAAAAAAAAAAAAA="
        #expect(await caps.resolve(lying, entity: entity) { _, _ in info } == nil)
        #expect(caps.features(ver: lying.ver) == nil)
        // Bounded: the oldest entries go.
        for index in 0..<3 {
            let other = Self.discoInfo(identities: [("client", "pc", "T\(index)")], features: ["urn:x:\(index)"])
            var next = claim
            next.ver = EntityCaps.sha1Base64(EntityCaps.verificationString(other) ?? "")
            _ = await caps.resolve(next, entity: entity) { _, _ in other }
        }
        #expect(caps.count == 2)
        #expect(caps.features(ver: ver) == nil)
    }
}
