"""The pipeline as data: which stages run for which variants and seeds, their command lines, inputs,
outputs and params. One description (`emae.workflow.stages`) feeds the Snakefile, the generated
`dvc.yaml` (`emae dvc-yaml`) and `emae stage`, the command both DAGs run.

Importable without snakemake or dvc.
"""

from emae.workflow.config import PipelineConfig, ReportConfig, StageToggles
from emae.workflow.stages import Out, Pipeline, Run, StageJob

__all__ = ["Out", "Pipeline", "PipelineConfig", "ReportConfig", "Run", "StageJob",
           "StageToggles"]
