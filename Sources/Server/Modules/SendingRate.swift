import Foundation

/// How fast one sender may go: a token bucket, `perSecond` refilled up to `burst`. Group chat
/// limits each occupant's messages with it (`muc.messages_per_second`, `muc.message_burst`),
/// PEP each account's notifications (`pep.notifications_per_second`, `pep.notification_burst`).
struct SendingRate: Sendable, Equatable {
    var perSecond: Double
    var burst: Double
}

/// One sender's bucket: what it may still send, as of `at`.
struct SendingAllowance: Sendable, Equatable {
    var tokens: Double
    var at: Date

    /// A new sender starts with a full bucket, whatever the rate (refilling caps it).
    init(at: Date) {
        tokens = .infinity
        self.at = at
    }

    private mutating func refill(now: Date, rate: SendingRate) {
        tokens = min(rate.burst, tokens + max(0, now.timeIntervalSince(at)) * rate.perSecond)
        at = now
    }

    /// Takes one message's worth; false when the sender has gone too fast.
    mutating func take(now: Date, rate: SendingRate) -> Bool {
        refill(now: now, rate: rate)
        guard tokens >= 1 else { return false }
        tokens -= 1
        return true
    }

    /// Whether anything may be sent now (one publish whose fan-out is not known yet).
    mutating func mayStart(now: Date, rate: SendingRate) -> Bool {
        refill(now: now, rate: rate)
        return tokens >= 1
    }

    /// Spends `count` after the fact: the bucket may go below zero, and what comes next waits
    /// until it has refilled (one publish to 1,000 contacts is allowed, the next waits).
    mutating func spend(_ count: Int, now: Date, rate: SendingRate) {
        refill(now: now, rate: rate)
        tokens -= Double(count)
    }
}
