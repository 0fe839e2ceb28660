# The report: summary table (CSV, Markdown; mean +- std over seeds), loss and accuracy plots, and the
# reconstructions, all under results/report/. `snakemake --report report.html` embeds the outputs
# below with the captions of workflow/report/*.rst.
import os.path

# output file or folder name -> (caption, category)
REPORT_CAPTIONS = {
    "summary.csv": ("../report/summary.rst", "1. Summary"),
    "summary.md": ("../report/summary.rst", "1. Summary"),
    "runs.csv": ("../report/runs.rst", "1. Summary"),
    "loss_curves.png": ("../report/loss_curves.rst", "2. Pre-training"),
    "accuracy_vs_time.png": ("../report/accuracy_vs_time.rst", "2. Pre-training"),
    "accuracy_vs_flops.png": ("../report/accuracy_vs_flops.rst", "2. Pre-training"),
    "time_to_target.csv": ("../report/time_to_target.rst", "1. Summary"),
    "accuracy_vs_epochs.png": ("../report/accuracy_vs_epochs.rst", "2. Pre-training"),
    "reconstructions": ("../report/reconstructions.rst", "3. Reconstructions"),
}


def report_outputs():
    outputs = []
    for out in PIPELINE.pattern("report").snakemake_outs:
        path = directory(out.path) if out.directory else out.path
        caption = REPORT_CAPTIONS.get(os.path.basename(out.path))
        if caption is not None:
            extra = {"patterns": ["{name}.png"]} if out.directory else {}
            path = report(path, caption=caption[0], category=caption[1], **extra)
        outputs.append(path)
    return outputs


rule report:
    input: PIPELINE.job("report").deps
    output: report_outputs()
    params: values=stage_params("report"), code=stage_code("report"), args=stage_args("report")
    log: log_path("report")
    threads: 1
    shell: "{EMAE} stage {params.args} > {log} 2>&1"
