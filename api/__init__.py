"""HTTP faces of the swarm: an OpenAI-compatible API over the client library, the health monitor, metrics."""
