import Foundation
import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// Push notifications (XEP-0357): a client registers its app server (a JID, a node, and
/// publish-options such as a secret); when a message for the account reaches no device
/// (stored offline, or handed to sessions that wait for resumption), the server publishes a
/// notification to each registration over federation. By default the notification says
/// only how many messages wait (`push.include_sender`, `push.include_body` add more): the app
/// server, and Apple's or Google's relays behind it, learn nothing else.
///
/// Registrations live in the account store `push` (key: app server JID and node). An app
/// server that answers with errors `push.max_errors` times in a row loses its registration
/// (§7).
struct PushModule: BraidModule {
    static let namespace = "urn:xmpp:push:0"
    static let summary = "urn:xmpp:push:summary"

    struct Registration: Codable, Sendable, Equatable {
        var jid: String
        var node: String
        /// The publish-options the client gave (field → values), sent back with each
        /// notification.
        var options: [String: [String]]

        var key: String { jid + "\n" + node }
    }

    let settings: BraidConfiguration.PushSettings
    let outcomes = PushOutcomes()

    init(settings: BraidConfiguration.PushSettings = .init()) {
        self.settings = settings
    }

    var name: String { "push" }

    func register(in builder: inout ModuleBuilder) {
        builder.accountFeature(Self.namespace)
        let module = self
        builder.onAccountIQ(Self.namespace) { request in await module.handle(request) }
        builder.onMessageWaiting { waiting in await module.notify(waiting) }
        // The app servers' answers to our publishes come to the account's bare JID.
        builder.onRoute(priority: 90) { routed in
            await module.takeAnswer(routed.stanza, router: routed.router) ? .handled : .pass
        }
    }

    // MARK: Enable and disable (§5, §6)

    private func handle(_ request: IQRequest) async -> IQResponse {
        // Only the account's own devices register; the same answer whatever the account.
        guard request.requester.bare == request.target, request.iq.type == .set else { return .error(StanzaError(.forbidden)) }
        let storage = request.router.server.storage
        let account = request.target
        guard let jid = request.payload.attribute("jid").flatMap({ try? JID($0) }) else {
            return .error(StanzaError(.badRequest, text: "the app server's jid is missing or malformed"))
        }
        do {
            switch request.payload.name {
            case "enable":
                guard let node = request.payload.attribute("node"), !node.isEmpty else { return .error(StanzaError(.badRequest, text: "a node is required")) }
                var options: [String: [String]] = [:]
                if let form = request.payload.firstChild(name: "x", namespace: "jabber:x:data") {
                    for field in form.children(name: "field", namespace: "jabber:x:data") {
                        guard let name = field.attribute("var"), name != "FORM_TYPE" else { continue }
                        options[name] = field.children(name: "value", namespace: "jabber:x:data").map(\.text)
                    }
                }
                let registration = Registration(jid: jid.description, node: node, options: options)
                let existing = try await storage.storeEntries("push", of: account)
                if existing.count >= settings.maxRegistrations, !existing.contains(where: { $0.key == registration.key }) {
                    return .error(StanzaError(.resourceConstraint, type: .cancel, text: "at most \(settings.maxRegistrations) push registrations"))
                }
                let encoder = JSONEncoder()
                encoder.outputFormatting = .sortedKeys
                try await storage.putStoreEntry("push", of: account, key: registration.key,
                                                value: String(decoding: try encoder.encode(registration), as: UTF8.self), keepLast: nil)
                request.router.logger.info("push enabled", metadata: ["account": "\(account)", "app_server": "\(jid)"])
            case "disable":
                // §6: without a node, every registration with that app server goes.
                let node = request.payload.attribute("node")
                for entry in try await storage.storeEntries("push", of: account) {
                    guard let registration = try? JSONDecoder().decode(Registration.self, from: Data(entry.value.utf8)),
                          registration.jid == jid.description, node == nil || registration.node == node else { continue }
                    try await storage.removeStoreEntry("push", of: account, key: entry.key)
                }
            default:
                return .error(StanzaError(.badRequest))
            }
            return .result(nil)
        } catch StorageError.userNotFound {
            return .error(StanzaError(.forbidden))
        } catch {
            request.router.logger.error("push registration failed", metadata: ["account": "\(account)", "error": "\(error)"])
            return .error(StanzaError(.internalServerError))
        }
    }

    // MARK: Notifications (§5.2)

    private func notify(_ waiting: WaitingMessage) async {
        let router = waiting.router
        let account = waiting.account.bare
        guard let entries = try? await router.server.storage.storeEntries("push", of: account), !entries.isEmpty else { return }
        let count = (try? await router.server.storage.offlineMessageCount(for: account)).map { max($0, 1) } ?? 1
        for entry in entries {
            guard let registration = try? JSONDecoder().decode(Registration.self, from: Data(entry.value.utf8)),
                  let appServer = try? JID(registration.jid) else { continue }
            let id = "push-" + ServerContext.randomIdentifier(bytes: 8)
            outcomes.sent(id: id, account: account, key: entry.key)
            let publish = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("type", "set"), XMLAttribute("id", id), XMLAttribute("from", account.description), XMLAttribute("to", appServer.description),
            ], children: [.element(XMLElement(name: "pubsub", namespace: PubSubNamespace.pubsub, children: [
                .element(XMLElement(name: "publish", namespace: PubSubNamespace.pubsub, attributes: [XMLAttribute("node", registration.node)], children: [
                    .element(XMLElement(name: "item", namespace: PubSubNamespace.pubsub, children: [
                        .element(XMLElement(name: "notification", namespace: Self.namespace, children: [.element(summary(waiting.message, count: count))])),
                    ])),
                ])),
                .element(XMLElement(name: "publish-options", namespace: PubSubNamespace.pubsub, children: [.element(Self.form(PubSubNamespace.publishOptions, registration.options))])),
            ]))])
            if let stanza = Stanza(publish) { await router.route(stanza) }
        }
    }

    /// §5.2's summary form: the count, and the sender and body only when configured.
    private func summary(_ message: Message, count: Int) -> XMLElement {
        var fields: [String: [String]] = ["message-count": [String(count)]]
        if settings.includeSender, let from = message.element.attribute("from").flatMap({ try? JID($0) }) {
            fields["last-message-sender"] = [from.bare.description]
        }
        if settings.includeBody, let body = message.body { fields["last-message-body"] = [body] }
        return Self.form(Self.summary, fields, type: "submit")
    }

    static func form(_ formType: String, _ fields: [String: [String]], type: String = "submit") -> XMLElement {
        let dataForms = "jabber:x:data"
        var children: [XMLNode] = [.element(XMLElement(name: "field", namespace: dataForms, attributes: [XMLAttribute("var", "FORM_TYPE"), XMLAttribute("type", "hidden")],
                                                       children: [.element(XMLElement(name: "value", namespace: dataForms, text: formType))]))]
        for (name, values) in fields.sorted(by: { $0.key < $1.key }) {
            children.append(.element(XMLElement(name: "field", namespace: dataForms, attributes: [XMLAttribute("var", name)],
                                                children: values.map { .element(XMLElement(name: "value", namespace: dataForms, text: $0)) })))
        }
        return XMLElement(name: "x", namespace: dataForms, attributes: [XMLAttribute("type", type)], children: children)
    }

    /// An app server's answer: errors counted per registration, which goes after too many.
    private func takeAnswer(_ stanza: Stanza, router: Router) async -> Bool {
        guard stanza.kind == .iq, let id = stanza.id, id.hasPrefix("push-"),
              stanza.typeAttribute == "result" || stanza.typeAttribute == "error",
              let (account, key) = outcomes.answered(id: id) else { return false }
        guard stanza.typeAttribute == "error" else {
            outcomes.succeeded(account: account, key: key)
            return true
        }
        if outcomes.failed(account: account, key: key) >= settings.maxErrors {
            do {
                try await router.server.storage.removeStoreEntry("push", of: account, key: key)
            } catch {
                router.logger.error("dropping a push registration failed", metadata: ["account": "\(account)", "error": "\(error)"])
            }
            outcomes.succeeded(account: account, key: key)
            router.logger.notice("push registration dropped after repeated errors from the app server",
                                 metadata: ["account": "\(account)", "registration": "\(key.replacingOccurrences(of: "\n", with: " "))"])
        }
        return true
    }
}

/// The publishes waiting for an answer, and each registration's errors in a row.
final class PushOutcomes: Sendable {
    private struct State {
        var pending: [String: (JID, String)] = [:]
        var errors: [String: Int] = [:]
    }

    private let state = Mutex(State())

    func sent(id: String, account: JID, key: String) {
        state.withLock { state in
            // Bounded: an app server that never answers does not grow the table for good.
            if state.pending.count > 100_000 { state.pending.removeAll() }
            state.pending[id] = (account, key)
        }
    }

    func answered(id: String) -> (JID, String)? {
        state.withLock { $0.pending.removeValue(forKey: id) }
    }

    func failed(account: JID, key: String) -> Int {
        state.withLock { state in
            let name = account.description + "\n" + key
            state.errors[name, default: 0] += 1
            return state.errors[name] ?? 0
        }
    }

    func succeeded(account: JID, key: String) {
        _ = state.withLock { $0.errors.removeValue(forKey: account.description + "\n" + key) }
    }
}
