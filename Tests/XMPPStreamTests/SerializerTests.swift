import NIOCore
import Testing
import XMPPCore
@testable import XMPPStream

@Suite("Serializer")
struct SerializerTests {
    func serialize(_ element: XMLElement, namespace: String = XMLNamespace.client) -> String {
        var buffer = ByteBuffer()
        XMLSerializer.write(element, contentNamespace: namespace, into: &buffer)
        return String(buffer: buffer)
    }

    @Test("Parsed stanzas serialize and parse back to equal trees", arguments: [
        (StreamTranscripts.clientLogin, XMLNamespace.client),
        (StreamTranscripts.serverToClient, XMLNamespace.client),
        (StreamTranscripts.serverToServer, XMLNamespace.server),
    ])
    func roundTrip(transcript: String, namespace: String) {
        let first = parse(transcript, contentNamespace: namespace)
        #expect(first.error == nil)
        var buffer = ByteBuffer()
        guard case .streamStart(let header) = first.events.first else {
            Issue.record("no header")
            return
        }
        XMLSerializer.writeStreamHeader(header, into: &buffer)
        for element in first.elements {
            XMLSerializer.write(element, contentNamespace: namespace, into: &buffer)
        }
        XMLSerializer.writeStreamEnd(into: &buffer)
        let second = parse(String(buffer: buffer), contentNamespace: namespace)
        #expect(second.error == nil)
        #expect(second.events == first.events)
    }

    @Test("Text escapes &, <, > and CR; other characters pass through")
    func textEscaping() {
        let element = XMLElement(name: "body", namespace: XMLNamespace.client, text: "a & b < c > d \r\n 'q' \"dq\" ✓")
        #expect(serialize(element) == "<body>a &amp; b &lt; c &gt; d &#13;\n 'q' \"dq\" ✓</body>")
    }

    @Test("Attribute values escape quotes, tab, newline and CR, and survive a re-parse")
    func attributeEscaping() {
        let value = "it's \"x\" & <y>\t\n\r end"
        let element = XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("id", value)])
        let text = serialize(element)
        #expect(text == "<message id='it&apos;s &quot;x&quot; &amp; &lt;y&gt;&#9;&#10;&#13; end'/>")
        let reparsed = parse(clientHeader + text)
        #expect(reparsed.elements.first?.attribute("id") == value)
    }

    @Test("A client stanza is re-scoped to jabber:server without any declaration")
    func rescoping() {
        let outcome = parse(clientHeader + "<message to='romeo@example.net'><body>hi</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>")
        let message = outcome.elements[0]
        #expect(message.namespace == XMLNamespace.client)
        let text = serialize(message, namespace: XMLNamespace.server)
        #expect(text == "<message to='romeo@example.net'><body>hi</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>")
        let onServer = parse(serverHeader + text, contentNamespace: XMLNamespace.server)
        #expect(onServer.elements.first?.namespace == XMLNamespace.server)
        #expect(onServer.elements.first?.firstChild(name: "body", namespace: XMLNamespace.server)?.text == "hi")
    }

    @Test("A stanza forwarded inside another namespace keeps its explicit jabber:client")
    func forwardedKeepsNamespace() {
        let inner = XMLElement(name: "message", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "chat")], children: [
            .element(XMLElement(name: "body", namespace: XMLNamespace.client, text: "x")),
        ])
        let forwarded = XMLElement(name: "forwarded", namespace: "urn:xmpp:forward:0", children: [.element(inner)])
        let outer = XMLElement(name: "message", namespace: XMLNamespace.client, children: [
            .element(XMLElement(name: "sent", namespace: "urn:xmpp:carbons:2", children: [.element(forwarded)])),
        ])
        #expect(serialize(outer) == "<message><sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'><message xmlns='jabber:client' type='chat'><body>x</body></message></forwarded></sent></message>")
    }

    @Test("A child in the other content namespace keeps it, on either stream (fuzzer finding)")
    func otherContentNamespaceChild() {
        let element = XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "get")], children: [
            .element(XMLElement(name: "x", namespace: XMLNamespace.server)),
            .element(XMLElement(name: "y", namespace: XMLNamespace.client)),
        ])
        // On a client stream the server-namespaced child must say so, or it would read back
        // as jabber:client.
        #expect(serialize(element) == "<iq type='get'><x xmlns='jabber:server'/><y/></iq>")
        // Re-scoped onto a server stream, the stanza's own namespace follows the stream and
        // the child already in jabber:server needs nothing.
        #expect(serialize(element, namespace: XMLNamespace.server) == "<iq type='get'><x/><y/></iq>")
    }

    @Test("An element in the xml namespace keeps the xml prefix (fuzzer finding)")
    func xmlNamespaceElement() {
        let element = XMLElement(name: "x", namespace: XMLNamespace.xml)
        #expect(serialize(element) == "<xml:x/>")
        let parsed = parse(clientHeader + "<xml:x/>", contentNamespace: XMLNamespace.client)
        #expect(parsed.elements == [element])
    }

    @Test("Namespaced attributes get a declared prefix; xml:lang uses the xml prefix")
    func attributePrefixes() {
        let element = XMLElement(name: "x", namespace: "urn:a", attributes: [
            XMLAttribute("lang", "de", namespace: XMLNamespace.xml),
            XMLAttribute("kind", "k", namespace: "urn:b"),
        ], children: [
            .element(XMLElement(name: "y", namespace: "urn:a", attributes: [XMLAttribute("more", "m", namespace: "urn:b")])),
        ])
        let text = serialize(XMLElement(name: "message", namespace: XMLNamespace.client, children: [.element(element)]))
        #expect(text == "<message><x xmlns='urn:a' xml:lang='de' xmlns:ns0='urn:b' ns0:kind='k'><y ns0:more='m'/></x></message>")
        let reparsed = parse(clientHeader + text)
        #expect(reparsed.error == nil)
        #expect(reparsed.elements.first?.firstChild(name: "x", namespace: "urn:a") == element)
    }

    @Test("An element with no namespace under a default namespace undeclares it")
    func emptyNamespace() {
        let element = XMLElement(name: "message", namespace: XMLNamespace.client, children: [.element(XMLElement(name: "plain", namespace: ""))])
        let text = serialize(element)
        #expect(text == "<message><plain xmlns=''/></message>")
        #expect(parse(clientHeader + text).elements.first == element)
    }

    @Test("The stream header carries the declarations and attributes")
    func streamHeader() {
        var buffer = ByteBuffer()
        let header = StreamHeader(to: "example.net", from: "example.com", id: "a'b", contentNamespace: XMLNamespace.server, prefixes: ["db": XMLNamespace.dialback])
        XMLSerializer.writeStreamHeader(header, into: &buffer)
        #expect(String(buffer: buffer) == "<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' to='example.net' from='example.com' id='a&apos;b' version='1.0' xml:lang='en'>")
        let reparsed = parse(String(buffer: buffer), contentNamespace: XMLNamespace.server)
        #expect(reparsed.events == [.streamStart(StreamHeader(to: "example.net", from: "example.com", id: "a'b", contentNamespace: XMLNamespace.server, prefixes: ["stream": XMLNamespace.streams, "db": XMLNamespace.dialback]))])
    }

    @Test("Every stream error condition renders and reads back", arguments: StreamError.Condition.allCases)
    func streamErrorRoundTrip(condition: StreamError.Condition) {
        let error = StreamError(condition, text: "because")
        let text = serialize(error.element)
        #expect(text.hasPrefix("<stream:error><\(condition.rawValue) xmlns='urn:ietf:params:xml:ns:xmpp-streams'"))
        let stream = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'><stream:error><\(condition.rawValue) xmlns='urn:ietf:params:xml:ns:xmpp-streams'/><text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>because</text></stream:error>"
        guard let element = parse(stream).elements.first else {
            Issue.record("no element")
            return
        }
        #expect(StreamError(element: element) == error)
    }

    @Test("Dialback elements use the db prefix on server streams and declare it elsewhere")
    func dialbackPrefix() {
        let result = XMLElement(name: "result", namespace: XMLNamespace.dialback, attributes: [XMLAttribute("from", "a.example"), XMLAttribute("to", "b.example")], text: "key")
        #expect(serialize(result, namespace: XMLNamespace.server) == "<db:result from='a.example' to='b.example'>key</db:result>")
        #expect(serialize(result, namespace: XMLNamespace.client) == "<result xmlns='jabber:server:dialback' from='a.example' to='b.example'>key</result>")
        let reparsed = parse(serverHeader + serialize(result, namespace: XMLNamespace.server), contentNamespace: XMLNamespace.server)
        #expect(reparsed.elements == [result])
    }

    @Test("Unknown and RFC 3920 stream conditions map as RFC 6120 §4.9.2 says")
    func legacyConditions() {
        #expect(StreamError.Condition(elementName: "xml-not-well-formed") == .notWellFormed)
        #expect(StreamError.Condition(elementName: "invalid-id") == .undefinedCondition)
    }

    @Test("Every stanza error condition renders with its default type and reads back", arguments: StanzaError.Condition.allCases)
    func stanzaErrorRoundTrip(condition: StanzaError.Condition) {
        let error = StanzaError(condition, text: "t", by: "example.com")
        let text = serialize(error.element())
        #expect(text.contains("type='\(condition.defaultType.rawValue)'"))
        let message = parse(clientHeader + "<message type='error'>" + text + "</message>").elements.first
        #expect(message.flatMap { Stanza($0)?.error } == error)
    }
}
