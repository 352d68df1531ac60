"""Evaluation, one place for every caller: features of any layers x poolings and their distributed
gather (``features``), the classification evaluate (``classification``), weighted k-NN (``knn``),
linear heads (``heads``), logistic-regression probes (``probes``) and COCO detection metrics (``coco``)."""
