"""Benchmarks and the autoscaling simulation that drive a running service from outside."""
