/// A stanza-level error (RFC 6120 §8.3). It answers one stanza and leaves the stream up.
public struct StanzaError: Error, Sendable, Hashable {
    /// RFC 6120 §8.3.2: what the sender should do about the error.
    public enum ErrorType: String, Sendable, Hashable, CaseIterable {
        case auth, cancel, `continue`, modify, wait
    }

    /// Every defined condition of RFC 6120 §8.3.3.
    public enum Condition: String, Sendable, Hashable, CaseIterable {
        case badRequest = "bad-request"
        case conflict = "conflict"
        case featureNotImplemented = "feature-not-implemented"
        case forbidden = "forbidden"
        case gone = "gone"
        case internalServerError = "internal-server-error"
        case itemNotFound = "item-not-found"
        case jidMalformed = "jid-malformed"
        case notAcceptable = "not-acceptable"
        case notAllowed = "not-allowed"
        case notAuthorized = "not-authorized"
        case policyViolation = "policy-violation"
        case recipientUnavailable = "recipient-unavailable"
        case redirect = "redirect"
        case registrationRequired = "registration-required"
        case remoteServerNotFound = "remote-server-not-found"
        case remoteServerTimeout = "remote-server-timeout"
        case resourceConstraint = "resource-constraint"
        case serviceUnavailable = "service-unavailable"
        case subscriptionRequired = "subscription-required"
        case undefinedCondition = "undefined-condition"
        case unexpectedRequest = "unexpected-request"

        /// The error type RFC 6120 §8.3.3 pairs with each condition in its examples.
        public var defaultType: ErrorType {
            switch self {
            case .badRequest, .jidMalformed, .notAcceptable, .policyViolation, .redirect: .modify
            case .conflict, .featureNotImplemented, .gone, .internalServerError, .itemNotFound,
                 .notAllowed, .remoteServerNotFound, .serviceUnavailable, .undefinedCondition:
                .cancel
            case .forbidden, .notAuthorized, .registrationRequired, .subscriptionRequired: .auth
            case .recipientUnavailable, .remoteServerTimeout, .resourceConstraint, .unexpectedRequest: .wait
            }
        }
    }

    public var condition: Condition
    public var type: ErrorType
    public var text: String?
    /// The entity that generated the error (the `by` attribute), when known.
    public var by: String?
    /// For `gone` and `redirect`: the new address.
    public var alternateAddress: String?

    public init(_ condition: Condition, type: ErrorType? = nil, text: String? = nil, by: String? = nil, alternateAddress: String? = nil) {
        self.condition = condition
        self.type = type ?? condition.defaultType
        self.text = text
        self.by = by
        self.alternateAddress = alternateAddress
    }

    /// The `<error/>` child element, in the given content namespace.
    public func element(namespace: String = XMLNamespace.client) -> XMLElement {
        var attributes = [XMLAttribute("type", type.rawValue)]
        if let by { attributes.append(XMLAttribute("by", by)) }
        var children: [XMLNode] = [
            .element(XMLElement(name: condition.rawValue, namespace: XMLNamespace.stanzaErrors, text: alternateAddress ?? ""))
        ]
        if let text, !text.isEmpty {
            children.append(.element(XMLElement(
                name: "text", namespace: XMLNamespace.stanzaErrors,
                attributes: [XMLAttribute("lang", "en", namespace: XMLNamespace.xml)], text: text)))
        }
        return XMLElement(name: "error", namespace: namespace, attributes: attributes, children: children)
    }

    /// Reads the `<error/>` child of an error stanza.
    public init?(element: XMLElement) {
        guard element.name == "error", XMLNamespace.isContent(element.namespace) else { return nil }
        var condition = Condition.undefinedCondition
        var text: String?
        var alternate: String?
        for child in element.elements where child.namespace == XMLNamespace.stanzaErrors {
            if child.name == "text" {
                text = child.text
            } else if let known = Condition(rawValue: child.name) {
                condition = known
                if known == .gone || known == .redirect { alternate = child.text.isEmpty ? nil : child.text }
            }
        }
        let type = element.attribute("type").flatMap(ErrorType.init(rawValue:))
        self.init(condition, type: type, text: text, by: element.attribute("by"), alternateAddress: alternate)
    }
}

extension StanzaError: CustomStringConvertible {
    public var description: String {
        if let text { return "\(condition.rawValue) (\(text))" }
        return condition.rawValue
    }
}

/// A failure that knows which stanza error it deserves.
public protocol StanzaErrorConvertible: Error {
    var stanzaError: StanzaError { get }
}

extension StanzaError: StanzaErrorConvertible {
    public var stanzaError: StanzaError { self }
}
