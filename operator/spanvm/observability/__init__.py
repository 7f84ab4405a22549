"""What the operator and the agent share for being observed: build info, the metrics HTTP
server with its /healthz, and the rule that no `_created` series are exported."""
