// PLACEHOLDER: being implemented (IDNA2008 domain preparation, RFC 5890-5895, RFC 7622 §3.2).
enum IDNA {
    static func toUnicode(_ input: Substring) throws(JIDError) -> String {
        throw JIDError(.domainpart, .invalidLabel("unsupported"))
    }
    static func toASCII(_ domain: String) throws(JIDError) -> String { domain }
}
enum IPLiteral {
    static func canonicalIPv6(_ input: Substring) throws(JIDError) -> String {
        throw JIDError(.domainpart, .invalidIPLiteral)
    }
}
