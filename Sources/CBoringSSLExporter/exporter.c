// Intentionally empty: this target only declares functions that swift-nio-ssl's BoringSSL
// defines (see include/CBoringSSLExporter.h); SwiftPM needs one source file per C target.
#include "CBoringSSLExporter.h"
