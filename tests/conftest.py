"""The tests' fixtures, by concern, in tests/fixtures/:

- databases: one throwaway PostgreSQL per session, one database per test (from a template), DB helper
- daemons:   real HTTP receivers on 127.0.0.1 and the real `crm-bridge run` daemon as a subprocess
- security:  login roles in the crm-bridge groups, a throwaway CA, counting TCP listeners
- factories: one way to make the engine's values (a claimed Delivery) in unit tests
"""

pytest_plugins = ["fixtures.databases", "fixtures.daemons", "fixtures.security"]
