import NIOCore
import NIOEmbedded
import Testing
import XMPPCore
@testable import XMPPStream

@Suite("Stream parser: well-formed streams")
struct XMLStreamParserTests {
    static let transcripts: [(String, String, String)] = [
        ("client login", StreamTranscripts.clientLogin, XMLNamespace.client),
        ("server to client", StreamTranscripts.serverToClient, XMLNamespace.client),
        ("server to server", StreamTranscripts.serverToServer, XMLNamespace.server),
    ]

    @Test("The client login transcript yields the expected header and elements")
    func clientLoginContent() throws {
        let outcome = parse(StreamTranscripts.clientLogin)
        #expect(outcome.error == nil)
        guard case .streamStart(let header) = outcome.events.first else {
            Issue.record("no header")
            return
        }
        #expect(header.to == "example.com")
        #expect(header.version == "1.0")
        #expect(header.language == "en")
        #expect(header.contentNamespace == XMLNamespace.client)
        #expect(header.prefixes == ["stream": XMLNamespace.streams])
        #expect(outcome.events.last == .streamEnd)

        let elements = outcome.elements
        #expect(elements.map(\.name) == ["auth", "response", "iq", "iq", "presence", "message", "message", "iq", "r"])
        #expect(elements[0].namespace == XMLNamespace.sasl)
        #expect(elements[0].attribute("mechanism") == "SCRAM-SHA-256")
        // Text directly inside a first-level element (SASL payloads, dialback keys).
        #expect(elements[0].text == "biwsbj1qdWxpZXQscj1vTXNUQUF3QUFBQU1BQUFBTlAwVEFBQUFBQUJQVTBBQQ==")
        #expect(elements[2].firstChild(name: "bind", namespace: XMLNamespace.bind)?.firstChild(name: "resource", namespace: XMLNamespace.bind)?.text == "Gajim.Ω")
        #expect(elements[4].firstChild(name: "status", namespace: XMLNamespace.client)?.text == "Ich bin heute in München 🎉 — ça va?")

        let message = elements[5]
        #expect(message.namespace == XMLNamespace.client)
        #expect(message.attribute("id") == "m&1")
        #expect(message.attribute("lang", namespace: XMLNamespace.xml) == "fr")
        #expect(message.firstChild(name: "body", namespace: XMLNamespace.client)?.text == "Wherefore art thou, Romeo? 你好，世界 𝄞 <3 😀 é")
        let prefixed = message.firstChild(name: "data", namespace: "urn:example:prefixed")
        #expect(prefixed?.attribute("kind", namespace: "urn:example:prefixed") == "prefixed")
        #expect(prefixed?.firstChild(name: "item", namespace: "urn:example:prefixed")?.text == "keep prefixes out of the tree")

        #expect(elements[6].firstChild(name: "body", namespace: XMLNamespace.client)?.text == "<not> & markup")
        #expect(elements[8].namespace == XMLNamespace.streamManagement)
    }

    @Test("The server-to-server transcript keeps dialback elements in their namespace", arguments: [XMLNamespace.server])
    func serverToServerContent(namespace: String) throws {
        let outcome = parse(StreamTranscripts.serverToServer, contentNamespace: namespace)
        #expect(outcome.error == nil)
        guard case .streamStart(let header) = outcome.events.first else {
            Issue.record("no header")
            return
        }
        #expect(header.declaresDialback)
        #expect(header.from == "capulet.example")
        let elements = outcome.elements
        #expect(elements.map { "\($0.namespace) \($0.name)" } == [
            "jabber:server:dialback result", "jabber:server:dialback verify",
            "jabber:server presence", "jabber:server message", "jabber:server iq", "urn:xmpp:sm:3 a",
        ])
        #expect(elements[1].attribute("id") == "417GAF25")
    }

    @Test("Every split point gives the same events as the whole stream", arguments: transcripts)
    func everySplitPoint(name: String, transcript: String, namespace: String) {
        let bytes = Array(transcript.utf8)
        let whole = parse(chunks: [bytes], contentNamespace: namespace)
        #expect(whole.error == nil, "\(name)")
        #expect(whole.events.count > 5)
        for offset in 0...bytes.count {
            let outcome = parse(chunks: split(bytes, at: offset), contentNamespace: namespace)
            if outcome != whole {
                Issue.record("\(name): split at \(offset) gave a different result: \(String(describing: outcome.error))")
                return
            }
        }
    }

    @Test("Feeding one byte at a time gives the same events", arguments: transcripts)
    func byteByByte(name: String, transcript: String, namespace: String) {
        let bytes = Array(transcript.utf8)
        let whole = parse(chunks: [bytes], contentNamespace: namespace)
        let single = parse(chunks: bytes.map { [$0] }, contentNamespace: namespace)
        #expect(single == whole, "\(name)")
    }

    @Test("Random three-way splits give the same events", arguments: transcripts)
    func randomSplits(name: String, transcript: String, namespace: String) {
        let bytes = Array(transcript.utf8)
        let whole = parse(chunks: [bytes], contentNamespace: namespace)
        var generator = SplitMix64(seed: 0xB4A1D)
        for _ in 0..<300 {
            let a = Int(generator.next() % UInt64(bytes.count + 1))
            let b = Int(generator.next() % UInt64(bytes.count + 1))
            let (low, high) = (min(a, b), max(a, b))
            let chunks = [Array(bytes[..<low]), Array(bytes[low..<high]), Array(bytes[high...])]
            let outcome = parse(chunks: chunks, contentNamespace: namespace)
            if outcome != whole {
                Issue.record("\(name): split at \(low)/\(high) differs")
                return
            }
        }
    }

    @Test("A stanza is delivered by the feed that carries its closing '>'")
    func deliveredImmediately() throws {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: .client)
        parser.feed(Array(clientHeader.utf8))
        guard case .streamStart = try parser.nextEvent() else {
            Issue.record("expected header")
            return
        }
        parser.feed(Array("<message to='a@b'><body>hi</body></message".utf8))
        #expect(try parser.nextEvent() == nil)
        parser.feed(Array(">".utf8))
        let event = try parser.nextEvent()
        guard case .element(let element) = event else {
            Issue.record("expected the message as soon as '>' arrived, got \(String(describing: event))")
            return
        }
        #expect(element.name == "message")
    }

    @Test("Whitespace keepalives between stanzas are ignored")
    func keepalives() {
        let outcome = parse(clientHeader + " \n\t\r\n <presence/>   \n  <presence/> ")
        #expect(outcome.error == nil)
        #expect(outcome.elements.count == 2)
    }

    @Test("Reset after <proceed/> hands back the bytes that followed, unparsed")
    func resetReturnsLeftover() throws {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: .client)
        parser.feed(Array((clientHeader + "<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><iq type='get' id='injected'/>").utf8))
        _ = try parser.nextEvent()
        guard case .element(let starttls) = try parser.nextEvent() else {
            Issue.record("expected starttls")
            return
        }
        #expect(starttls.name == "starttls")
        let leftover = parser.reset()
        #expect(String(buffer: leftover) == "<iq type='get' id='injected'/>")

        // The reset parser starts a fresh document.
        parser.feed(Array((clientHeader + "<presence/>").utf8))
        guard case .streamStart = try parser.nextEvent() else {
            Issue.record("expected a new header after reset")
            return
        }
        guard case .element(let presence) = try parser.nextEvent() else {
            Issue.record("expected presence")
            return
        }
        #expect(presence.name == "presence")
    }

    @Test("Reset with pipelined input lets the caller feed it to the new stream")
    func resetAndRefeed() throws {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: .client)
        parser.feed(Array((clientHeader + "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGp1bGlldABy</auth>" + clientHeader + "<iq type='set' id='b'/>").utf8))
        _ = try parser.nextEvent()
        _ = try parser.nextEvent()
        let leftover = parser.reset()
        parser.feed(leftover)
        var names: [String] = []
        while let event = try parser.nextEvent() {
            switch event {
            case .streamStart: names.append("header")
            case .element(let element): names.append(element.name)
            case .streamEnd: names.append("end")
            }
        }
        #expect(names == ["header", "iq"])
    }

    @Test("Namespace declarations on content are resolved, not kept as prefixes")
    func prefixesResolved() {
        let a = parse(clientHeader + "<message><p:x xmlns:p='urn:a'><p:y/></p:x></message>")
        let b = parse(clientHeader + "<message><x xmlns='urn:a'><y/></x></message>")
        #expect(a.error == nil)
        #expect(a.elements == b.elements)
    }

    @Test("A stanza at the size limit passes; one byte over fails", arguments: [10_000, 20_000])
    func sizeBoundary(limit: Int) {
        let limits = XMLStreamLimits(maximumStanzaBytes: limit)
        let prefix = "<message><body>"
        let suffix = "</body></message>"
        let exact = prefix + String(repeating: "a", count: limit - prefix.utf8.count - suffix.utf8.count) + suffix
        #expect(exact.utf8.count == limit)
        let ok = parse(clientHeader + exact, limits: limits)
        #expect(ok.error == nil)
        #expect(ok.elements.count == 1)
        let over = parse(clientHeader + prefix + "a" + String(repeating: "a", count: limit - prefix.utf8.count - suffix.utf8.count) + suffix, limits: limits)
        #expect(over.condition == .policyViolation)
    }

    @Test("Restricted and bad input is not accepted after a reset either")
    func resetClearsFailure() throws {
        let parser = XMLStreamParser(contentNamespace: XMLNamespace.client, limits: .client)
        parser.feed(Array((clientHeader + "<!-- no -->").utf8))
        _ = try parser.nextEvent()
        #expect(throws: XMLStreamError.self) { try parser.nextEvent() }
        #expect(throws: XMLStreamError.self) { try parser.nextEvent() }
        parser.reset()
        parser.feed(Array((clientHeader + "<?pi?>").utf8))
        _ = try parser.nextEvent()
        #expect(throws: XMLStreamError(.restrictedXML, "")) { try parser.nextEvent() }
    }
}

/// A small deterministic generator, so split tests are repeatable.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

@Suite("Stream parser: a name cache shared by the streams of one event loop")
struct SharedNameCacheTests {
    @Test("Streams sharing one cache, parsed interleaved a few bytes at a time, give the events each gives alone")
    func interleavedStreamsShareOneCache() throws {
        let inputs = [
            (StreamTranscripts.clientLogin, XMLNamespace.client),
            (StreamTranscripts.serverToClient, XMLNamespace.client),
            (StreamTranscripts.serverToServer, XMLNamespace.server),
        ]
        let shared = XMLNameCache()
        let parsers = inputs.map { XMLStreamParser(contentNamespace: $0.1, limits: .client, names: shared) }
        var events = Array(repeating: [StreamEvent](), count: inputs.count)
        let bytes = inputs.map { Array($0.0.utf8) }
        var offsets = Array(repeating: 0, count: inputs.count)
        // Seven bytes from each in turn: names of one stream evict those of another from the
        // shared slots in the middle of elements.
        while offsets.indices.contains(where: { offsets[$0] < bytes[$0].count }) {
            for index in inputs.indices where offsets[index] < bytes[index].count {
                let end = min(offsets[index] + 7, bytes[index].count)
                parsers[index].feed(Array(bytes[index][offsets[index]..<end]))
                offsets[index] = end
                while let event = try parsers[index].nextEvent() { events[index].append(event) }
            }
        }
        for index in inputs.indices {
            #expect(events[index] == parse(inputs[index].0, contentNamespace: inputs[index].1).events)
        }
    }

    @Test("Each event loop has its own cache, the same one every time")
    func oneCachePerLoop() throws {
        let caches = XMLNameCaches()
        let loops = [EmbeddedEventLoop(), EmbeddedEventLoop()]
        let first = loops.map { ObjectIdentifier(caches.cache(on: $0)) }
        let again = loops.map { ObjectIdentifier(caches.cache(on: $0)) }
        #expect(first == again)
        #expect(first[0] != first[1])
    }
}
