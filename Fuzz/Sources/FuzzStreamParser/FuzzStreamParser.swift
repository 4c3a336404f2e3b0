import XMPPCore
import XMPPStream

/// Feeds fuzzer input to the stream parser twice, whole and split at fuzzer-chosen points,
/// and traps if the two runs disagree: the parser must give identical events and the
/// identical error condition for every byte split (issue: stream foundation).
///
/// Input layout: byte 0 picks the content namespace and whether a valid stream header is
/// prepended (so the fuzzer reaches stanza parsing quickly); bytes 1-2 pick split points.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzStreamParser(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= 3 else { return 0 }
    let control = data[0]
    let namespace = control & 1 == 0 ? XMLNamespace.client : XMLNamespace.server
    var input: [UInt8] = []
    if control & 2 == 0 {
        input += Array("<stream:stream xmlns='\(namespace)' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' version='1.0'>".utf8)
    }
    input += UnsafeBufferPointer(start: data + 3, count: size - 3)
    let limits = XMLStreamLimits(maximumStanzaBytes: 10_000, maximumDepth: 8, maximumAttributesPerElement: 8, maximumAttributeValueBytes: 4096)

    let whole = run(chunks: [input], namespace: namespace, limits: limits)
    let first = input.isEmpty ? 0 : Int(data[1]) % (input.count + 1)
    let second = input.isEmpty ? 0 : Int(data[2]) * 7 % (input.count + 1)
    let (low, high) = (min(first, second), max(first, second))
    let pieces = [Array(input[..<low]), Array(input[low..<high]), Array(input[high...])]
    let split = run(chunks: pieces, namespace: namespace, limits: limits)
    if whole.events != split.events || whole.error != split.error {
        fatalError("split at \(low)/\(high) changed the outcome: \(String(describing: whole.error)) vs \(String(describing: split.error))")
    }
    // Whatever parsed must serialize and parse back to the same tree.
    for event in whole.events {
        guard case .element(let element) = event else { continue }
        var output = XMLStringOutput()
        XMLWriter.write(element, inheritedNamespace: namespace, to: &output)
        let text = "<stream:stream xmlns='\(namespace)' xmlns:stream='http://etherx.jabber.org/streams'>" + output.string
        let reparsed = run(chunks: [Array(text.utf8)], namespace: namespace, limits: XMLStreamLimits(maximumStanzaBytes: 1 << 20))
        guard reparsed.events.count == 2, reparsed.events.last == .element(element) else {
            fatalError("serialized element did not parse back: \(output.string)")
        }
    }
    return 0
}

struct Outcome {
    var events: [StreamEvent] = []
    var error: StreamError.Condition?
}

func run(chunks: [[UInt8]], namespace: String, limits: XMLStreamLimits) -> Outcome {
    let parser = XMLStreamParser(contentNamespace: namespace, limits: limits)
    var outcome = Outcome()
    for chunk in chunks {
        parser.feed(chunk)
        do {
            while let event = try parser.nextEvent() { outcome.events.append(event) }
        } catch {
            outcome.error = error.condition
            return outcome
        }
    }
    return outcome
}
