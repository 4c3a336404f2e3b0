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

    /// The parts of the Nickname profile (RFC 8266) that need XMPPCore's tables. The profile
    /// also needs NFKC, which the standard library does not offer; callers with Foundation
    /// compose it (`MUCNickname` in the server) from these two:
    ///
    /// The FreeformClass check (RFC 8264 §4.3), which the profile's strings must pass.
    /// Errors are reported with the `.resourcepart` part: a nickname is a room JID's resource.
    public static func checkFreeformClass(_ s: String) throws(JIDError) {
        let scalars = Array(s.unicodeScalars)
        guard !scalars.isEmpty else { throw JIDError(.resourcepart, .empty) }
        try CodePointRules.validate(scalars, part: .resourcepart, allowFreeformOnly: true, property: CodePointRules.precis)
    }

    /// Unicode toLowerCase (with the Final_Sigma rule), the case mapping of the PRECIS
    /// profiles that compare without case (RFC 8264 §9.3; RFC 8266 §2.4).
    public static func lowercased(_ s: String) -> String {
        String(String.UnicodeScalarView(UCD.lowercased(Array(s.unicodeScalars))))
    }
}
