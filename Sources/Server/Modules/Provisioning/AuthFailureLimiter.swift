import NIOCore
import Synchronization

/// Failed API authentications per client address (`provisioning.auth_failures_per_minute`):
/// a token bucket per address that each missing, wrong or expired token drains by one and
/// that refills at the configured rate. An address whose bucket is empty is refused with 429
/// before its token is even looked at, so guessing tokens costs the guesser time, not the
/// database reads, and a correct token from that address waits too (else a guesser would
/// learn from the 429 turning into a 200 which guess was right).
///
/// Memory is bounded: at most `capacity` addresses are tracked, and the one tracked longest
/// is forgotten first (a forgotten address starts again with a full bucket).
final class AuthFailureLimiter: Sendable {
    /// Failures allowed in a burst; also the refill per minute.
    let perMinute: Int
    let capacity: Int
    private let now: @Sendable () -> NIODeadline
    private let state: Mutex<State>

    /// Whole numbers, so that the limit falls exactly where the configuration says: one
    /// failure costs `cost` units, and a bucket gains `perMinute` units per nanosecond (a
    /// full bucket, `perMinute` failures, refills in one minute).
    private struct Bucket {
        var units: Int64
        var updated: NIODeadline
    }

    private static let cost: Int64 = 60_000_000_000

    private struct State {
        var buckets: [String: Bucket] = [:]
        /// Addresses in the order they were first tracked; `head` is the oldest still valid.
        var order: [String] = []
        var head = 0
    }

    init(perMinute: Int, capacity: Int = 10_000, now: @escaping @Sendable () -> NIODeadline) {
        self.perMinute = min(max(0, perMinute), 1_000_000)
        self.capacity = max(1, capacity)
        self.now = now
        state = Mutex(State())
    }

    var isEnabled: Bool { perMinute > 0 }

    private var full: Int64 { Int64(perMinute) * Self.cost }

    /// Seconds until `address` may try again, or nil when it may now.
    func retryAfter(_ address: String) -> Int? {
        guard isEnabled else { return nil }
        let now = now()
        return state.withLock { state -> Int? in
            guard var bucket = state.buckets[address] else { return nil }
            refill(&bucket, now: now)
            state.buckets[address] = bucket
            guard bucket.units < Self.cost else { return nil }
            let nanoseconds = (Self.cost - bucket.units + Int64(perMinute) - 1) / Int64(perMinute)
            return max(1, Int((nanoseconds + 999_999_999) / 1_000_000_000))
        }
    }

    /// Records one failed authentication from `address`.
    func recordFailure(_ address: String) {
        guard isEnabled else { return }
        let now = now()
        state.withLock { state in
            if var bucket = state.buckets[address] {
                refill(&bucket, now: now)
                bucket.units = max(0, bucket.units - Self.cost)
                state.buckets[address] = bucket
                return
            }
            while state.buckets.count >= capacity, state.head < state.order.count {
                state.buckets[state.order[state.head]] = nil
                state.head += 1
            }
            state.buckets[address] = Bucket(units: full - Self.cost, updated: now)
            state.order.append(address)
            // Drop the forgotten prefix now and then rather than on every eviction.
            if state.head > capacity {
                state.order.removeFirst(state.head)
                state.head = 0
            }
        }
    }

    /// The number of addresses tracked (for tests of the bound).
    var trackedAddresses: Int { state.withLock { $0.buckets.count } }

    private func refill(_ bucket: inout Bucket, now: NIODeadline) {
        // Capped at a minute, which refills any bucket, so the product cannot overflow.
        let elapsed = min(max(0, (now - bucket.updated).nanoseconds), Self.cost)
        bucket.units = min(full, bucket.units + elapsed * Int64(perMinute))
        bucket.updated = now
    }

    /// The key for a client address: its IP without the port (every connection of one host
    /// shares a bucket); "unknown" when the listener gave none.
    static func key(_ address: SocketAddress?) -> String {
        address?.ipAddress ?? "unknown"
    }
}
