import DNS
import Federation
import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import Trust
import X509
import XMPPCore

// The checks of one name. Each returns typed results; nothing here prints or exits.

extension ServerCheck {
    /// Everything `braid check` says about one name.
    public func check(_ name: CheckedName) async -> DomainCheckReport {
        var logger = self.logger
        logger[metadataKey: "domain"] = "\(name.domain)"
        var run = DomainRun(name: name)
        guard let ascii = try? DNSName.queryName(name.domain) else {
            return DomainCheckReport(domain: name.domain, kind: name.kind, parent: name.parent, checks: [
                CheckResult(.srv, .error, "\(name.domain) is not a valid DNS name", hint: "Remove it with 'braid domain remove'."),
            ])
        }
        run.ascii = ascii
        let presented = presentedCertificate(for: name.domain)

        if name.kind == .hosted {
            await clientRecords(&run)
        }
        let targets: [ServiceTarget]
        if configuration.s2s.enabled {
            targets = await serverRecords(&run)
            await tlsaRecords(&run, targets: targets, presented: presented)
        } else {
            targets = []
        }
        run.results.append(dnssecResult(run))
        if configuration.s2s.enabled {
            if let posh {
                await poshDocument(&run, fetcher: posh, presented: presented)
            }
            await reachability(&run, targets: targets)
        }
        run.results += certificateResults(name.domain, presented: presented)
        // Gathered in the order the look-ups need; shown in the order of ``CheckName``.
        let rank = Dictionary(uniqueKeysWithValues: CheckName.allCases.enumerated().map { ($1, $0) })
        run.results = run.results.enumerated().sorted { (rank[$0.element.name] ?? 0, $0.offset) < (rank[$1.element.name] ?? 0, $1.offset) }.map(\.element)
        for result in run.results where result.status != .ok {
            logger.debug("check finding", metadata: ["check": "\(result.name.rawValue)", "status": "\(result.status.rawValue)", "message": "\(result.message)"])
        }
        return DomainCheckReport(domain: name.domain, kind: name.kind, parent: name.parent, checks: run.results)
    }

    /// What the checks of one name gather as they go.
    struct DomainRun {
        var name: CheckedName
        var ascii = ""
        var results: [CheckResult] = []
        /// Every DNS answer read, by the name asked, for the DNSSEC check.
        var statuses: [(name: String, status: DNSSECStatus)] = []
        /// Hosts the domain's SRV records name, for the record to suggest when one is missing.
        var knownTargets: [String] = []
        /// Addresses of the server targets, looked up once for TLSA and reachability.
        var addresses: [String: Result<DNSAnswer<IPAddress>, any Error>] = [:]
    }

    // MARK: Certificates

    /// The chain the server presents for `domain` (STARTTLS by `to`, direct TLS by SNI; both
    /// resolve through the store the same way), with its identity.
    struct Presented {
        var chain: [Certificate]
        var der: [UInt8]
        var identity: CertificateIdentity?

        var leaf: Certificate? { chain.first }

        /// The certificate itself names the domain (rather than being installed for it by
        /// `tls.certificates[].domains`, as a provider's certificate for a tenant is).
        func names(_ domain: String) -> Bool {
            guard let identity else { return false }
            return identity.matches(domain: domain, service: .xmppServer) != nil || identity.matches(domain: domain, service: .xmppClient) != nil
        }
    }

    func presentedCertificate(for domain: String) -> Presented? {
        guard let der = certificates.certificateDER(for: domain) else { return nil }
        let chain = certificates.clientCredentials(for: domain)?.chain.compactMap { certificate -> Certificate? in
            guard let bytes = try? certificate.toDERBytes() else { return nil }
            return try? Certificate(derEncoded: bytes)
        } ?? []
        guard !chain.isEmpty else { return nil }
        return Presented(chain: chain, der: der, identity: certificates.certificateIdentity(for: domain))
    }

    func certificateResults(_ domain: String, presented: Presented?) -> [CheckResult] {
        guard let presented, let leaf = presented.leaf else {
            if configuration.tls.selfSignMissing {
                return [CheckResult(.certificate, .warning, "no certificate covers \(domain) yet; the server will make a self-signed one on first use (fine for testing, not for production)",
                                    hint: "Install a CA-issued certificate naming \(domain) in tls.certificates.")]
            }
            return [CheckResult(.certificate, .error, "no certificate covers \(domain): TLS to it fails",
                                hint: "Add a certificate naming \(domain) to tls.certificates (or a wildcard for its parent), or for testing run 'braid cert selfsign \(domain)'.")]
        }
        var results: [CheckResult] = []
        if leaf.issuer == leaf.subject {
            results.append(CheckResult(.certificate, .warning, "the certificate for \(domain) is self-signed: fine for testing, not for production (peers cannot validate it)",
                                       hint: "Install a CA-issued certificate naming \(domain) in tls.certificates (ACME/Let's Encrypt works)."))
        } else if !presented.names(domain) {
            results.append(CheckResult(.certificate, .warning, "the certificate presented for \(domain) does not name it (issued to \(leaf.subject)); peers accept it only with POSH or DANE",
                                       hint: "Publish the output of 'braid posh \(domain)' at https://\(domain)/.well-known/posh/xmpp-server.json, or get a certificate naming \(domain)."))
        } else {
            results.append(CheckResult(.certificate, .ok, "certificate for \(domain) issued by \(leaf.issuer)"))
        }

        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withFullDate]
        let until = formatter.string(from: leaf.notValidAfter)
        let left = leaf.notValidAfter.timeIntervalSince(now)
        let renew = "Renew the certificate, then send the server SIGHUP (it re-reads certificates)."
        if left <= 0 {
            results.append(CheckResult(.certificateExpiry, .error, "the certificate for \(domain) expired on \(until)", hint: renew))
        } else if now < leaf.notValidBefore {
            results.append(CheckResult(.certificateExpiry, .error, "the certificate for \(domain) is not valid before \(formatter.string(from: leaf.notValidBefore))",
                                       hint: "Check the system clock, or wait for the certificate's validity to start."))
        } else if left < expiryWarning {
            let days = Int(left / 86_400)
            results.append(CheckResult(.certificateExpiry, .warning, "the certificate for \(domain) expires in \(days) day\(days == 1 ? "" : "s") (\(until))", hint: renew))
        } else {
            results.append(CheckResult(.certificateExpiry, .ok, "the certificate for \(domain) is valid until \(until) (\(Int(left / 86_400)) days)"))
        }
        return results
    }

    // MARK: SRV

    /// What one SRV record set should say.
    struct Service {
        var prefix: String
        var port: Int?
        /// Which configuration key sets the port.
        var key: String
        var server: Bool
    }

    func clientRecords(_ run: inout DomainRun) async {
        let c2s = configuration.c2s
        let services = [
            Service(prefix: "_xmpp-client._tcp", port: c2s.starttlsPort, key: "c2s.starttls_port", server: false),
            Service(prefix: "_xmpps-client._tcp", port: c2s.directTLSPort, key: "c2s.direct_tls_port", server: false),
        ]
        var answers: [(Service, Result<DNSAnswer<SRVRecord>, any Error>)] = []
        for service in services {
            do {
                answers.append((service, .success(try await resolver.srv("\(service.prefix).\(run.ascii)"))))
            } catch {
                answers.append((service, .failure(error)))
            }
        }
        for (_, answer) in answers {
            if case .success(let found) = answer {
                run.knownTargets += found.records.filter { !$0.isNoService }.map(\.target)
            }
        }
        for (service, answer) in answers {
            srvResult(&run, service, answer)
        }
    }

    /// The server records, read through the locator as federation reads them; returns the
    /// targets peers would connect to (the RFC 6120 fallback included).
    func serverRecords(_ run: inout DomainRun) async -> [ServiceTarget] {
        let s2s = configuration.s2s
        let startTLS = Service(prefix: "_xmpp-server._tcp", port: s2s.starttlsPort, key: "s2s.starttls_port", server: true)
        let direct = Service(prefix: "_xmpps-server._tcp", port: s2s.directTLSPort, key: "s2s.direct_tls_port", server: true)
        let discovery: XMPPServiceLocator.ServerDiscovery
        do {
            discovery = try await locator.discoverServer(run.name.domain)
        } catch {
            srvResult(&run, startTLS, .failure(error))
            srvResult(&run, direct, .failure(error))
            return []
        }
        guard case .answers(_, let directAnswer, let startTLSAnswer) = discovery else { return [] }
        run.knownTargets += (startTLSAnswer.records + directAnswer.records).filter { !$0.isNoService }.map(\.target)
        srvResult(&run, startTLS, .success(startTLSAnswer))
        srvResult(&run, direct, .success(directAnswer))
        // The same rules federation uses to pick targets (fallback, `.`, bogus).
        guard case .targets(let targets) = try? await locator.locateServer(run.name.domain) else { return [] }
        var unique: [ServiceTarget] = []
        for target in targets where !unique.contains(where: { $0.host == target.host && $0.port == target.port }) {
            unique.append(target)
        }
        return unique.sorted { ($0.host, $0.port) < ($1.host, $1.port) }
    }

    /// The host to suggest in a record to publish: one the domain's other records name, else
    /// the provider's host name, else the domain itself.
    func suggestedHost(_ run: DomainRun) -> String {
        run.knownTargets.first ?? configuration.admin.poshHostName ?? run.ascii
    }

    func srvResult(_ run: inout DomainRun, _ service: Service, _ answer: Result<DNSAnswer<SRVRecord>, any Error>) {
        let owner = "\(service.prefix).\(run.ascii)"
        // A server record pointing elsewhere loses federation; a client one may be a proxy.
        let wrong: CheckStatus = service.server ? .error : .warning
        let found: DNSAnswer<SRVRecord>
        switch answer {
        case .failure(let error):
            run.results.append(CheckResult(.srv, .error, "\(owner): look-up failed: \(error)",
                                           hint: "Check the resolvers (dns.forwarders, dns.resolv_conf) and the zone's name servers."))
            return
        case .success(let answer):
            found = answer
        }
        run.statuses.append((owner, found.status))
        if case .bogus = found.status {
            // Reported once, by the DNSSEC check.
            return
        }
        let suggestion = service.port.map { "\(owner). 3600 IN SRV 0 5 \($0) \(suggestedHost(run))." }
        let targets = found.records.filter { !$0.isNoService }
        if found.records.isEmpty {
            guard let port = service.port, let suggestion else {
                run.results.append(CheckResult(.srv, .ok, "\(owner): none published, and \(service.key) is off"))
                return
            }
            let why = service.prefix == "_xmpp-server._tcp"
                ? " (peers fall back to \(run.ascii):5269\(port == 5269 ? "" : ", not \(port)"))"
                : service.server ? " (peers that prefer direct TLS, XEP-0368, will not find it)" : " (clients guess \(run.ascii) and the default port)"
            run.results.append(CheckResult(.srv, .warning, "\(owner): no SRV record\(why)", hint: "Publish: \(suggestion)"))
            return
        }
        if targets.isEmpty {
            if let suggestion {
                run.results.append(CheckResult(.srv, .warning, "\(owner) says the service is not offered ('.'), but \(service.key) is \(service.port ?? 0)",
                                               hint: "Publish instead: \(suggestion)"))
            } else {
                run.results.append(CheckResult(.srv, .ok, "\(owner) says the service is not offered ('.'), and \(service.key) is off"))
            }
            return
        }
        let listed = targets.map { "\($0.target):\($0.port)" }.joined(separator: ", ")
        guard let port = service.port else {
            run.results.append(CheckResult(.srv, wrong, "\(owner) points to \(listed), but \(service.key) is off: nothing listens for it",
                                           hint: "Set \(service.key), or remove the record (or publish '\(owner). 3600 IN SRV 0 0 0 .')."))
            return
        }
        let elsewhere = targets.filter { Int($0.port) != port }
        if !elsewhere.isEmpty {
            let ports = Set(elsewhere.map { String($0.port) }).sorted().joined(separator: ", ")
            run.results.append(CheckResult(.srv, wrong, "\(owner) points to port \(ports), but Braid listens on \(port) (\(service.key))",
                                           hint: "Change the record to port \(port) (\(suggestion ?? "")), or set \(service.key): \(elsewhere[0].port)."))
            return
        }
        run.results.append(CheckResult(.srv, .ok, "\(owner) → \(listed)"))
    }

    // MARK: DNSSEC

    func dnssecResult(_ run: DomainRun) -> CheckResult {
        let bogus = run.statuses.compactMap { entry -> (name: String, reason: String)? in
            if case .bogus(let reason) = entry.status { return (entry.name, reason) }
            return nil
        }
        if let first = bogus.first {
            // One resolver reason is enough: the others repeat it for each name.
            return CheckResult(.dnssec, .error, "DNSSEC validation fails (bogus) for \(bogus.map(\.name).joined(separator: ", ")): peers refuse to connect (RFC 7673 §3.1); \(first.reason)",
                               hint: "Re-sign the zone or fix its DS record at the parent; 'delv' or https://dnsviz.net/ show where the chain breaks.")
        }
        if run.statuses.isEmpty {
            return CheckResult(.dnssec, .ok, "no DNS answers to judge")
        }
        let insecure = run.statuses.filter { !$0.status.isSecure }.map(\.name)
        if insecure.isEmpty {
            return CheckResult(.dnssec, .ok, "every answer is DNSSEC-secure (\(run.statuses.count) look-ups)")
        }
        return CheckResult(.dnssec, .ok, "insecure (not DNSSEC-signed, or no trust anchor): \(insecure.joined(separator: ", ")); DANE cannot be used")
    }

    // MARK: Addresses

    func addresses(_ run: inout DomainRun, of host: String) async -> Result<DNSAnswer<IPAddress>, any Error> {
        if let known = run.addresses[host] { return known }
        let result: Result<DNSAnswer<IPAddress>, any Error>
        do {
            let answer = try await resolver.addresses(host)
            run.statuses.append((host, answer.status))
            result = .success(answer)
        } catch {
            result = .failure(error)
        }
        run.addresses[host] = result
        return result
    }

    // MARK: TLSA

    /// TLSA at each server target. Records there must match the certificate presented for
    /// the domain; the matching is the DANE prooftype's own (``DANEProof``), fed the records
    /// read here, so `braid check` and a peer running Braid agree.
    func tlsaRecords(_ run: inout DomainRun, targets: [ServiceTarget], presented: Presented?) async {
        var found = 0
        var queried: [String] = []
        for target in targets {
            let owner = "_\(target.port)._tcp.\(target.host)"
            let address = await addresses(&run, of: target.host)
            // A target without addresses has nothing to secure (reachability reports it), and
            // DANE never looks further than a failed address look-up (RFC 7673 §3.2).
            guard let resolved = try? address.get(), !resolved.records.isEmpty else { continue }
            queried.append(owner)
            let answer: DNSAnswer<TLSARecord>
            do {
                answer = try await resolver.tlsa(owner)
            } catch {
                run.results.append(CheckResult(.tlsa, .error, "TLSA at \(owner): look-up failed: \(error)",
                                               hint: "A failed TLSA look-up makes DANE-aware peers give up on this target (RFC 7673 §3.4); check the zone's name servers."))
                continue
            }
            run.statuses.append((owner, answer.status))
            if case .bogus = answer.status { continue }
            guard !answer.records.isEmpty else { continue }
            found += 1
            guard answer.status.isSecure, target.srvSecure, resolved.status.isSecure else {
                let unsigned = !answer.status.isSecure ? "the TLSA records" : !target.srvSecure ? "the SRV records" : "the addresses of \(target.host)"
                run.results.append(CheckResult(.tlsa, .warning, "TLSA at \(owner) is in an insecure zone (\(unsigned) not DNSSEC-signed): peers ignore it",
                                               hint: "Sign the zone with DNSSEC (and publish its DS at the parent), or remove the TLSA records."))
                continue
            }
            guard let presented else {
                run.results.append(CheckResult(.tlsa, .error, "TLSA at \(owner) is published, but no certificate covers \(run.name.domain)",
                                               hint: "Install the certificate the records describe (tls.certificates)."))
                continue
            }
            let records = answer.records.map(TLSAAssociation.init)
            let proof = DANEProof(source: PublishedTLSA(records: records, expires: now + TimeInterval(max(answer.ttl, 1))), validator: validator)
            let evidence = PeerEvidence(certificateChain: presented.chain, time: now, connectedTarget: ServerTarget(host: target.host, port: target.port))
            let listed = records.map { "\($0.usage) \($0.selector) \($0.matchingType)" }.joined(separator: ", ")
            let publish = (try? presented.leaf.map { try TLSAAssociation(usage: 3, selector: 1, matchingType: 1, certificate: $0) })?.map { "\(owner). 3600 IN TLSA \($0)" }
            switch await proof.prove(run.name.domain, evidence: evidence) {
            case .proven:
                run.results.append(CheckResult(.tlsa, .ok, "TLSA at \(owner) (\(listed)) matches the certificate presented for \(run.name.domain)"))
            case .refuted(let reason):
                run.results.append(CheckResult(.tlsa, .error, "TLSA at \(owner) (\(listed)) matches no certificate presented for \(run.name.domain): DANE-aware peers refuse it (\(reason))",
                                               hint: "Publish the current certificate's record\(publish.map { ": \($0)" } ?? ""), or install the certificate the records describe."))
            case .notApplicable(let reason):
                run.results.append(CheckResult(.tlsa, .warning, "TLSA at \(owner) has no usable record (\(listed)): \(reason)",
                                               hint: "Publish a DANE-EE record\(publish.map { ": \($0)" } ?? " (3 1 1)")."))
            }
        }
        if found == 0 && !queried.isEmpty {
            run.results.append(CheckResult(.tlsa, .ok, "no TLSA records at \(queried.joined(separator: ", ")) (DANE not used)"))
        }
    }

    /// TLSA records already read, handed to ``DANEProof``.
    struct PublishedTLSA: DANERecordSource {
        var records: [TLSAAssociation]
        var expires: Date

        func associations(for domain: String, target: ServerTarget?) async -> DANELookup {
            .secure(records, expires: expires)
        }
    }

    // MARK: POSH

    /// POSH (RFC 7711), judged by the POSH prooftype itself (``POSHProof``), so references,
    /// `expires: 0` and hash rules are those a peer running Braid applies. A recording
    /// fetcher tells "nothing there" from "there, but unusable".
    func poshDocument(_ run: inout DomainRun, fetcher: any POSHFetching, presented: Presented?) async {
        let url = POSHPublisher.documentURL(domain: run.name.domain) ?? "https://\(run.ascii)\(POSHPublisher.wellKnownPath())"
        guard let presented else {
            run.results.append(CheckResult(.posh, .ok, "POSH not checked: no certificate covers \(run.name.domain) to compare with"))
            return
        }
        let recorder = RecordingFetcher(fetcher)
        let proof = POSHProof(fetcher: recorder, failureCache: .zero, now: { [now] in now })
        let outcome = await proof.prove(run.name.domain, evidence: PeerEvidence(certificateChain: presented.chain, time: now))
        let publish = "Publish the output of 'braid posh \(run.name.domain)' at \(url)."
        switch outcome {
        case .proven:
            run.results.append(CheckResult(.posh, .ok, "POSH at \(url) lists the certificate presented for \(run.name.domain)"))
        case .refuted:
            run.results.append(CheckResult(.posh, .error, "POSH at \(url) does not list the certificate presented for \(run.name.domain): peers relying on POSH refuse it",
                                           hint: publish + " (The document must change at every renewal unless it refers to the provider's.)"))
        case .notApplicable(let reason):
            let nothing: String?
            switch recorder.first(url) {
            case .notFound: nothing = "no POSH document at \(url)"
            case .unreachable: nothing = "POSH at \(url) cannot be fetched (\(reason))"
            case .body, nil: nothing = nil
            }
            if let nothing, presented.names(run.name.domain) {
                run.results.append(CheckResult(.posh, .ok, "\(nothing); not needed: the certificate names \(run.name.domain)"))
            } else if let nothing {
                run.results.append(CheckResult(.posh, .warning, "\(nothing), and the certificate presented for \(run.name.domain) does not name it: peers have no way to accept it but DANE or dialback",
                                               hint: publish))
            } else {
                run.results.append(CheckResult(.posh, .warning, "POSH at \(url) is unusable: \(reason)", hint: publish))
            }
        }
    }

    /// Remembers what each URL gave, for telling apart why POSH did not apply.
    final class RecordingFetcher: POSHFetching {
        enum Outcome: Sendable, Equatable {
            case unreachable
            case notFound
            case body
        }

        private let fetcher: any POSHFetching
        private let outcomes = Mutex<[String: Outcome]>([:])

        init(_ fetcher: any POSHFetching) {
            self.fetcher = fetcher
        }

        func fetch(_ url: String) async throws -> [UInt8]? {
            do {
                let body = try await fetcher.fetch(url)
                outcomes.withLock { $0[url] = body == nil ? .notFound : .body }
                return body
            } catch {
                outcomes.withLock { $0[url] = .unreachable }
                throw error
            }
        }

        func first(_ url: String) -> Outcome? {
            outcomes.withLock { $0[url] }
        }
    }

    // MARK: Reachability

    /// A TCP connect to every address of every server target, bounded by `connectTimeout`:
    /// what a peer's first step would be.
    func reachability(_ run: inout DomainRun, targets: [ServiceTarget]) async {
        for target in targets {
            let label = "\(target.host):\(target.port)\(target.directTLS ? " (direct TLS)" : "")"
            let found: DNSAnswer<IPAddress>
            switch await addresses(&run, of: target.host) {
            case .failure(let error):
                run.results.append(CheckResult(.reachability, .error, "\(label): address look-up failed: \(error)",
                                               hint: "Check the zone's name servers and the resolvers (dns.forwarders)."))
                continue
            case .success(let answer):
                found = answer
            }
            if case .bogus = found.status { continue }
            guard !found.records.isEmpty else {
                let why = target.viaSRV ? "the SRV target \(target.host) has no A/AAAA record" : "no SRV record, and \(target.host) has no A/AAAA record to fall back to"
                run.results.append(CheckResult(.reachability, .error, "\(label): \(why): peers cannot connect",
                                               hint: "Publish A/AAAA records for \(target.host)\(target.viaSRV ? "" : ", or SRV records pointing at this server")."))
                continue
            }
            var failures: [String] = []
            for address in found.records {
                if let failure = await connect(address, port: target.port) {
                    failures.append("\(address): \(failure)")
                }
            }
            if failures.count == found.records.count {
                run.results.append(CheckResult(.reachability, .error, "\(label): cannot connect (\(failures.joined(separator: "; ")))",
                                               hint: "Is 'braid serve' running with the s2s listener on port \(target.port), reachable through the firewall at \(found.records.map(\.description).joined(separator: ", "))?"))
            } else if !failures.isEmpty {
                run.results.append(CheckResult(.reachability, .warning, "\(label): some addresses do not connect (\(failures.joined(separator: "; ")))",
                                               hint: "Peers try the next address after a timeout; fix or remove the records of the addresses that fail."))
            } else {
                run.results.append(CheckResult(.reachability, .ok, "\(label) accepts connections (\(found.records.map(\.description).joined(separator: ", ")))"))
            }
        }
    }

    /// Nil when a TCP connection opened; else why not.
    func connect(_ address: IPAddress, port: Int) async -> String? {
        let socket: SocketAddress
        do {
            socket = try address.socketAddress(port: port)
        } catch {
            return "\(error)"
        }
        let nanoseconds = connectTimeout.components.seconds * 1_000_000_000 + connectTimeout.components.attoseconds / 1_000_000_000
        let bootstrap = ClientBootstrap(group: group).connectTimeout(.nanoseconds(max(1, nanoseconds)))
        do {
            let channel = try await bootstrap.connect(to: socket).get()
            try? await channel.close()
            return nil
        } catch let error as IOError {
            return String(cString: strerror(error.errnoCode)).lowercased()
        } catch let error as ChannelError {
            if case .connectTimeout = error { return "no answer within \(connectTimeout)" }
            return "\(error)"
        } catch {
            return "\(error)"
        }
    }
}
