// The Server module: hosted domains, sessions, the router and feature modules.
