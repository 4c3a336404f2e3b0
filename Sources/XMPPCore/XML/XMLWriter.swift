/// A destination for serialized XML bytes.
///
/// `XMPPStream` makes NIO's `ByteBuffer` conform, so stanzas are written straight into the
/// outgoing buffer; ``XMLStringOutput`` serves logs and tests. The writer is generic over the
/// output, so each conformance gets a specialised copy with no dynamic dispatch per byte run.
public protocol XMLOutput {
    /// Appends bytes that are already valid, escaped XML.
    mutating func writeRaw(_ bytes: UnsafeRawBufferPointer)
}

extension XMLOutput {
    @inlinable
    public mutating func writeRaw(_ string: StaticString) {
        string.withUTF8Buffer { self.writeRaw(UnsafeRawBufferPointer($0)) }
    }

    @inlinable
    public mutating func writeRaw(_ string: String) {
        var string = string
        string.withUTF8 { self.writeRaw(UnsafeRawBufferPointer($0)) }
    }
}

/// Collects serialized XML in memory.
public struct XMLStringOutput: XMLOutput {
    public private(set) var bytes: [UInt8] = []

    public init() {}

    public mutating func writeRaw(_ bytes: UnsafeRawBufferPointer) {
        self.bytes.append(contentsOf: bytes)
    }

    public var string: String { String(decoding: bytes, as: UTF8.self) }
}

/// Serializes element trees.
///
/// Rules it keeps:
/// - Stanza content (`jabber:client` / `jabber:server`) is written with no prefix and no
///   `xmlns` when it sits where the stream's content namespace is the default, which re-scopes
///   a stanza between client and server streams (RFC 6120 §4.8.3, §4.8.5).
/// - Every other namespace an element uses is declared on it, so a forwarded stanza carries
///   all the declarations it needs and none from the stream it came from (§4.8.5).
/// - Text escapes `&`, `<`, `>` and CR; attribute values also escape quotes, tab and newline,
///   so values survive XML attribute-value normalisation unchanged.
public enum XMLWriter {
    /// Writes `element`, assuming `inheritedNamespace` is the default namespace in scope.
    ///
    /// For a stanza written on a stream, pass the stream's content namespace.
    ///
    /// `streamPrefix` names a prefix declared on the stream header (`stream` for the streams
    /// namespace, `db` for dialback): a first-level element in that namespace is written with
    /// the prefix, as `<stream:features>` or `<db:result>`, which is what deployed servers and
    /// clients expect to see.
    @inlinable
    public static func write<Output: XMLOutput>(
        _ element: XMLElement, inheritedNamespace: String, streamPrefix: (prefix: StaticString, namespace: String)? = nil,
        to output: inout Output
    ) {
        var scope = PrefixScope()
        if XMLNamespace.isContent(element.namespace) && XMLNamespace.isContent(inheritedNamespace) {
            scope.contentMapping = (element.namespace, inheritedNamespace)
        }
        if let streamPrefix, element.namespace == streamPrefix.namespace {
            writeElement(element, inherited: inheritedNamespace, prefix: streamPrefix.prefix, scope: &scope, to: &output)
        } else {
            writeElement(element, inherited: inheritedNamespace, prefix: nil, scope: &scope, to: &output)
        }
    }

    /// Prefixes declared for namespaced attributes on the path from the root to the element
    /// being written. Namespaced attributes other than `xml:lang` are rare in XMPP, so a small
    /// array beats a dictionary here.
    @usableFromInline
    struct PrefixScope {
        @usableFromInline var bindings: [(prefix: String, namespace: String)] = []
        @usableFromInline var counter = 0
        /// A stanza re-scoped between client and server streams: its content namespace
        /// (`from`) is written as the stream's (`to`) wherever that is the default in scope.
        /// Content elements in the other namespace, or under a foreign parent (a forwarded
        /// stanza), keep their own.
        @usableFromInline var contentMapping: (from: String, to: String)?

        @usableFromInline init() {}

        @usableFromInline
        func prefix(for namespace: String) -> String? {
            for binding in bindings.reversed() where binding.namespace == namespace {
                return binding.prefix
            }
            return nil
        }
    }

    @usableFromInline
    static func writeElement<Output: XMLOutput>(
        _ element: XMLElement, inherited: String, prefix: StaticString?, scope: inout PrefixScope, to output: inout Output
    ) {
        // The xml namespace can never be a default namespace; an element in it keeps the
        // predefined `xml` prefix (a fuzzer found `<xml:x/>` otherwise came back unparsable).
        let prefix: StaticString? = prefix ?? (element.namespace == XMLNamespace.xml ? "xml" : nil)
        output.writeRaw("<")
        if let prefix {
            output.writeRaw(prefix)
            output.writeRaw(":")
        }
        output.writeRaw(element.name)

        var written = element.namespace
        if let mapping = scope.contentMapping, element.namespace == mapping.from, inherited == mapping.to {
            written = mapping.to
        }
        let childDefault: String
        if written == inherited || prefix != nil {
            // A prefixed element leaves the default namespace as it was.
            childDefault = inherited
        } else {
            childDefault = written
            output.writeRaw(" xmlns='")
            writeEscaped(written, inAttribute: true, to: &output)
            output.writeRaw("'")
        }

        let savedBindings = scope.bindings.count
        for attribute in element.attributes {
            output.writeRaw(" ")
            if attribute.namespace.isEmpty {
                // Unqualified: nothing to declare.
            } else if attribute.namespace == XMLNamespace.xml {
                output.writeRaw("xml:")
            } else if let prefix = scope.prefix(for: attribute.namespace) {
                output.writeRaw(prefix)
                output.writeRaw(":")
            } else {
                let prefix = "ns\(scope.counter)"
                scope.counter += 1
                scope.bindings.append((prefix, attribute.namespace))
                output.writeRaw("xmlns:")
                output.writeRaw(prefix)
                output.writeRaw("='")
                writeEscaped(attribute.namespace, inAttribute: true, to: &output)
                output.writeRaw("' ")
                output.writeRaw(prefix)
                output.writeRaw(":")
            }
            output.writeRaw(attribute.name)
            output.writeRaw("='")
            writeEscaped(attribute.value, inAttribute: true, to: &output)
            output.writeRaw("'")
        }

        if element.children.isEmpty {
            output.writeRaw("/>")
        } else {
            output.writeRaw(">")
            for child in element.children {
                switch child {
                case .element(let childElement):
                    writeElement(childElement, inherited: childDefault, prefix: nil, scope: &scope, to: &output)
                case .text(let text):
                    writeEscaped(text, inAttribute: false, to: &output)
                }
            }
            output.writeRaw("</")
            if let prefix {
                output.writeRaw(prefix)
                output.writeRaw(":")
            }
            output.writeRaw(element.name)
            output.writeRaw(">")
        }
        scope.bindings.removeSubrange(savedBindings...)
    }

    /// Writes `string` escaped for character data or for a single-quoted attribute value.
    ///
    /// Runs of bytes that need no escaping are copied in one call.
    @inlinable
    public static func writeEscaped<Output: XMLOutput>(_ string: String, inAttribute: Bool, to output: inout Output) {
        var string = string
        string.withUTF8 { bytes in
            guard let base = bytes.baseAddress else { return }
            var runStart = 0
            var index = 0
            let count = bytes.count
            while index < count {
                let byte = bytes[index]
                let replacement: StaticString
                switch byte {
                case UInt8(ascii: "&"): replacement = "&amp;"
                case UInt8(ascii: "<"): replacement = "&lt;"
                case UInt8(ascii: ">"): replacement = "&gt;"
                case UInt8(ascii: "\r"): replacement = "&#13;"
                case UInt8(ascii: "'") where inAttribute: replacement = "&apos;"
                case UInt8(ascii: "\"") where inAttribute: replacement = "&quot;"
                case UInt8(ascii: "\n") where inAttribute: replacement = "&#10;"
                case UInt8(ascii: "\t") where inAttribute: replacement = "&#9;"
                default:
                    index += 1
                    continue
                }
                if index > runStart {
                    output.writeRaw(UnsafeRawBufferPointer(start: base + runStart, count: index - runStart))
                }
                output.writeRaw(replacement)
                index += 1
                runStart = index
            }
            if count > runStart {
                output.writeRaw(UnsafeRawBufferPointer(start: base + runStart, count: count - runStart))
            }
        }
    }
}
