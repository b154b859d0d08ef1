"""lorafit's data layer: sources, splits, cleaning, cached tokenization, bucketed batches."""

from lorafit.data.sources import load_dataset
from lorafit.data.splits import DatasetSplits, Split

__all__ = ["DatasetSplits", "Split", "load_dataset"]
