"""Downstream evaluation of a pre-trained encoder: kNN, linear probe, fine-tuning (on the encoder
export), prediction consistency and reconstruction grids (on the pre-training checkpoint).

Every command writes `metrics.json` (via `emae.io.write_json`) into its output folder; the keys are
listed in docs/evaluation.md.
"""
