import Foundation
import NIOEmbedded
import Testing
import Trust
import XMPPCore
import XMPPStream
@testable import Federation

/// The per-stanza checks on a link (RFC 6120 §8.1.1.2, §8.1.2.2): a stanza from a peer is
/// routed only when its `to` is hosted here and its (to, from) domain pair is authorised
/// inbound on this link. No sockets: the link sits on an `EmbeddedChannel` that nothing
/// reads, and only its table of authorisations matters.
@Suite("Inbound stanza checks on a link")
struct InboundChecksTests {
    /// Hosts a fixed set of domains; never delivers anything.
    struct Host: FederationHost {
        var hosted: Set<String>
        let tls = TLSContextStore()
        func isHosted(_ domain: String) -> Bool { hosted.contains(domain) }
        func deliverInbound(_ stanza: Stanza) async {}
        func bounce(_ stanza: Stanza, with error: StanzaError) async {}
        func prepareCertificate(for domain: String) async {}
    }

    static let hosted = Host(hosted: ["a.example", "b.example"])
    /// The pair every test link carries unless it says otherwise.
    static let pair = DomainPair(local: "a.example", remote: "peer.example")

    /// What the check decided, comparable.
    enum Seen: Equatable, CustomStringConvertible {
        case accept(XMLElement)
        case refuse(XMLElement, StanzaError.Condition)
        case reset
        case reject(StreamError.Condition)

        init(_ verdict: InboundChecks.Verdict) {
            switch verdict {
            case .accept(let stanza): self = .accept(stanza.element)
            case .refuse(let stanza, let error): self = .refuse(stanza.element, error.condition)
            case .reset: self = .reset
            case .reject(let error, _): self = .reject(error.condition)
            }
        }

        var description: String {
            switch self {
            case .accept(let element): "accept <\(element.name)/>"
            case .refuse(_, let condition): "refuse with \(condition.rawValue)"
            case .reset: "reset"
            case .reject(let condition): "reject with <\(condition.rawValue)/>"
            }
        }
    }

    static func message(to: String? = "juliet@a.example/balcony", from: String? = "romeo@peer.example/orchard", kind: String = "message",
                        namespace: String = XMLNamespace.server) -> XMLElement {
        var attributes: [XMLAttribute] = []
        if let to { attributes.append(XMLAttribute("to", to)) }
        if let from { attributes.append(XMLAttribute("from", from)) }
        attributes.append(XMLAttribute("id", "m1"))
        return XMLElement(name: kind, namespace: namespace, attributes: attributes)
    }

    /// A link with `pair` authorised inbound (and whatever `prepare` adds).
    func link(authorizing pairs: [DomainPair] = [pair], _ prepare: (FederationLink) -> Void = { _ in }) -> FederationLink {
        let link = FederationLink(origin: .incoming, peerAddress: "test", channel: EmbeddedChannel())
        for pair in pairs {
            link.authorize(pair, .inbound, method: .dialback, expires: nil)
        }
        prepare(link)
        return link
    }

    func check(_ element: XMLElement, on link: FederationLink, host: Host = hosted) -> Seen {
        Seen(InboundChecks.check(element, link: link, host: host))
    }

    // MARK: Accepted

    @Test("A stanza for an authorised pair is accepted as it came, whatever its kind",
          arguments: ["message", "presence", "iq"], [XMLNamespace.server, XMLNamespace.client])
    func accepted(_ kind: String, _ namespace: String) {
        let element = Self.message(kind: kind, namespace: namespace)
        #expect(check(element, on: link()) == .accept(element))
    }

    /// Addresses are compared as prepared domains (RFC 7622): case does not matter, and bare
    /// domain JIDs (server to server) are fine.
    @Test("Addresses are compared by their prepared domainpart", arguments: [
        ("juliet@A.Example/balcony", "romeo@PEER.example"),
        ("a.example", "peer.example"),
        ("A.EXAMPLE", "romeo@peer.example/orchard"),
    ])
    func preparedDomains(_ to: String, _ from: String) {
        let element = Self.message(to: to, from: from)
        #expect(check(element, on: link()) == .accept(element))
    }

    @Test("A retiring link still takes what the peer sends until it closes")
    func retiring() {
        let link = link { #expect($0.beginRetiring()) }
        let element = Self.message()
        #expect(check(element, on: link) == .accept(element))
    }

    // MARK: Rejected: the link closes with a stream error

    struct Case: Sendable, CustomTestStringConvertible {
        var name: String
        var element: XMLElement
        var condition: StreamError.Condition
        var testDescription: String { "\(name) → <\(condition.rawValue)/>" }
        init(_ name: String, _ element: XMLElement, _ condition: StreamError.Condition) {
            self.name = name
            self.element = element
            self.condition = condition
        }
    }

    /// RFC 6120 §8.1.1.2: no `to`, or one that is not a JID, is improper-addressing; a `to`
    /// we do not serve is host-unknown. §8.1.2.2: no `from` is improper-addressing; a `from`
    /// whose domain is not authenticated on this stream is invalid-from. A hosted `to` whose
    /// pair with the `from` domain was never authorised (XEP-0220 §1.2: dialback authorises
    /// domain pairs) is host-unknown as well. Anything but a stanza is unsupported-stanza-type.
    @Test("Stanzas that break the rules close the link", arguments: [
        Case("no to", message(to: nil), .improperAddressing),
        Case("no from", message(from: nil), .improperAddressing),
        Case("neither to nor from", message(to: nil, from: nil), .improperAddressing),
        Case("malformed to", message(to: "juliet@@a.example"), .improperAddressing),
        Case("empty from", message(from: ""), .improperAddressing),
        Case("from a domain not authenticated here", message(from: "mallory@evil.example"), .invalidFrom),
        Case("to a domain not hosted here", message(to: "someone@c.example"), .hostUnknown),
        Case("to a hosted domain whose pair is not authorised", message(to: "bob@b.example"), .hostUnknown),
        Case("not a stanza", XMLElement(name: "frobnicate", namespace: "urn:example:unknown"), .unsupportedStanzaType),
        Case("a stanza name in a foreign namespace", message(namespace: "urn:example:unknown"), .unsupportedStanzaType),
        Case("an unknown element in the content namespace", message(kind: "note"), .unsupportedStanzaType),
    ])
    func rejected(_ row: Case) {
        #expect(check(row.element, on: link()) == .reject(row.condition))
    }

    /// RFC 6120 §4.3.5 and §4.9.3.12: no stanza may flow before the peer has authenticated
    /// a domain, so this comes before any address check.
    @Test("Before any inbound pair, every stanza is not-authorized", arguments: [
        Case("valid addresses", message(), .notAuthorized),
        Case("no to", message(to: nil), .notAuthorized),
        Case("from an unknown domain", message(from: "mallory@evil.example"), .notAuthorized),
    ])
    func beforeAuthentication(_ row: Case) {
        #expect(check(row.element, on: link(authorizing: [])) == .reject(row.condition))
        // An outbound authorisation lets us send; it proves nothing about the peer.
        let outboundOnly = link(authorizing: []) { $0.authorize(Self.pair, .outbound, method: .pkix, expires: nil) }
        #expect(check(row.element, on: outboundOnly) == .reject(row.condition))
    }

    @Test("Authorised only outbound for this pair, inbound for another: the pair is not authorised here")
    func directionMatters() {
        let link = link(authorizing: [DomainPair(local: "b.example", remote: "peer.example")]) {
            $0.authorize(Self.pair, .outbound, method: .pkix, expires: nil)
        }
        #expect(check(Self.message(), on: link) == .reject(.hostUnknown))
        let element = Self.message(to: "bob@b.example")
        #expect(check(element, on: link) == .accept(element))
    }

    @Test("An authorised pair whose local domain is no longer hosted (not yet withdrawn) is host-unknown")
    func unhostedButAuthorised() {
        #expect(check(Self.message(), on: link(), host: Host(hosted: ["b.example"])) == .reject(.hostUnknown))
    }

    // MARK: Lapsed and withdrawn pairs

    /// A proof with an expiry (certificate, DNS TTL, POSH) that has passed: the link is
    /// reset so every domain on it is proven again (RFC 6120 §4.9.3.16).
    @Test("A stanza for a pair whose proof lapsed resets the link", arguments: [false, true])
    func lapsed(_ withOtherValidPair: Bool) {
        let link = link(authorizing: withOtherValidPair ? [DomainPair(local: "b.example", remote: "peer.example")] : []) {
            $0.authorize(Self.pair, .inbound, method: .pkix, expires: Date.distantPast)
        }
        #expect(check(Self.message(), on: link) == .reset)
        if withOtherValidPair {
            let element = Self.message(to: "bob@b.example")
            #expect(check(element, on: link) == .accept(element))
        }
    }

    /// FederationManager.withdraw: stanzas in flight for a domain that stopped being hosted
    /// come back as remote-server-not-found stanza errors; the link stays up for the others.
    @Test("A stanza for a withdrawn pair is refused with a stanza error while other pairs keep flowing")
    func withdrawn() {
        let link = link(authorizing: [Self.pair, DomainPair(local: "b.example", remote: "peer.example")])
        #expect(link.withdraw(local: "a.example") == [Self.pair])
        let element = Self.message()
        #expect(check(element, on: link, host: Host(hosted: ["b.example"])) == .refuse(element, .remoteServerNotFound))
        let other = Self.message(to: "bob@b.example")
        #expect(check(other, on: link, host: Host(hosted: ["b.example"])) == .accept(other))
        // Hosted again but not re-authorised: the pair is simply not authorised.
        #expect(check(element, on: link) == .reject(.hostUnknown))
    }

    /// The same rule when the withdrawn domain's pairs were the only inbound ones on the
    /// link (the "nothing authenticated yet" guard used to run first and close the link with
    /// `<not-authorized/>`; found by this suite).
    @Test("A stanza for a withdrawn pair is refused even when it was the link's only inbound pair")
    func withdrawnOnlyPair() {
        let link = link()
        #expect(link.withdraw(local: "a.example") == [Self.pair])
        let element = Self.message()
        #expect(check(element, on: link, host: Host(hosted: ["b.example"])) == .refuse(element, .remoteServerNotFound))
    }
}
