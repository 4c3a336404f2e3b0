import Admin
import Foundation
import Logging
import Synchronization
import XMPPCore

/// HTTP file upload (XEP-0363) at `upload.DOMAIN` for every hosted domain (`services.upload`):
/// the domain's accounts ask the service for a slot over XMPP, then PUT the file to the HTTPS
/// listener and share its GET URL. Files are kept in a directory (`UploadStore`); the slot
/// rules, quotas and signatures are `UploadService`'s; the HTTP side is `UploadHTTP`'s.
struct UploadModule: BraidModule {
    static let namespace = "urn:xmpp:http:upload:0"
    static let label = "upload"

    let settings: BraidConfiguration.UploadSettings
    let service: UploadService
    private let cleanup = CleanupTask()

    init(configuration: BraidConfiguration, now: @escaping @Sendable () -> Date = { Date() }) {
        settings = configuration.upload
        let directory = configuration.upload.directory.isEmpty ? configuration.dataDirectory + "/uploads" : configuration.upload.directory
        service = UploadService(settings: configuration.upload, directory: directory, now: now)
    }

    var name: String { "upload" }

    func register(in builder: inout ModuleBuilder) {
        let module = self
        // XEP-0363 §3: the size limit as a XEP-0128 form in the service's disco#info, which
        // the router answers from the registration.
        builder.service(ServiceRegistration(label: Self.label, category: "store", type: "file", displayName: "HTTP file upload",
                                            features: [Self.namespace], extendedInfo: [sizeForm()]) { stanza in
            await module.handle(stanza)
        })
        builder.onHTTP { router, server in
            UploadHTTP(service: module.service, server: server).install(on: router)
            module.startCleanup(server: server)
        }
        builder.onShutdown { _ in
            module.cleanup.replace(with: nil)
        }
    }

    // MARK: XMPP

    /// The size limit as a XEP-0128 form (XEP-0363 §3), for the service's `disco#info`.
    func sizeForm() -> XMLElement {
        let dataForms = "jabber:x:data"
        func field(_ name: String, _ value: String, hidden: Bool = false) -> XMLNode {
            .element(XMLElement(name: "field", namespace: dataForms, attributes: [XMLAttribute("var", name)] + (hidden ? [XMLAttribute("type", "hidden")] : []),
                                children: [.element(XMLElement(name: "value", namespace: dataForms, text: value))]))
        }
        var fields = [field("FORM_TYPE", Self.namespace, hidden: true)]
        if settings.maxFileSize > 0 { fields.append(field("max-file-size", String(settings.maxFileSize))) }
        return XMLElement(name: "x", namespace: dataForms, attributes: [XMLAttribute("type", "result")], children: fields)
    }

    private func handle(_ service: ServiceStanza) async {
        guard let iq = IQ(service.stanza), iq.type?.isRequest == true else { return }
        guard service.to.localpart == nil, service.to.resourcepart == nil, let payload = iq.payload else {
            await service.bounce(with: StanzaError(.serviceUnavailable))
            return
        }
        switch (iq.type, payload.namespace, payload.name) {
        case (.get, "http://jabber.org/protocol/disco#items", "query") where payload.attribute("node") == nil:
            await service.send(iq.result(payload: XMLElement(name: "query", namespace: payload.namespace)).stanza)
        case (_, Self.namespace, "request"):
            await requestSlot(iq, payload: payload, service: service)
        default:
            await service.bounce(with: StanzaError(.featureNotImplemented))
        }
    }

    private func requestSlot(_ iq: IQ, payload: XMLElement, service: ServiceStanza) async {
        let server = service.router.server
        let from = try? service.stanza.from()
        let outcome: Result<XMLElement, SlotRefusal>
        var account = from?.bare.description ?? "?"
        if iq.type != .get {
            outcome = .failure(.badRequest("a slot is requested with type get"))
        } else if let from, from.localpart != nil, from.domainpart == service.parent, server.domains.isHosted(service.parent) {
            // §4: the service decides who may upload; here, the accounts of its own domain.
            account = from.bare.description
            do {
                let request = try SlotRequest(payload)
                outcome = await grant(request, account: account, service: service)
            } catch {
                outcome = .failure(.badRequest(error.reason))
            }
        } else {
            outcome = .failure(.notAllowed)
        }
        switch outcome {
        case .success(let slot):
            server.metrics.uploadSlot("granted")
            await service.send(iq.result(payload: slot).stanza)
        case .failure(let refusal):
            server.metrics.uploadSlot(refusal.metricOutcome)
            server.logger.info("upload slot refused", metadata: [
                "account": "\(account)", "service": "\(service.to)", "reason": "\(refusal)",
                "filename": "\(payload.attribute("filename") ?? "")", "size": "\(payload.attribute("size") ?? "")",
            ])
            let (error, extra) = Self.errorElements(refusal)
            await service.router.bounce(service.stanza, with: error, extra: extra)
        }
    }

    /// A slot for a checked request: its URLs, or why not.
    private func grant(_ request: SlotRequest, account: String, service: ServiceStanza) async -> Result<XMLElement, SlotRefusal> {
        let server = service.router.server
        guard let base = baseURL(service: service.to.domainpart, admin: server.configuration.admin, boundPort: server.boundHTTPSPort) else {
            server.logger.warning("upload slot refused: no HTTPS listener (admin.posh_port) and no upload.base_url")
            return .failure(.unavailable)
        }
        let signer: UploadSigner
        do {
            signer = try await self.service.prepare()
        } catch {
            server.logger.error("upload store unavailable", metadata: ["error": "\(error)"])
            return .failure(.unavailable)
        }
        return self.service.requestSlot(request, account: account, domain: service.parent).map { record in
            let put = base + UploadHTTP.path(for: record, signature: signer.signature(.put, for: record))
            let get = base + UploadHTTP.path(for: record, signature: signer.signature(.get, for: record))
            return XMLElement(name: "slot", namespace: Self.namespace, children: [
                .element(XMLElement(name: "put", namespace: Self.namespace, attributes: [XMLAttribute("url", put)])),
                .element(XMLElement(name: "get", namespace: Self.namespace, attributes: [XMLAttribute("url", get)])),
            ])
        }
    }

    /// Where URLs point: `upload.base_url`, else `https://` + the provider host name (or the
    /// service domain) + the HTTPS listener's port unless 443. Nil without a listener. With
    /// `posh_port: 0` the port is the one the listener was given (`boundPort`).
    func baseURL(service domain: String, admin: AdminConfiguration, boundPort: Int? = nil) -> String? {
        let configured = settings.baseURL.trimmingCharacters(in: .whitespaces)
        if !configured.isEmpty { return configured.hasSuffix("/") ? String(configured.dropLast()) : configured }
        guard let configuredPort = admin.poshPort else { return nil }
        guard let port = configuredPort > 0 ? configuredPort : boundPort, port > 0 else { return nil }
        let host = admin.poshHostName.flatMap { $0.isEmpty ? nil : $0 } ?? domain
        return "https://\(host)" + (port == 443 ? "" : ":\(port)")
    }

    /// The error and the XEP-0363 element that goes with it (§4).
    static func errorElements(_ refusal: SlotRefusal) -> (StanzaError, XMLElement?) {
        switch refusal {
        case .notAllowed:
            return (StanzaError(.notAllowed, text: "Only accounts of this domain may upload files"), nil)
        case .badRequest(let reason):
            return (StanzaError(.badRequest, text: reason), nil)
        case .fileTooLarge(let max):
            return (StanzaError(.notAcceptable, type: .modify, text: "File too large, the maximum is \(max) bytes"),
                    XMLElement(name: "file-too-large", namespace: namespace, children: [.element(XMLElement(name: "max-file-size", namespace: namespace, text: String(max)))]))
        case .quota(let reason, let retry):
            return (StanzaError(.resourceConstraint, type: .wait, text: "Quota reached: \(reason)"), retry.map(retryElement))
        case .rateLimited(let retry):
            return (StanzaError(.resourceConstraint, type: .wait, text: "Too many upload requests, wait a moment"), retryElement(retry))
        case .unavailable:
            return (StanzaError(.serviceUnavailable), nil)
        }
    }

    private static func retryElement(_ date: Date) -> XMLElement {
        XMLElement(name: "retry", namespace: namespace, attributes: [
            XMLAttribute("stamp", MessageService.timestamp(millisecondsSince1970: Int64(date.timeIntervalSince1970.rounded(.up)) * 1000)),
        ])
    }

    // MARK: Cleanup

    /// Started when the HTTPS listener starts (the only start-up hook with the server at
    /// hand); cancelled at shutdown.
    private func startCleanup(server: ServerContext) {
        let service = self.service
        let interval = max(0.05, settings.cleanupIntervalSeconds)
        let task = Task {
            while !Task.isCancelled {
                await Self.sweep(service, server: server)
                try? await Task.sleep(for: .seconds(interval))
            }
        }
        cleanup.replace(with: task)
    }

    static func sweep(_ service: UploadService, server: ServerContext) async {
        guard (try? await service.prepare()) != nil else { return }
        let storage = server.storage
        let hosted = try? Set(await storage.domains().map(\.name))
        let removed = await service.sweep(hostedDomains: hosted) { account in
            guard let jid = try? JID(account) else { return nil }
            return try? await storage.userExists(jid)
        }
        server.metrics.uploadRemoved("expired", count: removed.expired)
        server.metrics.uploadRemoved("account", count: removed.account)
        server.metrics.uploadRemoved("domain", count: removed.domain)
        if removed != UploadService.Removed() {
            server.logger.info("upload cleanup", metadata: ["expired": "\(removed.expired)", "account": "\(removed.account)", "domain": "\(removed.domain)"])
        }
    }
}

/// The module's periodic cleanup, replaced or cancelled as one step.
private final class CleanupTask: Sendable {
    private let task = Mutex<Task<Void, Never>?>(nil)

    func replace(with new: Task<Void, Never>?) {
        task.withLock { current in
            current?.cancel()
            current = new
        }
    }
}
