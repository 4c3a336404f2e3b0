// PLACEHOLDER: being implemented (PRECIS UsernameCaseMapped / OpaqueString, RFC 8264/8265).
enum PRECIS {
    static func usernameCaseMapped(_ input: Substring) throws(JIDError) -> String {
        throw JIDError(.localpart, .disallowedCharacter(input.unicodeScalars.first ?? " "))
    }
    static func opaqueString(_ input: Substring) throws(JIDError) -> String {
        throw JIDError(.resourcepart, .disallowedCharacter(input.unicodeScalars.first ?? " "))
    }
}
