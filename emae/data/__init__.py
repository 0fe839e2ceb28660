from emae.data.datasets import build_dataset, eval_transform, pretrain_transform
from emae.data.sampling import ResumableBatchSampler, SeededDataset
from emae.data.scan import dataset_digest

__all__ = ["build_dataset", "dataset_digest", "eval_transform", "pretrain_transform", "ResumableBatchSampler",
           "SeededDataset"]
