#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Splits an XMPP stream into its top-level pieces without building a tree: the stream
/// header, each stanza or nonza as a byte range, and the stream's end. The generator only
/// needs a stanza's name, a few attributes and a body of digits, so a scan for `<`, `>` and
/// quotes is enough, and costs far less per received message than a full parser (the
/// generator must not be the bottleneck). It trusts the server to send well-formed XML.
struct StreamScanner {
    enum Step {
        /// More bytes are needed; keep the bytes from this offset.
        case need(at: Int)
        /// Nothing of interest (whitespace, an XML declaration, a comment) up to this offset.
        case skip(to: Int)
        case streamOpen(end: Int)
        case streamClose(end: Int)
        case element(start: Int, end: Int)
    }

    /// Whether the stream header has been read (a stream restart sets it back to false).
    var inStream = false

    static let lt = UInt8(ascii: "<")
    static let gt = UInt8(ascii: ">")
    static let slash = UInt8(ascii: "/")
    static let bang = UInt8(ascii: "!")
    static let question = UInt8(ascii: "?")

    mutating func step(_ b: UnsafeRawBufferPointer, from i: Int) -> Step {
        guard let open = Bytes.index(of: Self.lt, in: b, from: i) else { return .skip(to: b.count) }
        guard open + 1 < b.count else { return .need(at: open) }
        switch b[open + 1] {
        case Self.question:
            guard let end = Bytes.index(of: Bytes.piEnd, in: b, from: open + 2) else { return .need(at: open) }
            return .skip(to: end + 2)
        case Self.bang:
            guard let end = Self.specialEnd(b, at: open) else { return .need(at: open) }
            return .skip(to: end)
        case Self.slash:
            guard let end = Bytes.index(of: Self.gt, in: b, from: open + 2) else { return .need(at: open) }
            inStream = false
            return .streamClose(end: end + 1)
        default:
            guard let tagEnd = Self.tagEnd(b, from: open + 1) else { return .need(at: open) }
            if !inStream {
                inStream = true
                return .streamOpen(end: tagEnd)
            }
            if b[tagEnd - 2] == Self.slash { return .element(start: open, end: tagEnd) }
            var depth = 1
            var j = tagEnd
            while true {
                guard let next = Bytes.index(of: Self.lt, in: b, from: j), next + 1 < b.count else { return .need(at: open) }
                switch b[next + 1] {
                case Self.slash:
                    guard let end = Bytes.index(of: Self.gt, in: b, from: next + 2) else { return .need(at: open) }
                    depth -= 1
                    j = end + 1
                    if depth == 0 { return .element(start: open, end: j) }
                case Self.bang:
                    guard let end = Self.specialEnd(b, at: next) else { return .need(at: open) }
                    j = end
                case Self.question:
                    guard let end = Bytes.index(of: Bytes.piEnd, in: b, from: next + 2) else { return .need(at: open) }
                    j = end + 2
                default:
                    guard let end = Self.tagEnd(b, from: next + 1) else { return .need(at: open) }
                    if b[end - 2] != Self.slash { depth += 1 }
                    j = end
                }
            }
        }
    }

    /// The offset after the `>` that ends a start tag begun before `from`; quotes are honoured
    /// because an attribute value may hold a raw `>`.
    static func tagEnd(_ b: UnsafeRawBufferPointer, from: Int) -> Int? {
        var quote: UInt8 = 0
        var i = from
        while i < b.count {
            let c = b[i]
            if quote != 0 {
                if c == quote { quote = 0 }
            } else if c == UInt8(ascii: "'") || c == UInt8(ascii: "\"") {
                quote = c
            } else if c == gt {
                return i + 1
            }
            i += 1
        }
        return nil
    }

    /// The end of a comment or CDATA section starting at `at` (which holds `<!`).
    static func specialEnd(_ b: UnsafeRawBufferPointer, at: Int) -> Int? {
        if Bytes.hasPrefix(b, at: at, Bytes.cdataStart) {
            return Bytes.index(of: Bytes.cdataEnd, in: b, from: at + 9).map { $0 + 3 }
        }
        if Bytes.hasPrefix(b, at: at, Bytes.commentStart) {
            return Bytes.index(of: Bytes.commentEnd, in: b, from: at + 4).map { $0 + 3 }
        }
        return Bytes.index(of: gt, in: b, from: at + 2).map { $0 + 1 }
    }
}

/// Byte searches over an element's bytes (memchr and memmem: these run per received stanza).
enum Bytes {
    static let piEnd = Array("?>".utf8)
    static let cdataStart = Array("<![CDATA[".utf8)
    static let cdataEnd = Array("]]>".utf8)
    static let commentStart = Array("<!--".utf8)
    static let commentEnd = Array("-->".utf8)

    static func index(of byte: UInt8, in b: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < b.count, let base = b.baseAddress else { return nil }
        guard let found = memchr(base + from, Int32(byte), b.count - from) else { return nil }
        return base.distance(to: UnsafeRawPointer(found))
    }

    static func index(of needle: [UInt8], in b: UnsafeRawBufferPointer, from: Int) -> Int? {
        guard from < b.count, let base = b.baseAddress else { return nil }
        // memchr for the first byte, then a compare (glibc's memmem is not imported).
        guard let first = needle.first else { return from }
        var at = from
        while at + needle.count <= b.count {
            guard let found = memchr(base + at, Int32(first), b.count - needle.count + 1 - at) else { return nil }
            let i = base.distance(to: UnsafeRawPointer(found))
            if hasPrefix(b, at: i, needle) { return i }
            at = i + 1
        }
        return nil
    }

    static func contains(_ needle: [UInt8], in b: UnsafeRawBufferPointer) -> Bool {
        index(of: needle, in: b, from: 0) != nil
    }

    static func hasPrefix(_ b: UnsafeRawBufferPointer, at: Int, _ prefix: [UInt8]) -> Bool {
        guard at + prefix.count <= b.count else { return false }
        for k in 0..<prefix.count where b[at + k] != prefix[k] { return false }
        return true
    }

    /// The element's local name (after any prefix), as bytes from `<` to the first space,
    /// `/` or `>`.
    static func localName(_ b: UnsafeRawBufferPointer) -> UnsafeRawBufferPointer {
        var end = 1
        var start = 1
        while end < b.count {
            let c = b[end]
            if c == UInt8(ascii: " ") || c == UInt8(ascii: "/") || c == UInt8(ascii: ">")
                || c == UInt8(ascii: "\t") || c == UInt8(ascii: "\n") || c == UInt8(ascii: "\r") { break }
            if c == UInt8(ascii: ":") { start = end + 1 }
            end += 1
        }
        return UnsafeRawBufferPointer(rebasing: b[start..<end])
    }

    static func equals(_ b: UnsafeRawBufferPointer, _ s: [UInt8]) -> Bool {
        guard b.count == s.count else { return false }
        for k in 0..<s.count where b[k] != s[k] { return false }
        return true
    }

    /// The value of attribute `name` in the element's start tag (either quote style), raw.
    static func attribute(_ name: String, in b: UnsafeRawBufferPointer) -> [UInt8]? {
        let tagEnd = StreamScanner.tagEnd(b, from: 1) ?? b.count
        let start = UnsafeRawBufferPointer(rebasing: b[0..<tagEnd])
        for quote in ["'", "\""] {
            let needle = Array(" \(name)=\(quote)".utf8)
            if let at = index(of: needle, in: start, from: 0) {
                let from = at + needle.count
                guard let end = index(of: UInt8(ascii: quote == "'" ? "'" : "\""), in: start, from: from) else { return nil }
                return Array(start[from..<end])
            }
        }
        return nil
    }

    /// The text between `<name ...>` and the next `<` (the first such child), raw.
    static func childText(_ name: String, in b: UnsafeRawBufferPointer) -> [UInt8]? {
        for needle in [Array("<\(name)>".utf8), Array("<\(name) ".utf8)] {
            guard let at = index(of: needle, in: b, from: 0),
                  let open = index(of: StreamScanner.gt, in: b, from: at) else { continue }
            if b[open - 1] == StreamScanner.slash { return [] }
            guard let close = index(of: StreamScanner.lt, in: b, from: open + 1) else { return nil }
            return Array(b[(open + 1)..<close])
        }
        return nil
    }

    /// Every `<name>text</name>` text in the element (mechanisms in the features).
    static func allChildTexts(_ name: String, in b: UnsafeRawBufferPointer) -> [String] {
        var out: [String] = []
        let needle = Array("<\(name)>".utf8)
        var from = 0
        while let at = index(of: needle, in: b, from: from) {
            let textStart = at + needle.count
            guard let close = index(of: StreamScanner.lt, in: b, from: textStart) else { break }
            out.append(String(decoding: b[textStart..<close], as: UTF8.self))
            from = close
        }
        return out
    }

    /// The element's own text: what lies between its start tag and the first `<` after it
    /// (empty for `<x/>`).
    static func ownText(_ b: UnsafeRawBufferPointer) -> [UInt8] {
        guard let tagEnd = StreamScanner.tagEnd(b, from: 1) else { return [] }
        if b[tagEnd - 2] == StreamScanner.slash { return [] }
        let close = index(of: StreamScanner.lt, in: b, from: tagEnd) ?? b.count
        return Array(b[tagEnd..<close])
    }

    /// Parses leading ASCII digits at `from`; nil when there are none.
    static func decimal(_ b: UnsafeRawBufferPointer, from: Int) -> (UInt64, Int)? {
        var value: UInt64 = 0
        var i = from
        while i < b.count, b[i] >= UInt8(ascii: "0"), b[i] <= UInt8(ascii: "9"), i - from < 19 {
            value = value &* 10 &+ UInt64(b[i] &- UInt8(ascii: "0"))
            i += 1
        }
        return i > from ? (value, i) : nil
    }
}
