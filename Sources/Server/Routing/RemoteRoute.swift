import XMPPCore

/// Where stanzas for domains Braid does not host go. Federation implements it; until then
/// ``NoFederation`` answers every such stanza with `remote-server-not-found`.
public protocol RemoteRoute: Sendable {
    /// Sends `stanza` (whose `from` is authenticated and `to` is a remote domain). Failures
    /// come back to the sender as stanza errors through ``Router/route(_:)``.
    func send(_ stanza: Stanza, router: Router) async
}

/// The remote route of a server without federation: every remote stanza bounces.
public struct NoFederation: RemoteRoute {
    public init() {}

    public func send(_ stanza: Stanza, router: Router) async {
        await router.bounce(stanza, with: StanzaError(.remoteServerNotFound, text: "federation is not enabled on this server"))
    }
}
