"""The gateway policy language: what a gateway does, in its users' words.

``model`` is the schema (pydantic; ``xdsplane schema`` prints it as JSON Schema), ``check``
the cross-references, and ``translate`` the pure functions from a policy to Envoy resources.
"""
