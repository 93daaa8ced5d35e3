"""`xdsplane test`: requests run against a real Envoy serving a policy, checked case by case."""
