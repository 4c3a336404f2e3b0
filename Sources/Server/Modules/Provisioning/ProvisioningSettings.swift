extension BraidConfiguration {
    /// The provisioning API (`provisioning`) on the HTTPS listener: `/api/v1/…` for a
    /// provider's control panel, with bearer tokens from `braid api token add`
    /// (docs/provisioning-api.md). Without a token nothing is accessible, so it is on by
    /// default.
    public struct ProvisioningSettings: Codable, Sendable, Equatable {
        public var enabled = true
        /// The largest request body accepted (413 beyond).
        public var maxBodyBytes = 64 * 1024
        /// The shortest password an account created or changed through the API may have.
        public var minimumPasswordLength = 8
        /// Failed authentications (no, wrong or expired token) one client address may make
        /// per minute, in a burst or spread out; beyond it every request from the address
        /// gets 429 until its budget refills. 0 turns the limit off.
        public var authFailuresPerMinute = 10

        public init() {}

        enum CodingKeys: String, CodingKey {
            case enabled
            case maxBodyBytes = "max_body_bytes"
            case minimumPasswordLength = "minimum_password_length"
            case authFailuresPerMinute = "auth_failures_per_minute"
        }
    }
}
