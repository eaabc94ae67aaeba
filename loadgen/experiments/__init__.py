"""The headline experiments: peak load per policy, resources at low load, a diurnal day.

`search.py` holds the pure logic (rate search, QoS check, SM-share accounting); `admin.py` is the
Admin API client; `runs.py` drives trials against a gateway and shapes results; `__main__.py`
parses arguments.
"""
