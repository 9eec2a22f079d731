"""Fairness evaluations: synthesis plans, bias measurement, downstream fairness, reports."""
