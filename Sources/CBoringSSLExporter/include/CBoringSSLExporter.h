#ifndef BRAID_CBORINGSSL_EXPORTER_H
#define BRAID_CBORINGSSL_EXPORTER_H

#include <stddef.h>
#include <stdint.h>

// Declarations of two functions of the BoringSSL copy that swift-nio-ssl links into every
// Braid binary (its symbols carry the CNIOBoringSSL_ prefix). swift-nio-ssl does not export
// its C module to other packages, and it has no Swift API for RFC 5705 keying-material
// export, which `tls-exporter` channel binding (RFC 9266) needs. The signatures are
// BoringSSL's public API (include/openssl/ssl.h). `ssl` is an `SSL *` as an opaque pointer.

struct ssl_st;

int CNIOBoringSSL_SSL_export_keying_material(struct ssl_st *ssl, uint8_t *out, size_t out_len,
                                             const char *label, size_t label_len,
                                             const uint8_t *context, size_t context_len,
                                             int use_context);

uint16_t CNIOBoringSSL_SSL_version(const struct ssl_st *ssl);

#endif
