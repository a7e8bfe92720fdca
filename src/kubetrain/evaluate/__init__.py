"""Evaluation: accuracy, efficiency measurements and the HTML report."""
