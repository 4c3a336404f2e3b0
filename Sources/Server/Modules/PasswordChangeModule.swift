import Storage
import XMPPCore
import XMPPStream

/// XEP-0077 `jabber:iq:register`, for accounts that exist: a logged-in user changes its
/// password (§3.3). Accounts are made by the operator (`braid user add`), or, on the domains
/// listed in `registration.domains`, by anyone before logging in (`InBandRegistration`, in
/// the client stream's negotiation); elsewhere no `iq-register` stream feature is offered and
/// a stream that has not authenticated may send no stanza at all (RFC 6120 §6.4.1:
/// `not-authorized`). A logged-in user's attempt to register any other account is refused. Removing an account in-band (§3.2) is
/// refused too (see ``changePassword(_:account:server:)``).
///
/// Clients send the request with no `to` (slixmpp) or to their domain (Conversations, Gajim),
/// so the namespace is answered at both.
struct PasswordChangeModule: BraidModule {
    static let namespace = "jabber:iq:register"

    var name: String { "register" }

    func register(in builder: inout ModuleBuilder) {
        // Clients look for it before they offer a password change (Conversations does).
        builder.serverFeature(Self.namespace)
        builder.onAccountIQ(Self.namespace) { request in
            // From the account's own client only; to anyone else's bare JID this is
            // registration with a user, which nobody offers.
            guard request.session != nil, request.requester.bare == request.target else {
                return .error(StanzaError(.serviceUnavailable))
            }
            return await Self.answer(request, account: request.target, server: request.router.server)
        }
        builder.onServerIQ(Self.namespace) { request in
            // To a hosted domain: only from a client bound here, on that domain. Anyone else
            // (another hosted domain's user, a peer server's) would be registering a new
            // account: §3.1, a host without in-band registration answers service-unavailable.
            let requester = request.requester
            guard requester.localpart != nil, requester.domainpart == request.target.domainpart,
                  request.router.server.sessions.entry(for: requester) != nil else {
                return .error(StanzaError(.serviceUnavailable))
            }
            return await Self.answer(request, account: requester.bare, server: request.router.server)
        }
    }

    /// A request from `account`'s own logged-in client.
    static func answer(_ request: IQRequest, account: JID, server: ServerContext) async -> IQResponse {
        let query = request.payload
        guard query.name == "query" else { return .error(StanzaError(.badRequest)) }
        switch request.iq.type {
        case .get:
            // §3.1: a registered entity gets <registered/> and what is on file; never the
            // password.
            return .result(XMLElement(name: "query", namespace: namespace, children: [
                .element(XMLElement(name: "registered", namespace: namespace)),
                .element(XMLElement(name: "username", namespace: namespace, text: account.localpart ?? "")),
                .element(XMLElement(name: "password", namespace: namespace)),
            ]))
        case .set:
            do throws(StanzaError) {
                try await changePassword(query, account: account, server: server)
                return .result(nil)
            } catch {
                return .error(error)
            }
        case .result, .error, nil:
            return .error(StanzaError(.badRequest))
        }
    }

    /// §3.3. Errors never echo the request, which holds the password (the router's error
    /// replies carry no payload).
    static func changePassword(_ query: XMLElement, account: JID, server: ServerContext) async throws(StanzaError) {
        if query.firstChild(name: "remove", namespace: namespace) != nil {
            // §3.2: bad-request when <remove/> is not alone. Otherwise not-allowed: removing
            // an account means ending its sessions and cancelling its subscriptions in a set
            // order, which is core work no module can do yet; the operator removes accounts.
            throw StanzaError(Array(query.elements).count == 1 ? .notAllowed : .badRequest)
        }
        if query.firstChild(name: "x", namespace: "jabber:x:data") != nil {
            // §4: a form is what this server would have asked for; it asks for none.
            throw StanzaError(.badRequest, text: "send <username/> and <password/>")
        }
        guard let username = query.firstChild(name: "username", namespace: namespace)?.text,
              let password = query.firstChild(name: "password", namespace: namespace)?.text else {
            throw StanzaError(.badRequest, text: "a password change needs <username/> and <password/>")
        }
        guard names(account, username: username) else {
            // Another account's name: that is registering (or taking over) an account.
            throw StanzaError(.notAllowed, text: "accounts are not registered in-band here")
        }
        // §3.3: an empty password never replaces the existing one.
        guard !password.isEmpty else { throw StanzaError(.badRequest, text: "the new password is empty") }
        let credentials: StoredCredentials
        do {
            credentials = try Self.credentials(password: password, iterations: server.configuration.auth.scramIterations)
        } catch {
            // OpaqueString refuses it (RFC 8265 §4.2: control characters, say); no login
            // could ever match it.
            throw StanzaError(.notAcceptable, text: "the new password cannot be used (RFC 8265 OpaqueString)")
        }
        do {
            try await server.storage.setCredentials(account, credentials: credentials)
        } catch {
            server.logger.error("password change failed", metadata: ["account": "\(account)", "error": "\(error)"])
            throw StanzaError(.internalServerError)
        }
        server.logger.info("password changed in-band", metadata: ["account": "\(account)"])
    }

    /// Whether `username` names `account`: its localpart (§3.3), or its bare JID, as the
    /// form examples of §3.2 and §3.3 write it; compared in the canonical form.
    static func names(_ account: JID, username: String) -> Bool {
        let given = username.contains("@")
            ? try? JID(username)
            : try? JID(localpart: username, domainpart: account.domainpart, resourcepart: nil as String?)
        guard let given, given.resourcepart == nil else { return false }
        return given == account.bare
    }

    /// New SCRAM keys for SHA-1 and SHA-256, as `braid user add|passwd` makes them: the
    /// password prepared with OpaqueString, a fresh salt for each.
    static func credentials(password: String, iterations: Int) throws(SCRAMKeyDerivationError) -> StoredCredentials {
        func stored(_ keys: SCRAMServerKeys) -> ScramCredentials {
            ScramCredentials(salt: keys.salt, iterations: keys.iterations, storedKey: keys.storedKey, serverKey: keys.serverKey)
        }
        return StoredCredentials(
            sha1: stored(try SCRAMKeyDerivation.newKeys(password: password, iterations: iterations, hash: .sha1)),
            sha256: stored(try SCRAMKeyDerivation.newKeys(password: password, iterations: iterations, hash: .sha256)))
    }
}
