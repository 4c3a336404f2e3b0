import Foundation
import XMPPCore

/// Room nicknames under the PRECIS Nickname profile (RFC 8266): what a room shows and what it
/// compares. Enforcement maps non-ASCII spaces to U+0020, drops outer spaces, folds inner runs
/// of spaces into one and applies NFKC (§2.3), so `ａｌｉｃｅ` is shown as `alice` and
/// `" alice  b "` as `"alice b"`; the result must be FreeformClass (RFC 8264 §4.3). Two
/// nicknames conflict when their comparison forms, also lower-cased (§2.4), are equal: `Alice`
/// and `alice` are one occupant's name.
struct MUCNickname: Sendable, Hashable {
    /// The nickname as the room shows it (the enforced form).
    let shown: String
    /// What nicknames are compared by.
    let key: String

    /// Nil when the nickname is empty after enforcement or has code points the profile
    /// disallows (controls, unassigned ones …).
    init?(_ requested: String) {
        guard let shown = Self.enforce(requested) else { return nil }
        self.shown = shown
        key = Self.stable(PRECISProfiles.lowercased(shown)) ?? shown
    }

    /// RFC 8264 §7: the rules are applied until the string no longer changes (at most four
    /// times), and a string that does not settle is refused.
    private static func enforce(_ input: String) -> String? {
        var current = input
        for _ in 0 ..< 4 {
            let next = enforceOnce(current)
            if next.utf8.elementsEqual(current.utf8) {
                return (try? PRECISProfiles.checkFreeformClass(next)) == nil ? nil : next
            }
            current = next
        }
        return nil
    }

    private static func enforceOnce(_ input: String) -> String {
        var mapped = String.UnicodeScalarView()
        var pendingSpace = false
        for scalar in input.unicodeScalars {
            if scalar == " " || (scalar.value >= 0x80 && scalar.properties.generalCategory == .spaceSeparator) {
                pendingSpace = !mapped.isEmpty
                continue
            }
            if pendingSpace { mapped.append(" ") }
            pendingSpace = false
            mapped.append(scalar)
        }
        return String(mapped).precomposedStringWithCompatibilityMapping
    }

    private static func stable(_ input: String) -> String? {
        let normalized = input.precomposedStringWithCompatibilityMapping
        return normalized.isEmpty ? nil : normalized
    }
}
