"""COCO detection and instance segmentation with ViTDet's plain-backbone Mask R-CNN (torchvision heads)."""
