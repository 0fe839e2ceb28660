# Evaluations of each pre-trained run: results/<variant>/seed<seed>/<stage>/ (stages switched on in
# pipeline.stages). kNN, linear probe and fine-tuning read the exported encoder; consistency and
# reconstructions the full checkpoint (with the decoder); detect / segment (dense transfer) the encoder.
for _stage in ("knn", "linprobe", "finetune", "consistency", "visualize", "detect", "segment"):
    if not PIPELINE.stage_enabled(_stage):
        continue

    rule:
        name: _stage
        input: stage_inputs(_stage)
        output: stage_outputs(_stage)
        params: values=stage_params(_stage), code=stage_code(_stage), args=stage_args(_stage)
        log: log_path(_stage)
        threads: THREADS
        shell: THREAD_ENV + "{EMAE} stage {params.args} > {log} 2>&1"
