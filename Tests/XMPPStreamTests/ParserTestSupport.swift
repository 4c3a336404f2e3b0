import NIOCore
import XMPPCore
@testable import XMPPStream

/// What a parse run produced: the events in order, and the error that ended it, if any.
struct ParseOutcome: Equatable {
    var events: [StreamEvent]
    var error: XMLStreamError?

    var condition: StreamError.Condition? { error?.condition }
}

/// Feeds `input` to a fresh parser in the given chunks and collects everything it yields.
func parse(
    chunks: [[UInt8]],
    contentNamespace: String = XMLNamespace.client,
    limits: XMLStreamLimits = .client
) -> ParseOutcome {
    let parser = XMLStreamParser(contentNamespace: contentNamespace, limits: limits)
    var events: [StreamEvent] = []
    for chunk in chunks {
        parser.feed(chunk)
        do {
            while let event = try parser.nextEvent() {
                events.append(event)
            }
        } catch {
            return ParseOutcome(events: events, error: error)
        }
    }
    return ParseOutcome(events: events, error: nil)
}

func parse(_ input: String, contentNamespace: String = XMLNamespace.client, limits: XMLStreamLimits = .client) -> ParseOutcome {
    parse(chunks: [Array(input.utf8)], contentNamespace: contentNamespace, limits: limits)
}

/// Splits `bytes` at one offset.
func split(_ bytes: [UInt8], at offset: Int) -> [[UInt8]] {
    [Array(bytes[..<offset]), Array(bytes[offset...])]
}

let clientHeader = "<?xml version='1.0'?><stream:stream to='example.com' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en'>"
let serverHeader = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' to='example.net' from='example.com' version='1.0'>"

extension ParseOutcome {
    /// The first-level elements, without header and end events.
    var elements: [XMLElement] {
        events.compactMap { event in
            if case .element(let element) = event { return element }
            return nil
        }
    }
}
