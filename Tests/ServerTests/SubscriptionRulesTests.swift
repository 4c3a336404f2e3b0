import Testing
import XMPPCore
@testable import Server

/// Every row of RFC 6121 Appendix A, transcribed. Each row: existing state, whether the
/// stanza is routed (outbound) or delivered (inbound), and the new state ("-" for no change).
@Suite("RFC 6121 Appendix A subscription states")
struct SubscriptionRulesTests {
    static func state(_ name: String) -> SubscriptionState {
        switch name {
        case "None": SubscriptionState()
        case "None + Pending Out": SubscriptionState(pendingOut: true)
        case "None + Pending In": SubscriptionState(pendingIn: true)
        case "None + Pending Out/In": SubscriptionState(pendingOut: true, pendingIn: true)
        case "To": SubscriptionState(to: true)
        case "To + Pending In": SubscriptionState(to: true, pendingIn: true)
        case "From": SubscriptionState(from: true)
        case "From + Pending Out": SubscriptionState(from: true, pendingOut: true)
        case "Both": SubscriptionState(to: true, from: true)
        default: preconditionFailure("unknown state \(name)")
        }
    }

    struct Row: Sendable, CustomTestStringConvertible {
        var type: PresenceType
        var existing: String
        var acts: Bool
        var new: String
        var testDescription: String { "\(type.rawValue) in \"\(existing)\"" }
    }

    static func rows(_ type: PresenceType, _ table: [(String, Bool, String)]) -> [Row] {
        table.map { Row(type: type, existing: $0.0, acts: $0.1, new: $0.2) }
    }

    /// A.2.1 (routed in every state, RFC 6121 §3.1.2), A.2.2 (§3.3.2), A.2.3, A.2.4.
    static let outboundRows: [Row] =
        rows(.subscribe, [
            ("None", true, "None + Pending Out"), ("None + Pending Out", true, "-"), ("None + Pending In", true, "None + Pending Out/In"),
            ("None + Pending Out/In", true, "-"), ("To", true, "-"), ("To + Pending In", true, "-"),
            ("From", true, "From + Pending Out"), ("From + Pending Out", true, "-"), ("Both", true, "-"),
        ]) + rows(.unsubscribe, [
            ("None", true, "-"), ("None + Pending Out", true, "None"), ("None + Pending In", true, "-"),
            ("None + Pending Out/In", true, "None + Pending In"), ("To", true, "None"), ("To + Pending In", true, "None + Pending In"),
            ("From", true, "-"), ("From + Pending Out", true, "From"), ("Both", true, "From"),
        ]) + rows(.subscribed, [
            ("None", false, "-"), ("None + Pending Out", false, "-"), ("None + Pending In", true, "From"),
            ("None + Pending Out/In", true, "From + Pending Out"), ("To", false, "-"), ("To + Pending In", true, "Both"),
            ("From", false, "-"), ("From + Pending Out", false, "-"), ("Both", false, "-"),
        ]) + rows(.unsubscribed, [
            ("None", false, "-"), ("None + Pending Out", false, "-"), ("None + Pending In", true, "None"),
            ("None + Pending Out/In", true, "None + Pending Out"), ("To", false, "-"), ("To + Pending In", true, "To"),
            ("From", true, "None"), ("From + Pending Out", true, "None + Pending Out"), ("Both", true, "To"),
        ])

    /// A.3.1 to A.3.4.
    static let inboundRows: [Row] =
        rows(.subscribe, [
            ("None", true, "None + Pending In"), ("None + Pending Out", true, "None + Pending Out/In"), ("None + Pending In", false, "-"),
            ("None + Pending Out/In", false, "-"), ("To", true, "To + Pending In"), ("To + Pending In", false, "-"),
            ("From", false, "-"), ("From + Pending Out", false, "-"), ("Both", false, "-"),
        ]) + rows(.unsubscribe, [
            ("None", false, "-"), ("None + Pending Out", false, "-"), ("None + Pending In", true, "None"),
            ("None + Pending Out/In", true, "None + Pending Out"), ("To", false, "-"), ("To + Pending In", true, "To"),
            ("From", true, "None"), ("From + Pending Out", true, "None + Pending Out"), ("Both", true, "To"),
        ]) + rows(.subscribed, [
            ("None", false, "-"), ("None + Pending Out", true, "To"), ("None + Pending In", false, "-"),
            ("None + Pending Out/In", true, "To + Pending In"), ("To", false, "-"), ("To + Pending In", false, "-"),
            ("From", false, "-"), ("From + Pending Out", true, "Both"), ("Both", false, "-"),
        ]) + rows(.unsubscribed, [
            ("None", false, "-"), ("None + Pending Out", true, "None"), ("None + Pending In", false, "-"),
            ("None + Pending Out/In", true, "None + Pending In"), ("To", true, "None"), ("To + Pending In", true, "None + Pending In"),
            ("From", false, "-"), ("From + Pending Out", true, "From"), ("Both", true, "From"),
        ])

    @Test("Outbound transitions match RFC 6121 A.2", arguments: outboundRows)
    func outbound(row: Row) {
        let existing = Self.state(row.existing)
        let result = SubscriptionRules.outbound(row.type, existing)
        var expected = row.new == "-" ? existing : Self.state(row.new)
        // Pre-approval (§3.4) is the one flag beyond the tables: a "subscribed" with no
        // pending request and no From sets it; an "unsubscribed" clears it.
        if row.type == .subscribed && !existing.pendingIn && !existing.from { expected.approved = true }
        #expect(result.route == row.acts)
        #expect(result.state == expected)
    }

    @Test("Inbound transitions match RFC 6121 A.3", arguments: inboundRows)
    func inbound(row: Row) {
        let existing = Self.state(row.existing)
        let result = SubscriptionRules.inbound(row.type, existing)
        #expect(result.deliver == row.acts)
        #expect(result.state == (row.new == "-" ? existing : Self.state(row.new)))
        // §3.1.3: a subscribe from a contact who already has From is answered for the user.
        #expect(result.autoReplySubscribed == (row.type == .subscribe && existing.from))
    }

    @Test("A pre-approved subscribe is granted at once and the approval is spent")
    func preApprovalGrants() {
        var approved = SubscriptionState()
        approved.approved = true
        let result = SubscriptionRules.inbound(.subscribe, approved)
        #expect(result.deliver == false)
        #expect(result.autoReplySubscribed)
        #expect(result.state == SubscriptionState(from: true))
    }

    @Test("An unsubscribed cancels a pre-approval without routing")
    func unsubscribedCancelsPreApproval() {
        var approved = SubscriptionState()
        approved.approved = true
        let result = SubscriptionRules.outbound(.unsubscribed, approved)
        #expect(result.route == false)
        #expect(result.state == SubscriptionState())
    }

    @Test("An inbound unsubscribe that removes From sends the user's unavailable presence (§3.3.3)")
    func unsubscribeSendsUnavailable() {
        #expect(SubscriptionRules.inbound(.unsubscribe, Self.state("Both")).sendUnavailable)
        #expect(SubscriptionRules.inbound(.unsubscribe, Self.state("None + Pending In")).sendUnavailable == false)
    }
}
