"""The ``swarm-peer`` command line."""
