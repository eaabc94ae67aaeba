"""Offline tools, run by hand on the CPU (`python -m scheduler.tools.<name>`): the policy
benchmark, the profile fit benchmark, merging profiler outputs into the bundled profiles, and
synthetic profiles. The scheduler process never imports them."""
