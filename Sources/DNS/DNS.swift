// The DNS module: SRV, A/AAAA and TLSA with DNSSEC status, over libunbound.
