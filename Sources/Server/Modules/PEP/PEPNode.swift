import Foundation
import Storage
import XMPPCore

/// XEP-0060 namespaces PEP uses.
enum PubSubNamespace {
    static let pubsub = "http://jabber.org/protocol/pubsub"
    static let owner = "http://jabber.org/protocol/pubsub#owner"
    static let event = "http://jabber.org/protocol/pubsub#event"
    static let errors = "http://jabber.org/protocol/pubsub#errors"
    static let nodeConfig = "http://jabber.org/protocol/pubsub#node_config"
    static let publishOptions = "http://jabber.org/protocol/pubsub#publish-options"
    static let dataForms = "jabber:x:data"
}

/// Who may read a node (XEP-0060 §4.5; XEP-0163 §4: `presence` by default).
enum PEPAccessModel: String, Codable, Sendable, CaseIterable {
    case open, presence, roster, whitelist
}

/// A PEP node's configuration (XEP-0060 §16.4.3's `pubsub#` fields that PEP uses), stored as
/// JSON in the account store `pep` under the node's name.
struct PEPNodeConfiguration: Codable, Sendable, Equatable {
    var accessModel: PEPAccessModel = .presence
    /// Items kept; `max` (nil here) is the service's limit.
    var maxItems: Int? = 1
    var persistItems = true
    var notifyRetract = true
    var deliverPayloads = true
    /// Roster groups whose members may read a `roster` node.
    var rosterGroupsAllowed: [String] = []
    /// Bare JIDs the owner made members (affiliation `member`): readers of a `whitelist` node.
    var members: [String] = []
    /// `on_sub_and_presence` (PEP's default) or `never`.
    var sendLastPublishedItem = "on_sub_and_presence"
    var title = ""

    init() {}

    /// Nodes stored before a field existed keep its default.
    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let defaults = PEPNodeConfiguration()
        accessModel = try container.decodeIfPresent(PEPAccessModel.self, forKey: .accessModel) ?? defaults.accessModel
        maxItems = try container.decodeIfPresent(Int.self, forKey: .maxItems)
        persistItems = try container.decodeIfPresent(Bool.self, forKey: .persistItems) ?? defaults.persistItems
        notifyRetract = try container.decodeIfPresent(Bool.self, forKey: .notifyRetract) ?? defaults.notifyRetract
        deliverPayloads = try container.decodeIfPresent(Bool.self, forKey: .deliverPayloads) ?? defaults.deliverPayloads
        rosterGroupsAllowed = try container.decodeIfPresent([String].self, forKey: .rosterGroupsAllowed) ?? []
        members = try container.decodeIfPresent([String].self, forKey: .members) ?? []
        sendLastPublishedItem = try container.decodeIfPresent(String.self, forKey: .sendLastPublishedItem) ?? defaults.sendLastPublishedItem
        title = try container.decodeIfPresent(String.self, forKey: .title) ?? ""
    }

    /// Items to keep, within the service's limit.
    func keptItems(limit: Int) -> Int {
        guard persistItems else { return 1 }
        return min(limit, max(1, maxItems ?? limit))
    }

    // MARK: Forms

    /// The configuration as a form (`type` form for the owner's configure get, §8.2).
    func form(type: String = "form", limit: Int) -> XMLElement {
        func field(_ name: String, _ fieldType: String, _ values: [String], options: [String] = []) -> XMLNode {
            var children: [XMLNode] = values.map { .element(XMLElement(name: "value", namespace: PubSubNamespace.dataForms, text: $0)) }
            children += options.map { option in
                .element(XMLElement(name: "option", namespace: PubSubNamespace.dataForms, children: [
                    .element(XMLElement(name: "value", namespace: PubSubNamespace.dataForms, text: option)),
                ]))
            }
            return .element(XMLElement(name: "field", namespace: PubSubNamespace.dataForms, attributes: [XMLAttribute("var", name), XMLAttribute("type", fieldType)],
                                       children: children))
        }
        func flag(_ value: Bool) -> String { value ? "1" : "0" }
        return XMLElement(name: "x", namespace: PubSubNamespace.dataForms, attributes: [XMLAttribute("type", type)], children: [
            field("FORM_TYPE", "hidden", [PubSubNamespace.nodeConfig]),
            field("pubsub#title", "text-single", [title]),
            field("pubsub#access_model", "list-single", [accessModel.rawValue], options: PEPAccessModel.allCases.map(\.rawValue)),
            field("pubsub#max_items", "text-single", [maxItems.map(String.init) ?? "max"]),
            field("pubsub#persist_items", "boolean", [flag(persistItems)]),
            field("pubsub#notify_retract", "boolean", [flag(notifyRetract)]),
            field("pubsub#deliver_payloads", "boolean", [flag(deliverPayloads)]),
            field("pubsub#roster_groups_allowed", "list-multi", rosterGroupsAllowed),
            field("pubsub#send_last_published_item", "list-single", [sendLastPublishedItem], options: ["never", "on_sub", "on_sub_and_presence"]),
        ])
    }

    /// Why a form cannot be applied.
    enum FormProblem: Error, Equatable {
        /// A field Braid does not support, or a value it cannot take.
        case unsupported(String)
        case badValue(String)
    }

    /// A submitted form (configure, create or publish-options) over this configuration.
    func applying(_ form: XMLElement, limit: Int) throws(FormProblem) -> PEPNodeConfiguration {
        var next = self
        for (name, values) in Self.fields(form) {
            let value = values.first ?? ""
            switch name {
            case "FORM_TYPE":
                guard value == PubSubNamespace.nodeConfig || value == PubSubNamespace.publishOptions else { throw .badValue(name) }
            case "pubsub#title": next.title = value
            case "pubsub#access_model":
                guard let model = PEPAccessModel(rawValue: value) else { throw .unsupported("\(name)=\(value)") }
                next.accessModel = model
            case "pubsub#max_items":
                if value == "max" {
                    next.maxItems = nil
                } else {
                    guard let number = Int(value), number >= 1, number <= limit else { throw .badValue("\(name)=\(value)") }
                    next.maxItems = number
                }
            case "pubsub#persist_items": next.persistItems = try Self.bool(name, value)
            case "pubsub#notify_retract": next.notifyRetract = try Self.bool(name, value)
            case "pubsub#deliver_payloads": next.deliverPayloads = try Self.bool(name, value)
            case "pubsub#roster_groups_allowed": next.rosterGroupsAllowed = values
            case "pubsub#send_last_published_item":
                guard ["never", "on_sub", "on_sub_and_presence"].contains(value) else { throw .badValue("\(name)=\(value)") }
                next.sendLastPublishedItem = value
            default:
                throw .unsupported(name)
            }
        }
        return next
    }

    /// XEP-0223 §3 / XEP-0060 §7.1.5: publish-options are preconditions on an existing node:
    /// every field given must already have that value. Nil when they hold, else the field.
    func unmetPrecondition(_ options: XMLElement, limit: Int) -> String? {
        let wanted: PEPNodeConfiguration
        do {
            wanted = try applying(options, limit: limit)
        } catch {
            switch error {
            case .unsupported(let field), .badValue(let field): return field
            }
        }
        for (name, _) in Self.fields(options) where name != "FORM_TYPE" {
            let same: Bool = switch name {
            case "pubsub#title": wanted.title == title
            case "pubsub#access_model": wanted.accessModel == accessModel
            case "pubsub#max_items": wanted.maxItems == maxItems
            case "pubsub#persist_items": wanted.persistItems == persistItems
            case "pubsub#notify_retract": wanted.notifyRetract == notifyRetract
            case "pubsub#deliver_payloads": wanted.deliverPayloads == deliverPayloads
            case "pubsub#roster_groups_allowed": Set(wanted.rosterGroupsAllowed) == Set(rosterGroupsAllowed)
            case "pubsub#send_last_published_item": wanted.sendLastPublishedItem == sendLastPublishedItem
            default: false
            }
            if !same { return name }
        }
        return nil
    }

    static func fields(_ form: XMLElement) -> [(String, [String])] {
        form.children(name: "field", namespace: PubSubNamespace.dataForms).compactMap { field in
            guard let name = field.attribute("var") else { return nil }
            return (name, field.children(name: "value", namespace: PubSubNamespace.dataForms).map(\.text))
        }
    }

    private static func bool(_ name: String, _ value: String) throws(FormProblem) -> Bool {
        switch value {
        case "1", "true": return true
        case "0", "false": return false
        default: throw .badValue("\(name)=\(value)")
        }
    }
}

/// Whether a requester may read a node (XEP-0060 §6.5.x, XEP-0163 §4). The owner always
/// may; the others by the node's access model and their place in the owner's roster.
enum PEPAccess {
    enum Decision: Equatable {
        case allowed
        /// §6.5.3: a `presence` node, and no subscription to the owner's presence.
        case presenceSubscriptionRequired
        /// §6.5.4: a `roster` node, and not in an allowed group.
        case notInRosterGroup
        /// §6.5.5: a `whitelist` node, and not a member.
        case closedNode
    }

    static func decide(_ configuration: PEPNodeConfiguration, owner: JID, requester: JID, rosterItem: RosterItem?) -> Decision {
        if requester.bare == owner.bare { return .allowed }
        switch configuration.accessModel {
        case .open:
            return .allowed
        case .presence:
            guard let rosterItem, rosterItem.subscription == .from || rosterItem.subscription == .both else { return .presenceSubscriptionRequired }
            return .allowed
        case .roster:
            guard let rosterItem, !Set(rosterItem.groups).isDisjoint(with: configuration.rosterGroupsAllowed) else { return .notInRosterGroup }
            return .allowed
        case .whitelist:
            return configuration.members.contains(requester.bare.description) ? .allowed : .closedNode
        }
    }

    /// The error for a refusal. Someone not in the owner's roster at all learns nothing
    /// (`item-not-found`, as for a node or account that does not exist: no harvesting of
    /// who exists or what they keep); a contact gets the XEP's condition.
    static func error(_ decision: Decision, rosterItem: RosterItem?) -> (StanzaError, XMLElement?) {
        guard rosterItem != nil else { return (StanzaError(.itemNotFound), nil) }
        switch decision {
        case .allowed:
            return (StanzaError(.undefinedCondition), nil)
        case .presenceSubscriptionRequired:
            return (StanzaError(.notAuthorized), XMLElement(name: "presence-subscription-required", namespace: PubSubNamespace.errors))
        case .notInRosterGroup:
            return (StanzaError(.notAuthorized), XMLElement(name: "not-in-roster-group", namespace: PubSubNamespace.errors))
        case .closedNode:
            return (StanzaError(.notAllowed), XMLElement(name: "closed-node", namespace: PubSubNamespace.errors))
        }
    }
}
