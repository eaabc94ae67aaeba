"""The contract beyond the messages: what several processes must agree on and compute alike.

- `pipeline_config`: the pipeline configs every process reads (the gateway, stages, scheduler,
  agent, load generators): their schema, the rules of their DAG (no cycle, every stage feeds
  the output, stages in topological order) and `TensorSpec`, a tensor's per-item spec.
- `batching`: when a dynamic batch waits for company, the rule the stage's batcher applies and
  the scheduler's queueing model predicts; two copies would drift apart.

Why a package of its own: `services` and `scheduler` both need these, and neither may import
the other (they meet only through the contract); `common` serves every process with plumbing
(settings, logging, errors, lifecycle) and holds no domain logic. So, beside `protos/`, this is
the contract: pure data and pure functions, no gRPC and no process state, importing only
`common` (errors). A change here changes what several processes must agree on.
"""
