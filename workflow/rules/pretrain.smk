# Pre-training of each variant x seed: runs/<variant>/seed<seed>/ (resumes from checkpoints/last.pt).
rule pretrain:
    input: stage_inputs("pretrain")
    output: stage_outputs("pretrain")
    params: values=stage_params("pretrain"), code=stage_code("pretrain"), args=stage_args("pretrain")
    log: log_path("pretrain")
    threads: THREADS
    priority: pretrain_priority
    shell: THREAD_ENV + "{EMAE} stage {params.args} > {log} 2>&1"
