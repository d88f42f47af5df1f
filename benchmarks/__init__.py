"""Speed measurements (python -m core.bench runs them all); never collected by pytest."""
import os

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "two_stage.yaml")
