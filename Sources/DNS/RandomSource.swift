import Synchronization

/// Where SRV weighting and reconnect jitter get their randomness: the system generator in
/// production, a seeded or scripted one in tests.
public struct RandomSource: Sendable {
    private let nextValue: @Sendable () -> UInt64

    /// A source that calls `next` for each 64-bit value.
    public init(_ next: @escaping @Sendable () -> UInt64) {
        self.nextValue = next
    }

    /// The standard library's system generator.
    public static let system = RandomSource { UInt64.random(in: .min ... .max) }

    /// A deterministic SplitMix64 generator. Copies share one state, so a sequence of calls
    /// is reproducible whichever copy makes them.
    public static func seeded(_ seed: UInt64) -> RandomSource {
        let state = SplitMix64(seed: seed)
        return RandomSource { state.next() }
    }

    /// The next raw 64-bit value.
    public func next() -> UInt64 {
        nextValue()
    }

    /// A value uniformly distributed in `range` (unbiased, by the standard library's method).
    public func uniform(in range: ClosedRange<UInt64>) -> UInt64 {
        var generator = Generator(source: self)
        return UInt64.random(in: range, using: &generator)
    }

    private struct Generator: RandomNumberGenerator {
        let source: RandomSource
        mutating func next() -> UInt64 { source.next() }
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014), behind a lock so that a seeded source is Sendable.
private final class SplitMix64: Sendable {
    private let state: Mutex<UInt64>

    init(seed: UInt64) {
        state = Mutex(seed)
    }

    func next() -> UInt64 {
        state.withLock { state in
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }
}
