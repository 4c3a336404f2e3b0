import NIOCore
import XMPPCore

extension ByteBuffer: XMLOutput {
    @inlinable
    public mutating func writeRaw(_ bytes: UnsafeRawBufferPointer) {
        self.writeBytes(bytes)
    }
}

/// Writes stream headers, stanzas and stream endings straight into `ByteBuffer`s.
public enum XMLSerializer {
    /// Writes `element` as a first-level element of a stream whose content namespace is
    /// `contentNamespace`. Stanzas are re-scoped to that namespace (RFC 6120 §4.8.3).
    ///
    /// First-level elements in the streams namespace are written as `<stream:…>`, and on
    /// server streams dialback elements as `<db:…>`, using the prefixes our header declares.
    @inlinable
    public static func write(_ element: XMLElement, contentNamespace: String, into buffer: inout ByteBuffer) {
        if element.namespace == XMLNamespace.streams {
            XMLWriter.write(element, inheritedNamespace: contentNamespace, streamPrefix: ("stream", XMLNamespace.streams), to: &buffer)
        } else if element.namespace == XMLNamespace.dialback && contentNamespace == XMLNamespace.server {
            XMLWriter.write(element, inheritedNamespace: contentNamespace, streamPrefix: ("db", XMLNamespace.dialback), to: &buffer)
        } else {
            XMLWriter.write(element, inheritedNamespace: contentNamespace, to: &buffer)
        }
    }

    /// The header prefixes a stream of this content namespace declares.
    public static func headerPrefixes(contentNamespace: String) -> [String: String] {
        contentNamespace == XMLNamespace.server ? ["db": XMLNamespace.dialback] : [:]
    }

    /// Writes the XML declaration and the opening `<stream:stream>` tag.
    public static func writeStreamHeader(_ header: StreamHeader, into buffer: inout ByteBuffer) {
        buffer.writeRaw("<?xml version='1.0'?><stream:stream xmlns='")
        XMLWriter.writeEscaped(header.contentNamespace, inAttribute: true, to: &buffer)
        buffer.writeRaw("' xmlns:stream='http://etherx.jabber.org/streams'")
        for (prefix, uri) in header.prefixes.sorted(by: { $0.key < $1.key }) where prefix != "stream" {
            buffer.writeRaw(" xmlns:")
            buffer.writeRaw(prefix)
            buffer.writeRaw("='")
            XMLWriter.writeEscaped(uri, inAttribute: true, to: &buffer)
            buffer.writeRaw("'")
        }
        writeAttribute("to", header.to, into: &buffer)
        writeAttribute("from", header.from, into: &buffer)
        writeAttribute("id", header.id, into: &buffer)
        writeAttribute("version", header.version, into: &buffer)
        writeAttribute("xml:lang", header.language, into: &buffer)
        buffer.writeRaw(">")
    }

    /// Writes the closing `</stream:stream>` tag.
    public static func writeStreamEnd(into buffer: inout ByteBuffer) {
        buffer.writeRaw("</stream:stream>")
    }

    private static func writeAttribute(_ name: StaticString, _ value: String?, into buffer: inout ByteBuffer) {
        guard let value else { return }
        buffer.writeRaw(" ")
        buffer.writeRaw(name)
        buffer.writeRaw("='")
        XMLWriter.writeEscaped(value, inAttribute: true, to: &buffer)
        buffer.writeRaw("'")
    }
}
