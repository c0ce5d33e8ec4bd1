"""The per-user master on the login node: registry, tunnels, relay, console."""
