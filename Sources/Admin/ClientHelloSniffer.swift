import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOSSL
import NIOTLS

/// TLS-ALPN-01 (RFC 8737) on the HTTPS listener: what the listener asks the ACME side.
///
/// swift-nio-ssl's context callback sees only the server name, not the ALPN protocols
/// offered, so the listener reads the ClientHello itself (``ClientHelloSniffer``) and asks
/// ``context`` only for a handshake offering `acme-tls/1`.
public struct TLSALPNChallenges: Sendable {
    /// The ALPN protocol of a validation handshake.
    public static let protocolName = "acme-tls/1"

    /// The validation context (its certificate, `acme-tls/1` as the only protocol) for a
    /// server name (lower-case A-label) while its challenge is pending; nil otherwise.
    public var context: @Sendable (String) -> NIOSSLContext?
    /// Called for every ClientHello that could not be parsed (the connection is closed).
    public var malformed: @Sendable (_ reason: String) -> Void

    public init(context: @escaping @Sendable (String) -> NIOSSLContext?, malformed: @escaping @Sendable (String) -> Void = { _ in }) {
        self.context = context
        self.malformed = malformed
    }
}

/// The server name and ALPN protocols of a TLS ClientHello (RFC 8446 §4.1.2, RFC 6066 §3,
/// RFC 7301 §3.1), read with every length checked against what is there.
public struct ClientHello: Sendable, Equatable {
    /// The `host_name` of server_name, lower-cased; nil when absent or not a plain DNS name
    /// (such a hello is still well-formed: it goes to the normal TLS handler, which decides).
    public var serverName: String?
    /// The protocols offered, in the client's order; empty when absent.
    public var applicationProtocols: [String]

    public init(serverName: String? = nil, applicationProtocols: [String] = []) {
        self.serverName = serverName
        self.applicationProtocols = applicationProtocols
    }

    /// What the first bytes of a connection hold.
    public enum Parsed: Sendable, Equatable {
        /// Not a whole TLS record yet.
        case needMore
        case hello(ClientHello)
        /// A ClientHello longer than its first record (legal, rare): it is left to the TLS
        /// library, since no validation client sends one.
        case fragmented
        /// Not a ClientHello, or a length that does not fit: the connection is closed.
        case malformed(String)
    }

    /// The largest TLS record body (2^14 plaintext; a few more bytes are tolerated, as
    /// BoringSSL does for records with padding).
    public static let maximumRecordLength = 16_384 + 256

    static let serverNameExtension: UInt16 = 0
    static let alpnExtension: UInt16 = 16

    /// Parses the first record of a connection. Never traps: every read is bounds-checked
    /// by `ByteBuffer`, which answers nil past the end.
    public static func parse(_ input: ByteBuffer) -> Parsed {
        var buffer = input
        guard let contentType = buffer.readInteger(as: UInt8.self) else { return .needMore }
        // 22: handshake. Plain HTTP on the HTTPS port ("GET ...") ends here.
        guard contentType == 22 else { return .malformed("not a TLS handshake record (content type \(contentType))") }
        guard let major = buffer.readInteger(as: UInt8.self) else { return .needMore }
        guard major == 3 else { return .malformed("record version \(major).x") }
        guard buffer.readInteger(as: UInt8.self) != nil, let recordLength = buffer.readInteger(as: UInt16.self) else { return .needMore }
        guard recordLength > 0, Int(recordLength) <= maximumRecordLength else { return .malformed("record length \(recordLength)") }
        guard var record = buffer.readSlice(length: Int(recordLength)) else { return .needMore }

        guard let handshakeType = record.readInteger(as: UInt8.self) else { return .malformed("empty handshake record") }
        guard handshakeType == 1 else { return .malformed("first handshake message is type \(handshakeType), not client_hello") }
        guard let lengthBytes = record.readBytes(length: 3) else { return .malformed("truncated handshake header") }
        let messageLength = Int(lengthBytes[0]) << 16 | Int(lengthBytes[1]) << 8 | Int(lengthBytes[2])
        guard messageLength <= record.readableBytes else { return .fragmented }
        guard var body = record.readSlice(length: messageLength) else { return .malformed("truncated client_hello") }
        do {
            return .hello(try parseBody(&body))
        } catch {
            return .malformed(error.reason)
        }
    }

    struct Malformed: Error {
        var reason: String
        init(_ reason: String) { self.reason = reason }
    }

    /// The client_hello body: legacy_version, random, legacy_session_id, cipher_suites,
    /// legacy_compression_methods, then extensions (absent in old clients).
    private static func parseBody(_ body: inout ByteBuffer) throws(Malformed) -> ClientHello {
        guard body.readSlice(length: 2 + 32) != nil else { throw Malformed("truncated version and random") }
        let sessionID = try vector(&body, lengthBytes: 1, "legacy_session_id")
        guard sessionID.readableBytes <= 32 else { throw Malformed("session id of \(sessionID.readableBytes) bytes") }
        let suites = try vector(&body, lengthBytes: 2, "cipher_suites")
        guard suites.readableBytes >= 2, suites.readableBytes % 2 == 0 else { throw Malformed("cipher_suites of \(suites.readableBytes) bytes") }
        let compression = try vector(&body, lengthBytes: 1, "legacy_compression_methods")
        guard compression.readableBytes >= 1 else { throw Malformed("no compression method") }
        var hello = ClientHello()
        // No extensions at all: a TLS 1.2-era hello without SNI or ALPN.
        guard body.readableBytes > 0 else { return hello }
        var extensions = try vector(&body, lengthBytes: 2, "extensions")
        guard body.readableBytes == 0 else { throw Malformed("\(body.readableBytes) bytes after the extensions") }
        var seen = Set<UInt16>()
        while extensions.readableBytes > 0 {
            guard let type = extensions.readInteger(as: UInt16.self) else { throw Malformed("truncated extension type") }
            var data = try vector(&extensions, lengthBytes: 2, "extension \(type)")
            // RFC 8446 §4.2: one of each.
            guard seen.insert(type).inserted else { throw Malformed("extension \(type) twice") }
            switch type {
            case serverNameExtension:
                hello.serverName = try serverName(&data)
            case alpnExtension:
                hello.applicationProtocols = try protocols(&data)
            default:
                continue
            }
        }
        return hello
    }

    /// server_name (RFC 6066 §3): a list of (type, name); the first host_name (type 0) is
    /// taken. Lengths that do not fit are malformed; a name that is not a plain DNS name
    /// (RFC 6066: ASCII, no trailing dot) is none, since no validation is for it.
    private static func serverName(_ data: inout ByteBuffer) throws(Malformed) -> String? {
        // An empty extension is what a server sends back; from a client it names nothing.
        guard data.readableBytes > 0 else { return nil }
        var list = try vector(&data, lengthBytes: 2, "server_name_list")
        guard data.readableBytes == 0 else { throw Malformed("bytes after server_name_list") }
        var name: String?
        var seenHostName = false
        while list.readableBytes > 0 {
            guard let type = list.readInteger(as: UInt8.self) else { throw Malformed("truncated server name type") }
            let entry = try vector(&list, lengthBytes: 2, "server name")
            guard type == 0, !seenHostName else { continue }
            seenHostName = true
            let bytes = entry.readableBytesView
            guard !bytes.isEmpty, bytes.count <= 253,
                  bytes.allSatisfy({ $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "-") || ($0 >= 0x30 && $0 <= 0x39) || ($0 | 0x20 >= 0x61 && $0 | 0x20 <= 0x7A) }),
                  bytes.first != UInt8(ascii: "."), bytes.last != UInt8(ascii: ".") else { continue }
            name = String(decoding: bytes, as: UTF8.self).lowercased()
        }
        return name
    }

    /// application_layer_protocol_negotiation (RFC 7301 §3.1): a non-empty list of
    /// non-empty names. Names are kept as bytes decoded leniently; only exact matches count.
    private static func protocols(_ data: inout ByteBuffer) throws(Malformed) -> [String] {
        var list = try vector(&data, lengthBytes: 2, "protocol_name_list")
        guard data.readableBytes == 0, list.readableBytes >= 2 else { throw Malformed("bad protocol_name_list") }
        var names: [String] = []
        while list.readableBytes > 0 {
            let name = try vector(&list, lengthBytes: 1, "protocol name")
            guard name.readableBytes > 0 else { throw Malformed("empty protocol name") }
            names.append(String(decoding: name.readableBytesView, as: UTF8.self))
        }
        return names
    }

    /// A length-prefixed vector whose length must fit in what is left.
    private static func vector(_ buffer: inout ByteBuffer, lengthBytes: Int, _ what: String) throws(Malformed) -> ByteBuffer {
        let length: Int?
        switch lengthBytes {
        case 1: length = buffer.readInteger(as: UInt8.self).map(Int.init)
        default: length = buffer.readInteger(as: UInt16.self).map(Int.init)
        }
        guard let length else { throw Malformed("truncated \(what) length") }
        guard let slice = buffer.readSlice(length: length) else { throw Malformed("\(what) of \(length) bytes overruns its container") }
        return slice
    }
}

/// Reads a connection's first TLS record (the ClientHello) before any TLS handler exists,
/// then puts the TLS handler in its place: the validation context when the hello offers
/// `acme-tls/1` for a name with a pending challenge, else the listener's own (unchanged
/// handshake). The bytes read are handed on, so the TLS library sees the hello as sent.
final class ClientHelloSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private let normal: NIOSSLContext
    private let challenges: TLSALPNChallenges
    private let logger: Logger
    private var buffered: ByteBuffer?
    /// Set once the hello was refused: what still arrives is dropped, not handed to HTTP.
    private var closing = false

    init(normal: NIOSSLContext, challenges: TLSALPNChallenges, logger: Logger) {
        self.normal = normal
        self.challenges = challenges
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        var incoming = unwrapInboundIn(data)
        if buffered == nil {
            buffered = incoming
        } else {
            buffered?.writeBuffer(&incoming)
        }
        guard let bytes = buffered else { return }
        switch ClientHello.parse(bytes) {
        case .needMore:
            return
        case .fragmented:
            install(NIOSSLServerHandler(context: normal), validation: false, context: context)
        case .hello(let hello):
            if hello.applicationProtocols.contains(TLSALPNChallenges.protocolName), let name = hello.serverName,
               let validation = challenges.context(name) {
                logger.info("answering a TLS-ALPN-01 validation", metadata: ["server_name": "\(name)", "peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")"])
                install(NIOSSLServerHandler(context: validation), validation: true, context: context)
            } else {
                install(NIOSSLServerHandler(context: normal), validation: false, context: context)
            }
        case .malformed(let reason):
            closing = true
            buffered = nil
            challenges.malformed(reason)
            logger.info("closing an HTTPS connection: bad ClientHello", metadata: [
                "reason": "\(reason)", "peer": "\(context.remoteAddress.map { "\($0)" } ?? "?")",
            ])
            context.close(promise: nil)
        }
    }

    /// Puts `tls` after this handler, hands it the bytes read, and leaves (synchronously, so
    /// nothing more is read here).
    private func install(_ tls: NIOSSLServerHandler, validation: Bool, context: ChannelHandlerContext) {
        do {
            try context.pipeline.syncOperations.addHandler(tls, position: .after(self))
            if validation {
                try context.pipeline.syncOperations.addHandler(ValidationConnectionCloser(), position: .after(tls))
            }
        } catch {
            logger.error("cannot install TLS on an HTTPS connection", metadata: ["error": "\(error)"])
            closing = true
            buffered = nil
            context.close(promise: nil)
            return
        }
        if let bytes = buffered {
            buffered = nil
            context.fireChannelRead(wrapInboundOut(bytes))
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

/// After a validation handshake: nothing is served (RFC 8737 §3 lets the server close once
/// the handshake is done), and nothing reaches the HTTP handlers behind.
final class ValidationConnectionCloser: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .handshakeCompleted = event as? TLSUserEvent {
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }
}

@available(*, unavailable)
extension ClientHelloSniffer: Sendable {}

@available(*, unavailable)
extension ValidationConnectionCloser: Sendable {}

/// Hummingbird's TLS child channel with ``ClientHelloSniffer`` in front of the TLS handler,
/// so a TLS-ALPN-01 validation can be answered with its own certificate.
struct SniffingTLSChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value

    let base: Base
    let context: NIOSSLContext
    let challenges: TLSALPNChallenges
    let logger: Logger

    init(_ base: Base, tlsConfiguration: TLSConfiguration, challenges: TLSALPNChallenges, logger: Logger) throws {
        self.base = base
        self.context = try NIOSSLContext(configuration: tlsConfiguration)
        self.challenges = challenges
        self.logger = logger
    }

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(ClientHelloSniffer(normal: context, challenges: challenges, logger: self.logger))
        }.flatMap {
            base.setup(channel: channel, logger: logger)
        }
    }

    func handle(value: Base.Value, logger: Logger) async {
        await base.handle(value: value, logger: logger)
    }
}

extension SniffingTLSChannel: HTTPChannelHandler where Base: HTTPChannelHandler {
    var responder: HTTPChannelHandler.Responder { base.responder }
}
