import XMPPCore
import XMPPStream

/// XEP-0280 message carbons: each resource that enabled them gets a copy of the chat
/// messages its account sends from other resources (`<sent/>`) and of those delivered to
/// other resources (`<received/>`). The per-session switch lives in the session registry's
/// entry (it goes with the session, and moves with it on XEP-0198 resumption).
struct CarbonsModule: BraidModule {
    static let namespace = "urn:xmpp:carbons:2"
    static let forward = "urn:xmpp:forward:0"
    static let hints = "urn:xmpp:hints"

    var name: String { "carbons" }

    func register(in builder: inout ModuleBuilder) {
        builder.serverFeature(Self.namespace)
        builder.onAccountIQ(Self.namespace, enableOrDisable)
        builder.onMessageSent { sent in
            // §7: the sender's other resources get a <sent/> copy.
            guard Self.isEligible(sent.message) else { return }
            Self.copy(sent.message.element, wrapper: "sent", account: sent.session.jid.bare, except: [sent.session.jid], sessions: sent.router.server.sessions)
        }
        builder.onMessageDelivered { delivered in
            // §6: the resources that did not get it get a <received/> copy.
            guard Self.isEligible(delivered.message) else { return }
            Self.copy(delivered.message.element, wrapper: "received", account: delivered.account, except: delivered.resources, sessions: delivered.router.server.sessions)
        }
    }

    private func enableOrDisable(_ request: IQRequest) async -> IQResponse {
        guard request.iq.type == .set, let session = request.session, request.requester == session.jid else {
            return .error(StanzaError(.badRequest))
        }
        switch request.payload.name {
        case "enable":
            request.router.server.sessions.update(session) { $0.carbons = true }
        case "disable":
            request.router.server.sessions.update(session) { $0.carbons = false }
        default:
            return .error(StanzaError(.badRequest))
        }
        return .result(nil)
    }

    /// §6: chat messages, and normal messages with a body, unless marked private or
    /// no-copy; never copies of copies.
    static func isEligible(_ message: Message) -> Bool {
        let element = message.element
        if element.firstChild(name: "private", namespace: namespace) != nil { return false }
        if element.firstChild(name: "no-copy", namespace: hints) != nil { return false }
        if element.firstChild(name: "received", namespace: namespace) != nil || element.firstChild(name: "sent", namespace: namespace) != nil { return false }
        switch message.type {
        case .chat: return true
        case .normal: return message.body != nil
        case .error, .groupchat, .headline: return false
        }
    }

    private static func copy(_ element: XMLElement, wrapper: String, account: JID, except: Set<JID>, sessions: SessionRegistry) {
        for entry in sessions.entries(of: account) where entry.carbons && !except.contains(entry.session.jid) {
            entry.session.deliver(carbonCopy(of: element, wrapper: wrapper, account: account, to: entry.session.jid))
        }
    }

    /// §5: the copy comes from the account's bare JID, the original inside `<forwarded/>`
    /// (XEP-0297) in `jabber:client`.
    static func carbonCopy(of element: XMLElement, wrapper: String, account: JID, to resource: JID) -> XMLElement {
        let forwarded = XMLElement(name: "forwarded", namespace: forward, children: [.element(element.rescopingContent(to: XMLNamespace.client))])
        return XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [
            XMLAttribute("from", account.description), XMLAttribute("to", resource.description), XMLAttribute("type", Message(element)?.type.rawValue ?? "chat"),
        ], children: [.element(XMLElement(name: wrapper, namespace: namespace, children: [.element(forwarded)]))])
    }
}
