// The Admin module: the HTTP side (POSH documents, metrics, the admin API).
