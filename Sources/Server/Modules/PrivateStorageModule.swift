import Storage
import XMPPCore
import XMPPStream

/// XEP-0049 private XML storage (`jabber:iq:private`): an account keeps XML fragments on its
/// server, one per (element name, namespace), readable and writable by its own resources only.
/// Bookmarks (XEP-0048's `storage:bookmarks`) are what clients still keep here most.
///
/// The fragments live in the account store `private`, keyed in Clark notation
/// (`{namespace}name`: an XML name holds no `}`, so two fragments never share a key).
struct PrivateStorageModule: BraidModule {
    static let namespace = "jabber:iq:private"
    static let store = "private"
    /// Largest fragment kept, serialized: bookmarks and client preferences are a few KiB.
    static let maximumFragmentBytes = 64 * 1024
    /// Most fragments one account keeps, so the store cannot grow without bound.
    static let maximumFragments = 128

    /// Where XEP-0048 bookmarks written here also go (XEP-0402 §5.3: the PEP bookmarks).
    var bookmarks: PEPService?

    init(bookmarks: PEPService? = nil) {
        self.bookmarks = bookmarks
    }

    var name: String { "private" }

    func register(in builder: inout ModuleBuilder) {
        builder.onAccountIQ(Self.namespace, handle)
    }

    private func handle(_ request: IQRequest) async -> IQResponse {
        // §2.3 and §5: nobody but the account itself reads or writes it. The same answer
        // whether or not the addressed account exists, so it tells nothing about that.
        guard request.requester.bare == request.target else { return .error(StanzaError(.forbidden)) }
        guard request.payload.name == "query" else { return .error(StanzaError(.badRequest)) }
        let server = request.router.server
        do throws(StanzaError) {
            let fragments = try Self.fragments(of: request.payload)
            switch request.iq.type {
            case .get:
                return try await Self.get(fragments, account: request.target, server: server)
            case .set:
                try await Self.set(fragments, account: request.target, server: server)
                if let bookmarks, let legacy = fragments.first(where: { Self.key(of: $0) == Bookmarks.privateKey }) {
                    await Self.syncBookmarks(legacy, account: request.target, pep: bookmarks, router: request.router)
                }
                return .result(nil)
            case .result, .error, nil:
                return .error(StanzaError(.badRequest))
            }
        } catch {
            return .error(error)
        }
    }

    /// XEP-0402 §5.3: bookmarks written the old way reach the PEP ones (after the write, on
    /// the account's serializer; a failure there is logged, the private write stands).
    private static func syncBookmarks(_ legacy: XMLElement, account: JID, pep: PEPService, router: Router) async {
        do {
            try await router.server.accounts.run(account) {
                try await pep.bookmarksChanged(legacy: legacy, owner: account, router: router, fromPrivate: true)
            }
        } catch {
            router.logger.error("bookmarks from private XML not carried to PEP", metadata: ["account": "\(account)", "error": "\(error)"])
        }
    }

    /// The fragments a request names, checked against §2.3: at least one (not-acceptable
    /// otherwise, the section's MUST; its table's "Bad Format" is for gets only and older
    /// servers answer not-acceptable there too), none in a reserved namespace.
    static func fragments(of query: XMLElement) throws(StanzaError) -> [XMLElement] {
        let fragments = Array(query.elements)
        guard !fragments.isEmpty else {
            throw StanzaError(.notAcceptable, text: "name the fragment: one child element in its own namespace")
        }
        for fragment in fragments where isReserved(fragment.namespace) {
            throw StanzaError(.notAcceptable, text: "'\(fragment.namespace)' is a reserved namespace")
        }
        return fragments
    }

    /// §2.3: `jabber:*`, `http://jabber.org/*` and `vcard-temp` are the protocol's own (the
    /// vCard has its own module); refusing them is optional, and keeps a client from hiding
    /// protocol data where no protocol looks. No namespace at all is not "its own namespace".
    static func isReserved(_ namespace: String) -> Bool {
        namespace.isEmpty || namespace.hasPrefix("jabber:") || namespace.hasPrefix("http://jabber.org/") || namespace == "vcard-temp"
    }

    static func key(of fragment: XMLElement) -> String {
        "{\(fragment.namespace)}\(fragment.name)"
    }

    /// An empty fragment (no attributes, no content) stores nothing: setting one clears the
    /// key, as in Prosody, and getting a key never set answers with one.
    static func isEmpty(_ fragment: XMLElement) -> Bool {
        fragment.attributes.isEmpty && fragment.isEmpty
    }

    private static func get(_ fragments: [XMLElement], account: JID, server: ServerContext) async throws(StanzaError) -> IQResponse {
        // §2.3: "A client MUST NOT query for more than one namespace in a single IQ get."
        guard fragments.count == 1, let wanted = fragments.first else {
            throw StanzaError(.badRequest, text: "ask for one fragment at a time")
        }
        let stored: StoredEntry?
        do {
            stored = try await server.storage.storeEntry(store, of: account, key: key(of: wanted))
        } catch {
            server.logger.error("private storage read failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
        // Nothing stored: the empty element asked for, the answer clients expect (the shape
        // of §2.3's examples, as deployed servers give it), not an error.
        var answer = XMLElement(name: wanted.name, namespace: wanted.namespace)
        if let stored {
            do {
                answer = try XMLFragment.parse(stored.value)
            } catch {
                // A value that no longer parses is as good as none; say so in the log.
                server.logger.error("unreadable private XML ignored", metadata: ["account": "\(account)", "key": "\(stored.key)"])
            }
        }
        return .result(XMLElement(name: "query", namespace: namespace, children: [.element(answer)]))
    }

    /// Stores every fragment of a set, or none when one is refused; an empty one clears its
    /// key. §2.3: a set may carry several. (A storage failure part-way can leave the first
    /// ones written: the account store has no transaction over several keys.)
    private static func set(_ fragments: [XMLElement], account: JID, server: ServerContext) async throws(StanzaError) {
        var writes: [(key: String, value: String?)] = []
        for fragment in fragments {
            if isEmpty(fragment) {
                writes.append((key(of: fragment), nil))
                continue
            }
            let value = XMLFragment.serialize(fragment)
            guard value.utf8.count <= maximumFragmentBytes else {
                throw StanzaError(.notAcceptable, text: "a private XML fragment may have at most \(maximumFragmentBytes) bytes")
            }
            writes.append((key(of: fragment), value))
        }
        let storage = server.storage
        let planned = writes
        // Counting the fragments and adding new ones are one step for the account, so two
        // resources writing at once cannot pass the limit together.
        let outcome: Result<Void, StanzaError>
        do {
            outcome = try await server.accounts.run(account) { () async throws -> Result<Void, StanzaError> in
                var newKeys = Set<String>()
                for write in planned where write.value != nil {
                    if try await storage.storeEntry(store, of: account, key: write.key) == nil { newKeys.insert(write.key) }
                }
                // Replacing fragments (a bookmarks update) never reads the whole store.
                if !newKeys.isEmpty {
                    let existing = Set(try await storage.storeEntries(store, of: account).map(\.key))
                    let cleared = Set(planned.filter { $0.value == nil }.map(\.key))
                    let after = existing.subtracting(cleared).union(newKeys)
                    if after.count > maximumFragments, after.count > existing.count {
                        return .failure(StanzaError(.resourceConstraint, type: .cancel,
                                                    text: "an account keeps at most \(maximumFragments) private XML fragments"))
                    }
                }
                for write in planned {
                    if let value = write.value {
                        try await storage.putStoreEntry(store, of: account, key: write.key, value: value, keepLast: nil)
                    } else {
                        try await storage.removeStoreEntry(store, of: account, key: write.key)
                    }
                }
                return .success(())
            }
        } catch {
            server.logger.error("private storage write failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
        try outcome.get()
    }
}
