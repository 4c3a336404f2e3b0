import Federation
import Trust
import XMPPCore

/// What the federation layer sees of the server: hosted domains, local delivery, bounces
/// and certificates. It keeps the layering one-way (Server uses Federation, never the
/// reverse).
final class FederationBridge: FederationHost {
    let context: ServerContext

    init(context: ServerContext) {
        self.context = context
    }

    /// Ours, for federation: hosted domains and their service domains (a peer may open a
    /// pair with `conference.customer.example`).
    func isHosted(_ domain: String) -> Bool {
        context.domains.isServed(domain)
    }

    func deliverInbound(_ stanza: Stanza) async {
        // The link checked that `to` is hosted, but the domain may have been removed since:
        // then the stanza gets an error and never goes back out over s2s (RFC 6120 §10.5:
        // a server does not relay for others).
        // Federation answers such a stanza on its link; this is the last line of defence.
        guard let to = try? stanza.to(), context.domains.isServed(to.domainpart) else {
            context.logger.warning("dropping a stanza from a peer for a domain not hosted here", metadata: ["to": "\(stanza.toString ?? "")"])
            return
        }
        await context.router.route(stanza)
    }

    func bounce(_ stanza: Stanza, with error: StanzaError) async {
        await context.router.bounce(stanza, with: error)
    }

    var tls: TLSContextStore { context.certificates.store }

    func prepareCertificate(for domain: String) async {
        await context.certificates.prepareCertificate(for: domain)
    }
}

/// The router's way out to other domains, through federation.
struct FederationRoute: RemoteRoute {
    let manager: FederationManager

    func send(_ stanza: Stanza, router: Router) async {
        await manager.send(stanza)
    }
}
