from emae.data.datasets import build_dataset, eval_transform, pretrain_transform
from emae.data.sampling import ResumableBatchSampler, SeededDataset

__all__ = ["build_dataset", "eval_transform", "pretrain_transform", "ResumableBatchSampler",
           "SeededDataset"]
