/// Delays between reconnection attempts to a remote server (RFC 6120 §3.3).
///
/// The RFC asks for a random wait of 0 to 60 seconds before the first reconnection, so that
/// many servers that lost the same peer do not all come back at once, and for a "truncated
/// binary exponential backoff" after that. This gives:
/// - first delay: uniform in `0 ... initialWindow`;
/// - delay *n* ≥ 2: with `ceiling = min(maximum, base × 2^(n-2))`, uniform in
///   `ceiling/2 ... ceiling` (half fixed, half jitter, so delays keep growing while
///   attempts stay spread out).
///
/// Every delay is at most `max(initialWindow, maximum)`. Call ``reset()`` after a connection
/// succeeds.
public struct ReconnectBackoff: Sendable {
    /// The first delay is random within `0 ... initialWindow` (RFC 6120 §3.3: 60 s).
    public var initialWindow: Duration
    /// The ceiling of the second delay; each later ceiling doubles.
    public var base: Duration
    /// The largest ceiling.
    public var maximum: Duration
    /// How many delays have been handed out since the last reset.
    public private(set) var attempts: Int = 0
    private let random: RandomSource

    public init(
        initialWindow: Duration = .seconds(60),
        base: Duration = .seconds(30),
        maximum: Duration = .seconds(900),
        random: RandomSource = .system
    ) {
        self.initialWindow = initialWindow
        self.base = base
        self.maximum = maximum
        self.random = random
    }

    /// The delay before the next attempt.
    public mutating func nextDelay() -> Duration {
        defer { attempts += 1 }
        if attempts == 0 {
            return .nanoseconds(Int64(clamping: random.uniform(in: 0 ... Self.nanoseconds(initialWindow))))
        }
        let ceiling = ceilingNanoseconds(afterAttempts: attempts)
        let delay = random.uniform(in: ceiling / 2 ... ceiling)
        return .nanoseconds(Int64(clamping: delay))
    }

    /// Starts over: the next delay is again random in `0 ... initialWindow`.
    public mutating func reset() {
        attempts = 0
    }

    /// `min(maximum, base × 2^(attempts-1))` in nanoseconds, without overflow.
    func ceilingNanoseconds(afterAttempts attempts: Int) -> UInt64 {
        let cap = Self.nanoseconds(maximum)
        var ceiling = Self.nanoseconds(base)
        var doublings = attempts - 1
        while doublings > 0, ceiling < cap {
            ceiling = ceiling > UInt64.max / 2 ? UInt64.max : ceiling * 2
            doublings -= 1
        }
        return min(ceiling, cap)
    }

    /// A non-negative duration in nanoseconds, saturating.
    static func nanoseconds(_ duration: Duration) -> UInt64 {
        let (seconds, attoseconds) = duration.components
        guard seconds >= 0, attoseconds >= 0 else { return 0 }
        let (whole, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return UInt64.max }
        let (sum, overflow2) = whole.addingReportingOverflow(UInt64(attoseconds / 1_000_000_000))
        return overflow2 ? UInt64.max : sum
    }
}
