import Foundation
import Storage
import Testing
import XMPPCore

extension StorageBehaviourTests {
@Suite("provisioning API tokens and audit log")
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
}
}
