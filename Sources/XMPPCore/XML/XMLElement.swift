/// An attribute with its namespace resolved.
///
/// Almost every attribute in XMPP is unqualified (`namespace == ""`). The exception that
/// matters is `xml:lang`, whose namespace is ``XMLNamespace/xml``.
public struct XMLAttribute: Sendable, Hashable {
    /// The namespace name, or `""` for an unqualified attribute.
    public var namespace: String
    /// The local name.
    public var name: String
    /// The attribute value, with entity and character references already replaced.
    public var value: String

    @inlinable
    public init(_ name: String, _ value: String, namespace: String = "") {
        self.namespace = namespace
        self.name = name
        self.value = value
    }
}

/// A child of an element: another element, or character data.
public enum XMLNode: Sendable, Hashable {
    case element(XMLElement)
    case text(String)
}

/// An immutable, namespace-resolved XML element.
///
/// The tree holds names as (namespace, local name) pairs and never keeps prefixes: two
/// documents that differ only in prefixes give equal trees, and the serializer chooses the
/// declarations a forwarded stanza needs (RFC 6120 §4.8.5). It is a value type built from
/// arrays and strings, so copying one to forward it costs a few reference-count increments.
public struct XMLElement: Sendable, Hashable {
    /// The local name, such as `message`.
    public let name: String
    /// The namespace name, such as `jabber:client`.
    public let namespace: String
    /// Attributes in document order.
    public let attributes: [XMLAttribute]
    /// Child nodes in document order.
    public let children: [XMLNode]

    @inlinable
    public init(name: String, namespace: String, attributes: [XMLAttribute] = [], children: [XMLNode] = []) {
        self.name = name
        self.namespace = namespace
        self.attributes = attributes
        self.children = children
    }

    /// Creates an element whose only child is `text` (or no child when `text` is empty).
    @inlinable
    public init(name: String, namespace: String, attributes: [XMLAttribute] = [], text: String) {
        self.init(name: name, namespace: namespace, attributes: attributes, children: text.isEmpty ? [] : [.text(text)])
    }

    // MARK: Reading

    /// The value of the unqualified attribute `name`.
    @inlinable
    public func attribute(_ name: String) -> String? {
        for attribute in attributes where attribute.name == name && attribute.namespace.isEmpty {
            return attribute.value
        }
        return nil
    }

    /// The value of the attribute `name` in `namespace`.
    @inlinable
    public func attribute(_ name: String, namespace: String) -> String? {
        for attribute in attributes where attribute.name == name && attribute.namespace == namespace {
            return attribute.value
        }
        return nil
    }

    /// `xml:lang`, when present on this element.
    public var language: String? { attribute("lang", namespace: XMLNamespace.xml) }

    /// The child elements, skipping text.
    public var elements: some Sequence<XMLElement> {
        children.lazy.compactMap { node -> XMLElement? in
            if case .element(let element) = node { return element }
            return nil
        }
    }

    /// The first child element with this name and namespace.
    @inlinable
    public func firstChild(name: String, namespace: String) -> XMLElement? {
        for case .element(let element) in children where element.name == name && element.namespace == namespace {
            return element
        }
        return nil
    }

    /// The first child element in `namespace`, whatever its name.
    @inlinable
    public func firstChild(namespace: String) -> XMLElement? {
        for case .element(let element) in children where element.namespace == namespace {
            return element
        }
        return nil
    }

    /// The first child element, whatever its name.
    public var firstElement: XMLElement? {
        for case .element(let element) in children { return element }
        return nil
    }

    /// All child elements with this name and namespace.
    public func children(name: String, namespace: String) -> [XMLElement] {
        var result: [XMLElement] = []
        for case .element(let element) in children where element.name == name && element.namespace == namespace {
            result.append(element)
        }
        return result
    }

    /// The concatenated character data of the direct text children.
    public var text: String {
        var result = ""
        for case .text(let text) in children { result += text }
        return result
    }

    /// True when the element has no element children and its text is empty or whitespace.
    public var isEmpty: Bool {
        for node in children {
            switch node {
            case .element: return false
            case .text(let text): if !text.utf8.allSatisfy(XMLElement.isXMLWhitespace) { return false }
            }
        }
        return true
    }

    @usableFromInline
    static func isXMLWhitespace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D
    }

    // MARK: Building modified copies

    /// A copy with the attribute `attributeName` set to `value`, or removed when `value` is nil.
    public func setting(attribute attributeName: String, to value: String?, namespace attributeNamespace: String = "") -> XMLElement {
        var attributes = self.attributes
        if let index = attributes.firstIndex(where: { $0.name == attributeName && $0.namespace == attributeNamespace }) {
            if let value {
                attributes[index].value = value
            } else {
                attributes.remove(at: index)
            }
        } else if let value {
            attributes.append(XMLAttribute(attributeName, value, namespace: attributeNamespace))
        }
        return XMLElement(name: name, namespace: namespace, attributes: attributes, children: children)
    }

    /// A copy with different children.
    public func replacingChildren(_ children: [XMLNode]) -> XMLElement {
        XMLElement(name: name, namespace: namespace, attributes: attributes, children: children)
    }

    /// A copy with `child` appended.
    public func appending(_ child: XMLElement) -> XMLElement {
        XMLElement(name: name, namespace: namespace, attributes: attributes, children: children + [.element(child)])
    }

    /// A copy in another namespace. Descendants are untouched.
    public func withNamespace(_ namespace: String) -> XMLElement {
        XMLElement(name: name, namespace: namespace, attributes: attributes, children: children)
    }

    /// A copy without the child elements for which `shouldRemove` is true.
    public func removingChildren(where shouldRemove: (XMLElement) -> Bool) -> XMLElement {
        let kept = children.filter { node in
            if case .element(let element) = node { return !shouldRemove(element) }
            return true
        }
        return XMLElement(name: name, namespace: namespace, attributes: attributes, children: kept)
    }
}

extension XMLElement: CustomStringConvertible {
    /// The element serialized as XML, declaring its own namespace. For logs and tests.
    public var description: String {
        var output = XMLStringOutput()
        XMLWriter.write(self, inheritedNamespace: "", to: &output)
        return output.string
    }
}
