"""Collectors: the fleet state as Prometheus metric families, one collector per concept."""
