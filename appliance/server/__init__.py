"""The OpenAI-compatible API server: protocol (wire models), routes, serving layer, gate (audit, metrics, body cap)."""
