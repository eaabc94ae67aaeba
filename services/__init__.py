"""The data-path processes: stage replicas, the gateway, the node agent, and their tools."""
