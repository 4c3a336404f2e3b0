import CExpat
import NIOCore
import XMPPCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// An incremental, namespace-aware XMPP stream parser over libexpat.
///
/// Feed it bytes as they arrive, split anywhere, then pull events with ``nextEvent()``. It
/// yields the stream header, each complete first-level element as a tree, and the stream end.
///
/// Every event remembers where in the input it ended. That is what a stream restart needs:
/// after `<proceed/>` (STARTTLS) or `<success/>` (SASL), ``reset()`` hands back the bytes that
/// followed the last event the caller took, so the caller can reject them (cleartext after
/// STARTTLS is an injection attempt) or feed them to the new stream (RFC 6120 §4.3.3). Events
/// the old parser had already built beyond that point are discarded with it.
///
/// Everything RFC 6120 §11 restricts is refused with a typed ``XMLStreamError`` naming the
/// exact stream condition; the limits in ``XMLStreamLimits`` are enforced while input is still
/// arriving. Events that precede an error are delivered first. After an error the parser
/// stays failed until ``reset()``.
public final class XMLStreamParser {
    /// The content namespace the stream must declare: `jabber:client` or `jabber:server`.
    public let contentNamespace: String
    public let limits: XMLStreamLimits

    private let parser: XML_Parser
    /// Everything expat's callbacks touch. It lives behind a pointer so the per-element hot
    /// path runs without dynamic exclusivity checks on class properties.
    private let core: UnsafeMutablePointer<ParseCore>

    /// Input queued but not yet handed to expat.
    private var queued: [ByteBuffer] = []
    /// Slices handed to expat that still hold bytes after the last delivered event, and the
    /// expat byte index where the first of them starts.
    private var retained: [ByteBuffer] = []
    private var retainedStart = 0
    /// Expat's byte index just after the last event handed to the caller.
    private var lastDeliveredEnd = 0
    /// Total bytes handed to expat since the last reset.
    private var bytesFed = 0
    /// An error found while parsing the current slice, reported after the slice's events.
    private var pendingError: XMLStreamError?
    private var failure: XMLStreamError?
    /// Expat refused the character at this byte index, but it is a UTF-8 sequence cut short
    /// by the end of the input so far. Whether that is `unsupported-encoding` or
    /// `not-well-formed` waits for the next few bytes, so the verdict never depends on how
    /// the input was split (at most three more bytes are held).
    private var undecidedErrorPosition: Int?
    private var undecidedExpatMessage = ""

    /// Expat is fed in slices of at most this size, so the size limit is checked while a
    /// large read is still being parsed.
    private static let sliceSize = 16 * 1024
    /// After a restart, until the new document's first byte: whitespace is dropped.
    private var skipsLeadingWhitespace = false

    /// Creates a parser for a stream whose content namespace is `contentNamespace`.
    ///
    /// `names` is a name cache shared with the other parsers on the same thread (a server
    /// passes its event loop's, ``XMLNameCaches``); without one the parser has its own, about
    /// 18 KB that every idle session would hold.
    public init(contentNamespace: String, limits: XMLStreamLimits, names: XMLNameCache? = nil) {
        self.contentNamespace = contentNamespace
        self.limits = limits
        // The separator cannot appear in a namespace name: expat ≥ 2.4.5 rejects URIs
        // containing it (CVE-2022-25236), and names cannot contain a space.
        guard let parser = XML_ParserCreateNS("UTF-8", XML_Char(UInt8(ascii: " "))) else {
            // Allocation failure of a few hundred bytes: nothing sensible to recover to.
            fatalError("XML_ParserCreateNS failed: out of memory")
        }
        self.parser = parser
        XML_SetReturnNSTriplet(parser, 1)
        core = .allocate(capacity: 1)
        core.initialize(to: ParseCore(parser: parser, contentNamespace: contentNamespace, limits: limits, names: names ?? XMLNameCache()))
        configure()
    }

    deinit {
        XML_ParserFree(parser)
        core.pointee.destroy()
        core.deinitialize(count: 1)
        core.deallocate()
    }

    /// Bytes received since the last delivered event that no event has covered yet.
    public var pendingByteCount: Int {
        (bytesFed - lastDeliveredEnd) + queued.reduce(0) { $0 + $1.readableBytes }
    }

    /// True once the closing stream tag has been delivered.
    public var hasEnded: Bool { core.pointee.ended && core.pointee.eventIndex >= core.pointee.events.count }

    // MARK: Feeding and pulling

    /// Queues bytes for parsing. Nothing is parsed until ``nextEvent()`` is called.
    public func feed(_ bytes: ByteBuffer) {
        var bytes = bytes
        if skipsLeadingWhitespace {
            // Whitespace between the old stream's last element and the new header belongs
            // to the old stream (RFC 6120 §11.7); fed to the new document it would put the
            // XML declaration after it, which expat refuses (go-sendxmpp sends a newline
            // after </auth>, in the same read or the next).
            let leading = bytes.readableBytesView.prefix { Self.isXMLWhitespace($0) }.count
            bytes.moveReaderIndex(forwardBy: leading)
            if bytes.readableBytes > 0 { skipsLeadingWhitespace = false }
        }
        guard bytes.readableBytes > 0 else { return }
        queued.append(bytes)
    }

    public static func isXMLWhitespace(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte == UInt8(ascii: "\r") || byte == UInt8(ascii: "\n")
    }

    /// Queues bytes for parsing.
    public func feed(_ bytes: some Sequence<UInt8>) {
        feed(ByteBuffer(bytes: bytes))
    }

    /// Parses until the next event, or returns nil when the queued input is used up.
    public func nextEvent() throws(XMLStreamError) -> StreamEvent? {
        if let failure { throw failure }
        while true {
            if let (event, end) = core.pointee.takeEvent() {
                lastDeliveredEnd = end
                trimRetained()
                return event
            }
            if core.pointee.ended { return nil }
            if let error = pendingError {
                failure = error
                queued.removeAll()
                retained.removeAll()
                throw error
            }
            // The encoding sniff needs the first two bytes together; until both are here,
            // parse nothing, so the verdict does not depend on how the input was split.
            if bytesFed == 0 && queued.reduce(0, { $0 + $1.readableBytes }) < 2 { return nil }
            guard let slice = nextSlice() else { return nil }
            parseSlice(slice)
            if core.pointee.eventIndex >= core.pointee.events.count {
                // Every event parsed so far is delivered: the bytes up to the boundary were
                // stream-level whitespace (keepalives), which no restart needs. Without this,
                // each keepalive's read buffer stayed alive until the next stanza (about
                // 31 KB a keepalive per idle session, issue 10).
                trimRetained(upTo: max(lastDeliveredEnd, core.pointee.boundary))
            }
        }
    }

    private func nextSlice() -> ByteBuffer? {
        guard !queued.isEmpty else { return nil }
        if queued[0].readableBytes <= Self.sliceSize {
            return queued.removeFirst()
        }
        return queued[0].readSlice(length: Self.sliceSize)
    }

    private func parseSlice(_ slice: ByteBuffer) {
        var slice = slice
        if bytesFed == 0 && slice.readableBytes < 2, !queued.isEmpty {
            // Join the first byte with what follows so the sniff sees both.
            var next = queued.removeFirst()
            slice.writeBuffer(&next)
        }
        if bytesFed == 0, let error = sniffEncoding(slice) {
            pendingError = error
            return
        }
        if retained.isEmpty { retainedStart = bytesFed }
        retained.append(slice)
        bytesFed += slice.readableBytes
        if let position = undecidedErrorPosition {
            // Expat has already failed; these bytes only settle which error it was.
            pendingError = decideInvalidCharacter(at: position, expatMessage: undecidedExpatMessage)
            return
        }
        let status = slice.withUnsafeReadableBytes { raw in
            XML_Parse(parser, raw.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(raw.count), 0)
        }
        if status != XML_STATUS_OK {
            pendingError = translateError()
        } else if bytesFed - core.pointee.boundary > limits.maximumStanzaBytes {
            pendingError = XMLStreamError(.policyViolation, "element exceeds \(limits.maximumStanzaBytes) bytes while arriving")
        }
    }

    /// Drops retained slices that end before the last delivered event (or `point`).
    private func trimRetained(upTo point: Int? = nil) {
        let point = point ?? lastDeliveredEnd
        while let first = retained.first, retainedStart + first.readableBytes <= point {
            retainedStart += first.readableBytes
            retained.removeFirst()
        }
    }

    /// Input slices kept for a restart or an encoding verdict (for tests of memory bounds).
    var retainedSliceCount: Int { retained.count }

    /// Resets for a stream restart (RFC 6120 §4.3.3): a new parser state with handlers set
    /// again. Returns the input that followed the last delivered event, unparsed.
    @discardableResult
    public func reset() -> ByteBuffer {
        var leftover = ByteBuffer()
        var position = retainedStart
        for var slice in retained {
            let skip = max(0, min(slice.readableBytes, lastDeliveredEnd - position))
            position += slice.readableBytes
            slice.moveReaderIndex(forwardBy: skip)
            leftover.writeBuffer(&slice)
        }
        for var buffer in queued { leftover.writeBuffer(&buffer) }
        queued.removeAll()
        retained.removeAll()
        retainedStart = 0
        lastDeliveredEnd = 0
        bytesFed = 0
        pendingError = nil
        failure = nil
        undecidedErrorPosition = nil
        XML_ParserReset(parser, "UTF-8")
        core.pointee.clear()
        configure()
        skipsLeadingWhitespace = true
        return leftover
    }

    // MARK: Encoding and errors

    /// RFC 6120 §11.6: UTF-16 and UTF-32 streams are refused with `unsupported-encoding`.
    /// Their first two bytes give them away: a byte-order mark (FE or FF, never valid in
    /// UTF-8), or a zero byte beside the '<'.
    private func sniffEncoding(_ slice: ByteBuffer) -> XMLStreamError? {
        for (position, byte) in slice.readableBytesView.prefix(2).enumerated() {
            if byte == 0x00 || (position == 0 && (byte == 0xFE || byte == 0xFF)) {
                return XMLStreamError(.unsupportedEncoding, "input is UTF-16 or UTF-32, not UTF-8")
            }
        }
        return nil
    }

    /// The fed bytes in `[from, to)` that are still retained, in order.
    private func retainedBytes(from: Int, to: Int) -> [UInt8] {
        var result: [UInt8] = []
        var position = retainedStart
        for slice in retained {
            let sliceEnd = position + slice.readableBytes
            let low = max(from, position)
            let high = min(to, sliceEnd)
            if low < high, let bytes = slice.getBytes(at: slice.readerIndex + low - position, length: high - low) {
                result += bytes
            }
            position = sliceEnd
        }
        return result
    }

    /// The verdict on a character expat refused, or nil (recording the position) while the
    /// character is still arriving.
    private func decideInvalidCharacter(at position: Int, expatMessage: String) -> XMLStreamError? {
        switch UTF8Validation.firstCharacter(retainedBytes(from: position, to: position + 4)) {
        case .invalid:
            undecidedErrorPosition = nil
            return XMLStreamError(.unsupportedEncoding, "input is not UTF-8")
        case .valid:
            undecidedErrorPosition = nil
            return XMLStreamError(.notWellFormed, expatMessage)
        case .incomplete:
            undecidedErrorPosition = position
            undecidedExpatMessage = expatMessage
            return nil
        }
    }

    private func translateError() -> XMLStreamError? {
        let code = XML_GetErrorCode(parser)
        if code == XML_ERROR_ABORTED, let recorded = core.pointee.error {
            return recorded
        }
        let message = XML_ErrorString(code).map { String(cString: $0) } ?? "unknown expat error"
        switch code {
        case XML_ERROR_UNDEFINED_ENTITY, XML_ERROR_PARAM_ENTITY_REF, XML_ERROR_RECURSIVE_ENTITY_REF,
             XML_ERROR_BINARY_ENTITY_REF, XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF, XML_ERROR_AMPLIFICATION_LIMIT_BREACH,
             XML_ERROR_MISPLACED_XML_PI, XML_ERROR_NOT_STANDALONE, XML_ERROR_ENTITY_DECLARED_IN_PE,
             XML_ERROR_EXTERNAL_ENTITY_HANDLING:
            // RFC 6120 §11.1: entity references other than the five predefined ones, DTDs,
            // and processing instructions are restricted XML.
            return XMLStreamError(.restrictedXML, message)
        case XML_ERROR_UNKNOWN_ENCODING, XML_ERROR_INCORRECT_ENCODING:
            return XMLStreamError(.unsupportedEncoding, message)
        case XML_ERROR_INVALID_TOKEN, XML_ERROR_PARTIAL_CHAR:
            // Bytes that are not UTF-8 surface as invalid tokens; RFC 6120 §11.6 names them
            // `unsupported-encoding`. Expat points at the offending character, so only that
            // one character is examined: invalid UTF-8 further on must not change the
            // verdict, or the answer would depend on how the input was split. Valid UTF-8 that
            // is not XML stays `not-well-formed`.
            return decideInvalidCharacter(at: Int(XML_GetCurrentByteIndex(parser)), expatMessage: message)
        case XML_ERROR_NO_MEMORY:
            return XMLStreamError(.resourceConstraint, message)
        default:
            return XMLStreamError(.notWellFormed, message)
        }
    }

    // MARK: expat wiring

    private func configure() {
        XML_SetUserData(parser, UnsafeMutableRawPointer(core))
        XML_SetElementHandler(parser, { userData, name, attributes in
            guard let userData, let name else { return }
            userData.assumingMemoryBound(to: ParseCore.self).pointee.startElement(name, attributes)
        }, { userData, _ in
            guard let userData else { return }
            userData.assumingMemoryBound(to: ParseCore.self).pointee.endElement()
        })
        XML_SetCharacterDataHandler(parser, { userData, text, length in
            guard let userData, let text else { return }
            userData.assumingMemoryBound(to: ParseCore.self).pointee.characters(text, Int(length))
        })
        XML_SetNamespaceDeclHandler(parser, { userData, prefix, uri in
            guard let userData else { return }
            userData.assumingMemoryBound(to: ParseCore.self).pointee.namespaceDeclaration(prefix, uri)
        }, nil)
        XML_SetXmlDeclHandler(parser, { userData, _, encoding, _ in
            guard let userData else { return }
            userData.assumingMemoryBound(to: ParseCore.self).pointee.xmlDeclaration(encoding)
        })
        // RFC 6120 §11.1: comments, processing instructions, DTDs and entity declarations are
        // never allowed. Each handler aborts the parse at once, so a billion-laughs document
        // stops at its DOCTYPE before any entity is expanded.
        XML_SetCommentHandler(parser, { userData, _ in
            userData?.assumingMemoryBound(to: ParseCore.self).pointee.restricted("comment")
        })
        XML_SetProcessingInstructionHandler(parser, { userData, _, _ in
            userData?.assumingMemoryBound(to: ParseCore.self).pointee.restricted("processing instruction")
        })
        XML_SetStartDoctypeDeclHandler(parser, { userData, _, _, _, _ in
            userData?.assumingMemoryBound(to: ParseCore.self).pointee.restricted("document type declaration")
        })
        XML_SetEntityDeclHandler(parser, { userData, _, _, _, _, _, _, _, _ in
            userData?.assumingMemoryBound(to: ParseCore.self).pointee.restricted("entity declaration")
        })
        XML_SetSkippedEntityHandler(parser, { userData, _, _ in
            userData?.assumingMemoryBound(to: ParseCore.self).pointee.restricted("entity reference")
        })
        XML_SetParamEntityParsing(parser, XML_PARAM_ENTITY_PARSING_NEVER)
        _ = braid_expat_disable_reparse_deferral(parser)
    }
}

@available(*, unavailable)
extension XMLStreamParser: Sendable {}

// MARK: - The callback side

/// The state expat's callbacks build, reached through the parser's user-data pointer.
struct ParseCore {
    struct OpenElement {
        var name: String
        var namespace: String
        var attributes: [XMLAttribute]
        /// Where this element's children start in ``ParseCore/childScratch``.
        var firstChild: Int
    }

    let parser: XML_Parser
    let contentNamespace: String
    let limits: XMLStreamLimits

    /// 0 before the header, 1 inside the stream, 2 inside a first-level element, ...
    var depth = 0
    var open: [OpenElement] = []
    /// The children of every open element, innermost last. An element's children become
    /// one exactly-sized array when it closes.
    var childScratch = NodeStack()
    /// Character data not yet attached to the innermost open element.
    var pendingText: String?
    var events: [(StreamEvent, Int)] = []
    var eventIndex = 0
    var error: XMLStreamError?
    var ended = false
    var headerDefaultNamespace: String?
    var headerPrefixes: [String: String] = [:]
    /// Non-whitespace text seen between first-level elements, reported at the next markup.
    var strayText = false
    /// Expat's byte index just after the last event or stream-level whitespace; the size
    /// limit counts from here.
    var boundary = 0
    let names: XMLNameCache

    init(parser: XML_Parser, contentNamespace: String, limits: XMLStreamLimits, names: XMLNameCache) {
        self.parser = parser
        self.names = names
        self.contentNamespace = contentNamespace
        self.limits = limits
        open.reserveCapacity(4)
    }

    /// Returns to the state before the stream header, keeping buffers and the name cache.
    mutating func clear() {
        depth = 0
        open.removeAll(keepingCapacity: true)
        childScratch.removeAll()
        pendingText = nil
        events.removeAll(keepingCapacity: true)
        eventIndex = 0
        error = nil
        ended = false
        headerDefaultNamespace = nil
        headerPrefixes = [:]
        strayText = false
        boundary = 0
    }

    /// Frees the manually managed memory. Called once, when the parser goes away.
    mutating func destroy() {
        childScratch.deallocate()
    }

    mutating func takeEvent() -> (StreamEvent, Int)? {
        guard eventIndex < events.count else {
            if !events.isEmpty {
                events.removeAll(keepingCapacity: true)
                eventIndex = 0
            }
            return nil
        }
        defer { eventIndex += 1 }
        return events[eventIndex]
    }

    // MARK: Failures

    mutating func fail(_ error: XMLStreamError) {
        guard self.error == nil else { return }
        self.error = error
        XML_StopParser(parser, 0)
    }

    mutating func restricted(_ what: String) {
        if rejectStrayText() { return }
        fail(XMLStreamError(.restrictedXML, "\(what) is not allowed in an XMPP stream"))
    }

    /// Fails for text seen between first-level elements; true if it did.
    mutating func rejectStrayText() -> Bool {
        guard strayText else { return false }
        fail(XMLStreamError(.badFormat, "character data between first-level elements"))
        return true
    }

    private var currentEnd: Int {
        XML_GetCurrentByteIndex(parser) + Int(XML_GetCurrentByteCount(parser))
    }

    private mutating func emit(_ event: StreamEvent) {
        let end = currentEnd
        events.append((event, end))
        boundary = end
    }

    private mutating func checkSize() {
        if currentEnd - boundary > limits.maximumStanzaBytes {
            fail(XMLStreamError(.policyViolation, "element exceeds \(limits.maximumStanzaBytes) bytes"))
        }
    }

    // MARK: Callbacks

    mutating func xmlDeclaration(_ encoding: UnsafePointer<XML_Char>?) {
        guard let encoding else { return }
        let name = String(cString: encoding).lowercased()
        if name != "utf-8" && name != "utf8" {
            fail(XMLStreamError(.unsupportedEncoding, "declared encoding \(name)"))
        }
    }

    mutating func namespaceDeclaration(_ prefix: UnsafePointer<XML_Char>?, _ uri: UnsafePointer<XML_Char>?) {
        guard depth == 0 else { return }
        let uriString = uri.map { String(cString: $0) } ?? ""
        if let prefix {
            headerPrefixes[String(cString: prefix)] = uriString
        } else {
            headerDefaultNamespace = uriString
        }
    }

    mutating func startElement(_ rawName: UnsafePointer<XML_Char>, _ rawAttributes: UnsafeMutablePointer<UnsafePointer<XML_Char>?>?) {
        guard error == nil, !rejectStrayText() else { return }
        let qname = names.lookup(rawName)
        if depth == 0 {
            startStream(qname, rawAttributes)
            return
        }
        if qname.isContent {
            // RFC 6120 §4.8.5: stanza content is never prefixed.
            if let prefix = qname.prefix {
                fail(XMLStreamError(.badNamespacePrefix, "prefixed element <\(prefix):\(qname.local)> in \(qname.namespace)"))
                return
            }
            // A first-level element in the other content namespace is a wrong content namespace.
            if depth == 1 && qname.namespace != contentNamespace {
                fail(XMLStreamError(.invalidNamespace, "first-level element in \(qname.namespace) on a \(contentNamespace) stream"))
                return
            }
        }
        if depth > limits.maximumDepth {
            fail(XMLStreamError(.policyViolation, "element nesting deeper than \(limits.maximumDepth)"))
            return
        }

        var attributes: [XMLAttribute] = []
        if let rawAttributes, rawAttributes[0] != nil {
            var count = 0
            while rawAttributes[count] != nil { count += 2 }
            count /= 2
            if count > limits.maximumAttributesPerElement {
                fail(XMLStreamError(.policyViolation, "more than \(limits.maximumAttributesPerElement) attributes on <\(qname.local)>"))
                return
            }
            attributes.reserveCapacity(count)
            for index in 0..<count {
                guard let attributeName = rawAttributes[2 * index], let attributeValue = rawAttributes[2 * index + 1] else { break }
                let valueLength = strlen(attributeValue)
                if valueLength > limits.maximumAttributeValueBytes {
                    fail(XMLStreamError(.policyViolation, "attribute value over \(limits.maximumAttributeValueBytes) bytes"))
                    return
                }
                let attributeQName = names.lookup(attributeName)
                let value = String(decoding: UnsafeRawBufferPointer(start: attributeValue, count: valueLength), as: UTF8.self)
                attributes.append(XMLAttribute(attributeQName.local, value, namespace: attributeQName.namespace))
            }
        }

        flushText()
        open.append(OpenElement(name: qname.local, namespace: qname.namespace, attributes: attributes, firstChild: childScratch.count))
        depth += 1
    }

    private mutating func startStream(_ qname: QualifiedName, _ rawAttributes: UnsafeMutablePointer<UnsafePointer<XML_Char>?>?) {
        // RFC 6120 §4.8.1: the root must be <stream> in the streams namespace.
        guard qname.namespace == XMLNamespace.streams else {
            fail(XMLStreamError(.invalidNamespace, "stream element in namespace '\(qname.namespace)'"))
            return
        }
        guard qname.local == "stream" else {
            fail(XMLStreamError(.badFormat, "root element <\(qname.local)> is not <stream>"))
            return
        }
        // RFC 6120 §4.8.2, §4.8.3: the default namespace is the content namespace.
        guard let declared = headerDefaultNamespace, declared == contentNamespace else {
            fail(XMLStreamError(.invalidNamespace, "content namespace '\(headerDefaultNamespace ?? "")', expected \(contentNamespace)"))
            return
        }
        // RFC 6120 §4.8.5: only the stream and dialback prefixes belong on the header;
        // extension namespaces declared there would leak into every stanza. A prefix for a
        // content namespace is let through here so that using it gets the precise
        // `bad-namespace-prefix`.
        for (prefix, uri) in headerPrefixes {
            let allowed = uri == XMLNamespace.streams || (uri == XMLNamespace.dialback && prefix == "db")
                || XMLNamespace.isContent(uri)
            if !allowed {
                fail(XMLStreamError(.invalidNamespace, "namespace '\(uri)' declared on the stream header"))
                return
            }
        }
        var header = StreamHeader(version: nil, language: nil, contentNamespace: declared, prefixes: headerPrefixes)
        if let rawAttributes {
            var index = 0
            while let attributeName = rawAttributes[index], let attributeValue = rawAttributes[index + 1] {
                let attributeQName = names.lookup(attributeName)
                let value = String(cString: attributeValue)
                switch (attributeQName.namespace, attributeQName.local) {
                case ("", "to"): header.to = value
                case ("", "from"): header.from = value
                case ("", "id"): header.id = value
                case ("", "version"): header.version = value
                case (XMLNamespace.xml, "lang"): header.language = value
                default: break
                }
                index += 2
            }
        }
        depth = 1
        emit(.streamStart(header))
    }

    mutating func endElement() {
        guard error == nil, !rejectStrayText() else { return }
        depth -= 1
        if depth == 0 {
            ended = true
            emit(.streamEnd)
            return
        }
        flushText()
        guard let element = open.popLast() else { return }
        let children = childScratch.take(from: element.firstChild)
        let built = XMLElement(name: element.name, namespace: element.namespace, attributes: element.attributes, children: children)
        if depth == 1 {
            checkSize()
            guard error == nil else { return }
            emit(.element(built))
        } else {
            childScratch.append(.element(built))
        }
    }

    mutating func characters(_ text: UnsafePointer<XML_Char>, _ length: Int) {
        guard error == nil else { return }
        let bytes = UnsafeRawBufferPointer(start: text, count: length)
        if depth <= 1 {
            // Between first-level elements only whitespace is allowed (RFC 6120 §11.7);
            // it is a keepalive, and it moves the size-limit boundary forward.
            if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D }) {
                if !strayText { boundary = currentEnd }
            } else {
                // Reported at the next markup, not here: expat hands over text in pieces that
                // depend on how input arrived, and a well-formedness error later in the same
                // run of text must win however the input was split (found by the fuzzer).
                strayText = true
            }
            return
        }
        // The size limit is checked per slice fed and when the stanza closes, so text held
        // here never exceeds the limit by more than one slice.
        let piece = String(decoding: bytes, as: UTF8.self)
        if pendingText == nil {
            pendingText = piece
        } else {
            pendingText? += piece
        }
    }

    private mutating func flushText() {
        guard let text = pendingText else { return }
        pendingText = nil
        if !open.isEmpty { childScratch.append(.text(text)) }
    }
}

// MARK: - Name interning

/// A namespace-qualified name as expat reports it in triplet mode.
struct QualifiedName {
    var namespace: String
    var local: String
    var prefix: String?
    /// Whether `namespace` is `jabber:client` or `jabber:server`, worked out once per name.
    var isContent: Bool

    init(namespace: String, local: String, prefix: String?) {
        self.namespace = namespace
        self.local = local
        self.prefix = prefix
        isContent = XMLNamespace.isContent(namespace)
    }
}

/// Interns the names expat reports, so the same `jabber:client message` does not allocate
/// new strings for every stanza. A direct-mapped cache keyed by a cheap hash of the length
/// and the first and last bytes. Keys and values live in manually managed storage so a hit
/// copies nothing but the returned name; a miss costs only the allocation the parser would
/// have made anyway.
///
/// 128 slots (about 18 KB) hold the few dozen names a stream uses; 512 were no faster. A
/// server shares one per event loop among all the streams on it (``XMLNameCaches``), so an
/// idle session does not hold one: a cache per stream was about a quarter of an idle
/// session's memory (issue 16's measurement, docs/benchmarks.md).
///
/// Not thread-safe: every parser using one must run on the same thread.
public final class XMLNameCache {
    private static let slots = 128
    private static let slotBytes = 96

    private let keys: UnsafeMutableRawPointer
    /// Key length per slot, or -1 for an empty slot (whose value is uninitialized).
    private let lengths: UnsafeMutablePointer<Int>
    private let values: UnsafeMutablePointer<QualifiedName>

    public init() {
        keys = .allocate(byteCount: Self.slots * Self.slotBytes, alignment: 8)
        lengths = .allocate(capacity: Self.slots)
        lengths.initialize(repeating: -1, count: Self.slots)
        values = .allocate(capacity: Self.slots)
    }

    deinit {
        for slot in 0..<Self.slots where lengths[slot] >= 0 {
            (values + slot).deinitialize(count: 1)
        }
        values.deallocate()
        lengths.deallocate()
        keys.deallocate()
    }

    func lookup(_ raw: UnsafePointer<XML_Char>) -> QualifiedName {
        let length = strlen(raw)
        let bytes = UnsafeRawBufferPointer(start: raw, count: length)
        var hash = UInt64(truncatingIfNeeded: length) &* 0x9E37_79B9_7F4A_7C15
        if length >= 8 {
            hash ^= bytes.loadUnaligned(as: UInt64.self)
            hash = (hash ^ (hash >> 29)) &* 0xBF58_476D_1CE4_E5B9
            hash ^= bytes.loadUnaligned(fromByteOffset: length - 8, as: UInt64.self)
        } else {
            for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01B3 }
        }
        hash = (hash ^ (hash >> 31)) &* 0x94D0_49BB_1331_11EB
        let slot = Int(truncatingIfNeeded: hash >> 40) & (Self.slots - 1)
        let key = keys + slot * Self.slotBytes
        if lengths[slot] == length && memcmp(key, raw, length) == 0 {
            return values[slot]
        }
        let name = Self.split(bytes)
        guard length <= Self.slotBytes else { return name }
        if lengths[slot] >= 0 {
            values[slot] = name
        } else {
            (values + slot).initialize(to: name)
        }
        key.copyMemory(from: raw, byteCount: length)
        lengths[slot] = length
        return name
    }

    /// Splits "namespace SP local [SP prefix]" (or a bare "local" when unqualified).
    private static func split(_ bytes: UnsafeRawBufferPointer) -> QualifiedName {
        let separator = UInt8(ascii: " ")
        guard let first = bytes.firstIndex(of: separator) else {
            return QualifiedName(namespace: "", local: String(decoding: bytes, as: UTF8.self), prefix: nil)
        }
        let namespace = String(decoding: bytes[..<first], as: UTF8.self)
        let rest = bytes[(first + 1)...]
        if let second = rest.firstIndex(of: separator) {
            return QualifiedName(
                namespace: namespace,
                local: String(decoding: rest[..<second], as: UTF8.self),
                prefix: String(decoding: rest[(second + 1)...], as: UTF8.self))
        }
        return QualifiedName(namespace: namespace, local: String(decoding: rest, as: UTF8.self), prefix: nil)
    }
}

/// A growable stack of nodes in manually managed memory. Closing an element moves its
/// children out into an exactly-sized array, with no retain or release per node.
struct NodeStack {
    private(set) var base: UnsafeMutablePointer<XMLNode>
    private(set) var count = 0
    private var capacity: Int

    /// Small at first: every stream holds one while idle (64 nodes were about 3 KB per idle
    /// session, heaptrack, 2,000 sessions); it doubles as deeper elements need it.
    init(capacity: Int = 8) {
        self.capacity = capacity
        base = .allocate(capacity: capacity)
    }

    mutating func append(_ node: XMLNode) {
        if count == capacity {
            let grown = UnsafeMutablePointer<XMLNode>.allocate(capacity: capacity * 2)
            grown.moveInitialize(from: base, count: count)
            base.deallocate()
            base = grown
            capacity *= 2
        }
        (base + count).initialize(to: node)
        count += 1
    }

    /// Moves the nodes from `start` to the top into a new array.
    mutating func take(from start: Int) -> [XMLNode] {
        let taken = count - start
        guard taken > 0 else { return [] }
        let source = base + start
        count = start
        return Array(unsafeUninitializedCapacity: taken) { buffer, initialized in
            buffer.baseAddress?.moveInitialize(from: source, count: taken)
            initialized = taken
        }
    }

    /// Destroys every node, keeping the memory.
    mutating func removeAll() {
        base.deinitialize(count: count)
        count = 0
    }

    /// Destroys every node and frees the memory. The stack must not be used afterwards.
    mutating func deallocate() {
        removeAll()
        base.deallocate()
    }
}
