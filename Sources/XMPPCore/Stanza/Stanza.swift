/// The three stanza kinds of RFC 6120 §8.
public enum StanzaKind: String, Sendable, Hashable, CaseIterable {
    case message, presence, iq
}

/// A stanza: a first-level `message`, `presence` or `iq` element in a content namespace.
///
/// The view is a thin wrapper: it keeps the element as parsed and reads attributes on
/// demand, so routing a stanza never rebuilds it. Addresses are raw strings until a caller
/// asks for a ``JID``, because most hops only need the domain.
public struct Stanza: Sendable, Hashable {
    public let element: XMLElement
    public let kind: StanzaKind

    /// Wraps `element` when it is a stanza; nil for anything else, including look-alikes in
    /// other namespaces, which RFC 6120 §4.8.4 forbids routing.
    @inlinable
    public init?(_ element: XMLElement) {
        guard XMLNamespace.isContent(element.namespace), let kind = StanzaKind(rawValue: element.name) else { return nil }
        self.element = element
        self.kind = kind
    }

    public var id: String? { element.attribute("id") }
    public var typeAttribute: String? { element.attribute("type") }
    public var toString: String? { element.attribute("to") }
    public var fromString: String? { element.attribute("from") }

    /// The `to` address, prepared. Nil when absent.
    public func to() throws(JIDError) -> JID? {
        guard let value = toString else { return nil }
        return try JID(value)
    }

    /// The `from` address, prepared. Nil when absent.
    public func from() throws(JIDError) -> JID? {
        guard let value = fromString else { return nil }
        return try JID(value)
    }

    /// True for `type='error'`, which must never be answered with another error (§8.3.1).
    public var isError: Bool { typeAttribute == "error" }

    /// A copy with `to` and `from` set (nil removes the attribute).
    public func addressed(to: JID?, from: JID?) -> Stanza {
        let element = self.element
            .setting(attribute: "to", to: to?.description)
            .setting(attribute: "from", to: from?.description)
        return Stanza(trusted: element, kind: kind)
    }

    /// A copy with `from` overwritten, as a server stamps its own clients' stanzas
    /// (RFC 6120 §8.1.2.1).
    public func stamped(from: JID) -> Stanza {
        Stanza(trusted: element.setting(attribute: "from", to: from.description), kind: kind)
    }

    /// A copy with one attribute changed.
    public func setting(attribute name: String, to value: String?) -> Stanza {
        Stanza(trusted: element.setting(attribute: name, to: value), kind: kind)
    }

    @usableFromInline
    init(trusted element: XMLElement, kind: StanzaKind) {
        self.element = element
        self.kind = kind
    }

    /// The error reply to this stanza (RFC 6120 §8.3.1): addresses swapped, the same `id`,
    /// `type='error'`, and the error condition. Returns nil for an error stanza, which is
    /// never answered with another error.
    ///
    /// The original payload is not echoed back; only the error is. That keeps bounces small
    /// and avoids reflecting content to a sender we may not trust.
    public func errorReply(_ error: StanzaError, from replyFrom: String? = nil) -> Stanza? {
        guard !isError else { return nil }
        var attributes: [XMLAttribute] = []
        if let fromString { attributes.append(XMLAttribute("to", fromString)) }
        if let sender = replyFrom ?? toString { attributes.append(XMLAttribute("from", sender)) }
        if let id { attributes.append(XMLAttribute("id", id)) }
        attributes.append(XMLAttribute("type", "error"))
        var children: [XMLNode] = []
        // A message keeps its body so the sender's client can show what failed.
        if kind == .message, let body = element.firstChild(name: "body", namespace: element.namespace) {
            children.append(.element(body))
        }
        children.append(.element(error.element(namespace: element.namespace)))
        return Stanza(trusted: XMLElement(name: element.name, namespace: element.namespace, attributes: attributes, children: children), kind: kind)
    }

    /// The error carried by an error stanza.
    public var error: StanzaError? {
        guard isError, let child = element.firstChild(name: "error", namespace: element.namespace) else { return nil }
        return StanzaError(element: child)
    }
}

// MARK: - Message

/// RFC 6121 §5.2.2 message types. A missing or unknown type is `normal`.
public enum MessageType: String, Sendable, Hashable, CaseIterable {
    case chat, error, groupchat, headline, normal
}

/// A `<message/>` stanza.
public struct Message: Sendable, Hashable {
    public let stanza: Stanza

    public init?(_ stanza: Stanza) {
        guard stanza.kind == .message else { return nil }
        self.stanza = stanza
    }

    public init?(_ element: XMLElement) {
        guard let stanza = Stanza(element) else { return nil }
        self.init(stanza)
    }

    /// Builds a message in the client namespace.
    public init(to: JID?, from: JID? = nil, type: MessageType = .normal, id: String? = nil, body: String? = nil, extra: [XMLElement] = []) {
        var attributes: [XMLAttribute] = []
        if let to { attributes.append(XMLAttribute("to", to.description)) }
        if let from { attributes.append(XMLAttribute("from", from.description)) }
        if type != .normal { attributes.append(XMLAttribute("type", type.rawValue)) }
        if let id { attributes.append(XMLAttribute("id", id)) }
        var children: [XMLNode] = []
        if let body { children.append(.element(XMLElement(name: "body", namespace: XMLNamespace.client, text: body))) }
        children += extra.map(XMLNode.element)
        self.stanza = Stanza(trusted: XMLElement(name: "message", namespace: XMLNamespace.client, attributes: attributes, children: children), kind: .message)
    }

    public var element: XMLElement { stanza.element }
    public var type: MessageType { stanza.typeAttribute.flatMap(MessageType.init(rawValue:)) ?? .normal }

    /// The first `<body/>` text, if any.
    public var body: String? { element.firstChild(name: "body", namespace: element.namespace)?.text }
}

// MARK: - Presence

/// RFC 6121 presence types. A missing type means available, modelled as `nil` in ``Presence/type``.
public enum PresenceType: String, Sendable, Hashable, CaseIterable {
    case error, probe, subscribe, subscribed, unavailable, unsubscribe, unsubscribed

    /// True for the four subscription-management types (RFC 6121 §3).
    public var isSubscription: Bool {
        switch self {
        case .subscribe, .subscribed, .unsubscribe, .unsubscribed: true
        case .error, .probe, .unavailable: false
        }
    }
}

/// RFC 6121 §4.7.2.1 `<show/>` values.
public enum PresenceShow: String, Sendable, Hashable, CaseIterable {
    case away, chat, dnd, xa
}

/// A `<presence/>` stanza.
public struct Presence: Sendable, Hashable {
    public let stanza: Stanza

    public init?(_ stanza: Stanza) {
        guard stanza.kind == .presence else { return nil }
        self.stanza = stanza
    }

    public init?(_ element: XMLElement) {
        guard let stanza = Stanza(element) else { return nil }
        self.init(stanza)
    }

    /// Builds a presence in the client namespace.
    public init(to: JID? = nil, from: JID? = nil, type: PresenceType? = nil, id: String? = nil, children: [XMLElement] = []) {
        var attributes: [XMLAttribute] = []
        if let to { attributes.append(XMLAttribute("to", to.description)) }
        if let from { attributes.append(XMLAttribute("from", from.description)) }
        if let type { attributes.append(XMLAttribute("type", type.rawValue)) }
        if let id { attributes.append(XMLAttribute("id", id)) }
        self.stanza = Stanza(trusted: XMLElement(name: "presence", namespace: XMLNamespace.client, attributes: attributes, children: children.map(XMLNode.element)), kind: .presence)
    }

    public var element: XMLElement { stanza.element }

    /// The type; nil means available. An unknown type reads as nil only if absent; a present
    /// but unknown value is reported by ``hasValidType``.
    public var type: PresenceType? { stanza.typeAttribute.flatMap(PresenceType.init(rawValue:)) }

    /// False when `type` is present but not one RFC 6121 defines.
    public var hasValidType: Bool { stanza.typeAttribute.map { PresenceType(rawValue: $0) != nil } ?? true }

    public var isAvailable: Bool { stanza.typeAttribute == nil }

    public var show: PresenceShow? { element.firstChild(name: "show", namespace: element.namespace).flatMap { PresenceShow(rawValue: $0.text) } }

    public var status: String? { element.firstChild(name: "status", namespace: element.namespace)?.text }

    /// RFC 6121 §4.7.2.3: an integer from -128 to +127, default 0.
    public var priority: Int {
        guard let text = element.firstChild(name: "priority", namespace: element.namespace)?.text,
              let value = Int(text.trimmingXMLWhitespace), (-128...127).contains(value) else { return 0 }
        return value
    }
}

// MARK: - IQ

/// RFC 6120 §8.2.3 IQ types.
public enum IQType: String, Sendable, Hashable, CaseIterable {
    case get, set, result, error

    public var isRequest: Bool { self == .get || self == .set }
}

/// An `<iq/>` stanza.
public struct IQ: Sendable, Hashable {
    public let stanza: Stanza

    /// Wraps a stanza when it is an IQ with a valid type.
    public init?(_ stanza: Stanza) {
        guard stanza.kind == .iq else { return nil }
        self.stanza = stanza
    }

    public init?(_ element: XMLElement) {
        guard let stanza = Stanza(element) else { return nil }
        self.init(stanza)
    }

    /// Builds an IQ in the client namespace.
    public init(type: IQType, id: String, to: JID? = nil, from: JID? = nil, payload: XMLElement? = nil) {
        var attributes: [XMLAttribute] = []
        if let to { attributes.append(XMLAttribute("to", to.description)) }
        if let from { attributes.append(XMLAttribute("from", from.description)) }
        attributes.append(XMLAttribute("id", id))
        attributes.append(XMLAttribute("type", type.rawValue))
        self.stanza = Stanza(trusted: XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: attributes, children: payload.map { [.element($0)] } ?? []), kind: .iq)
    }

    public var element: XMLElement { stanza.element }

    /// The type, or nil when missing or unknown (which RFC 6120 §8.2.3 makes a `bad-request`).
    public var type: IQType? { stanza.typeAttribute.flatMap(IQType.init(rawValue:)) }

    public var id: String? { stanza.id }

    /// The request payload: the one child element of a get or set (§8.2.3).
    public var payload: XMLElement? {
        for case .element(let child) in element.children where child.name != "error" || !XMLNamespace.isContent(child.namespace) {
            return child
        }
        return nil
    }

    /// The `result` reply to this request, with an optional payload.
    public func result(payload: XMLElement? = nil) -> IQ {
        var attributes: [XMLAttribute] = []
        if let from = stanza.fromString { attributes.append(XMLAttribute("to", from)) }
        if let to = stanza.toString { attributes.append(XMLAttribute("from", to)) }
        attributes.append(XMLAttribute("id", id ?? ""))
        attributes.append(XMLAttribute("type", IQType.result.rawValue))
        return IQ(stanza: Stanza(trusted: XMLElement(name: "iq", namespace: element.namespace, attributes: attributes, children: payload.map { [.element($0)] } ?? []), kind: .iq))
    }

    private init(stanza: Stanza) {
        self.stanza = stanza
    }
}

extension String {
    /// The string without leading and trailing XML whitespace (space, tab, CR, LF).
    public var trimmingXMLWhitespace: String {
        let bytes = Array(utf8)
        var start = 0
        var end = bytes.count
        while start < end, XMLElement.isXMLWhitespace(bytes[start]) { start += 1 }
        while end > start, XMLElement.isXMLWhitespace(bytes[end - 1]) { end -= 1 }
        if start == 0 && end == bytes.count { return self }
        return String(decoding: bytes[start..<end], as: UTF8.self)
    }
}
