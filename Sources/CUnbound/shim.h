#ifndef BRAID_CUNBOUND_SHIM_H
#define BRAID_CUNBOUND_SHIM_H
#include <unbound.h>
#endif
