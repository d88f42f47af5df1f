"""Speed measurements (``python -m benchmarks`` runs them all); never collected by pytest."""
