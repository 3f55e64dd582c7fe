"""Simulated inference workers that publish realistic Dynamo-shaped metrics over NATS."""
