# The embedded data set (scikit-learn digits as an ImageFolder) at data.root.
if PIPELINE.stage_enabled("prepare"):

    rule prepare:
        output: stage_outputs("prepare")
        params: values=stage_params("prepare"), code=stage_code("prepare"), args=stage_args("prepare")
        log: log_path("prepare")
        threads: 1
        shell: "{EMAE} stage {params.args} > {log} 2>&1"


# The generated detection / segmentation set (COCO and ADE20K layouts) at dense_data.root.
if PIPELINE.stage_enabled("prepare_dense"):

    rule prepare_dense:
        output: stage_outputs("prepare_dense")
        params:
            values=stage_params("prepare_dense"), code=stage_code("prepare_dense"),
            args=stage_args("prepare_dense"),
        log: log_path("prepare_dense")
        threads: 1
        shell: "{EMAE} stage {params.args} > {log} 2>&1"
