#ifndef BRAID_CEXPAT_SHIM_H
#define BRAID_CEXPAT_SHIM_H
#include <expat.h>

/* Expat 2.6 added reparse deferral (XML_SetReparseDeferralEnabled). It can hold back
   callbacks until more input arrives, which would delay stanza delivery. Expose a
   feature test so Swift can switch it off only where the API exists. */
#if defined(XML_MAJOR_VERSION) && ((XML_MAJOR_VERSION > 2) || (XML_MAJOR_VERSION == 2 && XML_MINOR_VERSION >= 6))
#define BRAID_EXPAT_HAS_REPARSE_DEFERRAL 1
static inline int braid_expat_disable_reparse_deferral(XML_Parser p) {
    return XML_SetReparseDeferralEnabled(p, XML_FALSE) == XML_TRUE;
}
#else
#define BRAID_EXPAT_HAS_REPARSE_DEFERRAL 0
static inline int braid_expat_disable_reparse_deferral(XML_Parser p) {
    (void)p;
    return 0;
}
#endif

static inline int braid_expat_has_reparse_deferral(void) { return BRAID_EXPAT_HAS_REPARSE_DEFERRAL; }

#endif
