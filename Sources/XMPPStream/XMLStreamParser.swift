import CExpat
import NIOCore
import XMPPCore

/// An incremental, namespace-aware XMPP stream parser over libexpat.
///
/// Feed it bytes as they arrive, split anywhere, then pull events with ``nextEvent()``. It
/// yields the stream header, each complete first-level element as a tree, and the stream end.
///
/// The parser suspends expat after every event, so the layer above can act on an element
/// before a single further byte is interpreted. That is what a stream restart needs: after
/// `<proceed/>` (STARTTLS) or `<success/>` (SASL), ``reset()`` hands back the bytes that
/// followed the element, unparsed, so the caller can reject them (plaintext after STARTTLS is
/// an injection attempt) or feed them to the new stream (RFC 6120 §4.3.3).
///
/// Everything RFC 6120 §11 restricts is refused with a typed ``XMLStreamError`` naming the
/// exact stream condition; the limits in ``XMLStreamLimits`` are enforced while input is still
/// arriving. After an error the parser stays failed.
public final class XMLStreamParser {
    /// The content namespace the stream must declare: `jabber:client` or `jabber:server`.
    public let contentNamespace: String
    public let limits: XMLStreamLimits

    private var parser: XML_Parser
    private var state = State()
    private var failure: XMLStreamError?

    /// Input queued but not yet handed to expat.
    private var queued: [ByteBuffer] = []
    /// The slice expat is working on while suspended, and where it starts in expat's count.
    private var currentSlice: ByteBuffer?
    private var currentSliceStart: Int = 0
    /// Total bytes handed to expat since the last reset.
    private var bytesFed: Int = 0
    private var suspended = false
    /// The last bytes handed to expat before the current slice, for encoding diagnosis.
    private var recentTail: [UInt8] = []

    /// Expat is fed in slices of at most this size, so the size limit is checked while a
    /// large read is still being parsed.
    private static let sliceSize = 16 * 1024

    private let names = NameTable()

    /// Creates a parser for a stream whose content namespace is `contentNamespace`.
    public init(contentNamespace: String, limits: XMLStreamLimits) {
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
        configure()
    }

    deinit {
        XML_ParserFree(parser)
    }

    /// The number of bytes fed since the last reset that expat has not turned into events yet.
    public var pendingByteCount: Int {
        (bytesFed - state.boundary) + queued.reduce(0) { $0 + $1.readableBytes }
    }

    /// True once the closing stream tag has been seen.
    public var hasEnded: Bool { state.ended }

    // MARK: Feeding and pulling

    /// Queues bytes for parsing. Nothing is parsed until ``nextEvent()`` is called.
    public func feed(_ bytes: ByteBuffer) {
        guard bytes.readableBytes > 0 else { return }
        queued.append(bytes)
    }

    /// Queues bytes for parsing.
    public func feed(_ bytes: some Sequence<UInt8>) {
        feed(ByteBuffer(bytes: bytes))
    }

    /// Parses until the next event, or returns nil when the queued input is used up.
    public func nextEvent() throws(XMLStreamError) -> StreamEvent? {
        if let failure { throw failure }
        do {
            return try advance()
        } catch {
            failure = error
            queued.removeAll()
            currentSlice = nil
            throw error
        }
    }

    private func advance() throws(XMLStreamError) -> StreamEvent? {
        while true {
            if let event = state.takeEvent() { return event }
            if state.ended { return nil }
            let status: XML_Status
            if suspended {
                suspended = false
                status = XML_ResumeParser(parser)
            } else if let slice = nextSlice() {
                if bytesFed < 2 { try sniffEncoding(slice) }
                if let previous = currentSlice { rememberTail(of: previous) }
                currentSlice = slice
                currentSliceStart = bytesFed
                bytesFed += Int(slice.readableBytes)
                status = slice.withUnsafeReadableBytes { raw in
                    XML_Parse(parser, raw.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(raw.count), 0)
                }
            } else {
                return nil
            }
            switch status {
            case XML_STATUS_SUSPENDED:
                suspended = true
            case XML_STATUS_OK:
                if let finished = currentSlice { rememberTail(of: finished) }
                currentSlice = nil
                try checkPendingSize()
            default:
                throw translateError()
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

    /// Resets for a stream restart (RFC 6120 §4.3.3): a new parser state with handlers set
    /// again. Returns the input that followed the last event and was never parsed.
    @discardableResult
    public func reset() -> ByteBuffer {
        var leftover = ByteBuffer()
        if suspended, var slice = currentSlice {
            let consumed = Int(state.lastEventEnd - currentSliceStart)
            if consumed >= 0 && consumed <= slice.readableBytes {
                slice.moveReaderIndex(forwardBy: consumed)
                leftover.writeImmutableBuffer(slice)
            }
        }
        for var buffer in queued { leftover.writeBuffer(&buffer) }
        queued.removeAll()
        currentSlice = nil
        suspended = false
        recentTail = []
        bytesFed = 0
        currentSliceStart = 0
        failure = nil
        state = State()
        XML_ParserReset(parser, "UTF-8")
        configure()
        return leftover
    }

    private func rememberTail(of slice: ByteBuffer) {
        let bytes = slice.readableBytesView
        if bytes.count >= 3 {
            recentTail = Array(bytes.suffix(3))
        } else {
            recentTail = Array((recentTail + bytes).suffix(3))
        }
    }

    /// RFC 6120 §11.6: UTF-16 and UTF-32 streams are refused with `unsupported-encoding`.
    /// Their first two bytes give them away: a byte-order mark (FE or FF, never valid in
    /// UTF-8), or a zero byte beside the '<'.
    private func sniffEncoding(_ slice: ByteBuffer) throws(XMLStreamError) {
        let bytes = slice.readableBytesView
        for (offset, byte) in bytes.prefix(2 - bytesFed).enumerated() {
            let position = bytesFed + offset
            if byte == 0x00 || (position == 0 && (byte == 0xFE || byte == 0xFF)) {
                throw XMLStreamError(.unsupportedEncoding, "input is UTF-16 or UTF-32, not UTF-8")
            }
        }
    }

    // MARK: Limits and errors

    private func checkPendingSize() throws(XMLStreamError) {
        if bytesFed - state.boundary > Int(limits.maximumStanzaBytes) {
            throw XMLStreamError(.policyViolation, "element exceeds \(limits.maximumStanzaBytes) bytes while arriving")
        }
    }

    private func translateError() -> XMLStreamError {
        let code = XML_GetErrorCode(parser)
        if code == XML_ERROR_ABORTED, let recorded = state.error {
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
            // `unsupported-encoding`. Valid UTF-8 that is not XML stays `not-well-formed`.
            if inputAtErrorIsNotUTF8() {
                return XMLStreamError(.unsupportedEncoding, "input is not UTF-8")
            }
            return XMLStreamError(.notWellFormed, message)
        case XML_ERROR_NO_MEMORY:
            return XMLStreamError(.resourceConstraint, message)
        default:
            return XMLStreamError(.notWellFormed, message)
        }
    }

    /// Checks whether the input that made expat fail is not UTF-8.
    ///
    /// Expat reports an invalid token as soon as the bytes that make it invalid arrive, so
    /// the culprit lies in the slice just fed, or straddles it and the few bytes before it.
    private func inputAtErrorIsNotUTF8() -> Bool {
        var window = recentTail
        if let currentSlice { window.append(contentsOf: currentSlice.readableBytesView) }
        return UTF8Validation.check(window) == .invalid
    }

    // MARK: expat wiring
    // MARK: expat wiring

    private func configure() {
        XML_SetUserData(parser, Unmanaged.passUnretained(self).toOpaque())
        XML_SetElementHandler(parser, { userData, name, attributes in
            guard let userData, let name else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().startElement(name, attributes)
        }, { userData, name in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().endElement()
            _ = name
        })
        XML_SetCharacterDataHandler(parser, { userData, text, length in
            guard let userData, let text else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().characters(text, Int(length))
        })
        XML_SetNamespaceDeclHandler(parser, { userData, prefix, uri in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().namespaceDeclaration(prefix, uri)
        }, nil)
        XML_SetXmlDeclHandler(parser, { userData, _, encoding, _ in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().xmlDeclaration(encoding)
        })
        // RFC 6120 §11.1: comments, processing instructions, DTDs and entity declarations are
        // never allowed. Each handler aborts the parse at once, so a billion-laughs document
        // stops at its DOCTYPE before any entity is expanded.
        XML_SetCommentHandler(parser, { userData, _ in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().restricted("comment")
        })
        XML_SetProcessingInstructionHandler(parser, { userData, _, _ in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().restricted("processing instruction")
        })
        XML_SetStartDoctypeDeclHandler(parser, { userData, _, _, _, _ in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().restricted("document type declaration")
        })
        XML_SetEntityDeclHandler(parser, { userData, _, _, _, _, _, _, _, _ in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().restricted("entity declaration")
        })
        XML_SetSkippedEntityHandler(parser, { userData, _, _ in
            guard let userData else { return }
            Unmanaged<XMLStreamParser>.fromOpaque(userData).takeUnretainedValue().restricted("entity reference")
        })
        XML_SetParamEntityParsing(parser, XML_PARAM_ENTITY_PARSING_NEVER)
        _ = braid_expat_disable_reparse_deferral(parser)
    }

    private func fail(_ error: XMLStreamError) {
        guard state.error == nil else { return }
        state.error = error
        XML_StopParser(parser, 0)
    }

    private func restricted(_ what: String) {
        fail(XMLStreamError(.restrictedXML, "\(what) is not allowed in an XMPP stream"))
    }

    private func suspendAfterEvent() {
        state.lastEventEnd = XML_GetCurrentByteIndex(parser) + Int(XML_GetCurrentByteCount(parser))
        state.boundary = state.lastEventEnd
        XML_StopParser(parser, 1)
    }

    private func xmlDeclaration(_ encoding: UnsafePointer<XML_Char>?) {
        guard let encoding else { return }
        let name = String(cString: encoding).lowercased()
        if name != "utf-8" && name != "utf8" {
            fail(XMLStreamError(.unsupportedEncoding, "declared encoding \(name)"))
        }
    }

    private func namespaceDeclaration(_ prefix: UnsafePointer<XML_Char>?, _ uri: UnsafePointer<XML_Char>?) {
        guard state.depth == 0 else { return }
        let uriString = uri.map { String(cString: $0) } ?? ""
        if let prefix {
            state.headerPrefixes[String(cString: prefix)] = uriString
        } else {
            state.headerDefaultNamespace = uriString
        }
    }

    private func checkSizeInsideElement() {
        let position = XML_GetCurrentByteIndex(parser) + Int(XML_GetCurrentByteCount(parser))
        if position - state.boundary > Int(limits.maximumStanzaBytes) {
            fail(XMLStreamError(.policyViolation, "element exceeds \(limits.maximumStanzaBytes) bytes"))
        }
    }

    private func startElement(_ rawName: UnsafePointer<XML_Char>, _ rawAttributes: UnsafeMutablePointer<UnsafePointer<XML_Char>?>?) {
        guard state.error == nil else { return }
        let qname = names.lookup(rawName)
        if state.depth == 0 {
            startStream(qname, rawAttributes)
            return
        }
        checkSizeInsideElement()
        guard state.error == nil else { return }

        if XMLNamespace.isContent(qname.namespace) {
            // RFC 6120 §4.8.5: stanza content is never prefixed.
            if qname.hasPrefix {
                fail(XMLStreamError(.badNamespacePrefix, "prefixed element <\(qname.prefix ?? ""):\(qname.local)> in \(qname.namespace)"))
                return
            }
            // A first-level element in the other content namespace is a wrong content namespace.
            if state.depth == 1 && qname.namespace != contentNamespace {
                fail(XMLStreamError(.invalidNamespace, "first-level element in \(qname.namespace) on a \(contentNamespace) stream"))
                return
            }
        }
        if state.depth > limits.maximumDepth {
            fail(XMLStreamError(.policyViolation, "element nesting deeper than \(limits.maximumDepth)"))
            return
        }

        var attributes: [XMLAttribute] = []
        if let rawAttributes {
            var index = 0
            while let attributeName = rawAttributes[index], let attributeValue = rawAttributes[index + 1] {
                if attributes.count >= limits.maximumAttributesPerElement {
                    fail(XMLStreamError(.policyViolation, "more than \(limits.maximumAttributesPerElement) attributes on <\(qname.local)>"))
                    return
                }
                let valueLength = cStringLength(attributeValue)
                if valueLength > limits.maximumAttributeValueBytes {
                    fail(XMLStreamError(.policyViolation, "attribute value over \(limits.maximumAttributeValueBytes) bytes"))
                    return
                }
                let attributeQName = names.lookup(attributeName)
                let value = UnsafeRawBufferPointer(start: attributeValue, count: valueLength)
                attributes.append(XMLAttribute(attributeQName.local, String(decoding: value, as: UTF8.self), namespace: attributeQName.namespace))
                index += 2
            }
        }

        state.flushText()
        state.stack.append(ElementBuilder(name: qname.local, namespace: qname.namespace, attributes: attributes))
        state.depth += 1
    }

    private func startStream(_ qname: QualifiedName, _ rawAttributes: UnsafeMutablePointer<UnsafePointer<XML_Char>?>?) {
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
        guard let declared = state.headerDefaultNamespace, declared == contentNamespace else {
            fail(XMLStreamError(.invalidNamespace, "content namespace '\(state.headerDefaultNamespace ?? "")', expected \(contentNamespace)"))
            return
        }
        // RFC 6120 §4.8.5: only the stream and dialback prefixes belong on the header;
        // extension namespaces declared there would leak into every stanza. A prefix for a
        // content namespace is let through here so that using it gets the precise
        // `bad-namespace-prefix`.
        for (prefix, uri) in state.headerPrefixes {
            let allowed = uri == XMLNamespace.streams || (uri == XMLNamespace.dialback && prefix == "db")
                || XMLNamespace.isContent(uri)
            if !allowed {
                fail(XMLStreamError(.invalidNamespace, "namespace '\(uri)' declared on the stream header"))
                return
            }
        }
        var header = StreamHeader(version: nil, language: nil, contentNamespace: declared, prefixes: state.headerPrefixes)
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
        state.depth = 1
        state.events.append(.streamStart(header))
        suspendAfterEvent()
    }

    private func endElement() {
        guard state.error == nil else { return }
        state.depth -= 1
        if state.depth == 0 {
            state.ended = true
            state.events.append(.streamEnd)
            suspendAfterEvent()
            return
        }
        state.flushText()
        guard let builder = state.stack.popLast() else { return }
        let element = XMLElement(name: builder.name, namespace: builder.namespace, attributes: builder.attributes, children: builder.children)
        if state.depth == 1 {
            checkSizeInsideElement()
            guard state.error == nil else { return }
            state.events.append(.element(element))
            suspendAfterEvent()
        } else {
            state.stack[state.stack.count - 1].children.append(.element(element))
        }
    }

    private func characters(_ text: UnsafePointer<XML_Char>, _ length: Int) {
        guard state.error == nil else { return }
        let bytes = UnsafeRawBufferPointer(start: text, count: length)
        if state.depth <= 1 {
            // Between first-level elements only whitespace is allowed (RFC 6120 §11.7);
            // it is a keepalive, and it moves the size-limit boundary forward.
            if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0A || $0 == 0x0D }) {
                state.boundary = XML_GetCurrentByteIndex(parser) + Int(XML_GetCurrentByteCount(parser))
            } else {
                fail(XMLStreamError(.badFormat, "character data between first-level elements"))
            }
            return
        }
        checkSizeInsideElement()
        state.text.append(contentsOf: bytes)
    }
}

@available(*, unavailable)
extension XMLStreamParser: Sendable {}

// MARK: - Parse state

extension XMLStreamParser {
    struct ElementBuilder {
        var name: String
        var namespace: String
        var attributes: [XMLAttribute]
        var children: [XMLNode] = []
    }

    /// Everything that a reset discards.
    struct State {
        /// 0 before the header, 1 inside the stream, 2 inside a first-level element, ...
        var depth = 0
        var stack: [ElementBuilder] = []
        /// Character data not yet attached to the innermost open element.
        var text: [UInt8] = []
        var events: [StreamEvent] = []
        var eventIndex = 0
        var error: XMLStreamError?
        var ended = false
        var headerDefaultNamespace: String?
        var headerPrefixes: [String: String] = [:]
        /// Expat's byte index just after the last event or stream-level whitespace; the size
        /// limit counts from here.
        var boundary: Int = 0
        /// Expat's byte index just after the last delivered event.
        var lastEventEnd: Int = 0

        init() {
            text.reserveCapacity(1024)
        }

        mutating func flushText() {
            guard !text.isEmpty, !stack.isEmpty else { return }
            stack[stack.count - 1].children.append(.text(String(decoding: text, as: UTF8.self)))
            text.removeAll(keepingCapacity: true)
        }

        mutating func takeEvent() -> StreamEvent? {
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
    }
}

// MARK: - Name interning

/// A namespace-qualified name as expat reports it in triplet mode.
struct QualifiedName {
    var namespace: String
    var local: String
    var prefix: String?

    var hasPrefix: Bool { prefix != nil }
}

/// Interns the names expat reports, so the same `jabber:client message` does not allocate
/// new strings for every stanza. A direct-mapped cache: a miss only costs the allocation the
/// parser would have made anyway.
final class NameTable {
    private struct Entry {
        var key: [UInt8]
        var name: QualifiedName
    }

    private var entries: [Entry?]
    private let mask: Int

    init(capacity: Int = 512) {
        entries = Array(repeating: nil, count: capacity)
        mask = capacity - 1
    }

    func lookup(_ raw: UnsafePointer<XML_Char>) -> QualifiedName {
        // FNV-1a over the C string, measuring its length on the way.
        var hash: UInt = 0xcbf2_9ce4_8422_2325
        var length = 0
        raw.withMemoryRebound(to: UInt8.self, capacity: 1) { bytes in
            while bytes[length] != 0 {
                hash = (hash ^ UInt(bytes[length])) &* 0x0000_0100_0000_01b3
                length += 1
            }
        }
        let bytes = UnsafeRawBufferPointer(start: raw, count: length)
        let slot = Int(truncatingIfNeeded: hash) & mask
        if let entry = entries[slot], entry.key.count == length, entry.key.withUnsafeBytes({ $0.elementsEqual(bytes) }) {
            return entry.name
        }
        let name = Self.split(bytes)
        entries[slot] = Entry(key: Array(bytes), name: name)
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

/// The length of a NUL-terminated string from expat.
@inline(__always)
func cStringLength(_ pointer: UnsafePointer<XML_Char>) -> Int {
    pointer.withMemoryRebound(to: UInt8.self, capacity: 1) { bytes in
        var length = 0
        while bytes[length] != 0 { length += 1 }
        return length
    }
}
