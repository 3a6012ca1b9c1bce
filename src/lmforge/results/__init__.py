"""What runs produced, read back and judged: per-example predictions, statistics, run tables, the HTML report.

For notebooks:
    from lmforge.results import load_runs, load_metrics, load_predictions
(imported on first use: training, which writes predictions, does not pay for pandas)
"""

__all__ = ["load_metrics", "load_predictions", "load_runs"]


def __getattr__(name: str):
    if name in __all__:
        from lmforge.results import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'lmforge.results' has no attribute {name!r}")
