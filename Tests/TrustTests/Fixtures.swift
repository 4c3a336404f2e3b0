import NIOSSL

/// Certificates made once with OpenSSL 3.0 (`openssl req -x509 ...`), so that the tests also
/// read certificates this module did not write, and so that hashes can be checked against
/// values OpenSSL computed (`openssl x509 -outform der | openssl dgst -sha256`).
enum Fixtures {
    /// Decodes a single-certificate PEM to DER with BoringSSL, independently of the code under test.
    static func der(_ pem: String) throws -> [UInt8] {
        try NIOSSLCertificate(bytes: Array(pem.utf8), format: .pem).toDERBytes()
    }

    static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { byte in
            let digits = String(byte, radix: 16)
            return digits.count == 1 ? "0" + digits : digits
        }.joined()
    }

    /// ecdsa-with-SHA256, P-256. SHA-256 of the DER:
    static let ecdsaSHA256DigestSHA256 = "847a25c6f640142fd66c6e77740a31bf4c0c4023ebb3df973d223c8e2689e5f5"
    static let ecdsaSHA256 = """
        -----BEGIN CERTIFICATE-----
        MIIBiDCCAS2gAwIBAgIUSwYO5nrWFbffwHPbCK8YjWy8HJ4wCgYIKoZIzj0EAwIw
        GDEWMBQGA1UEAwwNZWMyNTYuZXhhbXBsZTAgFw0yNjExMjIwNTQ1NDRaGA8yMTI2
        MTAyOTA1NDU0NFowGDEWMBQGA1UEAwwNZWMyNTYuZXhhbXBsZTBZMBMGByqGSM49
        AgEGCCqGSM49AwEHA0IABL6S0bEQxEVAm+Xn43kricKTZU0EGttz5oU/wov7lzLo
        W4fu4qFFqKnqjyhPv2PVO3OT9OnJyWDjuL2YHSSN15qjUzBRMB0GA1UdDgQWBBS8
        qELINhLHEuecRkxyJMkr6plUczAfBgNVHSMEGDAWgBS8qELINhLHEuecRkxyJMkr
        6plUczAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQDzWv+MookM
        pkINrWf5vmfV1bXfeI7jpb79yKaC0up31QIhAOkbY5awNVF9Sn1fQaMirIp8fsm1
        laH8rFJvELgnIk28
        -----END CERTIFICATE-----
        """

    /// ecdsa-with-SHA384, P-384. SHA-384 of the DER:
    static let ecdsaSHA384DigestSHA384 =
        "44c3304cdb76a19a66a44a860464c5016c806a806d43e256e08c4af747cf9f68b375321aa286818a3741fc01eeefe697"
    static let ecdsaSHA384 = """
        -----BEGIN CERTIFICATE-----
        MIIBxDCCAUqgAwIBAgIUDzqRnl0HvYpaRFZSxxU4YT5PgrQwCgYIKoZIzj0EAwMw
        GDEWMBQGA1UEAwwNZWMzODQuZXhhbXBsZTAgFw0yNjExMjIwNTQ1NDRaGA8yMTI2
        MTAyOTA1NDU0NFowGDEWMBQGA1UEAwwNZWMzODQuZXhhbXBsZTB2MBAGByqGSM49
        AgEGBSuBBAAiA2IABIOQC8pUFErBb3y99vZp4WKIQQzX9iYeL5RDl/RXuuojRcPh
        9VWLRnDMNhS+gCBy+gPEbukFnG4tluHEUO1vB/i/diLMu8JAnRf2cZ3CDzCp9CWC
        xp0r6JXjK6emJBkRKKNTMFEwHQYDVR0OBBYEFFQh6FfGgjkL3saZKJVfub+EixSz
        MB8GA1UdIwQYMBaAFFQh6FfGgjkL3saZKJVfub+EixSzMA8GA1UdEwEB/wQFMAMB
        Af8wCgYIKoZIzj0EAwMDaAAwZQIxAMmorgEPsh0pBWWJ7rP3O1wZzbOBO7k+YryH
        BOx3pMQgGuf9raSHNe9ncyokFTQasgIwQ8Ql1y/rgdvHFWdlvGc+AtN4XAGZ9RST
        SdsEYXcDH0morgr8bOoCn3jvwP4ru3LE
        -----END CERTIFICATE-----
        """

    /// sha1WithRSAEncryption, RSA-1024. SHA-256 of the DER (RFC 5929 §4.1 upgrades SHA-1):
    static let rsaSHA1DigestSHA256 = "ea85e19cc471d4a9a2cf4d031b9effcd30e4d96952e1e54555b0953d9d8400dc"
    static let rsaSHA1 = """
        -----BEGIN CERTIFICATE-----
        MIICFDCCAX2gAwIBAgIUSqv5GUfBh58QPAFQIf/ER4hWlicwDQYJKoZIhvcNAQEF
        BQAwGzEZMBcGA1UEAwwQcnNhLXNoYTEuZXhhbXBsZTAgFw0yNjExMjIwNTQ1NDRa
        GA8yMTI2MTAyOTA1NDU0NFowGzEZMBcGA1UEAwwQcnNhLXNoYTEuZXhhbXBsZTCB
        nzANBgkqhkiG9w0BAQEFAAOBjQAwgYkCgYEA49zIhc2Fc6IpvhbapnLY/PibM9Cf
        oPD1TrGHXwDYkX/3elzor+Ihhx3m5KXZV5BXHH71RnlVSmFUb6XwUT26J3SFAC5D
        NSg3Vnd39mYCsjzepHruGTuza8jLvqF9H+v9Kgf8CHmsElDfyYHzzghjNSYprFJs
        MVdnRvoPnog89psCAwEAAaNTMFEwHQYDVR0OBBYEFKPV4kNGzzLeSUbBtFRfbVN4
        MpKWMB8GA1UdIwQYMBaAFKPV4kNGzzLeSUbBtFRfbVN4MpKWMA8GA1UdEwEB/wQF
        MAMBAf8wDQYJKoZIhvcNAQEFBQADgYEAZz3gdDC/8xMiX62R5h2tuglFjWp1HFW3
        eo2mcpT9I+NdqGGJ905e2VmeJ5bhnnJtTD1k6wI4xIddZFWylK90UbW5LDPewXcD
        Foght/JhQwHyezsZTyq97bsOeL/KchywIDAAjOnIEiDaBSQFBvjNdgK8nXdNGVGp
        3vJqV/J+LgU=
        -----END CERTIFICATE-----
        """

    /// RSASSA-PSS with SHA-512 in its parameters, RSA-1024. SHA-512 of the DER:
    static let rsaPSSSHA512DigestSHA512 =
        "0f0a1a477065e04ef6292a9e8dc70d3be6e8f68fb25e5d75a79f1bc8aa6dc88847a6b0554960f82755c59ff50d41bb02edabd63232b1729011720a06c05191a0"
    static let rsaPSSSHA512 = """
        -----BEGIN CERTIFICATE-----
        MIICcjCCAaegAwIBAgIUJA/UONLlh0KZBh4+b7qaj2XvJqkwQQYJKoZIhvcNAQEK
        MDSgDzANBglghkgBZQMEAgMFAKEcMBoGCSqGSIb3DQEBCDANBglghkgBZQMEAgMF
        AKIDAgEgMBYxFDASBgNVBAMMC3Bzcy5leGFtcGxlMCAXDTI2MTEyMjA1NDU0NFoY
        DzIxMjYxMDI5MDU0NTQ0WjAWMRQwEgYDVQQDDAtwc3MuZXhhbXBsZTCBnzANBgkq
        hkiG9w0BAQEFAAOBjQAwgYkCgYEA1z3p/bKszMxBqurxbO5GrsE/Quytgdvk4S+u
        D7h/q7gA3tCvCASamyJPUqEBgFfFS1rzmgOj8t/cOQYQQNRnHYAHdpy0Lv/fqrj9
        ZJiqTNOmrOAOzGKerFB4iIPB/0I5VUfUCyYxul7Flm3AxEyjI4pLTFeMMDmCoR5F
        Mz5fLpcCAwEAAaNTMFEwHQYDVR0OBBYEFK5obaOoeCGbnc4KVrzCA4qGIL49MB8G
        A1UdIwQYMBaAFK5obaOoeCGbnc4KVrzCA4qGIL49MA8GA1UdEwEB/wQFMAMBAf8w
        QQYJKoZIhvcNAQEKMDSgDzANBglghkgBZQMEAgMFAKEcMBoGCSqGSIb3DQEBCDAN
        BglghkgBZQMEAgMFAKIDAgEgA4GBABD3MR6RX2rFXPA8zSASz0qmwbWwTx3tsPV3
        nHM9RI9XSpqtZpgio1n+OWFTZ+4phQm/Do/G9LsxbEsP0aQLT/HzS5mdQl1WxQjs
        3D6dzahcZtEwdG5V94N7vzCyzkjh3QGOzycJ0iUVJyxByj/Pok30f8Qs+BG5a49h
        24lNydOF
        -----END CERTIFICATE-----
        """

    /// Ed25519: no hash function, so no tls-server-end-point binding.
    static let ed25519 = """
        -----BEGIN CERTIFICATE-----
        MIIBQDCB86ADAgECAhRL4LX8oBtIeZLdzZnzrsyruN4+uTAFBgMrZXAwFTETMBEG
        A1UEAwwKZWQuZXhhbXBsZTAgFw0yNjExMjIwNTQ1NDRaGA8yMTI2MTAyOTA1NDU0
        NFowFTETMBEGA1UEAwwKZWQuZXhhbXBsZTAqMAUGAytlcAMhAJsmcisZw9NUs3Q2
        +l14XDvCD6BuighDh2h/Vh9Ky/A+o1MwUTAdBgNVHQ4EFgQUVsQ+1Ej2HRBp5m8F
        UK+Zl+sZZIcwHwYDVR0jBBgwFoAUVsQ+1Ej2HRBp5m8FUK+Zl+sZZIcwDwYDVR0T
        AQH/BAUwAwEB/zAFBgMrZXADQQAEFAiwDV0fjmjqQj60KMrzXPjyniE/ETB1/9/7
        mIuNtTK3sYDloMRjgGCG3AGDZrlFyaz1rPhFA8Po99UKFlYI
        -----END CERTIFICATE-----
        """

    /// Subject `CN=legacy-cn.example`; SANs: DNS `openssl.example`, DNS `*.wild.example`,
    /// SRVName `_xmpp-server.srv-only.example`, SRVName `_xmpp-client.client-only.example`,
    /// XmppAddr `münchen.example` (UTF-8), e-mail `admin@openssl.example`, IP `192.0.2.7`.
    static let opensslXMPP = """
        -----BEGIN CERTIFICATE-----
        MIICKDCCAc6gAwIBAgIUFekSMOtR644aa9rlQCG7g6bv1hUwCgYIKoZIzj0EAwIw
        HDEaMBgGA1UEAwwRbGVnYWN5LWNuLmV4YW1wbGUwIBcNMjYxMTIyMDU0NjA3WhgP
        MjEyNjEwMjkwNTQ2MDdaMBwxGjAYBgNVBAMMEWxlZ2FjeS1jbi5leGFtcGxlMFkw
        EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEwB1n4mdtC0qT/61ah3S/Hsn56jXXCOwV
        ZndMDjgKV+bSII/GXktrCVWnvmNubveIgZdAWdnKhJO+6GUsLvALqqOB6zCB6DCB
        xgYDVR0RBIG+MIG7gg9vcGVuc3NsLmV4YW1wbGWCDioud2lsZC5leGFtcGxloCsG
        CCsGAQUFBwgHoB8WHV94bXBwLXNlcnZlci5zcnYtb25seS5leGFtcGxloC4GCCsG
        AQUFBwgHoCIWIF94bXBwLWNsaWVudC5jbGllbnQtb25seS5leGFtcGxloB4GCCsG
        AQUFBwgFoBIMEG3DvG5jaGVuLmV4YW1wbGWBFWFkbWluQG9wZW5zc2wuZXhhbXBs
        ZYcEwAACBzAdBgNVHQ4EFgQUvhr0TEU+YcOVKocnwU9E1ToW9ZowCgYIKoZIzj0E
        AwIDSAAwRQIgDhMqdOU+XRHPGxsR0RVIPP+ZP6OC5Uov+ezIdusAR/8CIQDs5mG/
        T9mqlQ9WkH0QEfIZwqmEXT2vB1q/ec8mJNwITQ==
        -----END CERTIFICATE-----
        """

    /// Subject `CN=cn-only.example`, no subjectAltName extension.
    static let opensslCNOnly = """
        -----BEGIN CERTIFICATE-----
        MIIBZjCCAQ2gAwIBAgIUBAvocQs88PBAXIvcGChtW50GmEEwCgYIKoZIzj0EAwIw
        GjEYMBYGA1UEAwwPY24tb25seS5leGFtcGxlMCAXDTI2MTEyMjA1NDYwOFoYDzIx
        MjYxMDI5MDU0NjA4WjAaMRgwFgYDVQQDDA9jbi1vbmx5LmV4YW1wbGUwWTATBgcq
        hkjOPQIBBggqhkjOPQMBBwNCAARQjnx1jqVIdMS2UggfqzwMLLCwZrsBYh1nIfjE
        Ws1V4ml07DAEJqVlP5W3PDLhMk+I/WjXF9PRf1jxcWzFY/GNoy8wLTAMBgNVHRMB
        Af8EAjAAMB0GA1UdDgQWBBSG1WgB6yflpt+onmOC3DujrVZp0TAKBggqhkjOPQQD
        AgNHADBEAiAjyuWzIz4TAtu0qQwvTCuyEEtZWXlDermzdQtdvTqS8QIgUTeSXPzJ
        xRQ44sTXPMVb2zESuNey5AJDHo6Ua059ggM=
        -----END CERTIFICATE-----
        """
}
