/// Namespace names used across Braid.
public enum XMLNamespace {
    /// The namespace bound to the `xml` prefix (`xml:lang`); it is never declared.
    public static let xml = "http://www.w3.org/XML/1998/namespace"
    /// The namespace of namespace declarations themselves.
    public static let xmlns = "http://www.w3.org/2000/xmlns/"

    /// RFC 6120 §4.8.1: the stream element and its children `features` and `error`.
    public static let streams = "http://etherx.jabber.org/streams"
    /// Content namespace of client-to-server streams (RFC 6120 §4.8.3).
    public static let client = "jabber:client"
    /// Content namespace of server-to-server streams (RFC 6120 §4.8.3).
    public static let server = "jabber:server"
    /// XEP-0220 dialback, declared on s2s stream headers with the `db` prefix.
    public static let dialback = "jabber:server:dialback"
    /// XEP-0220 §2.4.1 stream feature announcing dialback (with `<errors/>` support).
    public static let dialbackFeature = "urn:xmpp:features:dialback"

    public static let streamErrors = "urn:ietf:params:xml:ns:xmpp-streams"
    public static let stanzaErrors = "urn:ietf:params:xml:ns:xmpp-stanzas"
    public static let tls = "urn:ietf:params:xml:ns:xmpp-tls"
    public static let sasl = "urn:ietf:params:xml:ns:xmpp-sasl"
    public static let bind = "urn:ietf:params:xml:ns:xmpp-bind"
    public static let session = "urn:ietf:params:xml:ns:xmpp-session"

    /// XEP-0288 bidirectional s2s: the stream feature and the request element.
    public static let bidiFeature = "urn:xmpp:features:bidi"
    public static let bidi = "urn:xmpp:bidi"
    /// Braid's own stream feature, offered beside bidi: "on the links I open to you, I answer
    /// your `<db:result/>` requests" (which XEP-0288 §2.2 requires but Prosody 0.12 does not
    /// do). Unknown features are ignored by other servers.
    public static let bidiRequestsFeature = "urn:braid:features:bidi-requests:0"
    /// XEP-0198 stream management.
    public static let streamManagement = "urn:xmpp:sm:3"
    /// XEP-0352 client state indication.
    public static let clientState = "urn:xmpp:csi:0"

    /// True for the two namespaces stanzas live in. RFC 6120 §4.8.3 re-scopes stanzas
    /// between them when a server forwards from a client stream to a server stream.
    @inlinable
    public static func isContent(_ namespace: String) -> Bool {
        namespace == client || namespace == server
    }
}
