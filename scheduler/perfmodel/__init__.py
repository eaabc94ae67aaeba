"""The performance model: measured stage profiles (`profiles_data/`), the queueing formulas,
the predictor of a plan's latency and throughput (scalar and vectorised), and the online bias
that corrects it from what the mesh measures. Pure functions of their inputs: no I/O but
reading profile files."""
