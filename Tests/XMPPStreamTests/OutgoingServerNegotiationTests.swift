import Testing
import XMPPCore
@testable import XMPPStream

/// What the initiating side learns from the peer's stream features: whether the peer will
/// answer `db:result` for further pairs is a question of the features after TLS, not of the
/// header's namespace declaration (issue 9: ejabberd without `mod_s2s_dialback`).
@Suite("Outgoing s2s negotiation: the peer's dialback support")
struct OutgoingServerNegotiationTests {
    static let header = StreamHeader(from: "peer.example", id: "s1", contentNamespace: XMLNamespace.server,
                                     prefixes: ["db": XMLNamespace.dialback])

    func features(_ children: [XMLElement]) -> XMLElement {
        XMLElement(name: "features", namespace: XMLNamespace.streams, children: children.map { .element($0) })
    }

    static let external = XMLElement(name: "mechanisms", namespace: XMLNamespace.sasl, children: [
        .element(XMLElement(name: "mechanism", namespace: XMLNamespace.sasl, text: "EXTERNAL")),
    ])

    /// Runs the negotiation to the secured features, SASL EXTERNAL, and the features after
    /// it; returns the capabilities at establishment.
    func negotiate(secured: [XMLElement], authenticated: [XMLElement]) -> OutgoingServerNegotiation.PeerCapabilities? {
        var negotiation = OutgoingServerNegotiation(configuration: .init(localDomain: "us.example", remoteDomain: "peer.example", useExternal: true))
        _ = negotiation.start(directTLS: true)
        _ = negotiation.headerReceived(Self.header)
        _ = negotiation.elementReceived(features(secured + [Self.external]))
        _ = negotiation.elementReceived(XMLElement(name: "success", namespace: XMLNamespace.sasl))
        _ = negotiation.headerReceived(Self.header)
        guard case .established(let capabilities) = negotiation.elementReceived(features(authenticated)) else { return nil }
        return capabilities
    }

    @Test("A header that declares the dialback namespace, but no dialback feature: no requests on the link")
    func headerOnly() throws {
        let capabilities = try #require(negotiate(secured: [], authenticated: []))
        #expect(capabilities.dialback)
        #expect(!capabilities.dialbackFeature)
        #expect(!capabilities.dialbackErrors)
    }

    @Test("Dialback offered after TLS, without errors (Prosody 0.12): requests allowed, targets not")
    func dialbackWithoutErrors() throws {
        let capabilities = try #require(negotiate(secured: [XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature)], authenticated: []))
        #expect(capabilities.dialbackFeature)
        #expect(!capabilities.dialbackErrors)
    }

    @Test("Dialback with errors offered after SASL (Braid, ejabberd)")
    func dialbackWithErrors() throws {
        let offered = XMLElement(name: "dialback", namespace: XMLNamespace.dialbackFeature, children: [
            .element(XMLElement(name: "errors", namespace: XMLNamespace.dialbackFeature)),
        ])
        let capabilities = try #require(negotiate(secured: [], authenticated: [offered]))
        #expect(capabilities.dialbackFeature)
        #expect(capabilities.dialbackErrors)
    }
}
