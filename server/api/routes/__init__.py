"""HTTP routes: thin functions that validate (schemas), call (engine / store / services) and return.

Errors are raised, never returned: `server.api.errors` maps them to responses.
"""
