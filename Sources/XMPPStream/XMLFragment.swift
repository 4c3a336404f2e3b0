import NIOCore
import XMPPCore

/// Serializes a stanza to text for storage, and parses it back.
///
/// Stored stanzas are written re-scoped to `jabber:client` (RFC 6120 §4.8.3), whatever stream
/// they arrived on, and parsed with the same hardened stream parser as live input, so a
/// stored value can never carry what the parser would refuse.
public enum XMLFragment {
    public struct ParseError: Error, Sendable {
        public var reason: String
    }

    public static func serialize(_ element: XMLElement) -> String {
        var buffer = ByteBuffer()
        XMLSerializer.write(element, contentNamespace: XMLNamespace.client, into: &buffer)
        return String(buffer: buffer)
    }

    public static func parse(_ text: String) throws(ParseError) -> XMLElement {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: XMLStreamLimits(maximumStanzaBytes: max(text.utf8.count + 1, XMLStreamLimits.minimumStanzaBytes)))
        parser.feed(ByteBuffer(string: "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"))
        parser.feed(ByteBuffer(string: text))
        var element: XMLElement?
        do {
            while let event = try parser.nextEvent() {
                if case .element(let parsed) = event {
                    guard element == nil else { throw ParseError(reason: "more than one element") }
                    element = parsed
                }
            }
        } catch let error as ParseError {
            throw error
        } catch {
            throw ParseError(reason: "\(error)")
        }
        guard let element else { throw ParseError(reason: "no element") }
        return element
    }
}
