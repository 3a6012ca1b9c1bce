"""What runs produced, read back and judged: per-example predictions, statistics, run tables, the HTML report."""
