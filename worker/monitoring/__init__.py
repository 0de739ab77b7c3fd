"""Torch-free monitoring shared by worker and API: Prometheus families from Redis and the MC-loss drift statistic."""
