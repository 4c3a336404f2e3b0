import ArgumentParser
import Foundation
import Server
import Storage

// MARK: - api

/// `braid api`: the provisioning API's tokens and audit log (docs/provisioning-api.md).
struct APICommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "api",
        abstract: "Manage the provisioning API's tokens and read its audit log.",
        subcommands: [TokenCommand.self, AuditCommand.self])

    struct TokenCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "token",
            abstract: "Make, list and revoke bearer tokens. Only a hash is stored: a token is shown once.",
            subcommands: [Add.self, List.self, Remove.self])

        struct Add: AsyncParsableCommand {
            static let configuration = CommandConfiguration(
                abstract: "Make a token: provider-wide, or scoped to the domains given with --domain.",
                discussion: "A scoped token manages its domains' accounts only and cannot tell other domains from absent ones.")
            @OptionGroup var options: ConfigOptions
            @Option(name: .long, help: "A domain the token may manage (repeat for several); none: provider-wide.") var domain: [String] = []
            @Option(name: .long, help: "What the token is for (shown by 'braid api token list').") var label: String = ""
            @Option(name: .long, help: "Days until the token stops working; none: until revoked.") var expiresDays: Int?

            func run() async throws {
                let storage = try await options.openStorage(try options.load())
                let domains = domain.isEmpty ? nil : try domain.map(canonicalDomain)
                if let expiresDays, expiresDays < 1 { throw ValidationError("--expires-days must be at least 1") }
                let (token, stored) = ProvisioningTokens.mint(domains: domains, label: label, lifetime: expiresDays.map { TimeInterval($0) * 86_400 })
                try await storage.addAPIToken(stored)
                print(token)
                FileHandle.standardError.write(Data("token \(stored.id) made (\(domains.map { "domains: " + $0.joined(separator: ", ") } ?? "provider-wide")); it is not shown again\n".utf8))
            }
        }

        struct List: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "List tokens (ids, scopes, labels; never the secrets).")
            @OptionGroup var options: ConfigOptions

            func run() async throws {
                let storage = try await options.openStorage(try options.load())
                for token in try await storage.apiTokens() {
                    let created = Date(timeIntervalSince1970: TimeInterval(token.createdAt)).ISO8601Format()
                    let expires = token.expiresAt.map { "expires " + Date(timeIntervalSince1970: TimeInterval($0)).ISO8601Format() } ?? "no expiry"
                    print("\(token.id)  \(token.domains?.joined(separator: ",") ?? "*")  \(created)  \(expires)  \(token.label)")
                }
            }
        }

        struct Remove: AsyncParsableCommand {
            static let configuration = CommandConfiguration(abstract: "Revoke a token by its id; the next request with it gets 401.")
            @OptionGroup var options: ConfigOptions
            @Argument(help: "The token's id (from 'braid api token list').") var id: String

            func run() async throws {
                let storage = try await options.openStorage(try options.load())
                guard try await storage.removeAPIToken(id: id) else { throw ValidationError("no token \(id)") }
                print("revoked \(id)")
            }
        }
    }

    struct AuditCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "audit", abstract: "Print the audit log, newest first.")
        @OptionGroup var options: ConfigOptions
        @Option(help: "Only entries about this domain (itself, its accounts and services).") var domain: String?
        @Option(help: "How many entries.") var limit: Int = 50

        func run() async throws {
            let storage = try await options.openStorage(try options.load())
            for entry in try await storage.auditEntries(limit: limit, domain: try domain.map(canonicalDomain)) {
                let at = Date(timeIntervalSince1970: TimeInterval(entry.at) / 1000).ISO8601Format()
                print("\(at)  \(entry.tokenID ?? "-")  \(entry.action)  \(entry.target)  \(entry.outcome)\(entry.detail.isEmpty ? "" : "  " + entry.detail)")
            }
        }
    }
}
