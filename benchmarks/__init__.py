"""Speed measurements (python -m core.bench runs them all); never collected by pytest."""
