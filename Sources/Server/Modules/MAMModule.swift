import Foundation
import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// The message archive (XEP-0313, `urn:xmpp:mam:2` and `#extended`): every chat message an
/// account sends or receives is kept with a server-assigned id (XEP-0359 `stanza-id`, stamped
/// on what is delivered), so every device of the account finds its history, including what
/// arrived while it was away or went to another device. Queries page both ways (XEP-0059).
///
/// Received messages are archived on their way in (an `onStanza` handler that stamps the
/// id and hands the stamped message on, so offline storage keeps it too); sent ones when the
/// client sends them (`onMessageSent`). Preferences (always, never, roster) live in the
/// account store `mam`.
struct MAMModule: BraidModule {
    static let namespace = "urn:xmpp:mam:2"
    static let extended = "urn:xmpp:mam:2#extended"
    static let stanzaIDs = "urn:xmpp:sid:0"
    static let rsm = "http://jabber.org/protocol/rsm"
    static let forward = "urn:xmpp:forward:0"
    static let delay = "urn:xmpp:delay"
    static let hints = "urn:xmpp:hints"

    let settings: BraidConfiguration.MAMSettings
    let preferences = MAMPreferences()

    init(settings: BraidConfiguration.MAMSettings = .init()) {
        self.settings = settings
    }

    var name: String { "mam" }

    func register(in builder: inout ModuleBuilder) {
        for feature in [Self.namespace, Self.extended, Self.stanzaIDs] { builder.accountFeature(feature) }
        let module = self
        builder.onAccountIQ(Self.namespace) { request in await module.handle(request) }
        // Received messages: archived and stamped before delivery (or offline storage).
        builder.onStanza(.message, namespace: nil, priority: 50) { local in
            await module.archiveReceived(local)
        }
        builder.onMessageSent { sent in
            await module.archiveSent(sent)
        }
    }

    // MARK: Archiving

    /// XEP-0313 §5.1.1 (and the practice of clients): chat and normal messages with a body or
    /// an encrypted payload; not those marked not to be stored (XEP-0334), not errors,
    /// headlines or group chat (a room keeps its own archive).
    static func isArchivable(_ element: XMLElement) -> Bool {
        let type = element.attribute("type") ?? "normal"
        guard type == "chat" || type == "normal" else { return false }
        if element.firstChild(name: "no-store", namespace: hints) != nil || element.firstChild(name: "no-permanent-store", namespace: hints) != nil { return false }
        if element.firstChild(name: "body", namespace: element.namespace) != nil { return true }
        return element.firstChild(name: "encrypted", namespace: "eu.siacs.conversations.axolotl") != nil
            || element.firstChild(name: "encrypted", namespace: "urn:xmpp:omemo:2") != nil
    }

    /// The message with this archive's `stanza-id` and none other claiming to be by it (a
    /// sender cannot forge the archive's id, XEP-0359 §3.1).
    static func stamped(_ element: XMLElement, id: String, by archive: JID) -> XMLElement {
        let by = archive.bare.description
        let kept = element.children.filter { node in
            guard case .element(let child) = node else { return true }
            return !(child.name == "stanza-id" && child.namespace == stanzaIDs && child.attribute("by") == by)
        }
        return XMLElement(name: element.name, namespace: element.namespace, attributes: element.attributes, children: kept)
            .appending(XMLElement(name: "stanza-id", namespace: stanzaIDs, attributes: [XMLAttribute("id", id), XMLAttribute("by", by)]))
    }

    private func archiveReceived(_ local: LocalStanza) async -> StanzaDisposition {
        let element = local.stanza.element
        guard Self.isArchivable(element), let from = try? local.stanza.from() else { return .pass }
        let account = local.to.bare
        let router = local.router
        guard await shouldArchive(account: account, with: from.bare, router: router) else { return .pass }
        let id = ServerContext.randomIdentifier(bytes: 12)
        let stamped = Self.stamped(element, id: id, by: account)
        guard await store(stamped, id: id, account: account, with: from.bare, router: router) else { return .pass }
        return Stanza(stamped).map { .replace($0) } ?? .pass
    }

    private func archiveSent(_ sent: SentMessage) async {
        let element = sent.message.element
        guard Self.isArchivable(element), let to = element.attribute("to").flatMap({ try? JID($0) }) else { return }
        let account = sent.session.jid.bare
        let router = sent.router
        // Messages to oneself are archived once, as received.
        guard to.bare != account, await shouldArchive(account: account, with: to.bare, router: router) else { return }
        let id = ServerContext.randomIdentifier(bytes: 12)
        _ = await store(Self.stamped(element, id: id, by: account), id: id, account: account, with: to.bare, router: router)
    }

    private func store(_ element: XMLElement, id: String, account: JID, with: JID, router: Router) async -> Bool {
        let now = Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
        let days = settings.domainRetentionDays[account.domainpart] ?? settings.retentionDays
        let expireBefore = days > 0 ? now - Int64(days) * 86_400_000 : nil
        do {
            try await router.server.storage.archive(ArchivedMessage(id: id, with: with.description, stamp: now, stanza: XMLFragment.serialize(element)),
                                                    for: account, expireBefore: expireBefore,
                                                    keepLast: settings.maxMessagesPerAccount > 0 ? settings.maxMessagesPerAccount : nil)
            return true
        } catch StorageError.userNotFound {
            // No such account: nothing to keep (the delivery rules answer the sender).
            return false
        } catch {
            router.logger.error("archiving a message failed", metadata: ["account": "\(account)", "error": "\(error)"])
            return false
        }
    }

    private func shouldArchive(account: JID, with: JID, router: Router) async -> Bool {
        guard let prefs = await preferences.of(account, storage: router.server.storage, defaultValue: settings.defaultPreference) else { return true }
        if prefs.never.contains(with.description) { return false }
        if prefs.always.contains(with.description) { return true }
        switch prefs.defaultMode {
        case "never": return false
        case "roster": return await router.roster.item(of: account, contact: with) != nil
        default: return true
        }
    }

    // MARK: Queries (§4), preferences (§6), metadata (#extended)

    private func handle(_ request: IQRequest) async -> IQResponse {
        // Only the account reads its archive; the same answer whether or not it exists.
        guard request.requester.bare == request.target else { return .error(StanzaError(.forbidden)) }
        switch (request.iq.type, request.payload.name) {
        case (.get, "query"):
            return .result(XMLElement(name: "query", namespace: Self.namespace, children: [.element(Self.queryForm)]))
        case (.set, "query"):
            return await query(request)
        case (.get, "prefs"), (.set, "prefs"):
            return await preferencesRequest(request)
        case (.get, "metadata"):
            return await metadata(request)
        default:
            return .error(StanzaError(.badRequest))
        }
    }

    static var queryForm: XMLElement {
        func field(_ name: String, _ type: String, _ value: String? = nil) -> XMLNode {
            .element(XMLElement(name: "field", namespace: "jabber:x:data", attributes: [XMLAttribute("var", name), XMLAttribute("type", type)],
                                children: value.map { [.element(XMLElement(name: "value", namespace: "jabber:x:data", text: $0))] } ?? []))
        }
        return XMLElement(name: "x", namespace: "jabber:x:data", attributes: [XMLAttribute("type", "form")], children: [
            field("FORM_TYPE", "hidden", namespace),
            field("with", "jid-single"), field("start", "text-single"), field("end", "text-single"),
            field("after-id", "text-single"), field("before-id", "text-single"), field("ids", "list-multi"),
        ])
    }

    /// A query from the request: the form's filters and the RSM page; nil when malformed.
    func archiveQuery(_ payload: XMLElement) -> Result<ArchiveQuery, StanzaError> {
        var query = ArchiveQuery(limit: settings.defaultPageSize)
        if let form = payload.firstChild(name: "x", namespace: "jabber:x:data") {
            for field in form.children(name: "field", namespace: "jabber:x:data") {
                guard let name = field.attribute("var") else { continue }
                let values = field.children(name: "value", namespace: "jabber:x:data").map(\.text)
                let value = values.first ?? ""
                switch name {
                case "FORM_TYPE":
                    guard value == Self.namespace else { return .failure(StanzaError(.badRequest, text: "FORM_TYPE must be \(Self.namespace)")) }
                case "with":
                    guard let jid = try? JID(value) else { return .failure(StanzaError(.badRequest, text: "with is not a JID")) }
                    query.with = jid.bare.description
                case "start", "end":
                    guard let stamp = Self.milliseconds(value) else { return .failure(StanzaError(.badRequest, text: "\(name) is not an XEP-0082 date-time")) }
                    if name == "start" { query.start = stamp } else { query.end = stamp }
                case "after-id": query.after = value
                case "before-id": query.before = value
                case "ids": query.ids = values
                default:
                    // §4.1.1: a field the server does not support.
                    return .failure(StanzaError(.badRequest, text: "unsupported field \(name)"))
                }
            }
        }
        if let set = payload.firstChild(name: "set", namespace: Self.rsm) {
            if let max = set.firstChild(name: "max", namespace: Self.rsm) {
                guard let number = Int(max.text), number >= 0 else { return .failure(StanzaError(.badRequest, text: "max is not a number")) }
                query.limit = number
            }
            if let after = set.firstChild(name: "after", namespace: Self.rsm) {
                guard !after.text.isEmpty else { return .failure(StanzaError(.badRequest, text: "an empty after")) }
                query.after = after.text
            }
            if let before = set.firstChild(name: "before", namespace: Self.rsm) {
                if before.text.isEmpty { query.lastPage = true } else { query.before = before.text }
            }
            if set.firstChild(name: "index", namespace: Self.rsm) != nil {
                // XEP-0059 §2.4: a server that cannot page by index says so.
                return .failure(StanzaError(.featureNotImplemented, text: "paging by index is not supported"))
            }
        }
        query.limit = min(query.limit, settings.maxPageSize)
        return .success(query)
    }

    private func query(_ request: IQRequest) async -> IQResponse {
        let router = request.router
        let session = request.session
        let outcome = await Self.answer(request.payload, archive: request.target, requester: request.requester, settings: settings, router: router,
                                        fetch: { query in try await router.server.storage.archivedMessages(query, for: request.target) },
                                        deliver: { result in
                                            // Results reach the asking session before the answer (§4.2): straight to it.
                                            if let session {
                                                session.deliver(result)
                                            } else if let stanza = Stanza(result) {
                                                await router.route(stanza)
                                            }
                                        })
        switch outcome {
        case .success(let fin): return .result(fin)
        case .failure(let error): return .error(error)
        }
    }

    /// A MAM query on any archive (an account's, a room's): parses it, fetches the page,
    /// hands each result to `deliver` in order, and returns the `<fin/>` (or the error).
    static func answer(_ payload: XMLElement, archive: JID, requester: JID, settings: BraidConfiguration.MAMSettings, router: Router,
                       fetch: (ArchiveQuery) async throws -> ArchivePage, deliver: (XMLElement) async -> Void) async -> Result<XMLElement, StanzaError> {
        let query: ArchiveQuery
        switch MAMModule(settings: settings).archiveQuery(payload) {
        case .success(let parsed): query = parsed
        case .failure(let error): return .failure(error)
        }
        let page: ArchivePage
        do {
            page = try await fetch(query)
        } catch StorageError.itemNotFound {
            // §4.1.3 / XEP-0059 §2.6: an id the archive does not hold.
            return .failure(StanzaError(.itemNotFound))
        } catch {
            router.logger.error("archive query failed", metadata: ["archive": "\(archive)", "error": "\(error)"])
            return .failure(StanzaError(.internalServerError))
        }
        let queryID = payload.attribute("queryid")
        let flipped = payload.firstChild(name: "flip-page", namespace: namespace) != nil
        let messages = flipped ? page.messages.reversed() : page.messages
        for message in messages {
            guard let original = try? XMLFragment.parse(message.stanza) else {
                router.logger.error("unreadable archived message skipped", metadata: ["archive": "\(archive)", "id": "\(message.id)"])
                continue
            }
            var resultAttributes = [XMLAttribute("id", message.id)]
            if let queryID { resultAttributes.append(XMLAttribute("queryid", queryID)) }
            let result = XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
                XMLAttribute("from", archive.description), XMLAttribute("to", requester.description),
                XMLAttribute("id", ServerContext.randomIdentifier(bytes: 6)),
            ], children: [.element(XMLElement(name: "result", namespace: namespace, attributes: resultAttributes, children: [
                .element(XMLElement(name: "forwarded", namespace: forward, children: [
                    .element(XMLElement(name: "delay", namespace: delay, attributes: [XMLAttribute("stamp", MessageService.timestamp(millisecondsSince1970: message.stamp))])),
                    .element(original.rescopingContent(to: XMLNamespace.client)),
                ])),
            ]))])
            await deliver(result)
        }
        var set: [XMLNode] = []
        if let first = messages.first, let last = messages.last {
            set.append(.element(XMLElement(name: "first", namespace: rsm, attributes: flipped ? [] : [XMLAttribute("index", String(page.firstIndex))], text: first.id)))
            set.append(.element(XMLElement(name: "last", namespace: rsm, text: last.id)))
        }
        set.append(.element(XMLElement(name: "count", namespace: rsm, text: String(page.count))))
        var finAttributes: [XMLAttribute] = []
        if let queryID { finAttributes.append(XMLAttribute("queryid", queryID)) }
        if page.complete { finAttributes.append(XMLAttribute("complete", "true")) }
        return .success(XMLElement(name: "fin", namespace: namespace, attributes: finAttributes, children: [
            .element(XMLElement(name: "set", namespace: rsm, children: set)),
        ]))
    }

    /// #extended: the archive's first and last entries.
    private func metadata(_ request: IQRequest) async -> IQResponse {
        let storage = request.router.server.storage
        do {
            let first = try await storage.archivedMessages(ArchiveQuery(limit: 1), for: request.target).messages.first
            let last = try await storage.archivedMessages(ArchiveQuery(lastPage: true, limit: 1), for: request.target).messages.first
            var children: [XMLNode] = []
            for (name, entry) in [("start", first), ("end", last)] {
                guard let entry else { continue }
                children.append(.element(XMLElement(name: name, namespace: Self.namespace, attributes: [
                    XMLAttribute("id", entry.id), XMLAttribute("timestamp", MessageService.timestamp(millisecondsSince1970: entry.stamp)),
                ])))
            }
            return .result(XMLElement(name: "metadata", namespace: Self.namespace, children: children))
        } catch {
            return .error(StanzaError(.internalServerError))
        }
    }

    private func preferencesRequest(_ request: IQRequest) async -> IQResponse {
        let storage = request.router.server.storage
        let account = request.target
        if request.iq.type == .set {
            let payload = request.payload
            guard let mode = payload.attribute("default"), ["always", "never", "roster"].contains(mode) else {
                return .error(StanzaError(.badRequest, text: "default must be always, never or roster"))
            }
            func jids(_ name: String) -> [String] {
                payload.firstChild(name: name, namespace: Self.namespace)?.children(name: "jid", namespace: Self.namespace)
                    .compactMap { (try? JID($0.text))?.bare.description } ?? []
            }
            let prefs = MAMPreferences.Prefs(defaultMode: mode, always: Set(jids("always")), never: Set(jids("never")))
            do {
                try await preferences.save(prefs, for: account, storage: storage)
            } catch {
                return .error(StanzaError(.internalServerError))
            }
        }
        let prefs = await preferences.of(account, storage: storage, defaultValue: settings.defaultPreference)
            ?? MAMPreferences.Prefs(defaultMode: settings.defaultPreference, always: [], never: [])
        func list(_ name: String, _ jids: Set<String>) -> XMLNode {
            .element(XMLElement(name: name, namespace: Self.namespace, children: jids.sorted().map { .element(XMLElement(name: "jid", namespace: Self.namespace, text: $0)) }))
        }
        return .result(XMLElement(name: "prefs", namespace: Self.namespace, attributes: [XMLAttribute("default", prefs.defaultMode)],
                                  children: [list("always", prefs.always), list("never", prefs.never)]))
    }

    /// XEP-0082 date-time (with or without fractions) as milliseconds since 1970.
    static func milliseconds(_ text: String) -> Int64? {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return Int64((date.timeIntervalSince1970 * 1000).rounded(.down)) }
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.date(from: text).map { Int64((($0.timeIntervalSince1970) * 1000).rounded(.down)) }
    }
}

/// Each account's archiving preferences (§6), cached after the first read.
final class MAMPreferences: Sendable {
    struct Prefs: Codable, Sendable, Equatable {
        var defaultMode: String
        var always: Set<String>
        var never: Set<String>
    }

    /// nil: read, and none stored (the default applies).
    private let cache = Mutex<[JID: Prefs?]>([:])

    func of(_ account: JID, storage: any Storage, defaultValue: String) async -> Prefs? {
        if let cached = cache.withLock({ $0[account] }) { return cached ?? Prefs(defaultMode: defaultValue, always: [], never: []) }
        let stored = try? await storage.storeEntry("mam", of: account, key: "prefs").flatMap { try? JSONDecoder().decode(Prefs.self, from: Data($0.value.utf8)) }
        cache.withLock { cache in
            // Bounded: the cache is a convenience; forgetting it only costs a read.
            if cache.count > 100_000 { cache.removeAll() }
            cache[account] = .some(stored)
        }
        return stored ?? Prefs(defaultMode: defaultValue, always: [], never: [])
    }

    func save(_ prefs: Prefs, for account: JID, storage: any Storage) async throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        try await storage.putStoreEntry("mam", of: account, key: "prefs", value: String(decoding: try encoder.encode(prefs), as: UTF8.self), keepLast: nil)
        cache.withLock { $0[account] = .some(prefs) }
    }
}
