"""The node agent (the DaemonSet's process): capability discovery, heartbeats, fragments."""
