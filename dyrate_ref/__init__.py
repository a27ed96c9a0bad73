"""dyrate_ref: a readable reference LLaVA-1.5 with FastV, VTW and DyRate visual-token pruning."""

__version__ = "0.1.0"
