"""The `pipeline:` params section (params/pipeline.yaml): variants, seeds, stages, report settings."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from emae.config import Section

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class StageToggles(Section):
    """Which optional stages run (pretrain and report always do)."""

    prepare: bool = Field(description="write the embedded data set at data.root (false: data.root is yours)")
    knn: bool
    linprobe: bool
    finetune: bool
    consistency: bool
    visualize: bool
    prepare_dense: bool = Field(description="write the generated detection/segmentation set at dense_data.root")
    detect: bool = Field(description="Mask R-CNN on each encoder (emae detect; slow on CPU)")
    segment: bool = Field(description="semantic segmentation on each encoder (emae segment; slow on CPU)")
    sweep: bool = Field(description="also run the Optuna sweep of params/sweep.yaml (results/sweeps/k_mask_ratio)")


class BaselineToggles(Section):
    """Baselines every pre-trained figure is shown next to (same data, same protocols)."""

    pixels: bool = Field(description="kNN and linear probe on the raw normalised pixels")
    random_init: bool = Field(description="kNN, linear probe and fine-tuning (= training from scratch) "
                                          "of the reference variant's architecture at its initial weights")


class ReportConfig(Section):
    dpi: int = Field(gt=0, description="resolution of the PNG plots")
    figure_size: tuple[float, float] = Field(description="inches (width, height) of one plot")
    decimals: int = Field(ge=0, description="digits after the point in summary.md")


class PipelineConfig(Section):
    variants: dict[str, dict[str, Any]] = Field(
        min_length=1,
        description="name -> params tree merged over params/ for that variant (e.g. {model: {num_parts: 1}})")
    seeds: list[int] = Field(min_length=1, description="pre-training seeds; each variant runs once per seed")
    reference: str = Field(description="the variant others are measured against (MAE): the random-init "
                                       "architecture, compute_of budgets and the time-to-target table")
    compute_of: dict[str, str] = Field(description="variant -> variant whose pre-training FLOPs it is "
                                                   "given (its epochs fitted to them): equal-compute comparisons")
    baselines: BaselineToggles
    overrides: dict[str, Any] = Field(
        description="params tree merged into every variant (e.g. the kNN monitor during pre-training)")
    stages: StageToggles
    report: ReportConfig

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, tree in variants.items():
            if not NAME.match(name):
                raise ValueError(f"variant name {name!r} must match {NAME.pattern} (it names folders and jobs)")
            if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
                raise ValueError(f"variant {name!r} must map sections to keys, e.g. {{model: {{num_parts: 1}}}}")
        return variants

    @model_validator(mode="after")
    def _known_variants(self) -> PipelineConfig:
        names = ", ".join(self.variants)
        if self.reference not in self.variants:
            raise ValueError(f"pipeline.reference={self.reference!r} is not a variant (variants: {names})")
        for variant, source in self.compute_of.items():
            if variant not in self.variants or source not in self.variants or variant == source:
                raise ValueError(f"pipeline.compute_of.{variant}={source!r}: both must be distinct variants "
                                 f"(variants: {names})")
            if source in self.compute_of:
                raise ValueError(f"pipeline.compute_of.{variant}={source!r}: {source} takes its budget "
                                 "from another variant itself; give it an epochs budget")
        return self

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
        return seeds
