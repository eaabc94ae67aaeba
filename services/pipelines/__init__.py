"""The four reference pipelines: YAML configs (parsed by contract.pipeline_config), their input
generators, and the in-process reference runner used as the oracle in end-to-end tests."""
