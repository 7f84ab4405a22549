"""Placement of SpanningVMs onto nodes: a pure, deterministic function of a cluster snapshot."""
