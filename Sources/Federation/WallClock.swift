import Foundation

/// Where federation reads the time of day: certificate and proof expiry, POSH `expires`,
/// OCSP `nextUpdate`, acknowledgement and idle timeouts. Injected, so that a test can move it
/// forward (a certificate expiring, an acknowledgement overdue) instead of waiting; the
/// production clock is the system's.
public struct WallClock: Sendable {
    private let read: @Sendable () -> Date

    public init(_ read: @escaping @Sendable () -> Date) {
        self.read = read
    }

    public static let system = WallClock { Date() }

    public func now() -> Date { read() }
}
