import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Storage
import Synchronization
import XMPPCore
import XMPPStream

/// In-band registration (XEP-0077 §3.1) before authentication, on the domains the operator
/// opened (`registration.domains`; off by default, as in Prosody and ejabberd). A client asks
/// for the fields (username and password), then sends them; the account is created with the
/// same SCRAM keys `braid user add` makes, and the client logs in on the same stream.
///
/// Every attempt counts against its address (`registration.attempts_per_address_per_hour`),
/// successful or not: registration is the one place where a client learns whether a name is
/// taken (`conflict`, which the XEP requires), so probing names is rate limited with it.
enum InBandRegistration {
    static let namespace = "jabber:iq:register"

    /// The answer to `iq` (a get or set of the register query) from a client at `address`
    /// that opened a stream to `domain`.
    static func answer(_ iq: XMLElement, domain: String, address: String?, server: ServerContext) async -> XMLElement {
        let id = iq.attribute("id") ?? ""
        func result(_ payload: XMLElement?) -> XMLElement {
            XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "result"), XMLAttribute("id", id)],
                       children: payload.map { [.element($0)] } ?? [])
        }
        func refusal(_ error: StanzaError) -> XMLElement {
            // The request is not echoed: it holds the password.
            XMLElement(name: "iq", namespace: XMLNamespace.client, attributes: [XMLAttribute("type", "error"), XMLAttribute("id", id)],
                       children: [.element(error.element())])
        }
        guard let query = iq.firstChild(name: "query", namespace: namespace) else { return refusal(StanzaError(.badRequest)) }
        let settings = server.configuration.registration
        if iq.attribute("type") == "get" {
            // §3.1: the fields to fill in.
            return result(XMLElement(name: "query", namespace: namespace, children: [
                .element(XMLElement(name: "instructions", namespace: namespace,
                                    text: "Choose a username and a password of at least \(settings.minPasswordLength) characters for an account on \(domain).")),
                .element(XMLElement(name: "username", namespace: namespace)),
                .element(XMLElement(name: "password", namespace: namespace)),
            ]))
        }
        guard server.registrationThrottle.attempt(from: address, limit: settings.attemptsPerAddressPerHour) else {
            server.metrics.registrations("rate-limited")
            server.logger.notice("in-band registration refused: too many attempts from this address", metadata: ["domain": "\(domain)", "address": "\(address ?? "?")"])
            return refusal(StanzaError(.resourceConstraint, type: .wait, text: "too many registrations from this address; try again later"))
        }
        if query.firstChild(name: "remove", namespace: namespace) != nil || query.firstChild(name: "x", namespace: "jabber:x:data") != nil {
            // Removing an account needs one to be logged in; no form is asked for.
            server.metrics.registrations("refused")
            return refusal(StanzaError(.badRequest, text: "send <username/> and <password/>"))
        }
        guard let username = query.firstChild(name: "username", namespace: namespace)?.text, !username.isEmpty,
              let password = query.firstChild(name: "password", namespace: namespace)?.text else {
            server.metrics.registrations("refused")
            return refusal(StanzaError(.notAcceptable, text: "a username and a password are required"))
        }
        // The username is a localpart (RFC 7622 §3.3: UsernameCaseMapped), never a JID.
        guard !username.contains("@"), let account = try? JID(localpart: username, domainpart: domain, resourcepart: String?.none) else {
            server.metrics.registrations("refused")
            return refusal(StanzaError(.notAcceptable, text: "the username is not a valid localpart"))
        }
        guard password.count >= settings.minPasswordLength else {
            server.metrics.registrations("refused")
            return refusal(StanzaError(.notAcceptable, text: "the password needs at least \(settings.minPasswordLength) characters"))
        }
        let credentials: StoredCredentials
        do {
            credentials = try PasswordChangeModule.credentials(password: password, iterations: server.configuration.auth.scramIterations)
        } catch {
            server.metrics.registrations("refused")
            return refusal(StanzaError(.notAcceptable, text: "the password cannot be used (RFC 8265 OpaqueString)"))
        }
        do {
            try await server.storage.createUser(account, credentials: credentials)
        } catch StorageError.userExists {
            server.metrics.registrations("conflict")
            return refusal(StanzaError(.conflict, text: "that username is taken"))
        } catch {
            server.metrics.registrations("failed")
            server.logger.error("in-band registration failed", metadata: ["account": "\(account)", "error": "\(error)"])
            return refusal(StanzaError(.internalServerError))
        }
        server.metrics.registrations("created")
        server.logger.info("account registered in-band", metadata: ["account": "\(account)", "address": "\(address ?? "?")"])
        return result(nil)
    }
}

/// Registration attempts per client address in the last hour. Bounded: addresses whose
/// attempts are all older than an hour are forgotten when the table grows.
final class RegistrationThrottle: Sendable {
    private let attempts = Mutex<[String: [ContinuousClock.Instant]]>([:])

    /// Records an attempt from `address`; false when it already made `limit` this hour.
    func attempt(from address: String?, limit: Int, now: ContinuousClock.Instant = .now) -> Bool {
        let key = Self.key(address)
        let hourAgo = now - .seconds(3600)
        return attempts.withLock { table in
            var recent = (table[key] ?? []).filter { $0 > hourAgo }
            guard recent.count < limit else {
                table[key] = recent
                return false
            }
            recent.append(now)
            table[key] = recent
            if table.count > 100_000 {
                table = table.filter { $0.value.contains { $0 > hourAgo } }
            }
            return true
        }
    }

    /// IPv4 by address; IPv6 by its /64 (one host usually holds a whole /64).
    static func key(_ address: String?) -> String {
        guard let address else { return "unknown" }
        guard address.contains(":") else { return address }
        var parsed = in6_addr()
        guard inet_pton(AF_INET6, address, &parsed) == 1 else { return address }
        let bytes = withUnsafeBytes(of: &parsed) { Array($0.prefix(8)) }
        return bytes.map { String(format: "%02x", $0) }.joined() + "/64"
    }
}
