"""msmoe_dist: sparse mixture-of-experts transformers with momentum, trained at scale."""

__version__ = "0.1.0"
