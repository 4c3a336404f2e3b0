import Foundation
import Testing

/// docs/grafana/braid-dashboard.json is for operators to import; a metric renamed in the code
/// would leave a panel silently empty, so every name it queries must be one Braid defines.
@Suite("The Grafana dashboard")
struct GrafanaDashboardTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test("Is valid JSON, and queries only metrics the sources define")
    func queriesKnownMetrics() throws {
        let data = try Data(contentsOf: Self.root.appendingPathComponent("docs/grafana/braid-dashboard.json"))
        let dashboard = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let panels = try #require(dashboard["panels"] as? [[String: Any]])
        let expressions = panels.flatMap { ($0["targets"] as? [[String: Any]] ?? []).compactMap { $0["expr"] as? String } }
        #expect(expressions.count >= 20)
        let pattern = try Regex("braid_[a-z0-9_]+")
        let queried = Set(expressions.flatMap { $0.matches(of: pattern).map { String($0.output[0].substring ?? "") } })
        #expect(queried.contains("braid_certificate_earliest_expiry_timestamp_seconds"))

        var defined = Set<String>()
        let sources = Self.root.appendingPathComponent("Sources")
        let files = FileManager.default.enumerator(atPath: sources.path)?.compactMap { $0 as? String }.filter { $0.hasSuffix(".swift") } ?? []
        for file in files {
            let text = try String(contentsOfFile: sources.appendingPathComponent(file).path, encoding: .utf8)
            for match in text.matches(of: try Regex("\"(braid_[a-z0-9_]+)\"")) {
                if let name = match.output[1].substring { defined.insert(String(name)) }
            }
        }
        #expect(queried.subtracting(defined).isEmpty, "the dashboard queries metrics no source defines: \(queried.subtracting(defined).sorted())")
    }
}
