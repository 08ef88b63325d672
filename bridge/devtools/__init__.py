"""Development tooling, apart from the daemon's own modules: a throwaway PostgreSQL (pgserver),
a scriptable HTTP receiver (receiver), the one way to start a daemon subprocess (daemonproc) and
`crm-bridge demo` (demo).  The demo, the tests and the bench use them; the daemon never does."""
