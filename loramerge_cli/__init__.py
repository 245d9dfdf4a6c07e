"""loramerge: merge LoRA adapters exactly, and find what to prune before merging."""

__version__ = "0.1.0"
