"""Dense transfer of a pre-trained encoder: ViTDet-style adapter, Mask R-CNN detection /
instance segmentation (`emae detect`), UperNet-style semantic segmentation (`emae segment`),
and the generated COCO / ADE20K-format set they run on by default (`emae prepare-dense`)."""
