"""The scheduler process: its settings, gRPC server and servicers, the control loop, the
report reader and its windows, the plan store in Redis, and `SchedulerApp`, which holds the
world (pipelines, nodes, QoS, the plan in force) and turns it into plans and routes."""
