import Foundation
import Storage
import Testing
import XMPPCore

extension StorageBehaviourTests {
@Suite("provisioning API tokens, audit log and domain settings")
struct ProvisioningStorageTests {
    @Test(arguments: Backend.allCases) func tokensAddListRemove(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.apiTokens().isEmpty)
            let provider = StoredAPIToken(id: "p1", hash: String(repeating: "a", count: 64), domains: nil, label: "control panel", createdAt: 100)
            // Domains are kept canonical and sorted.
            let scoped = StoredAPIToken(id: "c1", hash: String(repeating: "b", count: 64), domains: ["Customer.Example", "b.example"], label: "customer", createdAt: 200, expiresAt: 86_600)
            try await storage.addAPIToken(provider)
            try await storage.addAPIToken(scoped)
            var expected = scoped
            expected.domains = ["b.example", "customer.example"]
            #expect(try await storage.apiTokens() == [provider, expected])

            // The same id, or the same hash, is refused.
            await #expect(throws: StorageError.tokenExists) {
                try await storage.addAPIToken(StoredAPIToken(id: "p1", hash: String(repeating: "c", count: 64), domains: nil, label: "", createdAt: 300))
            }
            await #expect(throws: StorageError.tokenExists) {
                try await storage.addAPIToken(StoredAPIToken(id: "p2", hash: provider.hash, domains: nil, label: "", createdAt: 300))
            }
            #expect(try await storage.removeAPIToken(id: "p1"))
            #expect(try await storage.removeAPIToken(id: "p1") == false)
            #expect(try await storage.apiTokens().map(\.id) == ["c1"])
        }
    }

    @Test(arguments: Backend.allCases) func auditNewestFirstAndByDomain(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            let entries = [
                AuditEntry(at: 1, tokenID: "p1", action: "domain.add", target: "customer.example", outcome: "ok"),
                AuditEntry(at: 2, tokenID: "c1", action: "account.create", target: "alice@customer.example", outcome: "ok", detail: "x"),
                AuditEntry(at: 3, tokenID: nil, action: "auth.refused", target: "/api/v1/domains", outcome: "refused", detail: "unknown token"),
                AuditEntry(at: 4, tokenID: "p1", action: "domain.add", target: "other.example", outcome: "ok"),
                // A domain that merely ends the same way is another domain.
                AuditEntry(at: 5, tokenID: "p1", action: "domain.add", target: "notcustomer.example", outcome: "ok"),
                AuditEntry(at: 6, tokenID: "c1", action: "settings", target: "conference.customer.example", outcome: "ok"),
            ]
            for entry in entries { try await storage.appendAuditEntry(entry) }
            #expect(try await storage.auditEntries(limit: 100, domain: nil) == entries.reversed())
            #expect(try await storage.auditEntries(limit: 2, domain: nil).map(\.at) == [6, 5])
            #expect(try await storage.auditEntries(limit: 100, domain: "customer.example").map(\.at) == [6, 2, 1])
            // LIKE wildcards in a name match only themselves.
            #expect(try await storage.auditEntries(limit: 100, domain: "%").isEmpty)
        }
    }

    @Test(arguments: Backend.allCases) func domainSettingsReplaceAndGoWithTheirDomain(_ backend: Backend) async throws {
        try await withEmptyStorage(backend) { (storage: any Storage) async throws in
            #expect(try await storage.addDomains(["customer.example", "other.example"]) == 2)
            #expect(try await storage.domainSettings().isEmpty)
            await #expect(throws: StorageError.unknownDomain) {
                try await storage.setDomainSettings(DomainSettings(acme: false), for: "nobody.example")
            }
            // Every change moves the generation, so every server re-reads.
            var generation = try await storage.domainsGeneration()
            let settings = DomainSettings(services: ["muc": false, "upload": true], acme: false)
            try await storage.setDomainSettings(settings, for: "Customer.Example")
            #expect(try await storage.domainSettings() == ["customer.example": settings])
            #expect(try await storage.domainsGeneration() > generation)

            // Replaced whole, not merged.
            generation = try await storage.domainsGeneration()
            try await storage.setDomainSettings(DomainSettings(services: ["pubsub": false]), for: "customer.example")
            try await storage.setDomainSettings(DomainSettings(acme: true), for: "other.example")
            #expect(try await storage.domainSettings() == ["customer.example": DomainSettings(services: ["pubsub": false]), "other.example": DomainSettings(acme: true)])
            #expect(try await storage.domainsGeneration() > generation)
            // Empty settings are no row at all.
            try await storage.setDomainSettings(DomainSettings(), for: "other.example")
            #expect(try await storage.domainSettings().keys.sorted() == ["customer.example"])
            // Removing the domain removes its settings.
            #expect(try await storage.removeDomain("customer.example"))
            #expect(try await storage.domainSettings().isEmpty)
            #expect(try await storage.addDomain("customer.example"))
            #expect(try await storage.domainSettings().isEmpty, "a domain added again starts from the defaults")
        }
    }

    @Test func domainSettingsAreMigrated() async throws {
        try await StorageLocation.with(.sqlite) { sqliteLocation in
            let source = try #require(try await sqliteLocation.open() as? SQLiteStorage)
            #expect(try await source.addDomains(["customer.example", "other.example"]) == 2)
            try await source.setDomainSettings(DomainSettings(services: ["muc": false], acme: false), for: "customer.example")
            try await source.setDomainSettings(DomainSettings(services: ["upload": true]), for: "other.example")
            try await StorageLocation.with(.postgresql) { postgresLocation in
                let target = try #require(try await postgresLocation.open() as? PostgresStorage)
                let counts = try await StorageMigration.copy(from: source, to: target, logger: StorageLocation.quietLogger())
                let copied = try #require(counts.first { $0.table == "domain_settings" })
                #expect(copied.source == 2 && copied.copied == 2 && copied.target == 2, "\(copied)")
                let copiedSettings = try await target.domainSettings()
                #expect(copiedSettings == (try await source.domainSettings()))
            }
        }
    }
}
}
