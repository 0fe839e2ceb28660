# The embedded data set (scikit-learn digits as an ImageFolder) at data.root.
if PIPELINE.stage_enabled("prepare"):

    rule prepare:
        output: stage_outputs("prepare")
        params: values=stage_params("prepare"), args=stage_args("prepare")
        log: log_path("prepare")
        threads: 1
        shell: "{EMAE} stage {params.args} > {log} 2>&1"
