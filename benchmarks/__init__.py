"""hbp_compile's benchmarks: ``python -m benchmarks`` runs the suite (see suite.py)."""
