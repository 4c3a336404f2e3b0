/// A stream-level error (RFC 6120 §4.9). Sending one closes the stream.
public struct StreamError: Error, Sendable, Hashable {
    /// Every defined condition of RFC 6120 §4.9.3.
    public enum Condition: String, Sendable, Hashable, CaseIterable {
        case badFormat = "bad-format"
        case badNamespacePrefix = "bad-namespace-prefix"
        case conflict = "conflict"
        case connectionTimeout = "connection-timeout"
        case hostGone = "host-gone"
        case hostUnknown = "host-unknown"
        case improperAddressing = "improper-addressing"
        case internalServerError = "internal-server-error"
        case invalidFrom = "invalid-from"
        case invalidNamespace = "invalid-namespace"
        case invalidXML = "invalid-xml"
        case notAuthorized = "not-authorized"
        case notWellFormed = "not-well-formed"
        case policyViolation = "policy-violation"
        case remoteConnectionFailed = "remote-connection-failed"
        case reset = "reset"
        case resourceConstraint = "resource-constraint"
        case restrictedXML = "restricted-xml"
        case seeOtherHost = "see-other-host"
        case systemShutdown = "system-shutdown"
        case undefinedCondition = "undefined-condition"
        case unsupportedEncoding = "unsupported-encoding"
        case unsupportedFeature = "unsupported-feature"
        case unsupportedStanzaType = "unsupported-stanza-type"
        case unsupportedVersion = "unsupported-version"

        /// The condition an element names. RFC 3920's `xml-not-well-formed` maps to
        /// `not-well-formed`, and anything unknown to `undefined-condition` (§4.9.2).
        public init(elementName: String) {
            if let known = Condition(rawValue: elementName) {
                self = known
            } else if elementName == "xml-not-well-formed" {
                self = .notWellFormed
            } else {
                self = .undefinedCondition
            }
        }
    }

    public var condition: Condition
    /// Human-readable text for the peer's logs. Never put internal details here.
    public var text: String?
    /// For `see-other-host`: the host (and optional port) to connect to instead (§4.9.3.19).
    public var otherHost: String?
    /// An application-specific condition (RFC 6120 §4.9.4), such as XEP-0198's
    /// `<handled-count-too-high/>`.
    public var applicationCondition: XMLElement?

    public init(_ condition: Condition, text: String? = nil, otherHost: String? = nil, applicationCondition: XMLElement? = nil) {
        self.condition = condition
        self.text = text
        self.otherHost = otherHost
        self.applicationCondition = applicationCondition
    }

    /// The `<stream:error/>` element.
    public var element: XMLElement {
        var children: [XMLNode] = [
            .element(XMLElement(name: condition.rawValue, namespace: XMLNamespace.streamErrors, text: otherHost ?? ""))
        ]
        if let text, !text.isEmpty {
            children.append(.element(XMLElement(
                name: "text", namespace: XMLNamespace.streamErrors,
                attributes: [XMLAttribute("lang", "en", namespace: XMLNamespace.xml)], text: text)))
        }
        if let applicationCondition { children.append(.element(applicationCondition)) }
        return XMLElement(name: "error", namespace: XMLNamespace.streams, children: children)
    }

    /// Reads a received `<stream:error/>`.
    public init?(element: XMLElement) {
        guard element.name == "error", element.namespace == XMLNamespace.streams else { return nil }
        var condition = Condition.undefinedCondition
        var text: String?
        var otherHost: String?
        for child in element.elements where child.namespace == XMLNamespace.streamErrors {
            if child.name == "text" {
                text = child.text
            } else {
                condition = Condition(elementName: child.name)
                if condition == .seeOtherHost, !child.text.isEmpty { otherHost = child.text }
            }
        }
        self.init(condition, text: text, otherHost: otherHost)
    }
}

extension StreamError: CustomStringConvertible {
    public var description: String {
        if let text { return "\(condition.rawValue) (\(text))" }
        return condition.rawValue
    }
}

/// A failure that knows which stream error it deserves.
///
/// Protocol failures anywhere in Braid are typed values; the stream layer converts them with
/// this protocol. Anything that does not conform is reported as `internal-server-error`, with
/// no detail sent to the peer.
public protocol StreamErrorConvertible: Error {
    var streamError: StreamError { get }
}

extension StreamError: StreamErrorConvertible {
    public var streamError: StreamError { self }
}
