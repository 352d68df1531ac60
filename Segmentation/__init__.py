"""ADE20K semantic segmentation with UperNet on the pre-trained ViT (native PyTorch, mmseg's recipe)."""
