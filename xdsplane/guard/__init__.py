"""``xdsplane guard``: ext_authz replay protection and a rate limit service for Envoy.

``service`` (the two gRPC APIs), ``store`` (in memory or a shared Redis), ``limits`` (the
rate limit file), ``app`` (the process). See docs/guard.md.
"""
