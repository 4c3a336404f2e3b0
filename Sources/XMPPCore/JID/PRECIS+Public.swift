/// Public entry points to the PRECIS profiles (RFC 8265) for modules outside XMPPCore, such
/// as SASL, which must prepare usernames and passwords exactly as JIDs are prepared.
/// The profiles themselves stay internal in ``PRECIS``; this only forwards to them.
public enum PRECISProfiles {
    /// Enforces the UsernameCaseMapped profile (RFC 8265 §3.3, §3.4). Errors are reported
    /// with the `.localpart` part.
    public static func usernameCaseMapped(_ s: String) throws(JIDError) -> String {
        try PRECIS.usernameCaseMapped(s[...])
    }

    /// Enforces the OpaqueString profile (RFC 8265 §4.2), the profile for passwords
    /// (RFC 8265 §4.1). Errors are reported with the `.resourcepart` part, since that is the
    /// JID part this profile otherwise serves.
    public static func opaqueString(_ s: String) throws(JIDError) -> String {
        try PRECIS.opaqueString(s[...])
    }

    /// Prepares `s` as a JID localpart: UsernameCaseMapped plus the rules of RFC 7622 §3.3
    /// that the profile alone does not enforce (the characters `"&'/:<>@` are forbidden and
    /// the result is at most 1023 octets). A SASL username is an account's localpart, so this
    /// is the preparation that makes it comparable with stored accounts.
    public static func localpart(_ s: String) throws(JIDError) -> String {
        try JID.prepareLocalpart(s[...])
    }
}
