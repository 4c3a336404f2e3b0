// The Trust module: certificate identity, PKIX policy, OCSP, DANE and POSH.
//
// Certificate side, as of now:
// - `SelfSignedCertificate` and `TestCertificateAuthority` make certificates for XMPP domains
//   (DNS-ID, SRV-ID and XmppAddr subjectAltNames).
// - `PEMCredentials` carries a certificate chain and its private key as PEM text.
// - `CertificateIdentity` lists the identifiers a certificate presents and matches reference
//   domains against them (RFC 6125 / RFC 9525 as profiled by RFC 6120 §13.7).
// - `TLSContextStore` keeps one TLS context per hosted domain and picks it by SNI or by the
//   stream header's `to`.
