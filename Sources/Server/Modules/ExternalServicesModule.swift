import Crypto
import Foundation
import XMPPCore

/// External service discovery (XEP-0215, `urn:xmpp:extdisco:2`): the STUN and TURN servers a
/// client uses for calls (Conversations, Dino, Monal ask for them), from the configuration.
/// TURN needs credentials: each is a username `EXPIRY:JID` and a password
/// `base64(HMAC-SHA1(secret, username))`, the time-limited scheme coturn checks with its
/// `static-auth-secret`, so the TURN server needs no account database.
struct ExternalServicesModule: BraidModule {
    static let namespace = "urn:xmpp:extdisco:2"

    let settings: BraidConfiguration.ExternalServices
    /// Seconds since 1970, injectable for tests.
    var now: @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970) }

    var name: String { "extdisco" }

    func register(in builder: inout ModuleBuilder) {
        guard !settings.services.isEmpty else { return }
        builder.serverFeature(Self.namespace)
        let module = self
        builder.onServerIQ(Self.namespace) { request in module.handle(request) }
    }

    private func handle(_ request: IQRequest) -> IQResponse {
        // Only the server's own users get the list, and credentials (§3.1: the server may
        // restrict it; TURN relays cost bandwidth).
        guard request.iq.type == .get, request.requester.localpart != nil, request.requester.domainpart == request.target.domainpart else {
            return .error(StanzaError(.forbidden))
        }
        let type = request.payload.attribute("type")
        switch request.payload.name {
        case "services":
            let chosen = settings.services.filter { type == nil || $0.type == type }
            return .result(XMLElement(name: "services", namespace: Self.namespace, attributes: type.map { [XMLAttribute("type", $0)] } ?? [],
                                      children: chosen.map { .element(element($0, for: request.requester)) }))
        case "credentials":
            // §3.3: credentials for one service, named by host and type.
            guard let wanted = request.payload.firstChild(name: "service", namespace: Self.namespace),
                  let service = settings.services.first(where: { $0.host == wanted.attribute("host") && (wanted.attribute("type") == nil || $0.type == wanted.attribute("type")) }) else {
                return .error(StanzaError(.itemNotFound))
            }
            return .result(XMLElement(name: "credentials", namespace: Self.namespace, children: [.element(element(service, for: request.requester))]))
        default:
            return .error(StanzaError(.badRequest))
        }
    }

    private func element(_ service: BraidConfiguration.ExternalServices.Service, for requester: JID) -> XMLElement {
        var attributes = [XMLAttribute("type", service.type), XMLAttribute("host", service.host)]
        if let port = service.port { attributes.append(XMLAttribute("port", String(port))) }
        if let transport = service.transport { attributes.append(XMLAttribute("transport", transport)) }
        let restricted = service.restricted ?? (service.type == "turn" || service.type == "turns")
        if restricted, !settings.secret.isEmpty {
            let expiry = now() + Int64(settings.credentialSeconds)
            let (username, password) = Self.credentials(secret: settings.secret, expiry: expiry, user: requester.bare.description)
            attributes += [XMLAttribute("restricted", "1"), XMLAttribute("username", username), XMLAttribute("password", password),
                           XMLAttribute("expires", MessageService.timestamp(millisecondsSince1970: expiry * 1000))]
        } else if restricted {
            attributes.append(XMLAttribute("restricted", "1"))
        }
        return XMLElement(name: "service", namespace: Self.namespace, attributes: attributes)
    }

    /// coturn's REST API credentials: `EXPIRY:USER` and its HMAC-SHA1 under the secret.
    static func credentials(secret: String, expiry: Int64, user: String) -> (username: String, password: String) {
        let username = "\(expiry):\(user)"
        let mac = HMAC<Insecure.SHA1>.authenticationCode(for: Data(username.utf8), using: SymmetricKey(data: Data(secret.utf8)))
        return (username, Data(mac).base64EncodedString())
    }
}
