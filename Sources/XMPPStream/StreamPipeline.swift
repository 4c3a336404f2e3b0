import NIOCore

/// The one way every stream's channel pipeline is built (c2s, s2s in and out, dialback
/// verification), so that each kind gets the same layers in the same order:
///
///     [TLS] → XMLStreamDecoder → XMLStreamEncoder → the stream's handler
///
/// TLS is there from the start for direct TLS (XEP-0368); STARTTLS puts it in front later
/// (``startTLS(_:on:)``), after the decoder was restarted so that nothing sent in the clear
/// after `<starttls/>` is read as part of the encrypted stream (RFC 6120 §5.4.3.3).
public enum StreamPipeline {
    /// Installs the layers on a new channel. Runs on the channel's event loop.
    public static func install(on channel: any Channel, directTLS: (any ChannelHandler)?, decoder: XMLStreamDecoder,
                               contentNamespace: String, handler: any ChannelHandler) throws {
        let pipeline = channel.pipeline.syncOperations
        if let directTLS { try pipeline.addHandler(directTLS) }
        try pipeline.addHandler(decoder)
        try pipeline.addHandler(XMLStreamEncoder(contentNamespace: contentNamespace))
        try pipeline.addHandler(handler)
    }

    /// Puts TLS in front of the stream layers (STARTTLS, RFC 6120 §5.4.3.3). Runs on the
    /// channel's event loop.
    public static func startTLS(_ tls: any ChannelHandler, on channel: any Channel) throws {
        try channel.pipeline.syncOperations.addHandler(tls, position: .first)
    }
}

/// A listener could not be opened: which one, where, and why (a port held by another
/// server, an address not on this machine), for the operator, instead of a bare errno.
public struct ListenerBindFailure: Error, CustomStringConvertible, Sendable {
    public var listener: String
    public var address: String
    public var reason: String

    public init(listener: String, host: String, port: Int, underlying: any Error) {
        self.listener = listener
        address = "\(host):\(port)"
        reason = "\(underlying)"
    }

    public var description: String {
        "cannot listen on \(address) for \(listener): \(reason)"
    }
}
