import Admin
import ArgumentParser
import Foundation
import Logging
import Server
import Trust
import XMPPCore

// MARK: - posh

/// `braid posh DOMAIN`: what a tenant publishes so that peers accept Braid's certificate for
/// their domain (RFC 7711, RFC 7712 §5.2).
struct PoshCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "posh",
        abstract: "Show the POSH document a hosted domain should publish (RFC 7711).",
        discussion: """
            Prints what the domain's owner must serve at \
            https://DOMAIN/.well-known/posh/xmpp-server.json so that other servers accept \
            this server's certificate for DOMAIN: preferably a reference to the provider's \
            own document, which survives certificate renewals, or else the fingerprints of \
            the certificate installed for DOMAIN now, which must be replaced at every renewal.
            """)

    @OptionGroup var options: ConfigOptions
    @Argument(help: "The hosted domain, e.g. example.com.") var domain: String
    @Option(name: .customLong("provider-url"), help: ArgumentHelp("The provider's POSH document to refer to. Default: https://<admin.posh_host_name>/.well-known/posh/xmpp-server.json.", valueName: "url"))
    var providerURL: String?

    func run() async throws {
        let configuration = try options.load()
        let admin = configuration.admin
        let name = try canonicalDomain(domain)
        let ascii = (try? JID(domain: name).asciiDomain) ?? name
        let path = POSHPublisher.wellKnownPath(service: "xmpp-server")
        let expires = admin.poshExpiresSeconds

        let store = TLSContextStore(logger: quietCLILogger())
        let problems = loadCertificates(configuration, into: store)
        let installed = store.certificateDER(for: name)

        var reference: String?
        if let providerURL {
            guard POSHDocument.isHTTPSURL(providerURL) else {
                throw ValidationError("--provider-url must be an https:// URL (RFC 7711 §3.2)")
            }
            reference = providerURL
        } else if let host = admin.poshHostName, let url = POSHPublisher.documentURL(domain: host) {
            reference = url
        }

        print("For other servers to accept this server's certificate for \(name), the domain's")
        print("owner publishes, over HTTPS with a certificate valid for \(ascii), at")
        print()
        print("    https://\(ascii)\(path)")
        print()
        let renewalNote = "which must be replaced whenever that certificate is renewed"
        if let reference {
            print("this reference to the provider's document (recommended: the provider keeps the")
            print("fingerprints current across certificate renewals, so nothing changes here):")
            print()
            print(indent(POSHPublisher.referenceDocument(url: reference, expires: expires)))
            if providerURL == nil, let host = admin.poshHostName, let providerDER = store.certificateDER(for: host),
               let installed, installed != providerDER {
                print("Note: the certificate presented for \(name) is not the one for \(host),")
                print("so the provider's document does not list it. Install the provider's certificate")
                print("for \(name) (tls.certificates, with 'domains'), or publish the fingerprints below.")
                print()
            }
            if let installed {
                print("or else the fingerprints of the certificate installed for \(name) now,")
                print("\(renewalNote):")
                print()
                print(indent(POSHPublisher.fingerprintsDocument(certificateDER: [installed], expires: expires)))
            }
        } else if let installed {
            print("the fingerprints of the certificate installed for \(name) now,")
            print("\(renewalNote):")
            print()
            print(indent(POSHPublisher.fingerprintsDocument(certificateDER: [installed], expires: expires)))
            print("A reference to the provider's own document would survive renewals: set")
            print("admin.posh_host_name in the configuration, or pass --provider-url.")
        } else {
            print("... but there is nothing to publish yet: no provider document to refer to (set")
            print("admin.posh_host_name, or pass --provider-url) and no certificate installed for")
            print("\(name) (one is loaded or made when the server first needs it).")
        }
        for problem in problems {
            print("warning: \(problem)")
        }
        if reference == nil && installed == nil {
            throw CommandFailure("nothing to publish for \(name) yet")
        }
    }

    /// Installs the certificates the server would: the configured files, then
    /// `<data_directory>/certs/NAME.crt` with `NAME.key`. Returns what could not be read.
    private func loadCertificates(_ configuration: BraidConfiguration, into store: TLSContextStore) -> [String] {
        var problems: [String] = []
        for file in configuration.tls.certificates {
            do {
                let credentials = try PEMCredentials.load(certificatePath: file.certificate, keyPath: file.key)
                let names = try file.domains ?? Array(CertificateIdentity(certificate: credentials.leafCertificate()).allDomains)
                try store.install(credentials, for: names)
            } catch {
                problems.append("certificate \(file.certificate): \(error)")
            }
        }
        let directory = "\(configuration.dataDirectory)/certs"
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        for file in files.sorted() where file.hasSuffix(".crt") {
            let stem = String(file.dropLast(4))
            let (certificate, key) = CertificateManager.paths(for: stem, in: directory)
            guard FileManager.default.fileExists(atPath: key) else { continue }
            do {
                let credentials = try PEMCredentials.load(certificatePath: certificate, keyPath: key)
                let covered = try CertificateIdentity(certificate: credentials.leafCertificate()).allDomains
                try store.install(credentials, for: covered.isEmpty ? [stem] : Array(covered))
            } catch {
                problems.append("certificate \(certificate): \(error)")
            }
        }
        return problems
    }

    private func indent(_ text: String) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false).map { $0.isEmpty ? "" : "    \($0)" }.joined(separator: "\n")
    }
}

// MARK: - links

/// `braid links`: the federation links of the running server, from its admin API.
struct LinksCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "links",
        abstract: "List the running server's federation links and the domain pairs on each.",
        discussion: "Asks the server's admin listener (admin.admin_address, admin.admin_port).")

    @OptionGroup var options: ConfigOptions
    @Flag(help: "Print the API's JSON as it is.") var json = false

    func run() async throws {
        let configuration = try options.load()
        let result: (json: [UInt8], links: [AdminLinkInfo])
        do {
            result = try await AdminClient.links(configuration: configuration.admin)
        } catch let error as AdminServerError {
            throw CommandFailure(error.description)
        }
        if json {
            print(String(decoding: result.json, as: UTF8.self))
            return
        }
        print(Self.table(result.links, now: Date()), terminator: "")
    }

    /// A readable listing: one line per link, then its pairs indented.
    static func table(_ links: [AdminLinkInfo], now: Date) -> String {
        guard !links.isEmpty else { return "No federation links.\n" }
        var rows: [[String]] = [["PEER", "ORIGIN", "AGE", "IN", "OUT", "STATE"]]
        var pairsAfter: [Int: [String]] = [:]
        for link in links {
            var state = link.closed ? "closed" : "open"
            if link.bidirectional { state += ", bidi" }
            if link.queued > 0 { state += ", \(link.queued) queued" }
            if link.unacknowledged > 0 { state += ", \(link.unacknowledged) unacked" }
            rows.append([link.peerAddress, link.origin, age(now.timeIntervalSince(link.createdAt)), "\(link.stanzasReceived)", "\(link.stanzasSent)", state])
            pairsAfter[rows.count - 1] = link.pairs.map { pair in
                let arrow = pair.direction == "inbound" ? "←" : "→"
                let expiry = pair.expires.map { "expires in \(age($0.timeIntervalSince(now)))" } ?? "no expiry"
                return "    \(pair.local) \(arrow) \(pair.remote)  \(pair.direction), \(pair.method), \(expiry)"
            }
        }
        let widths = (0..<rows[0].count).map { column in rows.map { $0[column].count }.max() ?? 0 }
        var output = ""
        for (index, row) in rows.enumerated() {
            output += row.enumerated().map { column, cell in
                column == row.count - 1 ? cell : cell.padding(toLength: widths[column], withPad: " ", startingAt: 0)
            }.joined(separator: "  ") + "\n"
            for line in pairsAfter[index] ?? [] { output += line + "\n" }
            if index > 0, (pairsAfter[index] ?? []).isEmpty { output += "    (no pairs)\n" }
        }
        return output
    }

    /// 42s, 5m, 3h12m, 2d4h; negative (lapsed) shown as "lapsed".
    static func age(_ seconds: TimeInterval) -> String {
        guard seconds >= 0 else { return "lapsed" }
        let total = Int(seconds)
        switch total {
        case ..<60: return "\(total)s"
        case ..<3600: return "\(total / 60)m"
        case ..<86_400: return "\(total / 3600)h\(total % 3600 / 60)m"
        default: return "\(total / 86_400)d\(total % 86_400 / 3600)h"
        }
    }
}

// MARK: - Helpers

/// A failure that is not a usage mistake: printed as "Error: ..." without the usage text.
struct CommandFailure: Error, CustomStringConvertible {
    var description: String

    init(_ description: String) {
        self.description = description
    }
}

/// A logger for CLI-side helpers that would otherwise print certificate warnings twice.
func quietCLILogger() -> Logger {
    var logger = Logger(label: "braid.cli")
    logger.logLevel = .error
    return logger
}
